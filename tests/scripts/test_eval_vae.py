"""scripts/eval_vae.py: the curve of a run's TensorBoard scalars, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import save_vae
from scripts import eval_vae


def _run(folder: Path, steps: dict[int, dict[str, float]]) -> Path:
    """A run folder whose tb/ holds `steps` (step -> scalars), as training logs them."""
    from tests.scripts.test_loss_curves import _log

    return _log(folder, steps)


def test_eval_vae_curve_reads_psnr_and_ssim_per_step(tmp_path: Path, capsys) -> None:
    run = _run(tmp_path / "vae_run", {1: {"loss/rec": 0.3},
                                      2: {"loss/rec": 0.2, "eval/psnr": 21.5, "eval/ssim": 0.61},
                                      4: {"loss/rec": 0.1, "eval/psnr": 23.25, "eval/ssim": 0.7}})
    assert eval_vae.main(["--curve", str(run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["step"], r["psnr"], r["ssim"]) for r in result["curve"]] == [
        (2, 21.5, 0.61), (4, 23.25, 0.7)]


def test_eval_vae_curve_of_a_resumed_run_leaves_out_the_abandoned_branch(tmp_path: Path,
                                                                         capsys) -> None:
    run = tmp_path / "vae_run"
    # evaluated at 250, 500 and 750, then resumed from the checkpoint at step 500
    _run(run, {step: {"loss/rec": 0.3, "eval/psnr": 20.0 + step / 250, "eval/ssim": 0.5}
               for step in (250, 500, 750)})
    _run(run, {600: {"loss/rec": 0.2}, 750: {"loss/rec": 0.2, "eval/psnr": 23.5,
                                             "eval/ssim": 0.6}})
    assert eval_vae.main(["--curve", str(run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["step"], r["psnr"], r["ssim"]) for r in result["curve"]] == [
        (250, 21.0, 0.5), (500, 22.0, 0.5), (750, 23.5, 0.6)]


def test_eval_vae_curve_minutes_leave_out_the_time_between_processes(tmp_path: Path,
                                                                    capsys) -> None:
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "vae_run"
    t0 = 1.7e9
    # a process evaluates at 250, 500 and 750, a minute apart; an hour later another resumes
    # from the checkpoint at step 500 and evaluates at 750, 30 s after its first loss
    for logged in ({250: 60, 500: 120, 750: 180}, {600: 3630, 750: 3660}):
        writer = SummaryWriter(str(run / "tb"))
        for step, seconds in logged.items():
            writer.add_scalar("loss/rec", 0.1, step, walltime=t0 + seconds)
            if step % 250 == 0:
                writer.add_scalar("eval/psnr", 20.0 + step / 250, step, walltime=t0 + seconds)
                writer.add_scalar("eval/ssim", 0.5, step, walltime=t0 + seconds)
        writer.close()
    assert eval_vae.main(["--curve", str(run)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 750: the first process's minute up to step 500, then the second's 30 s
    assert [(r["step"], r["minutes"]) for r in result["curve"]] == [(250, 0.0), (500, 1.0),
                                                                    (750, 1.5)]


@pytest.mark.parametrize("scalars, phrase", [
    ({1: {"loss/train": 1.0}, 2: {"loss/val": 0.9}},
     "no loss/rec, val/psnr, val/ssim scalars; it looks like a DiT run"),
    ({1: {"loss/rec": 0.3}}, "no val/psnr, val/ssim scalars; it looks like a VAE run that has "
                             "not been evaluated yet"),
], ids=["dit-run", "vae-run-before-eval"])
def test_eval_vae_curve_without_vae_scalars_is_one_line_error(
        tmp_path: Path, error_line, scalars: dict, phrase: str) -> None:
    run = _run(tmp_path / "run", scalars)
    assert eval_vae.main(["--curve", str(run)]) == 2
    assert error_line().startswith(f"error: {run}: {phrase}")


def test_eval_vae_curve_without_events_is_one_line_error(tmp_path: Path, error_line) -> None:
    assert eval_vae.main(["--curve", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no TensorBoard events file" in error_line()


@pytest.mark.parametrize("flags, phrase", [
    (["--vae", "{tmp}/missing"], "{tmp}/missing: VAE not found"),
    (["--crop", "0"], "--crop 0: must be a positive multiple of the VAE's downsampling factor"),
    (["--crop", "-8"], "--crop -8: must be a positive multiple"),
    (["--crop", "31"], "--crop 31: must be a positive multiple of 2, the downsampling factor"),
    (["--limit", "0"], "--limit 0: must be positive"),
    (["--dataset", "{tmp}/missing"], "{tmp}/missing: dataset folder not found"),
    (["--dataset", "{tmp}/empty"], "{tmp}/empty: no usable image to evaluate"),
], ids=["vae-missing", "crop-zero", "crop-negative", "crop-not-multiple", "limit-zero",
        "dataset-missing", "dataset-empty"])
def test_eval_vae_bad_input_is_one_line_error(tmp_path: Path, capsys, error_line,
                                              flags: list[str], phrase: str) -> None:
    torch.manual_seed(0)
    save_vae(AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                     latent_channels=4, layers_per_block=1, sample_size=32,
                                     mid_block_add_attention=False)), tmp_path / "vae")
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    (tmp_path / "empty").mkdir()
    args = ["--vae", str(tmp_path / "vae"), "--dataset", str(images), "--crop", "32"]
    assert eval_vae.main([*args, *(f.format(tmp=tmp_path) for f in flags)]) == 2
    assert phrase.format(tmp=tmp_path) in error_line()
    assert eval_vae.main(args) == 0  # the same call without the bad flag works
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["crops"] == 1
