"""Quality metrics during training (`training/quality.py`): FID/KID of the DiT's EMA samples
across a resume, training unchanged by them, the best step's record, and what happens without
or with a bad Inception file. Tiny runs with a random-weight Inception file and a few images
(the network costs ~0.15 s per image on a CPU). The stages' smoke tests check that FID (DiT)
and rFID (VAE) reach TensorBoard, on a GPU too; the DiT's torchrun test, that ranks share the
samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training import test_dit_stage
from tests.training.test_dit_stage import _scalars, _tiny_cfg, fid_settings
from training.dit_stage import train_dit
from training.quality import BEST_FILE, OFF_MESSAGE, BestFID, eval_mode, gather_rows


# the DiT tests' fixtures: a tiny VAE, the session's random-weight Inception file
tiny_vae, inception = test_dit_stage.tiny_vae, test_dit_stage.inception


def test_quality_dit_fid_goes_on_after_resume_and_leaves_training_unchanged(
        tmp_path: Path, tiny_vae: Path, inception: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("plain", "fid"):
        (tmp_path / name).mkdir()
    plain = train_dit(_tiny_cfg(tmp_path / "plain", tiny_vae, max_steps=2))
    assert capsys.readouterr().out.count(OFF_MESSAGE) == 1  # said once, and trained on
    assert not _scalars(plain, "quality/fid")

    cfg = _tiny_cfg(tmp_path / "fid", tiny_vae, max_steps=1, **fid_settings(inception))
    run = train_dit(cfg)
    assert "FID reference: 4 training images at 32x32\n" in capsys.readouterr().out
    cfg.train.max_steps = 2
    train_dit(cfg, resume=str(run))  # the schedule goes on; the reference comes from the cache
    assert "FID reference: 4 training images at 32x32 (from the cache)" in capsys.readouterr().out

    fids, kids = _scalars(run, "quality/fid"), _scalars(run, "quality/kid")
    assert sorted(fids) == sorted(kids) == [1, 2]
    assert all(math.isfinite(v) and v > 0 for v in fids.values())
    best = json.loads((run / BEST_FILE).read_text())
    assert best["step"] == min(fids, key=fids.get) and best["n"] == 4 and best["n_ref"] == 4
    assert best["fid"] == pytest.approx(fids[best["step"]], rel=1e-6)  # TensorBoard's float32
    assert best["size"] == "32x32"
    # Sampling, Inception and KID draw from no stream that training uses: the same losses and
    # bit-identical weights as the run without them.
    assert _scalars(run, "loss/train") == _scalars(plain, "loss/train")
    for group in ("model", "ema"):
        a, b = (load_file(r / "checkpoints" / "step_0000002" / f"{group}.safetensors")
                for r in (plain, run))
        assert all(torch.equal(a[k], b[k]) for k in a), group


@pytest.mark.parametrize("case", ["missing", "not_weights"])
def test_quality_refuses_a_bad_weights_file_in_one_line(tmp_path: Path, tiny_vae: Path,
                                                        error_line, case: str) -> None:
    from train import main

    bad = tmp_path / "inception.pth"
    if case == "not_weights":
        torch.save({"conv.weight": torch.zeros(3)}, bad)
    cfg = _tiny_cfg(tmp_path, tiny_vae, max_steps=1)
    config = tmp_path / "c.json"
    assert main(["--config", str(config), "--inception", str(bad)]) == 2
    line = error_line()
    assert str(bad) in line and "train.inception" in line
    assert not Path(cfg.run_dir).exists()  # refused before any work


def test_quality_best_fid_keeps_the_lowest_and_forgets_a_dropped_branch(tmp_path: Path) -> None:
    best = BestFID(tmp_path, 0)
    assert best.offer({"step": 10, "fid": 5.0}) and not best.offer({"step": 20, "fid": 6.0})
    assert json.loads((tmp_path / BEST_FILE).read_text())["step"] == 10
    assert BestFID(tmp_path, 10).best["step"] == 10  # resumed at or after it: kept
    again = BestFID(tmp_path, 5)  # resumed before it: that step is no longer this run's
    assert again.best is None and again.offer({"step": 6, "fid": 9.0})
    assert not list(tmp_path.glob(".*tmp"))  # written through a renamed temporary file


def test_quality_eval_mode_restores_each_modules_mode() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    model[1].eval()  # a sub-module in another mode than its parent
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
    rows = torch.ones(3, 2, dtype=torch.float64)
    assert gather_rows(rows, 3, torch.device("cpu")) is rows  # one process: its own rows
    assert gather_rows(rows[:2], 3, torch.device("cpu")) is None  # stopped early
