"""Aspect-ratio buckets and the batch schedule.

Bucket grid: every (width, height) whose sides are multiples of `step`, whose area lies in
[min_area_ratio × resolution², resolution²] and whose aspect lies in [1/max_aspect, max_aspect].
Letting the area vary a little (instead of keeping only the largest area per width) makes the
aspects dense, so images lose only a sliver when they are resized to cover their bucket and
centre-cropped.

Assignment: an image goes to the bucket nearest in log aspect ratio among those it covers
without upscaling (ties: the larger area); it is resized to cover that bucket and centre-cropped.

Batch schedule: batches hold one bucket only. Each bucket is an endless stream of seeded
permutations of its images cut into global batches, so no remainder is ever dropped and each
bucket trains at its share; an epoch's plan is a closed-form function of (seed, epoch, global
batch); rank r takes slice r of every global batch, so all ranks train the same shape at every
step. State is (epoch, index) and resuming continues with exactly the next batch.

Run `python bucketing.py --dataset DIR --resolution 256 [--json]` for the bucket table and the
crop statistics of a folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np


@dataclass(frozen=True)
class Placement:
    """How one image becomes a training crop: resize to `resized`, then crop `crop`."""

    bucket: int  # index into the bucket list
    resized: tuple[int, int]  # (width, height) after resizing to cover the bucket
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) in resized pixels

    @property
    def crop_loss(self) -> float:
        """Fraction of the resized image's pixels that the crop cuts away."""
        left, top, right, bottom = self.crop
        return 1.0 - (right - left) * (bottom - top) / (self.resized[0] * self.resized[1])


