"""The DiT stage end to end: smoke, exact resume across real processes, NaN guard, torchrun,
bad input. Tiny models on the synthetic set (real PNG/JPEG files) so it all runs on a CPU."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models.vae import AutoencoderKL
from models.vae_weights import load_vae, save_vae, vae_fingerprint
from training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from training.config import Config, ConfigError, TrainingStopped, from_dict
from training.dit_stage import train_dit
from training.quality import BEST_FILE, OFF_MESSAGE
from tests.models.inception_file import random_inception_file

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's random-weight FID Inception file."""
    return random_inception_file(tmp_path_factory)


def fid_settings(weights: Path, every: int = 1) -> dict:
    """`train` keys that measure FID/KID on a handful of samples and training images."""
    return {"inception": str(weights), "fid_every": every, "fid_samples": 3,
            "fid_ref_images": 3}


def _config(path: Path, run_dir: Path, vae: Path, **train) -> Path:
    cfg = {"description": "tiny DiT for tests", "stage": "dit", "run_dir": str(run_dir),
           "seed": 3, "batch_size": 2,
           "data": {"dataset": "synthetic:24", "resolution": 32, "num_workers": 0,
                    "holdout": 4, "use_classes": True},
           "train": {"max_steps": 4, "lr": 1e-3, "log_every": 1, "eval_every": 1000,
                     "ckpt_every": 1000, "sample_every": 1000, "precision": "fp32",
                     "device": "cpu", **train},
           "dit": {"model": "dit-t/2", "vae": str(vae), "sample_sizes": ["32x32", "48x16"],
                   "sample_steps": 3, "num_samples": 2, "val_images": 4}}
    path.write_text(json.dumps(cfg))
    return path


def _train(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, **kwargs)


