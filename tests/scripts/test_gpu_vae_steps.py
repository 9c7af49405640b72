"""scripts/gpu_vae_steps.py: one-line refusals before any work, and the timed VAE stage on the
CPU with a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import gpu_vae_steps
from training.config import load_config
from training.synthetic import make_synthetic

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CONFIG = str(REPO_ROOT / "configs" / "vae_f8c16_gpu.json")


@pytest.mark.parametrize("flags, phrase", [
    (["--seconds", "0"], "--seconds 0.0: must be a positive, finite number"),
    (["--seconds", "nan"], "--seconds nan: must be a positive, finite number"),
    (["--seconds", "inf"], "--seconds inf: must be a positive, finite number"),
    (["--fraction", "0"], "--fraction 0.0: must lie in (0, 1]"),
    (["--fraction", "1.5"], "--fraction 1.5: must lie in (0, 1]"),
    (["--config", "{tmp}/missing.json"], "{tmp}/missing.json: config file not found"),
    (["--config", str(REPO_ROOT / "configs" / "default.json")],
     f"{REPO_ROOT / 'configs' / 'default.json'}: a dit config; this script times the VAE stage"),
    (["--dataset", "{tmp}/missing"], "{tmp}/missing: dataset folder not found"),
    (["--eval-dataset", "{tmp}/missing"], "{tmp}/missing: dataset folder not found"),
], ids=["seconds-zero", "seconds-nan", "seconds-inf", "fraction-zero", "fraction-above-one",
        "config-missing", "config-dit", "dataset-missing", "eval-dataset-missing"])
def test_gpu_vae_steps_bad_input_is_one_line_error(tmp_path: Path, capsys, flags: list[str],
                                                   phrase: str) -> None:
    args = ["--config", CONFIG, "--dataset", str(tmp_path), "--seconds", "60"]
    assert gpu_vae_steps.main([*args, *(f.format(tmp=tmp_path) for f in flags)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {phrase.format(tmp=tmp_path)}"


def test_gpu_vae_steps_times_past_the_loader_queue() -> None:
    cfg = load_config(CONFIG)  # 14 workers with 4 batches each queued: 56 batches
    queue = cfg.data.num_workers * gpu_vae_steps.PREFETCH
    warm, timed = gpu_vae_steps.timing_plan(cfg)
    assert warm >= queue and timed >= 2 * queue
    assert warm % cfg.train.log_every == 0 and timed % cfg.train.log_every == 0


@pytest.mark.parametrize("vae", [{}, {"disc_start": 50, "disc_channels": 8, "disc_layers": 2}],
                         ids=["autoencoder", "with-discriminator"])
def test_gpu_vae_steps_times_the_real_stage_on_cpu(tmp_path: Path, capsys, vae: dict) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "description": "tiny VAE", "stage": "vae", "run_dir": str(tmp_path / "run"), "seed": 1,
        "batch_size": 2, "data": {"resolution": 32, "num_workers": 1},
        "train": {"max_steps": 100, "log_every": 2, "precision": "fp32", "device": "cpu"},
        "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4, "latent_channels": 4,
                "eval_crop": 32, **vae}}))
    held_out = make_synthetic(tmp_path / "held_out", 3, seed=5)
    assert gpu_vae_steps.main(["--config", str(config), "--dataset", "synthetic:12",
                               "--eval-dataset", str(held_out), "--seconds", "60"]) == 0
    out = capsys.readouterr().out
    assert f"{held_out}: 3 usable image(s)" in out  # the timing run loads the real run's folder
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps_timed"] >= 2 * gpu_vae_steps.PREFETCH  # past one worker's queue
    assert result["step_s"] > 0 and 0 <= result["data_wait_fraction"] <= 1
    assert result["batch"] == 2 and result["max_steps"] >= 100
    assert result["max_steps"] % 100 == 0
    assert not (tmp_path / "run").exists()  # timed in a temporary run folder