def make_buckets(resolution: int, step: int = 16, min_area_ratio: float = 0.8,
                 max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """All (width, height) buckets of the grid, sorted by aspect ratio (width / height)."""
    if step < 1:
        raise ValueError(f"step {step} must be positive")
    if resolution < step:
        raise ValueError(f"resolution {resolution} must be at least step {step}")
    if not 0 < min_area_ratio <= 1:
        raise ValueError(f"min_area_ratio {min_area_ratio} must lie in (0, 1]")
    if max_aspect < 1:
        raise ValueError(f"max_aspect {max_aspect} must be at least 1")
    max_area = resolution * resolution
    min_area = min_area_ratio * max_area
    buckets = []
    for w in range(step, max_area // step + 1, step):
        for h in range(step, max_area // w + 1, step):
            if w * h >= min_area and 1 / max_aspect <= w / h <= max_aspect:
                buckets.append((w, h))
    if not buckets:  # e.g. resolution == step: keep the square at least
        buckets.append((resolution // step * step,) * 2)
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def place(width: int, height: int, bucket_w: int, bucket_h: int, index: int) -> Placement:
    """Resize (width, height) to cover (bucket_w, bucket_h) and centre-crop it."""
    scale = max(bucket_w / width, bucket_h / height)
    rw = max(bucket_w, round(width * scale))
    rh = max(bucket_h, round(height * scale))
    left, top = (rw - bucket_w) // 2, (rh - bucket_h) // 2
    return Placement(index, (rw, rh), (left, top, left + bucket_w, top + bucket_h))


def assign(width: int, height: int, buckets: Sequence[tuple[int, int]],
           allow_upscale: bool = False,
           allowed: Sequence[int] | None = None) -> Placement | None:
    """Place an image in its nearest bucket (log aspect; ties: larger area), or None if too small.

    Only buckets the image covers without upscaling are candidates unless `allow_upscale`;
    `allowed` restricts the candidates to those bucket indices.
    """
    grid = np.asarray(buckets)  # (N, 2) of (width, height)
    idx = np.arange(len(grid)) if allowed is None else np.asarray(allowed, dtype=np.int64)
    if not allow_upscale:
        idx = idx[(grid[idx, 0] <= width) & (grid[idx, 1] <= height)]
    if len(idx) == 0:
        return None
    bw, bh = grid[idx, 0], grid[idx, 1]
    error = np.round(np.abs(np.log(bw / bh) - math.log(width / height)), 12)
    best = int(idx[np.lexsort((-(bw * bh), error))[0]])  # smallest error, then largest area
    return place(width, height, int(grid[best, 0]), int(grid[best, 1]), best)


def merge_small_buckets(sizes: Sequence[tuple[int, int]], placements: list[Placement | None],
                        buckets: Sequence[tuple[int, int]], min_count: int,
                        allow_upscale: bool = False) -> list[Placement | None]:
    """Move the images of buckets holding fewer than `min_count` into their nearest neighbours.

    First, buckets are emptied smallest first, each once: every image moves to the nearest
    bucket (in log aspect) among those still in use that it fits; an image that fits none stays
    where it was. A bucket emptied early may take images later and still end small. So then,
    over and over, the smallest bucket still small gives every image it can to the nearest
    bucket it fits that holds at least as many images, until no image can move. Each such move
    makes the counts more unequal (their sum of squares grows), so this ends.
    """
    placements = list(placements)
    counts = Counter(p.bucket for p in placements if p is not None)
    for fuller_only in (False, True):
        done: set[int] = set()  # buckets that gave up what they could, as things stood
        while small := [b for b, n in counts.items() if 0 < n < min_count and b not in done]:
            victim = min(small, key=lambda b: (counts[b], b))
            least = counts[victim] if fuller_only else 1
            targets = [b for b, n in counts.items() if n >= least and b != victim]
            moved = False
            for i, p in enumerate(placements):
                if p is not None and p.bucket == victim:
                    new = assign(*sizes[i], buckets, allow_upscale, allowed=targets)
                    if new is not None:
                        placements[i], moved = new, True
                        counts[victim] -= 1
                        counts[new.bucket] += 1
            if fuller_only and moved:
                done.clear()  # fuller buckets may now take images that fitted none before
            else:
                done.add(victim)
    return placements


@dataclass
class BucketStats:
    """Crop and aspect statistics of one assignment."""

    images: int
    crop_loss_mean: float
    crop_loss_max: float
    aspect_error_mean: float  # mean |log(bucket aspect / image aspect)|
    aspect_error_max: float


def bucket_stats(sizes: Sequence[tuple[int, int]], placements: Sequence[Placement | None],
                 buckets: Sequence[tuple[int, int]]) -> BucketStats:
    """Statistics over the placed images (None entries are ignored)."""
    losses, errors = [], []
    for (w, h), p in zip(sizes, placements):
        if p is not None:
            bw, bh = buckets[p.bucket]
            losses.append(p.crop_loss)
            errors.append(abs(math.log((bw / bh) / (w / h))))
    if not losses:
        return BucketStats(0, 0.0, 0.0, 0.0, 0.0)
    return BucketStats(len(losses), float(np.mean(losses)), float(np.max(losses)),
                       float(np.mean(errors)), float(np.max(errors)))


class BatchSchedule:
    """Seeded, resumable plan of single-bucket global batches of `batch_size × world_size`.

    Each bucket is an endless stream of seeded permutations of its members (pass 0, pass 1,
    ...), cut into global batches; epoch e is every bucket's batches whose first sample lies in
    pass e, in a seeded order. So every sample is used once per pass and no bucket's remainder
    is ever dropped: over any K epochs each sample is used K ± 1 times, and a bucket of n
    samples gets ceil((e + 1)·n / G) − ceil(e·n / G) batches in epoch e (G the global batch).

    A batch that starts near the end of pass e takes its last samples from the start of pass
    e + 1. So that no sample appears twice in it, the samples that end a pass (its tail) are
    kept out of the start of the next one: each pass is its seeded permutation with the next
    tail moved to the end and the previous tail moved out of the head. In buckets of at least
    2G − 1 samples the tail is the permutation's own; in smaller ones (n between G and 2G − 2,
    as `merge_small_buckets` makes) a tail must overlap the one before, so tails are the ends
    of one fixed seeded order of the bucket. Either way a pass is a closed-form function of
    (seed, bucket, pass): the plan of epoch e is computed without replaying earlier epochs.

    Buckets smaller than a global batch never fill one and are left out (`unused_samples`):
    merge them first (`merge_small_buckets`). Rank r takes slice r of every global batch, so
    all ranks train one shape at every step. The state is (epoch, index): resuming continues
    with exactly the next batch.
    """

    VERSION = 2  # recorded in checkpoints: 1 was the schedule that dropped bucket remainders

    def __init__(self, bucket_of: Sequence[int], batch_size: int, world_size: int = 1,
                 seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be positive")
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.global_batch = batch_size * world_size
        bucket_of = np.asarray(bucket_of, dtype=np.int64)
        index = np.int32 if len(bucket_of) < 2**31 else np.int64  # 4 bytes a sample
        order = np.argsort(bucket_of, kind="stable").astype(index)  # samples by bucket
        buckets, starts = np.unique(bucket_of[order], return_index=True)
        self.buckets = buckets.tolist()
        self.members = dict(zip(self.buckets, np.split(order, starts[1:])))
        self._cached: tuple[int, list[np.ndarray]] | None = None  # (epoch, plan)

    def unused_samples(self) -> int:
        """Samples in buckets too small to ever fill a global batch."""
        return sum(len(m) for m in self.members.values() if len(m) < self.global_batch)

    def _permutation(self, b: int, p: int) -> np.ndarray:
        """The seeded permutation of bucket b's members that pass p starts from."""
        return np.random.default_rng([self.seed, b, 1, p]).permutation(self.members[b])

    def _tail_length(self, n: int, p: int) -> int:
        """How many samples of pass p (of a bucket of n) start a batch that ends in pass p + 1;
        0 for p < 0 (nothing comes before pass 0)."""
        return (p + 1) * n % self.global_batch if p >= 0 else 0

    def _tail(self, b: int, p: int) -> np.ndarray:
        """The samples that end pass p of bucket b, as a set (sorted)."""
        members, G = self.members[b], self.global_batch
        r = self._tail_length(len(members), p)
        if r == 0:
            return members[:0]
        if len(members) >= 2 * G - 1:  # room enough: the pass's own permutation ends it
            end = self._permutation(b, p)[-r:]
        else:  # nested tails: consecutive tails overlap as much as the next head needs
            end = np.random.default_rng([self.seed, b, 0]).permutation(members)[-r:]
        return np.sort(end)

    def _pass(self, b: int, p: int) -> np.ndarray:
        """Pass p of bucket b: a permutation of its members (see the class docstring)."""
        members, G = self.members[b], self.global_batch
        order = self._permutation(b, p)
        tail, before = self._tail(b, p), self._tail(b, p - 1)
        r_before = self._tail_length(len(members), p - 1)
        head_length = G - r_before if r_before else 0  # this pass's share of that batch
        end = np.isin(order, tail)
        tail_part, body = order[end], order[~end]
        clash = np.isin(body, before)
        free = np.flatnonzero(~clash)[:head_length]  # first samples the last tail lacks
        rest = np.ones(len(body), dtype=bool)
        rest[free] = False
        return np.concatenate([body[free], body[rest], tail_part])

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The global batches of `epoch` (arrays of sample indices, one bucket each)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        G, batches = self.global_batch, []
        for b in self.buckets:
            n = len(self.members[b])
            if n < G:
                continue
            first, stop = -(-epoch * n // G), -(-(epoch + 1) * n // G)  # batch numbers
            if first == stop:
                continue
            stream = np.concatenate([self._pass(b, epoch), self._pass(b, epoch + 1)])
            offset = first * G - epoch * n  # where batch `first` starts in pass `epoch`
            batches += list(stream[offset:offset + (stop - first) * G].reshape(-1, G))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(batches))
        plan = [batches[i] for i in order]
        self._cached = (epoch, plan)
        return plan

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Number of global batches in `epoch`."""
        G = self.global_batch
        return sum(-(-(epoch + 1) * len(m) // G) - -(-epoch * len(m) // G)
                   for m in self.members.values() if len(m) >= G)

    def iterate(self, rank: int = 0, epoch: int = 0, index: int = 0
                ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (epoch, index, local batch) forever, starting at batch `index` of `epoch`.

        The local batch is slice `rank` of the global batch. After consuming a batch yielded
        with (e, i), the state to save for resuming is (e, i + 1); `index` equal to the number
        of batches in `epoch` starts the next epoch, a larger one is an error.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        if not any(len(m) >= self.global_batch for m in self.members.values()):
            raise ValueError(f"no bucket holds a full global batch of {self.global_batch} "
                             "samples; lower the batch size or merge small buckets")
        if epoch < 0 or index < 0:
            raise ValueError(f"resume position (epoch {epoch}, batch {index}) is negative")
        plan = self.epoch_plan(epoch)
        if index > len(plan):
            raise ValueError(f"resume position (epoch {epoch}, batch {index}) lies beyond the "
                             f"{len(plan)} batches of that epoch; the data, batch size or world "
                             "size differ from the run that saved it")
        lo, hi = rank * self.batch_size, (rank + 1) * self.batch_size
        while True:
            for i in range(index, len(plan)):
                yield epoch, i, plan[i][lo:hi]
            epoch, index = epoch + 1, 0
            plan = self.epoch_plan(epoch)


# ----------------------------------------------------------------------------------------------
# Command line


def bucket_dataset(cfg_data, batch_size: int | None = None, world_size: int = 1,
                   progress: bool = False):
    """Scan `cfg_data.dataset`, assign buckets (merging small ones when a batch size is given).

    Returns (scan, buckets, placements) where `placements[i]` belongs to `scan.records[i]`;
    images that cover no bucket (too small or too thin) are moved from the records to
    `scan.skipped`. Buckets are merged over the training images alone: the `held_out` ones keep
    their own placements and do not count towards a bucket's size.
    """
    from training.data import SkippedFile, resolve_dataset, scan_folder

    root = resolve_dataset(cfg_data.dataset)
    scan = scan_folder(root, use_classes=cfg_data.use_classes,
                       max_pixels=cfg_data.max_image_pixels, num_workers=cfg_data.num_workers,
                       progress=progress)
    buckets = make_buckets(cfg_data.resolution, cfg_data.step, cfg_data.min_area_ratio,
                           cfg_data.max_aspect)
    grid = np.asarray(buckets)
    aspects = grid[:, 0] / grid[:, 1]
    records, placements = [], []
    for rec in scan.records:
        p = assign(rec.width, rec.height, grid, cfg_data.allow_upscale)
        if p is None:
            w, h = rec.width, rec.height
            bw, bh = buckets[assign(w, h, grid, allow_upscale=True).bucket]
            if w * h >= bw * bh and not aspects.min() <= w / h <= aspects.max():
                why = (f"too thin: {w}x{h} is more elongated than any bucket (at most "
                       f"{aspects.max():.3g}:1), so it covers none")
            else:
                why = f"too small: {w}x{h} covers no bucket"
            scan.skipped.append(SkippedFile(rec.path, f"{why} (the nearest in shape is {bw}x{bh})"
                                            "; allow upscaling to keep it"))
        else:
            records.append(rec)
            placements.append(p)
    scan.records = records
    scan.skipped.sort(key=lambda s: s.path)
    if cfg_data.merge_small_buckets and batch_size:
        # Only the images training will use count towards a bucket's size: merging before the
        # held-out images leave could let a bucket drop back below one global batch.
        held = set(held_out(records, cfg_data))
        train = [i for i in range(len(records)) if i not in held]
        merged = merge_small_buckets([(records[i].width, records[i].height) for i in train],
                                     [placements[i] for i in train], grid,
                                     batch_size * world_size, cfg_data.allow_upscale)
        for i, p in zip(train, merged):
            placements[i] = p
    return scan, buckets, placements


def held_out(records: Sequence, cfg_data) -> list[int]:
    """Indices (ascending) of the `cfg_data.holdout` images kept out of training for validation:
    those with the smallest content hashes, so the choice is stable when files are added,
    renamed or reordered. None when a separate `eval_dataset` is given."""
    if cfg_data.eval_dataset or cfg_data.holdout <= 0:
        return []
    return sorted(sorted(range(len(records)), key=lambda i: records[i].sha256)
                  [:cfg_data.holdout])


def report(scan, buckets, placements) -> dict:
    """The machine-readable summary printed by `--json`."""
    sizes = [(r.width, r.height) for r in scan.records]
    stats = bucket_stats(sizes, placements, buckets)
    counts = Counter(p.bucket for p in placements)
    return {
        "root": scan.root,
        "images": stats.images,
        "buckets": [{"width": buckets[b][0], "height": buckets[b][1], "count": counts[b]}
                    for b in sorted(counts, key=lambda b: buckets[b][0] / buckets[b][1])],
        "grid_size": len(buckets),
        "crop_loss_mean": stats.crop_loss_mean,
        "crop_loss_max": stats.crop_loss_max,
        "aspect_error_mean": stats.aspect_error_mean,
        "aspect_error_max": stats.aspect_error_max,
        "classes": scan.class_names,
        "skipped": [{"path": s.path, "reason": s.reason} for s in scan.skipped],
    }


def format_report(rep: dict) -> str:
    """Human-readable table of `report`'s dict, safe to print whatever the file names."""
    from training.data import printable

    lines = [f"{rep['root']}: {rep['images']} images in {len(rep['buckets'])} buckets "
             f"(grid of {rep['grid_size']})",
             f"{'width':>6} {'height':>6} {'aspect':>7} {'count':>7}"]
    for b in rep["buckets"]:
        lines.append(f"{b['width']:>6} {b['height']:>6} {b['width'] / b['height']:>7.3f} "
                     f"{b['count']:>7}")
    lines.append(f"crop loss: mean {rep['crop_loss_mean']:.2%}, max {rep['crop_loss_max']:.2%}; "
                 f"aspect error: mean {rep['aspect_error_mean']:.4f}, "
                 f"max {rep['aspect_error_max']:.4f}")
    lines.append(f"skipped {len(rep['skipped'])} file(s)")
    lines += [f"  {s['path']}: {s['reason']}" for s in rep["skipped"]]
    return printable("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from dotenv import load_dotenv

    from training.config import REPO_ROOT, DataConfig, load_config

    load_dotenv(REPO_ROOT / ".env")
    d = load_config(REPO_ROOT / "configs" / "default.json").data  # what training uses
    parser = argparse.ArgumentParser(description="Show the aspect-ratio buckets of a folder.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default=os.environ.get("LDM_DATASET", d.dataset),
                        help="image folder, or synthetic[:N]")
    parser.add_argument("--resolution", type=int, default=d.resolution)
    parser.add_argument("--step", type=int, default=d.step, help="bucket sides are multiples")
    parser.add_argument("--min-area-ratio", type=float, default=d.min_area_ratio)
    parser.add_argument("--max-aspect", type=float, default=d.max_aspect)
    parser.add_argument("--classes", action="store_true", help="label = first sub-folder")
    parser.add_argument("--allow-upscale", action="store_true",
                        help="keep images smaller than every bucket by upscaling them")
    parser.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="merge buckets smaller than this into their neighbours")
    parser.add_argument("--holdout", type=int, default=d.holdout,
                        help="images training keeps for validation: they do not count towards "
                             "a bucket's size when merging (0 with --eval-dataset)")
    parser.add_argument("--num-workers", type=int, default=d.num_workers)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be positive")
    if args.holdout < 0:
        parser.error(f"--holdout {args.holdout} must be 0 or more")
    cfg = DataConfig(dataset=args.dataset, resolution=args.resolution, step=args.step,
                     min_area_ratio=args.min_area_ratio, max_aspect=args.max_aspect,
                     use_classes=args.classes, allow_upscale=args.allow_upscale,
                     max_image_pixels=args.max_image_pixels,
                     merge_small_buckets=args.batch_size is not None, holdout=args.holdout,
                     num_workers=args.num_workers)
    try:
        scan, buckets, placements = bucket_dataset(cfg, args.batch_size)
        if not scan.records:
            raise ValueError(f"{scan.root}: no usable image ({len(scan.skipped)} file(s) "
                             "skipped)")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rep = report(scan, buckets, placements)
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
