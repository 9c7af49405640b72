"""Bucket grid, assignment, crop boxes and the batch schedule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bucketing import (BatchSchedule, PlacementTable, assign, bucket_stats, format_report,
                       make_buckets, merge_small_buckets, nearest_buckets, place, report)


from training.plan import (bucket_dataset)
from training.config import DataConfig

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


@pytest.mark.parametrize("args,message", [
    ((256, 0, 0.8, 4.0), "step 0 must be positive"),
    ((256, -16, 0.8, 4.0), "step -16 must be positive"),
    ((8, 16, 0.8, 4.0), "resolution 8 must be at least step 16"),
    ((256, 16, 0.0, 4.0), r"min_area_ratio 0.0 must lie in \(0, 1\]"),
    ((256, 16, 0.8, 0.5), "max_aspect 0.5 must be at least 1"),
])
def test_bucketing_grid_refuses_bad_parameters_saying_which(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_buckets(*args)


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
    w, h = np.asarray(_log_uniform_sizes(2000, 256)).T
    buckets = make_buckets(256, 16)
    stats = bucket_stats(w, h, nearest_buckets(w, h, buckets), buckets)
    assert stats.images == 2000
    assert stats.crop_loss_mean <= 0.015
    assert stats.crop_loss_max <= 0.05
    # A step-64 grid, as other trainers use, loses far more.
    coarse = make_buckets(256, 64)
    coarse_stats = bucket_stats(w, h, nearest_buckets(w, h, coarse), coarse)
    assert coarse_stats.crop_loss_mean > 2 * stats.crop_loss_mean


def test_bucketing_place_exact_fit_has_no_loss() -> None:
    p = place(512, 256, 256, 128, 0)
    assert p.resized == (256, 128) and p.crop == (0, 0, 256, 128) and p.crop_loss == 0


def test_bucketing_merge_small_buckets_fills_global_batches() -> None:
    w, h = np.asarray(_log_uniform_sizes(200, 256, seed=3)).T
    buckets = make_buckets(256, 16)
    merged = merge_small_buckets(w, h, nearest_buckets(w, h, buckets), buckets, min_count=8)
    counts = Counter(merged.tolist())
    assert all(n >= 8 for n in counts.values())
    for width, height, b in zip(w, h, merged):  # every image still covers its (new) bucket
        bw, bh = buckets[b]
        assert bw <= width and bh <= height


def test_bucketing_merge_small_buckets_refills_buckets_emptied_early() -> None:
    # At resolution 64, global batches of 3. 48x80 (1 image) is emptied first, but its image
    # fits no other bucket and stays; emptying 64x64 then sends (103, 121) there. One pass ended
    # with 2 + 2 images and nothing to train; 48x80 must pass (103, 121) on to 80x48.
    buckets = make_buckets(64)
    w, h = np.asarray([(83, 63), (127, 71), (51, 100), (103, 121)]).T
    merged = merge_small_buckets(w, h, nearest_buckets(w, h, buckets), buckets, min_count=3)
    assert Counter(buckets[b] for b in merged) == {(80, 48): 3, (48, 80): 1}


def test_bucketing_merge_small_buckets_reaches_a_fixpoint() -> None:
    buckets = make_buckets(128)
    grid = np.asarray(buckets)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        # Sizes close to the buckets' own, so that many images fit only a few buckets.
        w, h = rng.integers(115, 260, size=(80, 2)).T
        placed = nearest_buckets(w, h, buckets)
        w, h, placed = w[placed >= 0], h[placed >= 0], placed[placed >= 0]
        min_count = int(rng.integers(5, 30))
        merged = merge_small_buckets(w, h, placed, buckets, min_count)
        counts = Counter(merged.tolist())
        for width, height, b in zip(w, h, merged.tolist()):
            assert grid[b, 0] <= width and grid[b, 1] <= height  # still covers its bucket
            if counts[b] < min_count:
                # An image of a small bucket fits no other bucket holding at least as many.
                fuller = [c for c, n in counts.items() if n >= counts[b] and c != b]
                assert not ((grid[fuller, 0] <= width) & (grid[fuller, 1] <= height)).any()


def _schedule(n: int = 103, buckets: int = 4, batch: int = 4, world: int = 2, seed: int = 0):
    rng = np.random.default_rng(42)
    bucket_of = rng.integers(0, buckets, size=n)
    return bucket_of, BatchSchedule(bucket_of, batch, world, seed)


def _stream_counts(bucket_of: np.ndarray, sched: BatchSchedule, epochs: range
                   ) -> tuple[Counter, Counter]:
    """Over `epochs`: how often each sample is used, and how many batches each bucket gets.
    Checks on the way that every global batch is full, of one bucket, without repeats."""
    uses, batches = Counter(), Counter()
    for epoch in epochs:
        for batch in sched.epoch_plan(epoch):
            assert len(batch) == sched.global_batch
            assert len(set(batch.tolist())) == len(batch)  # no sample twice in one batch
            (bucket,) = set(bucket_of[batch].tolist())  # one bucket a batch
            batches[bucket] += 1
            uses.update(batch.tolist())
    return uses, batches


def test_bucketing_schedule_uses_every_image_of_every_bucket() -> None:
    """The sizes where dropping each bucket's remainder used 160 of 233 images an epoch."""
    sizes = [40, 50, 33, 63, 47]
    bucket_of = np.repeat(np.arange(len(sizes)), sizes)
    np.random.default_rng(1).shuffle(bucket_of)
    sched = BatchSchedule(bucket_of, batch_size=32)
    first, _ = _stream_counts(bucket_of, sched, range(1))
    assert len(first) == 233  # the first epoch uses every image
    uses, batches = _stream_counts(bucket_of, sched, range(20))
    assert set(uses.values()) <= {20, 21} and len(uses) == 233
    for bucket, n in enumerate(sizes):  # a bucket of 63 trains at its share, as one of 64
        assert abs(batches[bucket] - 20 * n / 32) < 1


