"""Bucket grid, assignment, crop boxes and the batch schedule."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bucketing import (BatchSchedule, assign, bucket_stats, make_buckets, merge_small_buckets,
                       place)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _log_uniform_sizes(n: int, resolution: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = []
    for aspect in np.exp(rng.uniform(math.log(1 / 3), math.log(3), n)):
        area = rng.uniform(1.1, 4.0) * resolution ** 2
        sizes.append((int(math.sqrt(area * aspect)), int(math.sqrt(area / aspect))))
    return sizes


@pytest.mark.parametrize("resolution,step", [(256, 16), (512, 32), (128, 16), (1024, 64)])
def test_bucketing_grid_invariants(resolution: int, step: int) -> None:
    buckets = make_buckets(resolution, step, min_area_ratio=0.8, max_aspect=4.0)
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert 0.8 * resolution ** 2 <= w * h <= resolution ** 2
        assert 0.25 <= w / h <= 4.0
        assert (h, w) in buckets  # both orientations
    assert (resolution, resolution) in buckets


def test_bucketing_assigns_nearest_aspect_preferring_larger_area() -> None:
    buckets = make_buckets(256, 16)
    p = assign(1000, 1000, buckets)
    assert buckets[p.bucket] == (256, 256)
    p = assign(600, 300, buckets)
    w, h = buckets[p.bucket]
    best = min(abs(math.log(bw / bh) - math.log(2)) for bw, bh in buckets)
    assert math.isclose(abs(math.log(w / h) - math.log(2)), best)
    same_aspect = [b for b in buckets if math.isclose(b[0] / b[1], w / h)]
    assert w * h == max(bw * bh for bw, bh in same_aspect)


def test_bucketing_skips_images_too_small_unless_upscaling() -> None:
    buckets = make_buckets(256, 16)
    assert assign(100, 100, buckets) is None
    p = assign(100, 100, buckets, allow_upscale=True)
    assert p is not None and p.resized[0] >= buckets[p.bucket][0]


def test_bucketing_crop_box_lies_inside_resized_image() -> None:
    buckets = make_buckets(256, 16)
    for w, h in _log_uniform_sizes(300, 256, seed=1):
        p = assign(w, h, buckets)
        bw, bh = buckets[p.bucket]
        left, top, right, bottom = p.crop
        assert (right - left, bottom - top) == (bw, bh)
        assert 0 <= left and 0 <= top and right <= p.resized[0] and bottom <= p.resized[1]
        # Resizing keeps the aspect ratio to within a pixel of rounding.
        assert abs(p.resized[0] / p.resized[1] - w / h) < 2 / min(p.resized)
        assert min(p.resized[0] - bw, p.resized[1] - bh) <= 1  # covers tightly on one side


def test_bucketing_crop_loss_meets_targets() -> None:
    sizes = _log_uniform_sizes(2000, 256)
    buckets = make_buckets(256, 16)
    stats = bucket_stats(sizes, [assign(w, h, buckets) for w, h in sizes], buckets)
    assert stats.images == 2000
    assert stats.crop_loss_mean <= 0.015
    assert stats.crop_loss_max <= 0.05
    # A step-64 grid, as other trainers use, loses far more.
    coarse = make_buckets(256, 64)
    coarse_stats = bucket_stats(sizes, [assign(w, h, coarse) for w, h in sizes], coarse)
    assert coarse_stats.crop_loss_mean > 2 * stats.crop_loss_mean


def test_bucketing_place_exact_fit_has_no_loss() -> None:
    p = place(512, 256, 256, 128, 0)
    assert p.resized == (256, 128) and p.crop == (0, 0, 256, 128) and p.crop_loss == 0


def test_bucketing_merge_small_buckets_fills_global_batches() -> None:
    sizes = _log_uniform_sizes(200, 256, seed=3)
    buckets = make_buckets(256, 16)
    placements = [assign(w, h, buckets) for w, h in sizes]
    merged = merge_small_buckets(sizes, placements, buckets, min_count=8)
    counts = Counter(p.bucket for p in merged)
    assert all(n >= 8 for n in counts.values())
    for (w, h), p in zip(sizes, merged):  # every image still covers its (new) bucket
        bw, bh = buckets[p.bucket]
        assert bw <= w and bh <= h
        assert p.crop[2] - p.crop[0] == bw and p.crop[3] - p.crop[1] == bh


def _schedule(n: int = 103, buckets: int = 4, batch: int = 4, world: int = 2, seed: int = 0):
    rng = np.random.default_rng(42)
    bucket_of = rng.integers(0, buckets, size=n)
    return bucket_of, BatchSchedule(bucket_of, batch, world, seed)


def test_bucketing_schedule_uses_each_image_once_per_epoch_with_carry() -> None:
    bucket_of, sched = _schedule()
    carried = np.zeros(0, dtype=np.int64)
    for epoch in range(4):
        plan = sched.epoch_plan(epoch)
        used = np.concatenate(plan)
        assert len(used) == len(set(used.tolist()))  # nothing repeated within an epoch
        for batch in plan:
            assert len(batch) == 8 and len(set(bucket_of[batch])) == 1  # one bucket a batch
        assert set(carried.tolist()) <= set(used.tolist())  # last epoch's remainder comes first
        carried = sched.carry_after(epoch)
        assert sorted(used.tolist() + carried.tolist()) == list(range(len(bucket_of)))
    assert [b.tolist() for b in sched.epoch_plan(0)] != [b.tolist() for b in sched.epoch_plan(1)]


def test_bucketing_schedule_is_a_pure_function_of_its_inputs() -> None:
    _, a = _schedule(seed=5)
    _, b = _schedule(seed=5)
    _, c = _schedule(seed=6)
    a.epoch_plan(3)
    plan_a = [x.tolist() for x in a.epoch_plan(2)]  # computed after a later epoch
    assert plan_a == [x.tolist() for x in b.epoch_plan(2)]
    assert plan_a != [x.tolist() for x in c.epoch_plan(2)]


def test_bucketing_schedule_ranks_share_bucket_with_disjoint_slices() -> None:
    bucket_of, sched = _schedule(world=3, batch=2)
    it = [sched.iterate(rank=r) for r in range(3)]
    for _ in range(30):
        steps = [next(i) for i in it]
        assert len({(e, k) for e, k, _ in steps}) == 1
        batches = [b for _, _, b in steps]
        assert len({int(bucket_of[b[0]]) for b in batches}) == 1
        assert len(set(np.concatenate(batches).tolist())) == 6


def test_bucketing_schedule_resumes_mid_epoch() -> None:
    _, sched = _schedule()
    full = sched.iterate(rank=1)
    seen = [next(full) for _ in range(40)]  # crosses an epoch boundary
    epoch, index, _ = seen[16]
    state = json.loads(json.dumps({"epoch": epoch, "index": index + 1}))
    _, fresh = _schedule()
    resumed = fresh.iterate(rank=1, epoch=state["epoch"], index=state["index"])
    for expected in seen[17:]:
        got = next(resumed)
        assert got[:2] == expected[:2] and got[2].tolist() == expected[2].tolist()


def test_bucketing_schedule_refuses_when_no_bucket_fills_a_batch() -> None:
    sched = BatchSchedule([0, 0, 1], batch_size=4)
    assert sched.unused_samples() == 3
    with pytest.raises(ValueError, match="global batch"):
        next(sched.iterate())


def test_bucketing_cli_json_reports_buckets_and_skips(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(_log_uniform_sizes(24, 128, seed=4)):
        fmt = ("png", "jpg", "webp")[i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(root / f"{i}.{fmt}")
    Image.new("RGB", (40, 40)).save(root / "tiny.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nonsense")
    out = subprocess.run([sys.executable, "bucketing.py", "--dataset", str(root),
                          "--resolution", "128", "--json", "--num-workers", "1"],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["images"] == 24
    assert sum(b["count"] for b in rep["buckets"]) == 24
    assert all(b["width"] % 16 == 0 and b["height"] % 16 == 0 for b in rep["buckets"])
    assert 0 <= rep["crop_loss_mean"] <= rep["crop_loss_max"] < 0.2
    assert rep["aspect_error_mean"] >= 0
    reasons = {Path(s["path"]).name: s["reason"] for s in rep["skipped"]}
    assert set(reasons) == {"tiny.png", "broken.jpg"}
    assert reasons["tiny.png"].startswith("too small")
    text = subprocess.run([sys.executable, "bucketing.py", "--dataset", str(root),
                           "--resolution", "128"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout
    assert "crop loss" in text and "tiny.png" in text


def test_bucketing_cli_missing_dataset_fails_cleanly(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "bucketing.py", "--dataset", str(tmp_path / "nope")],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "nope" in out.stderr and "Traceback" not in out.stderr
