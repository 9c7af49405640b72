import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    set_aside_newer,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tiny(step: int) -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.full((3,), float(step))}}


def _steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_checkpoint_round_trip_resumes_optimizer_exactly(tmp_path, assert_shared_mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def step(m, o, s):
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()
        s.step()

    step(model, opt, sched)
    shared = torch.randn(3, 3)
    extras = {
        "tied_a": shared,
        "tied_b": shared,  # the same tensor twice, as with tied embeddings
        "transposed": torch.randn(2, 5).t(),  # non-contiguous
        "half": torch.randn(4).bfloat16(),
        "count": torch.tensor([7], dtype=torch.int64),
    }
    state = {"epoch": 2, "batch_index": 5, "config": {"lr": 1e-2, "name": "tiny"}}
    path = save_checkpoint(
        tmp_path,
        1,
        {"model": model.state_dict(), "extras": extras},
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
        state,
    )
    assert path == tmp_path / "checkpoints" / "step_0000001"
    assert sorted(p.name for p in path.iterdir()) == [
        "extras.safetensors",
        "model.safetensors",
        "optim.pt",
        "state.json",
    ]
    assert_shared_mode(*path.iterdir())
    assert set(torch.load(path / "optim.pt", weights_only=True)) == {"optimizer", "scheduler"}

    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path and ckpt.step == 1
    assert ckpt.state == {**state, "step": 1}
    for key, value in extras.items():
        assert ckpt.tensors["extras"][key].dtype == value.dtype
        assert torch.equal(ckpt.tensors["extras"][key], value)

    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    fresh.load_state_dict(ckpt.tensors["model"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: min(1.0, (s + 1) / 10))
    fresh_opt.load_state_dict(ckpt.torch_state["optimizer"])
    fresh_sched.load_state_dict(ckpt.torch_state["scheduler"])
    step(model, opt, sched)
    step(fresh, fresh_opt, fresh_sched)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_keep_last_deletes_only_older_complete_ones(tmp_path):
    incomplete = tmp_path / "checkpoints" / "step_0000000"
    incomplete.mkdir(parents=True)
    for s in range(1, 6):
        save_checkpoint(tmp_path, s, _tiny(s), {}, {}, keep_last=3)
        assert _steps(tmp_path)[-1] == s
    assert _steps(tmp_path) == [3, 4, 5]
    assert incomplete.is_dir()  # not a complete checkpoint: not ours to delete

    # the same step again replaces it, and only once the new one is complete
    save_checkpoint(tmp_path, 5, _tiny(50), {}, {}, keep_last=0)
    assert _steps(tmp_path) == [3, 4, 5]
    assert load_checkpoint(tmp_path).tensors["model"]["w"][0] == 50
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000000", "step_0000003", "step_0000004", "step_0000005"]


def test_checkpoint_rollback_sets_newer_ones_aside(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for s in (2, 4, 6):
        save_checkpoint(tmp_path, s, _tiny(s), {}, {}, keep_last=3)
    # a step below the newest would not be the one --resume picks next: refused, nothing written
    with pytest.raises(ValueError, match="step 3 below the newest checkpoint step_0000006"):
        save_checkpoint(tmp_path, 3, _tiny(3), {}, {}, keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002", "step_0000004",
                                                       "step_0000006"]

    # continuing from step 2 first moves the newer ones, unchanged, to a run-like folder
    moved = set_aside_newer(ckpts / "step_0000002")
    aside = moved[0].parent.parent
    assert aside.parent == tmp_path / "set_aside" and aside.name.endswith("_after_step_0000002")
    assert moved == [aside / "checkpoints" / "step_0000004", aside / "checkpoints" / "step_0000006"]
    assert load_checkpoint(aside).tensors["model"]["w"][0] == 6
    assert set_aside_newer(ckpts / "step_0000002") == []

    # the new branch is then the newest, and pruning reaches only checkpoints/
    for s in (3, 4, 5):
        save_checkpoint(tmp_path, s, _tiny(100 + s), {}, {}, keep_last=4)
    assert _steps(tmp_path) == [2, 3, 4, 5]
    assert load_checkpoint(tmp_path).tensors["model"]["w"][0] == 105
    save_checkpoint(tmp_path, 6, _tiny(106), {}, {}, keep_last=2)
    assert _steps(tmp_path) == [5, 6] and _steps(aside) == [4, 6]

    # a second roll-back to the same step (within the same second, here) gets its own folder
    save_checkpoint(tmp_path, 7, _tiny(107), {}, {}, keep_last=0)
    again = set_aside_newer(ckpts / "step_0000005")[0].parent.parent
    assert set_aside_newer(ckpts / "step_0000005") == []
    save_checkpoint(tmp_path, 6, _tiny(206), {}, {}, keep_last=0)
    third = set_aside_newer(ckpts / "step_0000005")[0].parent.parent
    assert len({aside, again, third}) == 3 and _steps(again) == [6, 7] and _steps(third) == [6]


def test_checkpoint_missing_tensor_group_is_named(tmp_path):
    tensors = {"model": {"w": torch.zeros(2)}, "ema": {"w": torch.ones(2)}}
    path = save_checkpoint(tmp_path, 1, tensors, {}, {})
    (path / "ema.safetensors").unlink()
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.group("model")["w"], torch.zeros(2))
    with pytest.raises(FileNotFoundError, match=r"step_0000001/ema\.safetensors: missing"):
        ckpt.group("ema")


def test_checkpoint_ignores_temporary_and_incomplete_folders(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(tmp_path)
    save_checkpoint(tmp_path, 2, _tiny(2), {}, {})
    dead = _dead_pid()
    for name in (f".tmp-step_0000009-{dead}", f".tmp-step_0000008-{os.getpid()}", "step_0000007"):
        (ckpts / name).mkdir()
        (ckpts / name / "model.safetensors").write_bytes(b"partial")
    (ckpts / f".tmp-step_0000009-{dead}" / "state.json").write_text("{}")

    assert list_checkpoints(tmp_path) == [ckpts / "step_0000002"]
    assert latest_checkpoint(tmp_path) == ckpts / "step_0000002"
    assert resolve_resume(tmp_path) == resolve_resume(ckpts) == ckpts / "step_0000002"
    assert resolve_resume(ckpts / "step_0000002") == ckpts / "step_0000002"
    with pytest.raises(FileNotFoundError, match="step_0000007.*incomplete"):
        resolve_resume(ckpts / "step_0000007")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_resume(ckpts / f".tmp-step_0000009-{dead}")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")

    # the next save removes the dead process's folder, keeps the live one's and step_0000007
    save_checkpoint(tmp_path, 3, _tiny(3), {}, {})
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [
        f".tmp-step_0000008-{os.getpid()}",
        "step_0000002",
        "step_0000003",
        "step_0000007",
    ]


def test_checkpoint_moved_aside_by_a_dead_process_is_put_back(tmp_path):
    ckpts = tmp_path / "checkpoints"
    save_checkpoint(tmp_path, 4, _tiny(4), {}, {}, keep_last=0)
    save_checkpoint(tmp_path, 5, _tiny(5), {}, {}, keep_last=0)
    dead = _dead_pid()
    # killed after moving step 4 aside to overwrite it, before renaming the new one in
    os.rename(ckpts / "step_0000004", ckpts / f".old-step_0000004-{dead}")
    assert _steps(tmp_path) == [5]
    save_checkpoint(tmp_path, 6, _tiny(6), {}, {}, keep_last=0)
    assert _steps(tmp_path) == [4, 5, 6]
    assert load_checkpoint(ckpts / "step_0000004").tensors["model"]["w"][0] == 4


_CHILD = textwrap.dedent(
    """
    import sys, time
    import safetensors.torch
    import torch
    from training.checkpoint import save_checkpoint

    run_dir = sys.argv[1]
    save_checkpoint(run_dir, 1, {"model": {"w": torch.arange(6.0)}}, {"epoch": 0}, {"epoch": 0})
    real_save_file = safetensors.torch.save_file

    def save_file_then_hang(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        print("writing", flush=True)
        time.sleep(120)

    safetensors.torch.save_file = save_file_then_hang
    big = {"model": {"w": torch.randn(1024, 1024)}, "ema": {"w": torch.randn(1024, 1024)}}
    save_checkpoint(run_dir, 2, big, {"epoch": 1}, {"epoch": 1})
    """
)


def test_checkpoint_killed_mid_write_leaves_previous_one_loadable(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL

    ckpts = tmp_path / "checkpoints"
    tmp = ckpts / f".tmp-step_0000002-{child.pid}"
    assert (tmp / "model.safetensors").is_file() and not (tmp / "state.json").exists()
    assert latest_checkpoint(tmp_path) == ckpts / "step_0000001"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 1 and ckpt.state == {"epoch": 0, "step": 1}
    assert torch.equal(ckpt.tensors["model"]["w"], torch.arange(6.0))
    assert ckpt.torch_state == {"epoch": 0}

    save_checkpoint(tmp_path, 2, _tiny(2), {}, {})  # the rerun cleans up after the dead child
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000001", "step_0000002"]


def test_checkpoint_refuses_non_finite_weights_before_writing(tmp_path):
    good = {"w": torch.ones(3), "steps": torch.tensor([3])}
    for bad_value in (float("nan"), float("inf")):
        bad = {"blocks.0.w": torch.tensor([1.0, bad_value]), "ok": torch.ones(2)}
        with pytest.raises(ValueError, match=r"'blocks\.0\.w' in group 'ema'"):
            save_checkpoint(tmp_path, 1, {"model": good, "ema": bad}, {}, {})
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoint_refuses_state_that_would_not_load_before_writing(tmp_path):
    tensors = _tiny(1)
    with pytest.raises(TypeError, match=r"torch_state\['scheduler'\]\['fn'\]"):
        save_checkpoint(tmp_path, 1, tensors, {"scheduler": {"fn": lambda s: s}}, {})
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path, 1, tensors, {"scaler": {"scale": np.float64(2.0)}}, {})
    with pytest.raises(ValueError, match="not plain JSON"):
        save_checkpoint(tmp_path, 1, tensors, {}, {"loss": float("nan")})
    with pytest.raises(ValueError, match="not plain JSON"):
        save_checkpoint(tmp_path, 1, tensors, {}, {"path": Path("x")})
    with pytest.raises(ValueError, match="disagrees"):
        save_checkpoint(tmp_path, 1, tensors, {}, {"step": 2})
    with pytest.raises(ValueError, match="group name"):
        save_checkpoint(tmp_path, 1, {"../model": {}}, {}, {})
    assert not (tmp_path / "checkpoints").exists()


