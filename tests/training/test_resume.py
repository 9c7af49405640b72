"""Resuming: where the data goes on, and every rank agreeing on the checkpoint."""

import json
from pathlib import Path

import pytest

from tests.training.test_plan import _plan

REPO = Path(__file__).resolve().parents[2]


def test_resume_resume_position_starts_the_next_epoch_when_the_images_changed(
        capsys: pytest.CaptureFixture) -> None:
    from training.resume import data_state, resume_position

    plan = _plan(["a.png", "b.png", "c.png"], [0, 0, 1])
    state = {"epoch": 2, "index": 5, **data_state(plan)}
    assert state["num_images"] == 3
    same = _plan(["a.png", "b.png", "c.png"], [0, 0, 1])
    assert resume_position(state, same, Path("ckpt")) == (2, 5)
    for changed in (_plan(["a.png", "b.png", "c.png", "d.png"], [0, 0, 1, 0]),  # added
                    _plan(["a.png", "c.png"], [0, 1]),  # removed
                    _plan(["a.png", "b2.png", "c.png"], [0, 0, 1]),  # renamed
                    _plan(["a.png", "b.png", "c.png"], [0, 1, 1])):  # another bucket
        assert resume_position(state, changed, Path("ckpt")) == (3, 0)
    assert "ckpt: the training images differ" in capsys.readouterr().out
    # at an epoch boundary nothing is skipped or repeated: keep the position, say nothing
    assert resume_position({**state, "index": 0}, changed, Path("ckpt")) == (2, 0)
    # checkpoints from before the fingerprint was recorded keep their position
    version = {"schedule_version": state["schedule_version"]}
    assert resume_position({"epoch": 2, "index": 5, **version}, changed, Path("ckpt")) == (2, 5)
    assert capsys.readouterr().out == ""


def test_resume_resume_position_leaves_an_epoch_of_the_old_schedule(
        capsys: pytest.CaptureFixture) -> None:
    """A checkpoint saved mid-epoch by the schedule that dropped bucket remainders (no
    `schedule_version` recorded) continues at the next epoch of today's schedule, and says so;
    at an epoch boundary both schedules agree on where the epoch starts."""
    from training.resume import data_state, resume_position

    plan = _plan(["a.png", "b.png", "c.png"], [0, 0, 1])
    old = {"epoch": 2, "index": 5, **data_state(plan)}
    del old["schedule_version"]
    assert resume_position(old, plan, Path("ckpt")) == (3, 0)
    assert "ckpt was saved with an older batch schedule" in capsys.readouterr().out
    assert resume_position({**old, "index": 0}, plan, Path("ckpt")) == (2, 0)
    assert resume_position({"epoch": 2, "index": 5}, plan, Path("ckpt")) == (3, 0)


_RESUME_VIEWS = """
import json, shutil, sys
from pathlib import Path
import torch
from training.checkpoint import save_checkpoint
from training.config import Config, ConfigError
from training.distributed import barrier, setup, teardown
from training.resume import find_resume, state_for_json


root, cfg = Path(sys.argv[1]), Config()
info = setup("cpu")
if info.rank == 0:
    for step in (1, 2):
        save_checkpoint(root / "run", step, {"model": {"w": torch.zeros(1)}}, {},
                        state_for_json(cfg, step, 0, 0, 2, {}))
    shutil.copytree(root / "run", root / "stale")
    shutil.rmtree(root / "stale" / "checkpoints" / "step_0000002")
barrier()
errors = []
# rank 1 sees the same run, an older state of it (a lagging network filesystem), no run at all
for theirs in ("run", "stale", "missing"):
    try:
        found = find_resume(cfg, str(root / ("run" if info.rank == 0 else theirs)), 2)
        errors.append(["ok", found.name])
    except (ConfigError, FileNotFoundError) as exc:
        errors.append([type(exc).__name__, str(exc)])
(root / f"rank{info.rank}.json").write_text(json.dumps(errors))
teardown()
"""


def test_resume_find_resume_ranks_agree_on_the_checkpoint(tmp_path: Path) -> None:
    from tests.training.test_distributed import _two_ranks

    _two_ranks(_RESUME_VIEWS, tmp_path, 29541)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank ends the same way
    same, stale, missing = ranks[0]
    assert same == ["ok", "step_0000002"]
    assert stale[0] == "ConfigError" and "different checkpoints" in stale[1]
    assert "rank 1: " + str(tmp_path / "stale" / "checkpoints" / "step_0000001") in stale[1]
    assert missing[0] == "FileNotFoundError" and missing[1].startswith("rank 1 (")
    assert str(tmp_path / "missing") in missing[1]
