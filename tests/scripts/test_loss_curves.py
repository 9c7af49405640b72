"""scripts/loss_curves.py on real TensorBoard files written by the training logger."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import loss_curves
from training.logging import RunLogger

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _log(folder: Path, steps: dict[int, dict[str, float]]) -> Path:
    """One training process's events file in `folder`/tb: `steps` (step -> scalars)."""
    logger = RunLogger(folder, True)
    for step, values in steps.items():
        logger.scalars(values, step)
    logger.close()
    return folder


def _curves(capsys, *args: str) -> dict:
    assert loss_curves.main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _run(folder: Path, losses: list[float], tags: tuple[str, str] = ("loss/train", "loss/val")
         ) -> Path:
    logger = RunLogger(folder, True)
    for step, loss in enumerate(losses, start=1):
        logger.scalars({tags[0]: loss}, step)
    logger.scalars({tags[1]: losses[-1]}, len(losses))
    logger.close()
    return folder


def test_loss_curves_bins_and_compares_runs(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", [4.0, 2.0, 3.0, 1.0, 5.0])
    b = _run(tmp_path / "b", [1.0] * 4, ("train/loss", "val/loss"))  # logged as before 2026-12
    done = subprocess.run([sys.executable, "scripts/loss_curves.py", str(a), str(b), "--every",
                           "2"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # means over (0, 2], (2, 4] and the last logged step
    assert report[str(a)]["loss/train"]["curve"] == [[2, 3.0], [4, 2.0], [5, 5.0]]
    assert report[str(a)]["loss/train"]["mean"] == 3.0
    assert report[str(a)]["loss/val"]["curve"] == [[5, 5.0]]
    assert report[str(b)]["loss/train"]["curve"] == [[2, 1.0], [4, 1.0]]


def test_loss_curves_bins_end_at_multiples_of_every(tmp_path: Path, capsys) -> None:
    # logged every 10 steps, reported every 25: each point is the mean over (end - 25, end]
    run = _log(tmp_path / "a", {step: {"loss/train": float(step)} for step in range(10, 111, 10)})
    report = _curves(capsys, str(run), "--tags", "loss/train", "--every", "25")
    assert report[str(run)]["loss/train"]["curve"] == [
        [25, 15.0], [50, 40.0], [75, 65.0], [100, 90.0], [110, 110.0]]


@pytest.mark.parametrize("names", ["as-created", "swapped"])
def test_loss_curves_resumed_run_leaves_out_the_abandoned_branch(tmp_path: Path, capsys,
                                                                names: str) -> None:
    run = tmp_path / "run"
    # trained to step 80, then resumed from its checkpoint at step 50 and trained to step 70
    _log(run, {step: {"loss/train": 1.0} for step in range(10, 81, 10)})
    _log(run, {step: {"loss/train": 0.5} for step in (60, 70)})
    if names == "swapped":  # names out of creation order (as a same-second pid wrap gives)
        old, new = sorted((run / "tb").iterdir())
        old.rename(tmp_path / "old")
        new.rename(old)
        (tmp_path / "old").rename(new)
    report = _curves(capsys, str(run), "--tags", "loss/train", "--every", "10")
    assert report[str(run)]["loss/train"] == {
        "curve": [[10, 1.0], [20, 1.0], [30, 1.0], [40, 1.0], [50, 1.0], [60, 0.5], [70, 0.5]],
        "mean": round(6 / 7, 5)}


def test_loss_curves_missing_events_is_one_line_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "scripts/loss_curves.py", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip() == f"error: {tmp_path}/tb holds no TensorBoard events file"


@pytest.mark.parametrize("every", ["0", "-5"])
def test_loss_curves_non_positive_every_is_one_line_error(tmp_path: Path, capsys,
                                                          every: str) -> None:
    run = _run(tmp_path / "a", [4.0, 2.0])
    assert loss_curves.main([str(run), "--every", every]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --every {every}: must be a positive number of steps"


def test_loss_curves_missing_run_is_one_line_error_before_reading(tmp_path: Path,
                                                                  capsys) -> None:
    run = _run(tmp_path / "a", [4.0, 2.0])
    assert loss_curves.main([str(run), str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {tmp_path / 'nope'}: run folder not found"
    assert captured.out == ""  # refused before the first run was read or anything printed
