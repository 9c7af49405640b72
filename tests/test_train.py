"""The train.py command line: help, dry run, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=env)


def test_train_help_lists_every_flag_with_default() -> None:
    out = _train("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in ("--config", "--stage", "--dataset", "--run-dir", "--resolution", "--batch-size",
                 "--seed", "--num-workers", "--classes", "--dry-run"):
        assert flag in text
    assert text.count("default:") >= 10
    # the defaults shown are configs/default.json's, which apply, not the dataclasses'
    defaults = json.loads((REPO_ROOT / "configs" / "default.json").read_text())
    assert f"data.resolution; default: {defaults['data']['resolution']})" in text
    assert f"train.max_steps; default: {defaults['train']['max_steps']})" in text


def test_train_dry_run_prints_buckets_and_plan(tmp_path: Path) -> None:
    out = _train("--dataset", "synthetic:24", "--resolution", "128", "--batch-size", "4",
                 "--classes", "--holdout", "4", "--dry-run", "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert "24 usable image(s)" in out.stdout
    assert "4 classes" in out.stdout
    assert "training on 20 image(s), validating on 4" in out.stdout  # as training splits them
    assert "crop loss" in out.stdout and "epoch 0:" in out.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    # what training refuses, the dry run refuses: 8 images left after the default holdout
    out = _train("--dataset", "synthetic:24", "--resolution", "128", "--batch-size", "12",
                 "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip().endswith("of the 8 left for training after data.holdout=16; "
                                       "lower --batch-size or --holdout"), out.stderr


def test_train_unknown_config_key_fails_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "typo.json"
    cfg.write_text(json.dumps({"description": "x", "batchsize": 4}))
    out = _train("--config", str(cfg), "--dry-run")
    assert out.returncode == 2
    assert "batchsize" in out.stderr and "typo.json" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_train_missing_dataset_fails_with_one_line(tmp_path: Path) -> None:
    out = _train("--dataset", str(tmp_path / "nowhere"), "--dry-run")
    assert out.returncode == 2
    assert "nowhere" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_train_dataset_without_usable_images_fails(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jpg").write_text("not a picture")
    out = _train("--dataset", str(tmp_path / "data"), "--dry-run")
    assert out.returncode == 2
    assert "no usable image" in out.stderr
    assert "a.jpg" in out.stdout  # the skip list names the file and the reason


def test_train_synthetic_quickstart_end_to_end(tmp_path: Path) -> None:
    """The README's quickstart with the default config, shrunk to a tiny VAE and DiT."""
    import torch

    from models.vae import AutoencoderKL, VAEConfig
    from models.vae_weights import save_vae

    torch.manual_seed(0)
    vae = save_vae(AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                           latent_channels=4, sample_size=64,
                                           force_upcast=False)), tmp_path / "vae")
    run = tmp_path / "run"
    out = _train("--dataset", "synthetic:32", "--classes", "--model", "dit-t/2", "--vae",
                 str(vae), "--resolution", "32", "--batch-size", "2", "--max-steps", "3",
                 "--holdout", "4", "--sample-every", "3", "--eval-every", "3",
                 "--run-dir", str(run), "--num-workers", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["dit"]["model"] == "dit-t/2" and config["data"]["use_classes"] is True
    assert (run / "checkpoints" / "step_0000003" / "state.json").exists()
    samples = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert samples == ["step_0000003_32x32.png"]  # previews at the run's own buckets
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_train_resume_continues_the_run_as_saved(tmp_path: Path) -> None:
    """`--resume CHECKPOINT` and `--run-dir RUN --resume` (the README's command) take the config
    saved with the checkpoint, change only what the flags say, and continue in that run's folder;
    a new batch schedule is refused."""
    run = tmp_path / "run"
    cfg = {"description": "tiny VAE", "stage": "vae", "run_dir": str(run), "seed": 1,
           "batch_size": 2,
           "data": {"dataset": "synthetic:12", "resolution": 32, "num_workers": 0, "holdout": 2},
           "train": {"max_steps": 2, "lr": 2e-3, "log_every": 1, "eval_every": 1000,
                     "ckpt_every": 1, "sample_every": 1000, "precision": "fp32",
                     "device": "cpu"},
           "vae": {"block_out_channels": [8, 16], "norm_num_groups": 4, "latent_channels": 4,
                   "disc_start": 1, "disc_warmup": 1, "disc_ramp": 2, "disc_channels": 8,
                   "disc_layers": 2, "eval_crop": 32, "eval_images": 2, "scale_images": 4}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert _train("--config", str(tmp_path / "c.json")).returncode == 0
    saved = json.loads((run / "config.json").read_text())
    env = {**os.environ, "LDM_RUNS_DIR": str(tmp_path / "runs")}  # where a default would go

    out = _train("--resume", str(run / "checkpoints" / "step_0000002"), "--max-steps", "3",
                 env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    state = json.loads((run / "checkpoints" / "step_0000003" / "state.json").read_text())
    assert state["config"] == {**saved, "train": {**saved["train"], "max_steps": 3}}
    assert json.loads((run / "config.json").read_text()) == state["config"]
    assert not (tmp_path / "runs").exists()

    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    out = _train("--run-dir", str(run), "--resume", "--batch-size", "4", "--max-steps", "5",
                 env=env)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "global batch (batch_size × processes) 2 -> 4" in out.stderr  # 2: the saved one
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert json.loads((run / "config.json").read_text()) == state["config"]


def test_train_command_line_paths_are_relative_to_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train import build_parser, resolve_config
    from training.config import REPO_ROOT, Config, from_dict, portable_config

    monkeypatch.chdir(tmp_path)
    for name in ("LDM_DATASET", "LDM_RUNS_DIR"):
        monkeypatch.delenv(name, raising=False)
    parser = build_parser(from_dict(Config, {}))
    cfg, _ = resolve_config(parser.parse_args(["--dataset", "data", "--run-dir", "runs/r",
                                               "--vae", "~/v"]))
    assert cfg.data.dataset == str(tmp_path / "data")
    assert cfg.run_dir == str(tmp_path / "runs" / "r")
    assert cfg.dit.vae == str(Path("~/v").expanduser())
    # configs/default.json's "vae" is the repository's, from any folder, and is saved as such
    cfg, _ = resolve_config(parser.parse_args(["--dataset", "synthetic:8"]))
    assert cfg.dit.vae == str(REPO_ROOT / "vae") and cfg.data.dataset == "synthetic:8"
    assert portable_config(cfg).dit.vae == "vae"


def test_train_ldm_dataset_fills_in_only_where_no_dataset_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train import build_parser, resolve_config
    from training.config import Config, from_dict

    monkeypatch.setenv("LDM_DATASET", "synthetic:8")
    parser = build_parser(from_dict(Config, {}))
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"data": {"dataset": str(tmp_path / "photos")}}))
    named = parser.parse_args(["--config", str(mine)])
    assert resolve_config(named)[0].data.dataset == str(tmp_path / "photos")  # the file's own
    shipped = parser.parse_args([])  # configs/default.json names no dataset
    assert resolve_config(shipped)[0].data.dataset == "synthetic:8"
    flag = parser.parse_args(["--config", str(mine), "--dataset", "synthetic:4"])
    assert resolve_config(flag)[0].data.dataset == "synthetic:4"