def test_bucketing_schedule_k_epochs_use_each_image_k_times_property() -> None:
    """Over any K consecutive epochs, for random bucket sizes and global batches: each image
    of a bucket holding a global batch is used K ± 1 times and each bucket gets K·n/G batches
    ± 1; images of smaller buckets are never used."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        batch, world = int(rng.integers(1, 7)), int(rng.integers(1, 4))
        G = batch * world
        sizes = [int(rng.integers(G, 3 * G + 3)) for _ in range(int(rng.integers(1, 5)))]
        sizes.append(int(rng.integers(0, G)))  # a bucket too small to fill a batch
        bucket_of = np.repeat(np.arange(len(sizes)), sizes)
        rng.shuffle(bucket_of)
        sched = BatchSchedule(bucket_of, batch, world, seed=int(rng.integers(1000)))
        first, K = int(rng.integers(0, 6)), int(rng.integers(1, 9))
        uses, batches = _stream_counts(bucket_of, sched, range(first, first + K))
        for i, bucket in enumerate(bucket_of):
            n = sizes[bucket]
            assert (K - 1 <= uses[i] <= K + 1) if n >= G else uses[i] == 0
        for bucket, n in enumerate(sizes):
            if n >= G:
                assert abs(batches[bucket] - K * n / G) < 1 + 1e-9
        assert sched.unused_samples() == sizes[-1]


def test_bucketing_schedule_epoch_is_computed_without_replaying_earlier_ones() -> None:
    """The plan of any epoch, however far, comes straight from (seed, epoch, global batch):
    the same whether earlier epochs were planned first or not, and batch 10⁹ is no slower to
    reach than batch 1 (each bucket's stream position after e passes is ceil(e·n / G))."""
    bucket_of, sched = _schedule(batch=3, world=2)
    walked = [sched.epoch_plan(e) for e in range(12)][-1]
    _, fresh = _schedule(batch=3, world=2)
    assert [b.tolist() for b in fresh.epoch_plan(11)] == [b.tolist() for b in walked]
    far = fresh.epoch_plan(10**9)
    assert len(far) == fresh.batches_per_epoch(10**9) > 0
    assert all(len(set(b.tolist())) == 6 and len(set(bucket_of[b].tolist())) == 1 for b in far)


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


def test_bucketing_schedule_refuses_resume_beyond_epoch() -> None:
    sched = BatchSchedule([0] * 40, batch_size=4)
    batches = sched.batches_per_epoch(3)
    # (epoch, number of batches) is what a run saves after the epoch's last batch.
    assert next(sched.iterate(0, epoch=3, index=batches))[:2] == (4, 0)
    with pytest.raises(ValueError, match=f"batch {batches + 1}\\) lies beyond the {batches}"):
        next(sched.iterate(0, epoch=3, index=batches + 1))
    with pytest.raises(ValueError, match="negative"):
        next(sched.iterate(0, epoch=0, index=-1))


def test_bucketing_schedule_refuses_when_no_bucket_fills_a_batch() -> None:
    sched = BatchSchedule([0, 0, 1], batch_size=4)
    assert sched.unused_samples() == 3
    with pytest.raises(ValueError, match="global batch"):
        next(sched.iterate())


def test_bucketing_schedule_holds_int32_indices_and_its_plan_is_unchanged() -> None:
    # 4 bytes a sample for the members and for an epoch's plan, one array each, sorted a chunk at
    # a time from the int16 bucket column; and the very batches the list-of-arrays form gave
    # (digest from before), so a checkpoint of an older run resumes with the same batches.
    import hashlib

    rng = np.random.default_rng(7)
    bucket_of = rng.integers(0, 6, size=70_001).astype(np.int16)  # over one CHUNK_ROWS
    sched = BatchSchedule(bucket_of, batch_size=4, world_size=2, seed=3)
    assert sorted(sched.members) == sched.buckets == list(range(6))
    for b, members in sched.members.items():
        assert members.dtype == np.int32
        assert np.array_equal(members, np.flatnonzero(bucket_of == b))
    digest = hashlib.sha256()
    for epoch in (0, 1, 5):
        plan = sched.epoch_plan(epoch)
        assert plan.dtype == np.int32 and plan.shape == (sched.batches_per_epoch(epoch), 8)
        digest.update(plan.astype(np.int64).tobytes())
    assert digest.hexdigest()[:16] == "c99f333d3c41d018"


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


def test_bucketing_report_prints_non_utf8_names(tmp_path: Path) -> None:
    Image.new("RGB", (90, 70)).save(tmp_path / "ok.png")
    (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(b"not an image")
    cfg = DataConfig(dataset=str(tmp_path), resolution=64, num_workers=1)
    text = format_report(report(*bucket_dataset(cfg)))
    assert "caf\\udce9.png: not an image" in text
    text.encode("utf-8")  # what printing does; stand-ins for undecodable bytes would raise


def test_bucketing_cli_missing_dataset_fails_cleanly(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "bucketing.py", "--dataset", str(tmp_path / "nope")],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "nope" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_bucketing_cli_refuses_a_batch_size_below_one(tmp_path: Path, batch: str) -> None:
    out = subprocess.run([sys.executable, "bucketing.py", "--dataset", "synthetic:8",
                          "--batch-size", batch], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={**os.environ, "LDM_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert f"--batch-size {batch} must be positive" in out.stderr
    out = subprocess.run([sys.executable, "bucketing.py", "--dataset", "synthetic:8",
                          "--holdout", "-1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--holdout -1 must be 0 or more" in out.stderr


def test_bucketing_cli_folder_without_images_is_an_error(tmp_path: Path, capsys) -> None:
    from bucketing import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert main(["--dataset", str(tmp_path / "empty")]) == 2
    assert "empty: no usable image" in capsys.readouterr().err


def test_bucketing_nearest_buckets_decides_as_assign_does() -> None:
    from bucketing import nearest_buckets

    buckets = make_buckets(128, 16)
    rng = np.random.default_rng(5)
    sizes = [tuple(int(v) for v in s) for s in rng.integers(20, 400, size=(500, 2))]
    sizes += [(s, s) for s in range(100, 300, 3)]  # squares: 2:1 and 1:2 tie exactly
    for upscale in (False, True):
        for allowed in (None, [20, 3, 17, 12, 5], []):
            got = nearest_buckets([w for w, _ in sizes], [h for _, h in sizes], buckets, upscale,
                                  allowed)
            want = [assign(w, h, buckets, upscale, allowed) for w, h in sizes]
            assert got.tolist() == [-1 if p is None else p.bucket for p in want]
    assert (nearest_buckets([10], [10], buckets) == -1).all()  # covers nothing


def test_bucketing_placement_table_gives_the_placements_place_gives(tmp_path: Path) -> None:
    from bucketing import nearest_buckets
    from training.image_table import ImageRecord, ImageTable

    rng = np.random.default_rng(6)
    sizes = rng.integers(200, 3000, size=(3000, 2))
    images = ImageTable.from_records("/d", [ImageRecord(f"/d/{i}.png", f"{i}.png", int(w), int(h),
                                                        -1, f"{i:064x}")
                                            for i, (w, h) in enumerate(sizes)])
    buckets = make_buckets(256, 16)
    table = PlacementTable(images, nearest_buckets(images.width, images.height, buckets), buckets)
    expected = [assign(int(w), int(h), buckets) for w, h in sizes]
    assert list(table) == expected  # iterated a chunk at a time
    assert [table[i] for i in (0, 1234, -1)] == [expected[0], expected[1234], expected[-1]]
    part = table.take([7, 3])
    assert list(part) == [expected[7], expected[3]] and part.images[0].rel == "7.png"
    assert list(table[10:13]) == expected[10:13]
    stats = bucket_stats(images.width, images.height, table.bucket, buckets)
    assert stats.images == len(expected)
    assert stats.crop_loss_max == pytest.approx(max(p.crop_loss for p in expected))
    assert stats.crop_loss_mean == pytest.approx(np.mean([p.crop_loss for p in expected]))




def test_bucketing_cli_counts_images_without_captions(tmp_path: Path, capsys) -> None:
    from bucketing import main

    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("a red square\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "1.png",
                                                         "text": "a darker one"}) + "\n")
    assert main(["--dataset", str(tmp_path), "--resolution", "64", "--captions", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["captions"]["captioned"], rep["captions"]["without"]) == (2, 1)
    (tmp_path / "2.txt").write_bytes(b"\xff\xfe bad")
    assert main(["--dataset", str(tmp_path), "--resolution", "64", "--captions"]) == 2
    assert "2.txt" in capsys.readouterr().err
