"""Aspect-ratio buckets and the batch schedule.

Bucket grid: every (width, height) whose sides are multiples of `step`, whose area lies in
[min_area_ratio × resolution², resolution²] and whose aspect lies in [1/max_aspect, max_aspect].
Letting the area vary a little (instead of keeping only the largest area per width) makes the
aspects dense, so images lose only a sliver when they are resized to cover their bucket and
centre-cropped.

Assignment: an image goes to the bucket nearest in log aspect ratio among those it covers
without upscaling (ties: the larger area); it is resized to cover that bucket and centre-cropped.
Whole folders are assigned at once (`nearest_buckets`), and their placements are held as a
column of bucket indices (`PlacementTable`) from which each resize and crop is recomputed.
Validation images, and every copy of their pictures, do not count towards a bucket's size.

Batch schedule: batches hold one bucket only. Each bucket is an endless stream of seeded
permutations of its images cut into global batches, so no remainder is ever dropped and each
bucket trains at its share; an epoch's plan is a closed-form function of (seed, epoch, global
batch); rank r takes slice r of every global batch, so all ranks train the same shape at every
step. State is (epoch, index) and resuming continues with exactly the next batch.

Run `python bucketing.py --dataset DIR --resolution 256 [--json]` for the bucket table, the
crop statistics and the exact duplicates of a folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: this module loads without torch

    from training.image_table import ImageTable, ScanResult


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


def place_many(width: np.ndarray, height: np.ndarray, bucket_w: np.ndarray,
               bucket_h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`place` for arrays of images (N,) and their buckets (N,): (resized width, resized
    height, crop left, crop top), (N,) int64 each, the very numbers `place` gives."""
    width, height = np.asarray(width, np.int64), np.asarray(height, np.int64)
    bucket_w, bucket_h = np.asarray(bucket_w, np.int64), np.asarray(bucket_h, np.int64)
    scale = np.maximum(bucket_w / width, bucket_h / height)
    # np.rint rounds halves to even, as Python's round does
    rw = np.maximum(bucket_w, np.rint(width * scale).astype(np.int64))
    rh = np.maximum(bucket_h, np.rint(height * scale).astype(np.int64))
    return rw, rh, (rw - bucket_w) // 2, (rh - bucket_h) // 2


# Rows at a time in the vectorised passes over every image: bounds the memory they take.
CHUNK_ROWS = 1 << 16


def nearest_buckets(widths: Sequence[int] | np.ndarray, heights: Sequence[int] | np.ndarray,
                    buckets: Sequence[tuple[int, int]], allow_upscale: bool = False,
                    allowed: Sequence[int] | None = None) -> np.ndarray:
    """The bucket `assign` picks for each image (N,), -1 where it covers none: the nearest in
    log aspect ratio (ties: the larger area, then the earlier in `allowed`, or in `buckets`).

    Only buckets an image covers without upscaling are candidates unless `allow_upscale`;
    `allowed` restricts the candidates to those bucket indices. Images of one size are decided
    once, so a folder of photographs in a few sizes costs little.
    """
    grid = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)  # (B, 2) of (width, height)
    idx = np.arange(len(grid)) if allowed is None else np.asarray(allowed, dtype=np.int64)
    out = np.full(len(widths), -1, dtype=np.int16 if len(grid) < 2**15 else np.int32)
    if not len(idx):
        return out
    bw, bh = grid[idx, 0], grid[idx, 1]  # (K,) the candidates, in order
    bucket_log, area = np.log(bw / bh), bw * bh
    for lo in range(0, len(widths), CHUNK_ROWS):
        w = np.asarray(widths[lo:lo + CHUNK_ROWS], dtype=np.int64)
        h = np.asarray(heights[lo:lo + CHUNK_ROWS], dtype=np.int64)
        sizes, inverse = np.unique(w << 32 | h, return_inverse=True)  # sides < 2**31
        best = np.full(len(sizes), -1, dtype=np.int64)
        for first in range(0, len(sizes), 4096):  # (4096, K) at a time
            w, h = sizes[first:first + 4096] >> 32, sizes[first:first + 4096] & 0xFFFFFFFF
            image_log = np.array([math.log(a / b) for a, b in zip(w.tolist(), h.tolist())])
            error = np.round(np.abs(bucket_log[None, :] - image_log[:, None]), 12)  # (n, K)
            if not allow_upscale:
                error[(bw[None, :] > w[:, None]) | (bh[None, :] > h[:, None])] = np.inf
            least = error.min(axis=1)  # (n,)
            # among the least errors the largest area; argmax takes the first of equals
            pick = np.where(error == least[:, None], area[None, :], -1).argmax(axis=1)
            best[first:first + 4096] = np.where(np.isfinite(least), idx[pick], -1)
        out[lo:lo + CHUNK_ROWS] = best[inverse.reshape(-1)]
    return out


