"""Quality metrics during training (`training/quality.py`): a bad Inception file, the best
step's record, and the parts that keep training unchanged.

The runs that measure them are the stages' own tests, with a random-weight Inception file and a
few images (the network costs ~0.15 s per image on a CPU): the smoke tests check that FID/KID
(DiT) and rFID (VAE) reach TensorBoard, on a GPU too; the DiT's exact-resume test, that a run
measuring FID across a SIGTERM and a resume trains exactly as one without, keeps its schedule,
reads the reference from the cache, says once when the weights are missing, and keeps the best
step in best_fid.json; its torchrun test, that two ranks sharing the samples give one rank's
FID."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.test_dit_stage import _tiny_cfg
from training.quality import BEST_FILE, BestFID, eval_mode, gather_rows




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
