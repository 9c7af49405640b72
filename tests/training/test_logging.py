"""TensorBoard logging (training/logging.py) into real event files, read back as TensorBoard
reads them."""

from __future__ import annotations

from pathlib import Path

from training.logging import RunLogger


def test_logging_resumed_run_shows_one_value_per_step(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = RunLogger(tmp_path)  # saved a checkpoint at step 5, logged to 10, then was killed
    for step in range(1, 11):
        first.scalars({"train/loss": float(step)}, step)
    first.close()
    resumed = RunLogger(tmp_path, resumed_step=5)
    for step in range(6, 9):
        resumed.scalars({"train/loss": 100.0 + step}, step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    series = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert series == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 106.0),
                      (7, 107.0), (8, 108.0)]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2