def assign(width: int, height: int, buckets: Sequence[tuple[int, int]],
           allow_upscale: bool = False,
           allowed: Sequence[int] | None = None) -> Placement | None:
    """Place an image in its nearest bucket (log aspect; ties: larger area), or None if too small.

    Only buckets the image covers without upscaling are candidates unless `allow_upscale`;
    `allowed` restricts the candidates to those bucket indices. `nearest_buckets` decides for
    many images at once.
    """
    best = int(nearest_buckets([width], [height], buckets, allow_upscale, allowed)[0])
    if best < 0:
        return None
    bucket_w, bucket_h = buckets[best]
    return place(width, height, int(bucket_w), int(bucket_h), best)


class PlacementTable:
    """Where each image of an `ImageTable` goes, row for row: its bucket, as a column.

    Indexing gives what a list of `Placement`s would: `t[i]` is the `Placement` that `place`
    gives image i in its bucket (resize to cover, centre crop), recomputed on demand from the
    image's size rather than stored; iteration computes them a chunk at a time. `bucket` (N,)
    holds the bucket indices into `buckets`, `images` the table they belong to; `take` and
    slicing give a smaller table of both. For vectorised work, `bucket_sizes()` and `boxes()`
    give every row's bucket size and resize and crop as arrays.
    """

    def __init__(self, images: ImageTable, bucket: Sequence[int] | np.ndarray,
                 buckets: Sequence[tuple[int, int]]) -> None:
        if len(bucket) != len(images):
            raise ValueError(f"{len(bucket)} buckets for {len(images)} images")
        self.images, self.buckets = images, list(buckets)
        self.bucket = np.asarray(bucket, dtype=np.int16 if len(buckets) < 2**15 else np.int32)
        if self.bucket.size and not 0 <= self.bucket.min() <= self.bucket.max() < len(buckets):
            raise ValueError(f"bucket indices outside a grid of {len(buckets)}")
        self._grid = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.bucket)

    def __getitem__(self, item: int | slice) -> Placement | PlacementTable:
        if isinstance(item, slice):
            return self.take(np.arange(len(self))[item])
        (width, height), b = self.images.size(item), int(self.bucket[item])
        return place(width, height, int(self._grid[b, 0]), int(self._grid[b, 1]), b)

    def __iter__(self) -> Iterator[Placement]:
        for lo in range(0, len(self), 1 << 14):
            part = self[lo:lo + (1 << 14)]
            rw, rh, left, top = part.boxes()
            bw, bh = part.bucket_sizes()
            for row in zip(part.bucket.tolist(), rw.tolist(), rh.tolist(), left.tolist(),
                           top.tolist(), bw.tolist(), bh.tolist()):
                b, w, h, x, y, cw, ch = row
                yield Placement(b, (w, h), (x, y, x + cw, y + ch))

    def __repr__(self) -> str:
        return f"PlacementTable({len(self)} image(s) in {len(np.unique(self.bucket))} buckets)"

    def take(self, indices: Sequence[int] | np.ndarray) -> PlacementTable:
        """The table of rows `indices`, in that order (of the images too)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        return PlacementTable(self.images.take(indices), self.bucket[indices], self.buckets)

    def bucket_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(bucket width, bucket height) of every row, (N,) int64 each."""
        return self._grid[self.bucket, 0], self._grid[self.bucket, 1]

    def boxes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`place_many` of every row: (resized width, resized height, crop left, crop top)."""
        return place_many(self.images.width, self.images.height, *self.bucket_sizes())


def merge_small_buckets(widths: Sequence[int] | np.ndarray, heights: Sequence[int] | np.ndarray,
                bucket_of: Sequence[int] | np.ndarray, buckets: Sequence[tuple[int, int]],
                min_count: int, allow_upscale: bool = False) -> np.ndarray:
    """Move the images of buckets holding fewer than `min_count` into their nearest neighbours;
    returns the new bucket of each image (N,), -1 staying -1 (an image not placed).

    First, buckets are emptied smallest first, each once: every image moves to the nearest
    bucket (in log aspect) among those still in use that it fits; an image that fits none stays
    where it was. A bucket emptied early may take images later and still end small. So then,
    over and over, the smallest bucket still small gives every image it can to the nearest
    bucket it fits that holds at least as many images, until no image can move. Each such move
    makes the counts more unequal (their sum of squares grows), so this ends. Candidates tie
    in the order the images first name their buckets.
    """
    widths, heights = np.asarray(widths), np.asarray(heights)
    bucket_of = np.array(bucket_of, dtype=np.int32)  # a copy: moved in place
    sizes = np.bincount(bucket_of[bucket_of >= 0], minlength=len(buckets))
    counts = {b: int(sizes[b]) for b in _by_first_appearance(bucket_of, np.count_nonzero(sizes))}
    for fuller_only in (False, True):
        done: set[int] = set()  # buckets that gave up what they could, as things stood
        while small := [b for b, n in counts.items() if 0 < n < min_count and b not in done]:
            victim = min(small, key=lambda b: (counts[b], b))
            least = counts[victim] if fuller_only else 1
            targets = [b for b, n in counts.items() if n >= least and b != victim]
            members = np.flatnonzero(bucket_of == victim)
            new = nearest_buckets(widths[members], heights[members], buckets, allow_upscale,
                                  allowed=targets)
            moves = new >= 0
            bucket_of[members[moves]] = new[moves]
            counts[victim] -= int(moves.sum())
            for b, n in zip(*np.unique(new[moves], return_counts=True)):
                counts[int(b)] += int(n)
            if fuller_only and moves.any():
                done.clear()  # fuller buckets may now take images that fitted none before
            else:
                done.add(victim)
    return bucket_of


def _by_first_appearance(values: np.ndarray, distinct: int) -> list[int]:
    """The `distinct` values >= 0 of `values`, in the order they first occur."""
    seen: dict[int, None] = {}
    for lo in range(0, len(values), CHUNK_ROWS):
        chunk = values[lo:lo + CHUNK_ROWS]
        ids, first = np.unique(chunk[chunk >= 0], return_index=True)
        seen.update(dict.fromkeys(ids[np.argsort(first)].tolist()))
        if len(seen) == distinct:
            break
    return list(seen)


@dataclass
class BucketStats:
    """Crop and aspect statistics of one assignment."""

    images: int
    crop_loss_mean: float
    crop_loss_max: float
    aspect_error_mean: float  # mean |log(bucket aspect / image aspect)|
    aspect_error_max: float


def bucket_stats(widths: np.ndarray, heights: np.ndarray, bucket: np.ndarray,
                 buckets: Sequence[tuple[int, int]]) -> BucketStats:
    """Crop and aspect statistics of images (N,) of `widths` × `heights` placed in `bucket`
    (indices into `buckets`; -1: not placed, left out)."""
    placed = np.asarray(bucket) >= 0
    w = np.asarray(widths, dtype=np.int64)[placed]
    h = np.asarray(heights, dtype=np.int64)[placed]
    if not len(w):
        return BucketStats(0, 0.0, 0.0, 0.0, 0.0)
    grid = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)
    bw, bh = grid[np.asarray(bucket)[placed], 0], grid[np.asarray(bucket)[placed], 1]
    rw, rh, _, _ = place_many(w, h, bw, bh)
    losses = 1.0 - (bw * bh) / (rw * rh)  # a crop is its bucket's size
    errors = np.abs(np.log((bw / bh) / (w / h)))
    return BucketStats(len(w), float(losses.mean()), float(losses.max()),
                       float(errors.mean()), float(errors.max()))


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
        self.members = self._members(np.asarray(bucket_of))
        self.buckets = sorted(self.members)
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, plan)

    @staticmethod
    def _members(bucket_of: np.ndarray) -> dict[int, np.ndarray]:
        """Each bucket's samples, ascending, as int32 (int64 past 2**31 samples): sorted a
        chunk of CHUNK_ROWS at a time, so that no temporary spans every sample."""
        index = np.int32 if len(bucket_of) < 2**31 else np.int64  # 4 bytes a sample
        parts: dict[int, list[np.ndarray]] = {}
        for lo in range(0, len(bucket_of), CHUNK_ROWS):
            chunk = bucket_of[lo:lo + CHUNK_ROWS]
            order = np.argsort(chunk, kind="stable")  # (chunk,) by bucket, then sample
            buckets, starts = np.unique(chunk[order], return_index=True)
            for b, rows in zip(buckets.tolist(), np.split(order, starts[1:])):
                parts.setdefault(b, []).append((rows + lo).astype(index))
        return {b: np.concatenate(p) if len(p) > 1 else p[0] for b, p in parts.items()}

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
        """Pass p of bucket b: a permutation of its members (see the class docstring).

        Its seeded permutation with the next tail moved to the end (the body before it), and
        the body's first `head_length` samples outside the last tail moved to the front. The
        tail of a large bucket's pass is its permutation's own end, and both tails hold fewer
        than G samples, so the head lies among the body's first head_length + G samples: only
        that prefix is rearranged, in place, and the pass takes no more memory than its
        permutation."""
        members, G = self.members[b], self.global_batch
        before = self._tail(b, p - 1)  # first: its permutation is gone before this one comes
        order = self._permutation(b, p)  # (n,)
        r = self._tail_length(len(members), p)
        if r and len(members) < 2 * G - 1:  # nested tails: this one moves to the end
            end = np.isin(order, self._tail(b, p))
            order = np.concatenate([order[~end], order[end]])
        r_before = self._tail_length(len(members), p - 1)
        head_length = G - r_before if r_before else 0  # this pass's share of that batch
        prefix = order[:min(len(order) - r, head_length + len(before))]  # of the body
        clash = np.isin(prefix, before)
        free = np.flatnonzero(~clash)[:head_length]  # first samples the last tail lacks
        rest = np.ones(len(prefix), dtype=bool)
        rest[free] = False
        prefix[:] = np.concatenate([prefix[free], prefix[rest]])
        return order

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """The global batches of `epoch`, (batches, G) sample indices (int32 below 2**31
        samples), one bucket a row: every bucket's batches in bucket order, then shuffled by a
        generator seeded with (seed, epoch). Filled in place, a bucket at a time."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        G, count = self.global_batch, self.batches_per_epoch(epoch)
        members = self.members.values()
        index = next(iter(members)).dtype if members else np.int32
        plan = np.empty((count, G), dtype=index)
        slot = np.empty(count, dtype=np.int64)  # where each batch, in bucket order, goes
        slot[np.random.default_rng([self.seed, epoch]).permutation(count)] = np.arange(count)
        done = 0
        for b in self.buckets:
            n = len(self.members[b])
            first, stop = -(-epoch * n // G), -(-(epoch + 1) * n // G)  # batch numbers
            if n < G or first == stop:
                continue
            offset = first * G - epoch * n  # where batch `first` starts in pass `epoch`
            stream = self._pass(b, epoch)[offset:offset + (stop - first) * G]
            whole = len(stream) // G  # batches that end in this pass
            plan[slot[done:done + whole]] = stream[:whole * G].reshape(-1, G)
            last = stream[whole * G:].copy()  # fewer than G: the pass goes before the next
            del stream
            if whole < stop - first:  # the last batch ends in the next pass
                plan[slot[done + whole]] = np.concatenate(
                    [last, self._pass(b, epoch + 1)[:G - len(last)]])
            done += stop - first
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


class ScheduleSampler:
    """The schedule for one rank, starting at (epoch, index): lists of (sample index, augment
    seed, epoch, batch index), usable as a DataLoader's batch sampler. A sample's augment seed
    fixes its random choices (flip, random crop) from (seed, epoch, sample); after a batch from
    (epoch, i) is consumed, the schedule state to save is (epoch, i + 1).
    """

    def __init__(self, schedule: BatchSchedule, rank: int, seed: int, epoch: int = 0,
                 index: int = 0) -> None:
        self.schedule, self.rank, self.seed = schedule, rank, seed
        self.start = (epoch, index)

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        for epoch, index, batch in self.schedule.iterate(self.rank, *self.start):
            yield [(int(i), int(np.random.SeedSequence([self.seed, epoch, int(i)])
                                .generate_state(1)[0]), epoch, index) for i in batch]


def report(scan: ScanResult, buckets: Sequence[tuple[int, int]],
           placements: PlacementTable) -> dict:
    """The machine-readable summary printed by `--json`."""
    stats = bucket_stats(scan.records.width, scan.records.height, placements.bucket, buckets)
    counts = np.bincount(placements.bucket, minlength=len(buckets))
    return {
        "root": scan.root,
        "images": stats.images,
        "buckets": [{"width": buckets[b][0], "height": buckets[b][1], "count": int(counts[b])}
                    for b in sorted(np.flatnonzero(counts).tolist(),
                                    key=lambda b: buckets[b][0] / buckets[b][1])],
        "grid_size": len(buckets),
        "crop_loss_mean": stats.crop_loss_mean,
        "crop_loss_max": stats.crop_loss_max,
        "aspect_error_mean": stats.aspect_error_mean,
        "aspect_error_max": stats.aspect_error_max,
        "classes": scan.class_names,
        "duplicates": {"copies": scan.duplicates.copies, "contents": scan.duplicates.contents,
                       "mixed_classes": scan.duplicates.mixed_classes,
                       "kept": scan.duplicates.kept},
        "skipped": [{"path": s.path, "reason": s.reason} for s in scan.skipped],
    }


def format_report(rep: dict) -> str:
    """Human-readable table of `report`'s dict, safe to print whatever the file names."""
    from training.images import printable

    lines = [f"{rep['root']}: {rep['images']} images in {len(rep['buckets'])} buckets "
             f"(grid of {rep['grid_size']})",
             f"{'width':>6} {'height':>6} {'aspect':>7} {'count':>7}"]
    for b in rep["buckets"]:
        lines.append(f"{b['width']:>6} {b['height']:>6} {b['width'] / b['height']:>7.3f} "
                     f"{b['count']:>7}")
    lines.append(f"crop loss: mean {rep['crop_loss_mean']:.2%}, max {rep['crop_loss_max']:.2%}; "
                 f"aspect error: mean {rep['aspect_error_mean']:.4f}, "
                 f"max {rep['aspect_error_max']:.4f}")
    copies = rep["duplicates"]
    if copies["copies"]:
        lines.append(f"exact duplicates: {copies['copies']} cop(ies) of {copies['contents']} "
                     "picture(s), " + ("kept (--keep-duplicates)" if copies["kept"] else
                                       "folded: each picture counted once, as its first file")
                     + (f"; {copies['mixed_classes']} lie in more than one class"
                        if copies["mixed_classes"] else ""))
    lines.append(f"skipped {len(rep['skipped'])} file(s)")
    lines += [f"  {s['path']}: {s['reason']}" for s in rep["skipped"]]
    return printable("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from dotenv import load_dotenv

    from training.config import REPO_ROOT, DataConfig, load_config
    from training.plan import bucket_dataset

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
    parser.add_argument("--keep-duplicates", action="store_true",
                        help="count every copy of a picture (training folds exact duplicates "
                             "to one file unless data.keep_duplicates)")
    parser.add_argument("--num-workers", type=int, default=d.num_workers)
    parser.add_argument("--captions", action="store_true",
                        help="also count the images with and without captions (NAME.txt, "
                        "metadata.jsonl)")
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
                     keep_duplicates=args.keep_duplicates, num_workers=args.num_workers)
    try:
        scan, buckets, placements = bucket_dataset(cfg, args.batch_size)
        if not scan.records:
            raise ValueError(f"{scan.root}: no usable image ({len(scan.skipped)} file(s) "
                             "skipped)")
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rep = report(scan, buckets, placements)
    if args.captions:
        from training.captions import read_captions

        try:
            captions = read_captions(scan.records, scan.records.root)
        except ValueError as exc:  # CaptionError: an unreadable caption file, a bad line
            print(f"error: {exc}", file=sys.stderr)
            return 2
        rep["captions"] = {"captioned": len(captions) - captions.missing,
                           "without": captions.missing, "summary": captions.summary()}
    print(json.dumps(rep) if args.json else format_report(rep))
    if args.captions and not args.json:
        print(rep["captions"]["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
