"""Tests for training/loop.py helpers that the stage tests do not exercise directly."""

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A training-like step: activations of several sizes, above glibc's largest mmap threshold and
# below it, live through the step and are freed together. Print the page faults of four steps
# after eight untimed ones (the heap settles within four).
_STEPS = """
import resource, sys, torch
from training.loop import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    activations = [torch.empty(mib << 20, dtype=torch.uint8).fill_(1)
                   for mib in (48, 16, 48, 16, 48, 16)]
    del activations
for _ in range(8):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _STEPS, mode], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or sys.platform != "linux",
                    reason="mallopt and page-fault counts are glibc/Linux specific")
def test_loop_keep_freed_memory_reuses_freed_blocks_without_page_faults():
    pages = (16 << 20) // 4096  # faults for one fresh 16 MiB block
    assert _faults("default") >= 4 * pages  # glibc unmaps and maps blocks every step
    assert _faults("keep") < pages // 10  # the freed blocks stay in the heap and are reused


def _plan(rels: list[str], buckets: list[int]):
    from bucketing import PlacementTable
    from training.image_table import ImageRecord, ImageTable
    from training.loop import DataPlan

    records = ImageTable.from_records("/data", [ImageRecord(f"/data/{r}", r, 64, 64, -1,
                                                            f"{i:064x}")
                                                for i, r in enumerate(rels)])
    grid = [(32, 32), (48, 16)]
    placements = PlacementTable(records, buckets, grid)
    return DataPlan(records, placements, grid, None, records.take([]), placements.take([]), [],
                    [])


def test_loop_fingerprint_hashes_each_path_with_its_bucket() -> None:
    import hashlib

    plan = _plan(["a.png", "sub/b.png", "caf\udce9.png"], [0, 1, 0])
    # as checkpoints have recorded it since it was introduced
    expected = hashlib.sha256(b"a.png\x0032x32\nsub/b.png\x0048x16\ncaf\xe9.png\x0032x32\n")
    assert plan.fingerprint() == expected.hexdigest()


def test_loop_resume_position_starts_the_next_epoch_when_the_images_changed(
        capsys: pytest.CaptureFixture) -> None:
    from training.loop import data_state, resume_position

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


def test_loop_resume_position_leaves_an_epoch_of_the_old_schedule(
        capsys: pytest.CaptureFixture) -> None:
    """A checkpoint saved mid-epoch by the schedule that dropped bucket remainders (no
    `schedule_version` recorded) continues at the next epoch of today's schedule, and says so;
    at an epoch boundary both schedules agree on where the epoch starts."""
    from training.loop import data_state, resume_position

    plan = _plan(["a.png", "b.png", "c.png"], [0, 0, 1])
    old = {"epoch": 2, "index": 5, **data_state(plan)}
    del old["schedule_version"]
    assert resume_position(old, plan, Path("ckpt")) == (3, 0)
    assert "ckpt was saved with an older batch schedule" in capsys.readouterr().out
    assert resume_position({**old, "index": 0}, plan, Path("ckpt")) == (2, 0)
    assert resume_position({"epoch": 2, "index": 5}, plan, Path("ckpt")) == (3, 0)


def test_loop_plan_data_gives_validation_images_the_training_labels(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from training.config import Config, ConfigError, from_dict
    from training.distributed import DistInfo
    from training.loop import plan_data

    rng = np.random.default_rng(0)
    for folder, classes in (("train", ("apples", "birds", "cars")), ("val", ("birds", "cars"))):
        for name in classes:
            (tmp_path / folder / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / folder / name / f"{i}.png")
    cfg = from_dict(Config, {"batch_size": 2, "data": {
        "dataset": str(tmp_path / "train"), "eval_dataset": str(tmp_path / "val"),
        "use_classes": True, "resolution": 32, "num_workers": 0}})
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    plan = plan_data(cfg, one)
    assert plan.class_names == ["apples", "birds", "cars"]
    # the validation folder's own class list is (birds, cars): labels 0, 1 there, 1, 2 here
    assert sorted(r.label for r in plan.eval_records) == [1, 1, 2, 2]
    (tmp_path / "val" / "dogs").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "val" / "dogs" / "0.png")
    with pytest.raises(ConfigError, match=r"validation classes \['dogs'\] are not among"):
        plan_data(cfg, one)
    (tmp_path / "empty").mkdir()
    cfg.data.eval_dataset = str(tmp_path / "empty")  # no silent run without validation
    with pytest.raises(ConfigError, match="empty: no usable validation image"):
        plan_data(cfg, one)


def test_loop_plan_data_lists_the_validation_folders_skipped_files(tmp_path: Path,
                                                                   capsys) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from training.config import Config, ConfigError, from_dict
    from training.distributed import DistInfo
    from training.loop import plan_data

    rng = np.random.default_rng(0)
    for folder in ("train", "val"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png")
    (tmp_path / "val" / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "tiny.png")
    cfg = from_dict(Config, {"batch_size": 2, "data": {
        "dataset": str(tmp_path / "train"), "eval_dataset": str(tmp_path / "val"),
        "resolution": 32, "num_workers": 0}})
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    plan = plan_data(cfg, one)
    assert len(plan.eval_records) == 2
    reasons = {Path(s.path).name: s.reason for s in plan.skipped}  # what skipped.json lists
    assert set(reasons) == {"broken.png", "tiny.png"}
    assert reasons["tiny.png"].startswith("too small or too thin: 8x8 covers no bucket")
    summary = f"{(tmp_path / 'val').resolve()}: 3 usable image(s), 1 skipped"
    assert summary in capsys.readouterr().out
    (tmp_path / "val" / "0.png").unlink()
    (tmp_path / "val" / "1.png").unlink()
    with pytest.raises(ConfigError, match="none of its 1 usable validation images covers a bucket"):
        plan_data(cfg, one)


def test_loop_lr_factor_warms_up_then_follows_the_schedule() -> None:
    import math

    from training.loop import lr_factor

    assert [lr_factor(s, 4, 100, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(0, 0, 100, "constant") == 1.0  # no warmup: the full rate from step 0
    assert lr_factor(4, 4, 104, "cosine") == 1.0  # cosine starts at the peak after warmup
    assert math.isclose(lr_factor(54, 4, 104, "cosine"), 0.55)  # halfway: (1 + 0.1) / 2
    assert math.isclose(lr_factor(104, 4, 104, "cosine"), 0.1)  # ends at 10 %
    assert math.isclose(lr_factor(500, 4, 104, "cosine"), 0.1)  # and stays there


_RESUME_VIEWS = """
import json, shutil, sys
from pathlib import Path
import torch
from training.checkpoint import save_checkpoint
from training.config import Config, ConfigError
from training.distributed import barrier, setup, teardown
from training.loop import find_resume, state_for_json

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