def test_train_ldm_inception_fills_in_where_no_weights_are_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from train import build_parser, resolve_config
    from training.config import Config, from_dict, portable_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_INCEPTION", "weights/pt.pth")  # from the current folder
    parser = build_parser(from_dict(Config, {}))
    shipped = resolve_config(parser.parse_args(["--dataset", "synthetic:8"]))[0]
    assert shipped.train.inception == str(tmp_path / "weights" / "pt.pth")
    assert portable_config(shipped).train.inception == str(tmp_path / "weights" / "pt.pth")
    flag = parser.parse_args(["--dataset", "synthetic:8", "--inception", "other.pth"])
    assert resolve_config(flag)[0].train.inception == str(tmp_path / "other.pth")
    monkeypatch.delenv("LDM_INCEPTION")
    assert resolve_config(parser.parse_args(["--dataset", "synthetic:8"]))[0].train.inception == ""


def test_train_boolean_flags_turn_off_and_out_needs_export() -> None:
    from train import build_parser, resolve_config
    from training.config import Config, from_dict

    parser = build_parser(from_dict(Config, {}))
    off = parser.parse_args(["--dataset", "synthetic:8", "--no-compile", "--no-classes"])
    cfg, _ = resolve_config(off)
    assert cfg.train.compile is False and cfg.data.use_classes is False
    assert parser.parse_args(["--compile"]).compile is True
    assert parser.parse_args([]).compile is None  # not given: the config's value stays
    out = _train("--out", "somewhere")
    assert out.returncode == 2 and "--out is where --export writes" in out.stderr
    out = _train("--export", "somewhere", "--max-steps", "5", "--dry-run")
    assert out.returncode == 2
    assert "--export takes only --out and --vae; --max-steps, --dry-run would be" in out.stderr


def test_train_dit_flags_are_refused_for_the_vae_stage() -> None:
    from train import build_parser, resolve_config
    from training.config import Config, ConfigError, from_dict

    parser = build_parser(from_dict(Config, {}))
    args = parser.parse_args(["--stage", "vae", "--dataset", "synthetic:8", "--model", "dit-b/2",
                              "--no-compile"])
    with pytest.raises(ConfigError, match="--model, --compile: DiT-stage flags"):
        resolve_config(args)


def test_train_dry_run_reports_exact_duplicates(tmp_path: Path) -> None:
    from PIL import Image

    from train import build_parser, resolve_config
    from training.config import Config, from_dict

    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 36), (40 * i, 0, 0)).save(data / f"{i}.png")
    for name in ("0_copy.png", "0_again.png"):
        (data / name).write_bytes((data / "0.png").read_bytes())
    out = _train("--dataset", str(data), "--resolution", "32", "--batch-size", "2", "--holdout",
                 "0", "--num-workers", "0", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "exact duplicates: 2 cop(ies) of 1 picture(s) folded" in out.stdout  # the table
    assert "exact duplicates: 2 cop(ies) of 1 picture(s) folded: each picture is used once" \
        in out.stdout  # the scan's summary
    assert ("training on 6 image(s), validating on 0; 2 exact duplicate(s) of 1 picture(s) "
            "folded") in out.stdout
    parser = build_parser(from_dict(Config, {}))
    cfg, _ = resolve_config(parser.parse_args(["--dataset", str(data), "--keep-duplicates"]))
    assert cfg.data.keep_duplicates is True