def _scalars(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events_file in sorted((run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events_file))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# On a GPU the smoke test runs as a GPU user would train: bf16 autocast and torch.compile.
DEVICES = [pytest.param({"device": "cpu"}, id="cpu"),
           pytest.param({"device": "cuda", "precision": "bf16", "compile": True}, id="cuda",
                        marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
def test_dit_stage_one_mini_batch_smoke(tmp_path: Path, tiny_vae: Path, inception: Path,
                                        device: dict) -> None:
    cfg = from_dict(Config, json.loads(_config(tmp_path / "c.json", tmp_path / "run", tiny_vae,
                                               max_steps=1, eval_every=1, sample_every=1,
                                               **fid_settings(inception), **device).read_text()))
    run = train_dit(cfg)
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt.step == 1 and set(ckpt.tensors) == {"model", "ema"}
    assert ckpt.state["class_names"] == ["checkers", "clouds", "discs", "stripes"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step_0000001_32x32.png", "step_0000001_48x16.png"]
    assert _scalars(run, "loss/train") and _scalars(run, "loss_val_at_t/0.062")
    assert any(k.startswith("loss_train_by_bucket/") for k in _tags(run))
    assert list(_scalars(run, "quality/fid")) == list(_scalars(run, "quality/kid")) == [1]
    best = json.loads((run / BEST_FILE).read_text())
    assert (best["step"], best["size"], best["n"]) == (1, "32x32", 3)  # the square bucket


def test_dit_stage_trains_on_every_cpu_once_the_cache_is_built(
        tmp_path: Path, tiny_vae: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    # The cache build's worker decodes images beside the encoder, so it leaves them a CPU;
    # training reads the cache in a thread and takes all three CPUs this process may use.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    calls: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n))[1])
    before = torch.get_num_threads()
    cfg = json.loads(_config(tmp_path / "c.json", tmp_path / "run", tiny_vae,
                             max_steps=1).read_text())
    cfg["data"]["num_workers"] = 1
    train_dit(from_dict(Config, cfg))
    assert calls == [2, 3, before]  # cache build, training, restored on the way out
    assert "using 3 CPU thread(s) (3 CPU(s) this process may use; " in capsys.readouterr().out


def _tags(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return acc.Tags()["scalars"]


def test_dit_stage_validates_on_the_usable_eval_images(tmp_path: Path, tiny_vae: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    # A VAE whose first convolution overflows to inf on saturated red: the all-red validation
    # image gets no cache entry, which must not stop training.
    vae = load_vae(tiny_vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight[0].zero_()
        vae.encoder.conv_in.weight[0, 0, 1, 1] = 2e38
        vae.encoder.conv_in.bias[0] = 2e38
    save_vae(vae, tmp_path / "vae")
    rng = np.random.default_rng(0)
    for folder, count in (("train", 8), ("eval", 2)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            pixels[..., 0] = 0  # no red: encodes to finite latents
            Image.fromarray(pixels).save(tmp_path / folder / f"{i}.png")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "eval" / "red.png")
    cfg = json.loads(_config(tmp_path / "c.json", tmp_path / "run", tmp_path / "vae",
                             max_steps=1, eval_every=1).read_text())
    cfg["data"] = {"dataset": str(tmp_path / "train"), "eval_dataset": str(tmp_path / "eval"),
                   "resolution": 32, "num_workers": 0}
    cfg["dit"]["cache_dir"] = str(tmp_path / "latents")
    run = train_dit(from_dict(Config, cfg))
    out = capsys.readouterr()
    assert f"{(tmp_path / 'eval' / 'red.png').resolve()}: " in out.out + out.err
    assert list(_scalars(run, "loss/val")) == [1]


def test_dit_stage_resume_after_sigterm_is_exact(tmp_path: Path, tiny_vae: Path,
                                                 inception: Path) -> None:
    # The interrupted run also measures FID every 6 steps: its sampling, Inception and KID
    # draw from no stream that training uses, so it still trains exactly as the plain run.
    steps = 12
    straight_cfg = _config(tmp_path / "a.json", tmp_path / "a", tiny_vae, max_steps=steps)
    straight = _train("--config", str(straight_cfg))
    assert straight.returncode == 0
    assert straight.stdout.count(OFF_MESSAGE) == 1  # no weights: said once, and trained on

    split_cfg = _config(tmp_path / "b.json", tmp_path / "b", tiny_vae, max_steps=steps,
                        ckpt_every=2, **fid_settings(inception, every=6))
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(split_cfg)],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list_checkpoints(tmp_path / "b") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    # saved and stopped, but not finished: the shell's status for a process ended by SIGTERM
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert f"--resume {tmp_path / 'b'}" in err.decode()
    stopped_at = load_checkpoint(latest_checkpoint(tmp_path / "b")).step
    assert 2 <= stopped_at < steps, "SIGTERM should stop the run early with a checkpoint"
    resumed = _train("--config", str(split_cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the reference statistics come from the cache; the FID schedule goes on
    assert "FID reference: 3 training images at 32x32 (from the cache)" in resumed.stdout
    fids = _scalars(tmp_path / "b", "quality/fid")
    assert set(fids) <= {6, 12} and 12 in fids  # 6 is lost if the stop came during it
    assert all(math.isfinite(v) and v > 0 for v in fids.values())
    best = json.loads((tmp_path / "b" / BEST_FILE).read_text())
    assert best["step"] == min(fids, key=fids.get) and (best["n"], best["n_ref"]) == (3, 3)
    assert best["fid"] == pytest.approx(fids[best["step"]], rel=1e-6)  # TensorBoard's float32

    assert _scalars(tmp_path / "a", "loss/train") == _scalars(tmp_path / "b", "loss/train")
    for group in ("model", "ema"):
        a = load_file(tmp_path / "a" / "checkpoints" / f"step_{steps:07d}" / f"{group}.safetensors")
        b = load_file(tmp_path / "b" / "checkpoints" / f"step_{steps:07d}" / f"{group}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), group


def test_dit_stage_stop_signal_skips_the_remaining_previews(tmp_path: Path,
                                                            tiny_vae: Path) -> None:
    # Preview grids can take longer than the scheduler's grace period after SIGTERM: a signal
    # that arrives while they are drawn skips the rest, and the next step is saved at once.
    cfg = _config(tmp_path / "c.json", tmp_path / "run", tiny_vae, max_steps=100,
                  sample_every=2)
    data = json.loads(cfg.read_text())
    data["dit"].update(sample_sizes=["32x32", "48x16", "16x48"], sample_steps=2000)
    cfg.write_text(json.dumps(data))
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(cfg)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = tmp_path / "run" / "samples"
    try:
        deadline = time.monotonic() + 120
        while not list(samples.glob("step_0000002_*.png")):  # the first grid of step 2
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert len(list(samples.glob("step_0000002_*.png"))) < 3  # the last grid was skipped
    assert "signal 15: saved step 3 and stopped" in err
    assert load_checkpoint(latest_checkpoint(tmp_path / "run")).step == 3


def test_dit_stage_stop_at_the_last_step_is_a_finished_run(tmp_path: Path, tiny_vae: Path,
                                                          monkeypatch) -> None:
    # A stop request in every step (as from a signal to another rank): at the last step the run
    # is done, so it returns as usual rather than saying it stopped early.
    from training import loop

    real_agree = loop.agree
    monkeypatch.setattr(loop, "agree", lambda loss, stop: real_agree(loss, True))
    cfg = json.loads(_config(tmp_path / "c.json", tmp_path / "run", tiny_vae,
                             max_steps=1).read_text())
    assert train_dit(from_dict(Config, cfg)) == tmp_path / "run"
    assert load_checkpoint(latest_checkpoint(tmp_path / "run")).step == 1
    cfg["train"]["max_steps"] = 3
    with pytest.raises(TrainingStopped, match="saved step 2 and stopped"):
        train_dit(from_dict(Config, cfg), resume=str(tmp_path / "run"))


def test_dit_stage_preview_sizes_follow_the_bucket_grid() -> None:
    from bucketing import make_buckets
    from training.dit_stage import preview_sizes

    # by default the run's own buckets nearest 1:1, 5:3 and 3:5, whatever its resolution
    assert preview_sizes([], make_buckets(128, 16), 16) == [(128, 128), (160, 96), (96, 160)]
    assert preview_sizes([], make_buckets(64, 16), 16) == [(64, 64), (80, 48), (48, 80)]
    assert preview_sizes([], make_buckets(32, 16), 16) == [(32, 32)]  # one shape only
    # sizes given are kept, rounded down to whole tokens
    assert preview_sizes(["100x50", "8x40"], make_buckets(64, 16), 16) == [(96, 48), (16, 32)]


def test_dit_stage_resume_skips_incomplete_checkpoint(tmp_path: Path, tiny_vae: Path) -> None:
    cfg = _config(tmp_path / "c.json", tmp_path / "run", tiny_vae, max_steps=2, ckpt_every=2)
    assert _train("--config", str(cfg)).returncode == 0
    # A newer checkpoint whose write was killed: weights but no state.json, plus a temp folder.
    broken = tmp_path / "run" / "checkpoints" / "step_0000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    (tmp_path / "run" / "checkpoints" / ".tmp-step_0000010-999999").mkdir()
    cfg = _config(tmp_path / "c.json", tmp_path / "run", tiny_vae, max_steps=3)
    out = _train("--config", str(cfg), "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout and "step_0000002" in out.stdout
    assert load_checkpoint(latest_checkpoint(tmp_path / "run")).step == 3


def test_dit_stage_nan_guard_aborts_without_bad_checkpoint(tmp_path: Path,
                                                           tiny_vae: Path) -> None:
    cfg = _config(tmp_path / "c.json", tmp_path / "run", tiny_vae, max_steps=20, lr=1e30,
                  max_nonfinite=2, ckpt_every=1, grad_clip=0.0)
    out = _train("--config", str(cfg))
    assert out.returncode == 2
    assert "non-finite steps in a row" in out.stderr
    assert "optimizer step skipped" in out.stdout and ".png" in out.stdout  # names the files
    # The messages number steps as TensorBoard and the checkpoints do.
    skipped = [int(n) for n in re.findall(r"step (\d+): non-finite", out.stdout)]
    losses = _scalars(tmp_path / "run", "loss/train")
    assert len(skipped) == 2 and not math.isfinite(losses[skipped[0]])
    assert all(math.isfinite(v) for n, v in losses.items() if n < skipped[0])
    assert f"in a row at step {skipped[1]};" in out.stderr
    for ckpt in list_checkpoints(tmp_path / "run"):
        for group in load_checkpoint(ckpt).tensors.values():
            assert all(torch.isfinite(v).all() for v in group.values())


def test_dit_stage_torchrun_two_ranks_train_as_one_rank(tmp_path: Path, tiny_vae: Path,
                                                        inception: Path) -> None:
    # 2 ranks × batch 2 take the same global batches as 1 rank × batch 4, and draw the same
    # noise for them: only the order of float sums (DDP's all-reduce) differs. The ranks share
    # the FID samples at the last step (5: 2 on rank 0, 3 on rank 1), seeded by global index.
    steps, quality = 6, {**fid_settings(inception, every=6), "fid_samples": 5}
    one = _config(tmp_path / "one.json", tmp_path / "one", tiny_vae, max_steps=steps, **quality)
    cfg = json.loads(one.read_text())
    cfg["batch_size"] = 4
    one.write_text(json.dumps(cfg))
    assert _train("--config", str(one)).returncode == 0
    two = _config(tmp_path / "two.json", tmp_path / "two", tiny_vae, max_steps=steps, **quality)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "train.py", "--config", str(two)],
                         cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run folder:") == 1  # said by rank 0 alone
    a, b = _scalars(tmp_path / "one", "loss/train"), _scalars(tmp_path / "two", "loss/train")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    # Measured: losses within 1.2e-7 relative, weights within 1.2e-7 (an ulp at |w| ~ 1). The
    # tolerances are ~100× that, and 100× below an AdamW step (lr 1e-3). Ranks that do not
    # average gradients move step 2's loss by 2e-3 relative; other samples or noise on a rank,
    # step 1's by 1e-2.
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * a[step], (step, a[step], b[step])
    fid_one, fid_two = _scalars(tmp_path / "one", "quality/fid"), _scalars(tmp_path / "two",
                                                                         "quality/fid")
    assert list(fid_one) == list(fid_two) == [steps]
    assert fid_two[steps] == pytest.approx(fid_one[steps], rel=1e-3)
    for group in ("model", "ema"):
        x, y = (load_file(tmp_path / run / "checkpoints" / f"step_{steps:07d}"
                          / f"{group}.safetensors") for run in ("one", "two"))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-5, msg=f"{group} {k}")


def _worker_pids(agent: int) -> dict[int, int]:
    """rank -> pid of the training processes a torchrun agent started (Linux /proc)."""
    found = {}
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [v for v in env if v.startswith(b"RANK=")]
        if rank:
            found[int(rank[0][5:])] = int(child)
    return found


def test_dit_stage_torchrun_signal_to_one_rank_stops_all(tmp_path: Path, tiny_vae: Path) -> None:
    # A signal that reaches rank 1 alone: every rank stops after the same step, which rank 0
    # saves, and all exit cleanly (rank 0 used to wait for rank 1 forever, or crash).
    cfg = _config(tmp_path / "c.json", tmp_path / "run", tiny_vae, max_steps=100_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                              "2", "--master_port", "29523", "train.py", "--config", str(cfg)],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not _scalars(tmp_path / "run", "loss/train"):  # both ranks are in the loop
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        os.kill(_worker_pids(agent.pid)[1], signal.SIGTERM)
        out, err = agent.communicate(timeout=120)
    finally:
        agent.kill()
    assert agent.returncode != 0, err[-3000:]  # the ranks stopped early: the run is not done
    assert "signal on another process: saved step" in out + err
    assert (out + err).count(": saved step") == 1  # said once, by rank 0
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and load_checkpoint(ckpt).step >= 1


@pytest.mark.parametrize("case", ["model", "dataset", "no_images", "vae", "config_key",
                                  "other_model"])
def test_dit_stage_bad_input_is_one_line_error(tmp_path: Path, tiny_vae: Path,
                                               case: str) -> None:
    cfg = _config(tmp_path / "c.json", tmp_path / "run", tiny_vae, max_steps=1)
    args = ["--config", str(cfg)]
    if case == "model":
        data = json.loads(cfg.read_text())
        data["dit"]["model"] = "dit-zz/2"
        cfg.write_text(json.dumps(data))
    elif case == "dataset":
        args += ["--dataset", str(tmp_path / "missing")]
    elif case == "no_images":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "x.jpg").write_text("not a picture")
        args += ["--dataset", str(tmp_path / "empty")]
    elif case == "vae":
        args += ["--vae", str(tmp_path / "no_vae")]
    elif case == "config_key":
        data = json.loads(cfg.read_text())
        data["train"]["learning_rate"] = 1.0
        cfg.write_text(json.dumps(data))
    else:  # resume a run made with another model size
        assert _train(*args).returncode == 0
        args += ["--model", "dit-s/4", "--resume"]
        before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    out = _train(*args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr[-2000:]
    expected = {"model": "dit-zz/2", "dataset": "missing", "no_images": "no usable image",
                "vae": "no_vae", "config_key": "learning_rate", "other_model": "another model"}
    assert expected[case] in lines[0]
    if case == "other_model":
        after = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
        assert after == before


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "tb" not in p.parts}


def _tiny_cfg(tmp_path: Path, vae: Path, **train) -> Config:
    return from_dict(Config, json.loads(_config(tmp_path / "c.json", tmp_path / "run", vae,
                                                **train).read_text()))


def test_dit_stage_resume_refuses_renamed_classes(tmp_path: Path, tiny_vae: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png")
    cfg = _tiny_cfg(tmp_path, tiny_vae, max_steps=1)
    cfg.data.dataset, cfg.data.holdout = str(tmp_path / "data"), 0
    run = train_dit(cfg)
    # same folder, same number of classes, but label 1 now means something else
    (tmp_path / "data" / "dogs").rename(tmp_path / "data" / "owls")
    before = _files(run)
    cfg.train.max_steps = 2
    with pytest.raises(ConfigError, match=r"only in the checkpoint \['dogs'\], only in the data "
                                          r"\['owls'\]"):
        train_dit(cfg, resume="")
    assert _files(run) == before


def test_dit_stage_resume_with_added_images_starts_the_next_epoch(
        tmp_path: Path, tiny_vae: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)

    def add(name: str, count: int, start: int = 0) -> None:
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png")

    add("cats", 4)
    add("dogs", 4)
    cfg = _tiny_cfg(tmp_path, tiny_vae, max_steps=2)
    cfg.data.dataset, cfg.data.holdout = str(tmp_path / "data"), 0
    run = train_dit(cfg)
    saved = load_checkpoint(latest_checkpoint(run)).state
    assert (saved["epoch"], saved["index"], saved["num_images"]) == (0, 2, 8)
    add("cats", 2, start=4)  # the saved index now points into another order
    cfg.train.max_steps = 3
    train_dit(cfg, resume="")
    assert "continuing from the start of epoch 1" in capsys.readouterr().out
    state = load_checkpoint(latest_checkpoint(run)).state
    assert (state["epoch"], state["index"], state["num_images"]) == (1, 1, 10)
    assert state["data_fingerprint"] != saved["data_fingerprint"]


def test_dit_stage_trains_the_class_embeddings_and_the_ema(tmp_path: Path,
                                                          tiny_vae: Path) -> None:
    from models.registry import build_dit

    run = train_dit(_tiny_cfg(tmp_path, tiny_vae, max_steps=4))
    ckpt = load_checkpoint(latest_checkpoint(run))
    # final.linear starts at zero and the model's moves from step 1 on: so must the EMA's
    assert ckpt.tensors["ema"]["final.linear.weight"].abs().max() > 0
    names = [n for n, _ in build_dit("dit-t/2", in_channels=4, num_classes=4).named_parameters()]
    moments = ckpt.torch_state["optimizer"]["state"][names.index("y_embed.weight")]["exp_avg"]
    trained = moments.abs().sum(1) > 0  # embedding rows that received a gradient
    assert trained[:4].any()  # the real classes: labels reach the model


def test_dit_stage_resume_with_nothing_left_to_train_is_refused(tmp_path: Path,
                                                                tiny_vae: Path) -> None:
    run = train_dit(_tiny_cfg(tmp_path, tiny_vae, max_steps=2))
    before = _files(run)
    with pytest.raises(ConfigError, match=r"is at step 2, so train.max_steps 2 leaves nothing"):
        train_dit(_tiny_cfg(tmp_path, tiny_vae, max_steps=2), resume="")
    assert _files(run) == before


def test_dit_stage_resume_checks_the_vae_fingerprint(tmp_path: Path, tiny_vae: Path) -> None:
    run = train_dit(_tiny_cfg(tmp_path, tiny_vae, max_steps=1))
    torch.manual_seed(1)  # another VAE with the same latent channels
    other = save_vae(AutoencoderKL(load_vae(tiny_vae).config), tmp_path / "other_vae")
    before = _files(run)
    with pytest.raises(ConfigError, match="VAE fingerprint"):
        train_dit(_tiny_cfg(tmp_path, other, max_steps=2), resume="")
    assert _files(run) == before
    fingerprint = vae_fingerprint(load_vae(tiny_vae))
    assert load_checkpoint(latest_checkpoint(run)).state["vae_fingerprint"] == fingerprint
    # the same VAE at another path is fine
    copy = shutil.copytree(tiny_vae, tmp_path / "moved_vae")
    train_dit(_tiny_cfg(tmp_path, copy, max_steps=2), resume="")
    assert load_checkpoint(latest_checkpoint(run)).step == 2


def test_dit_stage_resume_applies_new_optimizer_settings(tmp_path: Path, tiny_vae: Path) -> None:
    train_dit(_tiny_cfg(tmp_path, tiny_vae, max_steps=1))
    cfg = _tiny_cfg(tmp_path, tiny_vae, max_steps=2, weight_decay=0.1)
    cfg.dit.adam_beta2 = 0.99
    run = train_dit(cfg, resume="")
    (group,) = load_checkpoint(latest_checkpoint(run)).torch_state["optimizer"]["param_groups"]
    assert group["weight_decay"] == 0.1 and tuple(group["betas"]) == (0.9, 0.99)


def test_dit_stage_flow_noise_is_independent_of_the_latent_noise() -> None:
    from training.latent_cache.read import step_generator
    from training.dit_stage import flow_generator

    noise = step_generator(1234, 5)
    eps = torch.randn(8, 4, 16, 16, generator=noise)  # as LatentReader.batch draws x0's noise
    gen = flow_generator(noise, torch.device("cpu"))
    torch.randn(8, generator=gen)  # the flow's times
    flow_noise = torch.randn(8, 4, 16, 16, generator=gen).flatten()
    e = eps.flatten()
    shifted = [torch.corrcoef(torch.stack([flow_noise[:e.numel() - s], e[s:]]))[0, 1].abs()
               for s in range(64)]
    assert max(shifted) < 0.1  # independent streams (it was 1.0 at a shift of 8 + 8)
    replay = step_generator(1234, 5)  # and it is reproducible: a resumed run draws the same
    torch.randn(8, 4, 16, 16, generator=replay)
    again = flow_generator(replay, torch.device("cpu"))
    torch.randn(8, generator=again)
    assert torch.equal(torch.randn(8, 4, 16, 16, generator=again).flatten(), flow_noise)


@pytest.mark.parametrize("use_classes", [True, False], ids=["classes", "unconditional"])
def test_dit_stage_prefetcher_reads_each_batch_with_its_condition(tmp_path: Path, tiny_vae: Path,
                                                                  use_classes: bool) -> None:
    from models.conditioning import ClassCondition
    from bucketing import ScheduleSampler
    from training.distributed import DistInfo
    from training.dit_stage import BatchPrefetcher, load_stage_vae
    from training.latent_cache.build import ensure_cache
    from training.latent_cache.read import LatentReader
    from training.plan import plan_data

    cfg = _tiny_cfg(tmp_path, tiny_vae)
    cfg.data.use_classes, cfg.dit.cache_dir = use_classes, str(tmp_path / "cache")
    plan = plan_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    vae = load_stage_vae(cfg, torch.device("cpu"))
    summary = ensure_cache(plan.records, plan.placements, plan.buckets, vae, cfg.dit.cache_dir,
                           num_workers=0, progress=False)
    reader = LatentReader(summary.cache_dir, summary.locations, vae.config.latent_affine())
    labels = plan.records.label if use_classes else None
    assert not use_classes or len(set(labels.tolist())) > 1  # a wrong order would show
    items = ScheduleSampler(plan.schedule, 0, cfg.seed, 0, 0)
    expected = iter(ScheduleSampler(plan.schedule, 0, cfg.seed, 0, 0))
    condition = ClassCondition(len(plan.class_names))
    cond_of = (lambda rows, seeds: condition.batch(labels[rows])) if use_classes else None
    prefetcher = BatchPrefetcher(reader, iter(items), cond_of, cfg.seed, (0, 1),
                                 flip=False, device=torch.device("cpu"), start=0)
    try:
        for _ in range(6):
            batch = next(prefetcher)
            indices = [i for i, _, _, _ in next(expected)]
            x0, cond, _ = batch.data
            assert x0.shape[0] == len(indices) == cfg.batch_size
            assert batch.samples == indices
            if use_classes:
                assert cond.dtype == torch.int64 and cond.tolist() == labels[indices].tolist()
            else:
                assert cond is None
    finally:
        prefetcher.close()
        reader.close()


def test_dit_stage_resumes_a_checkpoint_with_older_key_names(tmp_path: Path,
                                                             tiny_vae: Path) -> None:
    # Checkpoints written before `MLP` existed name its layers mlp.0 / mlp.2, in the model's
    # weights and in the EMA's: resuming one continues exactly as resuming today's layout.
    runs = {}
    for name in ("today", "older"):
        (tmp_path / name).mkdir()
        cfg = _tiny_cfg(tmp_path / name, tiny_vae, max_steps=2)
        cfg.dit.cache_dir = str(tmp_path / "cache")
        runs[name] = train_dit(cfg)
    ckpt = latest_checkpoint(runs["older"])
    for group in ("model", "ema"):
        tensors = load_file(ckpt / f"{group}.safetensors")
        renamed = {k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2."): v
                   for k, v in tensors.items()}
        assert any(".mlp.0." in k for k in renamed) and not any(".mlp.fc" in k for k in renamed)
        save_file(renamed, ckpt / f"{group}.safetensors")
    final = {}
    for name, run in runs.items():
        cfg = _tiny_cfg(tmp_path / name, tiny_vae, max_steps=3)
        cfg.dit.cache_dir = str(tmp_path / "cache")
        train_dit(cfg, str(run))
        final[name] = load_checkpoint(latest_checkpoint(run))
    assert final["older"].step == final["today"].step == 3
    for group in ("model", "ema"):
        today, older = final["today"].group(group), final["older"].group(group)
        assert today.keys() == older.keys()
        for key in today:
            torch.testing.assert_close(older[key], today[key], rtol=0, atol=0)