def test_loop_find_resume_ranks_agree_on_the_checkpoint(tmp_path: Path) -> None:
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


_DATA_VIEWS = """
import json, sys
from pathlib import Path
from training.config import Config, ConfigError, from_dict
from training.distributed import setup, teardown
from training.loop import plan_data

root = Path(sys.argv[1])
info = setup("cpu")
outcomes = []
# rank 1 sees the same folder, one with an extra image (still being copied in), none at all
for theirs in ("a", "b", "missing"):
    mine = "a" if info.rank == 0 else theirs
    cfg = from_dict(Config, {"batch_size": 1, "data": {
        "dataset": str(root / mine), "resolution": 32, "num_workers": 0}})
    try:
        outcomes.append(["ok", len(plan_data(cfg, info).records)])
    except (ConfigError, FileNotFoundError) as exc:
        outcomes.append([type(exc).__name__, str(exc)])
(root / f"rank{info.rank}.json").write_text(json.dumps(outcomes))
teardown()
"""


def test_loop_plan_data_ranks_agree_on_the_images(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from tests.training.test_distributed import _two_ranks

    rng = np.random.default_rng(0)
    for folder, count in (("a", 4), ("b", 5)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png")
    _two_ranks(_DATA_VIEWS, tmp_path, 29542)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank ends the same way
    same, extra, missing = ranks[0]
    assert same == ["ok", 4]
    assert extra[0] == "ConfigError" and "the ranks see different files" in extra[1]
    assert "rank 0: 4 images" in extra[1] and "rank 1: 5 images" in extra[1]
    assert missing[1].startswith("rank 1 (") and str(tmp_path / "missing") in missing[1]


def test_loop_step_rate_leaves_paused_time_out_and_restarts_each_window(monkeypatch) -> None:
    from training import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    rate = loop.StepRate(step=10)

    def advance(seconds: float) -> None:
        now[0] += seconds

    advance(1)
    with rate.waiting():  # 2 s waiting for a batch
        advance(2)
    with rate.pause():  # 5 s of checkpoint and validation, left out
        advance(5)
    advance(4)
    # 4 steps of 8 samples in 12 s of which 5 paused: 32 samples in 7 s, 2 of them waiting
    assert rate.scalars(14, 8) == {"train/samples_per_s": 32 / 7,
                                   "train/data_wait_fraction": 2 / 7}
    for _ in range(3):  # a `break` out of the pause (a stop request) still counts it
        with rate.pause():
            advance(10)
            break
    advance(2)
    assert rate.scalars(15, 8) == {"train/samples_per_s": 4.0, "train/data_wait_fraction": 0.0}


def test_loop_plan_data_trains_no_copy_of_a_validation_picture(tmp_path: Path,
                                                                capsys) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from training.config import Config, from_dict
    from training.distributed import DistInfo
    from training.loop import SCHEDULE_KEYS, plan_data

    rng = np.random.default_rng(0)
    for folder in ("train", "val"):
        (tmp_path / folder).mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "train" / f"{i}.png")
    for name in ("v.png", "v_again.png"):  # a picture twice in validation, once in training
        (tmp_path / "val" / name).write_bytes((tmp_path / "train" / "4.png").read_bytes())
    (tmp_path / "train" / "5_copy.png").write_bytes((tmp_path / "train" / "5.png").read_bytes())
    cfg = from_dict(Config, {"batch_size": 1, "data": {
        "dataset": str(tmp_path / "train"), "eval_dataset": str(tmp_path / "val"),
        "resolution": 32, "num_workers": 0}})
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    plan = plan_data(cfg, one)
    assert [r.rel for r in plan.eval_records] == ["v.png"]
    assert [r.rel for r in plan.records] == ["0.png", "1.png", "2.png", "3.png", "5.png"]
    out = capsys.readouterr().out
    assert "1 training image(s) are copies of validation images" in out
    assert "exact duplicates: 1 cop(ies) of 1 picture(s) folded" in out
    cfg.data.keep_duplicates = True
    plan = plan_data(cfg, one)
    assert len(plan.eval_records) == 2 and "4.png" not in [r.rel for r in plan.records]
    assert [r.rel for r in plan.records] == ["0.png", "1.png", "2.png", "3.png", "5.png",
                                             "5_copy.png"]
    assert "data.keep_duplicates" in SCHEDULE_KEYS  # a resumed run keeps its schedule
