"""The data plan of a run: scan and bucket the data, split off validation, schedule the batches.

`plan_data` is what both stages call first: it scans the training folder (and the validation
folder, `data.eval_dataset`), folds exact duplicates, assigns every image its bucket (merging
buckets smaller than one global batch into their neighbours), keeps validation images and every
copy of their pictures out of training, and builds the batch schedule for this world size.
Under torchrun every rank ends with the same plan, or all of them stop with the reason.
`pixel_loader` serves the plan's images as pixel batches; `eval_crops` the validation crops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bucketing import (CHUNK_ROWS, BatchSchedule, PlacementTable, ScheduleSampler, make_buckets,
                       merge_small_buckets, nearest_buckets)
from training.captions import Captions, read_captions
from training.config import Config, ConfigError, DataConfig
from training.data import PixelDataset
from training.distributed import DistInfo, all_gather_objects, on_every_rank
from training.image_table import Duplicates, ImageTable, ScanResult, SkippedFile, fold_duplicates
from training.runtime import ignore_stop_signals
from training.scan import scan_folder


def bucket_dataset(cfg_data: DataConfig, batch_size: int | None = None, world_size: int = 1,
                   progress: bool = False, dist: DistInfo | None = None,
                   keep_out: ImageTable | None = None
                   ) -> tuple[ScanResult, list[tuple[int, int]], PlacementTable]:
    """Scan `cfg_data.dataset`, fold exact duplicates (unless `cfg_data.keep_duplicates`),
    assign buckets, and merge small ones when a batch size is given.

    Returns (scan, buckets, placements): `placements`, a `PlacementTable`, belongs to
    `scan.records` row for row; images that cover no bucket (too small or too thin) are moved
    from the records to `scan.skipped`. Buckets are merged over the training images alone
    (`split_validation`): the held-out images, every copy of their contents, and the images
    whose content is that of `keep_out` (an `ImageTable`: a validation folder's images) keep
    their own placements and do not count towards a bucket's size. Under torchrun (`dist`)
    every rank must call this alike; the ranks split the scan (`scan_folder`) and end with the
    same result, or all raise the same error.
    """
    from training.image_table import SkippedFile, fold_duplicates
    from training.scan import scan_folder
    from training.distributed import on_every_rank

    def work():
        scan = scan_folder(resolve_first(cfg_data.dataset, dist),
                           use_classes=cfg_data.use_classes, max_pixels=cfg_data.max_image_pixels,
                           num_workers=cfg_data.num_workers, progress=progress, dist=dist)
        fold_duplicates(scan, cfg_data.keep_duplicates)
        buckets = make_buckets(cfg_data.resolution, cfg_data.step, cfg_data.min_area_ratio,
                               cfg_data.max_aspect)
        records = scan.records
        bucket = nearest_buckets(records.width, records.height, buckets, cfg_data.allow_upscale)
        unfit = np.flatnonzero(bucket < 0)
        if unfit.size:
            aspects = np.asarray(buckets)[:, 0] / np.asarray(buckets)[:, 1]
            nearest = nearest_buckets(records.width[unfit], records.height[unfit], buckets,
                                      allow_upscale=True)
            for row, b in zip(unfit.tolist(), nearest.tolist()):
                (w, h), (bw, bh) = records.size(row), buckets[b]
                if w * h >= bw * bh and not aspects.min() <= w / h <= aspects.max():
                    why = (f"too thin: {w}x{h} is more elongated than any bucket (at most "
                           f"{aspects.max():.3g}:1), so it covers none")
                else:
                    why = f"too small: {w}x{h} covers no bucket"
                scan.skipped.append(SkippedFile(records.path(row), f"{why} (the nearest in shape "
                                                f"is {bw}x{bh}); allow upscaling to keep it"))
            scan.skipped.sort(key=lambda s: s.path)
            fits = np.flatnonzero(bucket >= 0)
            records, bucket = records.take(fits), bucket[fits]
            scan.records = records
        if cfg_data.merge_small_buckets and batch_size:
            # Only the images training will use count towards a bucket's size: merging before
            # the held-out images leave could let a bucket drop back below one global batch.
            train = split_validation(records, cfg_data, keep_out)[1]  # (N,) bool
            bucket[train] = merge_small_buckets(records.width[train], records.height[train],
                                        bucket[train], buckets, batch_size * world_size,
                                        cfg_data.allow_upscale)
        return scan, buckets, PlacementTable(records, bucket, buckets)

    return on_every_rank(work) if dist is not None and dist.world_size > 1 else work()


def resolve_first(spec: str, dist: DistInfo | None = None) -> Path:
    """`training.data.resolve_dataset(spec)`; under torchrun (`dist`) rank 0's first, so that
    only one process generates the synthetic set while the others wait for it, and an error
    on any rank is raised on all of them."""
    from training.data import resolve_dataset
    from training.distributed import main_first, on_every_rank

    if dist is None or dist.world_size == 1:
        return resolve_dataset(spec)
    main_first(dist, lambda: resolve_dataset(spec))
    return on_every_rank(lambda: resolve_dataset(spec))


def held_out(records: ImageTable, cfg_data: DataConfig) -> list[int]:
    """Rows (ascending) of the `cfg_data.holdout` images kept out of training for validation:
    the first file (by path) of each of the contents with the smallest hashes, so the choice
    is stable when files are added, renamed or reordered, and no content is held out twice.
    None when a separate `eval_dataset` is given. `records` is an `ImageTable`."""
    if cfg_data.eval_dataset or cfg_data.holdout <= 0:
        return []
    count = cfg_data.holdout
    copy = np.zeros(len(records), dtype=bool)
    copy[records.duplicates()[0]] = True  # each content counts as its first file only
    rows, keys = np.zeros(0, np.int64), np.zeros(0, np.uint64)  # the candidates so far
    for lo in range(0, len(records), CHUNK_ROWS):  # the `count` smallest keys, ties included
        new = np.flatnonzero(~copy[lo:lo + CHUNK_ROWS])
        rows = np.concatenate([rows, lo + new])
        keys = np.concatenate([keys, records.content_keys(lo, lo + CHUNK_ROWS)[new]])
        if len(rows) > count:
            small = keys <= np.partition(keys, count - 1)[count - 1]
            rows, keys = rows[small], keys[small]
    digests = records.digests(rows)  # the exact order of the hashes among those
    chosen = sorted(range(len(rows)), key=lambda k: digests[k].tobytes())[:count]
    return sorted(int(rows[k]) for k in chosen)


def split_validation(records: ImageTable, cfg_data: DataConfig,
                     keep_out: ImageTable | None = None) -> tuple[list[int], np.ndarray]:
    """(held-out rows (`held_out`), training mask (N,) bool) of `records`, an `ImageTable`:
    training keeps the images whose content is neither that of a held-out image nor of an
    image of `keep_out` (another `ImageTable`, the validation folder's), so that no picture
    validated on is trained on, whichever copies of it the folder holds."""
    held = held_out(records, cfg_data)
    validation = records.take(held) if keep_out is None else keep_out
    return held, ~records.same_content_as(validation)


@dataclass
class DataPlan:
    """Scanned, bucketed, split data and its batch schedule.

    `records` (an `ImageTable`) are the training images and `placements` (a `PlacementTable`)
    their buckets, row for row; `eval_records` and `eval_placements` the validation images'.
    """

    records: ImageTable
    placements: PlacementTable
    buckets: list[tuple[int, int]]
    schedule: BatchSchedule
    eval_records: ImageTable
    eval_placements: PlacementTable  # bucket placements of the validation images
    class_names: list[str]
    skipped: list
    duplicates: Duplicates = field(default_factory=Duplicates)  # of the training folder
    # with `data.captions`: the captions of `records` and `eval_records`, row for row
    captions: Captions | None = None
    eval_captions: Captions | None = None

    def fingerprint(self) -> str:
        """sha256 of the training images in schedule order with their buckets.

        With `SCHEDULE_KEYS` and the global batch this fixes the batch schedule: an equal
        fingerprint means a checkpoint's (epoch, index) points at the same next batch. Images
        added, removed, renamed or moved to another bucket change it; an image edited in place
        into the same bucket does not (its batch position is unchanged). It hashes the bytes
        "{rel}\0{w}x{h}\n" of each image in turn, rel as the file system's bytes.
        """
        digest = hashlib.sha256()
        suffixes = [f"\0{w}x{h}\n".encode() for w, h in self.buckets]
        for block in self.records.rel_lines(suffixes, self.placements.bucket):
            digest.update(block)
        return digest.hexdigest()


def plan_data(cfg: Config, dist: DistInfo) -> DataPlan:
    """Scan and bucket the data, split off the validation images, and build the batch schedule
    for this world size. Under torchrun the ranks split the reading of new or changed files
    between them (`scan_folder`), every rank must end with the same plan, and bad input found
    on any rank stops all of them."""
    buckets = make_buckets(cfg.data.resolution, cfg.data.step, cfg.data.min_area_ratio,
                           cfg.data.max_aspect)
    validation = (on_every_rank(lambda: _scan_validation(cfg, dist, buckets))
                  if cfg.data.eval_dataset else None)
    scanned = bucket_dataset(cfg.data, cfg.batch_size, dist.world_size, progress=dist.is_main,
                             dist=dist, keep_out=None if validation is None else validation[1])
    plan = on_every_rank(lambda: _plan_from_scan(cfg, dist, scanned, validation))
    # The ranks list the folders alike (`scan_folder` refuses otherwise) and share what they
    # read; this check covers what they decide on their own from it.
    views = all_gather_objects((plan.fingerprint(), len(plan.records), len(plan.eval_records)))
    if len(set(views)) > 1:
        seen = ", ".join(f"rank {r}: {n} images, {e} for validation"
                         for r, (_, n, e) in enumerate(views))
        raise ConfigError(f"the ranks see different training data ({seen}; or other names or "
                          "buckets); every machine must see the same dataset, unchanged while "
                          "the run starts")
    if cfg.data.captions:  # read afresh every run: an edited caption takes effect at once
        plan.captions = read_captions(plan.records, plan.records.root)
        plan.eval_captions = read_captions(plan.eval_records, plan.eval_records.root)
        if dist.is_main:
            print(plan.captions.summary(), flush=True)
    return plan


def _scan_validation(cfg: Config, dist: DistInfo, buckets: list[tuple[int, int]]
                     ) -> tuple[ScanResult, ImageTable, PlacementTable, list[SkippedFile]]:
    """The validation folder (`data.eval_dataset`): its scan, its images that cover a bucket
    with their placements, and its skipped files, these images included."""
    scan = scan_folder(resolve_first(cfg.data.eval_dataset, dist),
                       use_classes=cfg.data.use_classes, max_pixels=cfg.data.max_image_pixels,
                       num_workers=cfg.data.num_workers, dist=dist)
    fold_duplicates(scan, cfg.data.keep_duplicates)
    if not scan.records:
        raise ConfigError(f"{cfg.data.eval_dataset}: no usable validation image "
                          f"({len(scan.skipped)} file(s) skipped)")
    images = scan.records
    bucket = nearest_buckets(images.width, images.height, buckets, cfg.data.allow_upscale)
    skipped = list(scan.skipped)
    for row in np.flatnonzero(bucket < 0).tolist():
        w, h = images.size(row)
        skipped.append(SkippedFile(images.path(row), f"too small or too thin: {w}x{h} covers "
                                                     "no bucket (validation image)"))
    fits = np.flatnonzero(bucket >= 0)
    if not fits.size:
        raise ConfigError(f"{cfg.data.eval_dataset}: none of its {len(images)} usable validation "
                          "images covers a bucket (too small or too thin; allow upscaling to "
                          "keep them)")
    images = images.take(fits)
    return scan, images, PlacementTable(images, bucket[fits], buckets), skipped


def _plan_from_scan(cfg: Config, dist: DistInfo, scanned: tuple,
                    validation: tuple | None) -> DataPlan:
    """`plan_data` from the training folder's (scan, buckets, placements) and the validation
    folder's `_scan_validation` (None without one)."""
    scan, buckets, placements = scanned
    if dist.is_main:
        print(scan.summary(), flush=True)
    records = scan.records
    if not records:
        raise ConfigError(f"{scan.root}: no usable image (see the skip list above)")
    skipped = list(scan.skipped)  # with the validation folder's, for skipped.json
    eval_records = None
    if validation is not None:
        eval_scan, eval_records, eval_placements, eval_skipped = validation
        if dist.is_main:
            print(eval_scan.summary(), flush=True)
        skipped += eval_skipped
        unknown = sorted(set(eval_scan.class_names) - set(scan.class_names))
        if unknown:
            raise ConfigError(f"{cfg.data.eval_dataset}: validation classes {unknown} are not "
                              f"among the training classes {scan.class_names}")
        if eval_scan.class_names:  # by name: the folder may hold only some of the classes
            eval_records = eval_records.relabel([scan.class_names.index(name)
                                                 for name in eval_scan.class_names])
            eval_placements = PlacementTable(eval_records, eval_placements.bucket, buckets)
    # Validation images, and every copy of their pictures, stay out of training.
    held, train = split_validation(records, cfg.data, eval_records)
    if validation is None:
        eval_records, eval_placements = records.take(held), placements.take(held)
    copies = len(records) - int(train.sum()) - len(held)
    if copies and dist.is_main:
        print(f"note: {copies} training image(s) are copies of validation images and are left "
              "out of training", flush=True)
    keep = np.flatnonzero(train)
    records = records.take(keep)
    placements = PlacementTable(records, placements.bucket[keep], buckets)
    if not records:
        raise ConfigError(f"data.holdout={cfg.data.holdout} leaves no training image"
                          if validation is None else
                          f"every training image is a copy of a validation image in "
                          f"{cfg.data.eval_dataset}")
    schedule = BatchSchedule(placements.bucket, cfg.batch_size, dist.world_size, cfg.seed)
    if schedule.batches_per_epoch() == 0:
        held = (f" of the {len(records)} left for training after data.holdout="
                f"{cfg.data.holdout}" if cfg.data.holdout and not cfg.data.eval_dataset else "")
        raise ConfigError(f"no bucket holds a global batch of {schedule.global_batch} "
                          f"images{held}; lower --batch-size"
                          f"{' or --holdout' if held else ''}")
    if dist.is_main:
        warn_unused(schedule)
    return DataPlan(records, placements, buckets, schedule, eval_records, eval_placements,
                    scan.class_names, skipped, scan.duplicates)


def warn_unused(schedule: BatchSchedule) -> None:
    """Print how many images sit in buckets too small for one global batch, if any."""
    if schedule.unused_samples():
        print(f"warning: {schedule.unused_samples()} image(s) sit in buckets smaller than one "
              "global batch and are never used", flush=True)


def pixel_loader(cfg: Config, plan: DataPlan, dist: DistInfo, epoch: int, index: int,
                 random_crop: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader of uint8 pixel batches following the schedule from (epoch, index)."""
    dataset = PixelDataset(plan.records, plan.placements, plan.buckets, flip=cfg.data.flip,
                           random_crop=random_crop, max_pixels=cfg.data.max_image_pixels)
    sampler = ScheduleSampler(plan.schedule, dist.rank, cfg.seed, epoch, index)
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       worker_init_fn=ignore_stop_signals,
                                       pin_memory=dist.device.type == "cuda",
                                       persistent_workers=False,
                                       prefetch_factor=4 if workers else None)


def eval_crops(records: ImageTable, crop: int, limit: int,
               max_pixels: int = DataConfig.max_image_pixels) -> torch.Tensor:
    """Validation images: up to three crop×crop squares per image (start, centre, end of the
    long side) at native scale, or the image resized to cover the square when smaller.
    `max_pixels` is the run's `data.max_image_pixels` (its default when not given): larger
    images are refused as decompression bombs.

    Returns uint8 (N, 3, crop, crop).
    """
    from training.images import crop_to_bucket, load_image

    out = []
    for rec in records[:limit]:
        img = load_image(rec.path, max_pixels)
        w, h = img.size
        scale = max(1.0, crop / w, crop / h)
        rw, rh = max(crop, round(w * scale)), max(crop, round(h * scale))
        spots = [0.0, 0.5, 1.0] if max(rw, rh) >= 2 * crop else [0.5]
        for f in spots:
            left = int((rw - crop) * f) if rw >= rh else (rw - crop) // 2
            top = int((rh - crop) * f) if rh > rw else (rh - crop) // 2
            out.append(crop_to_bucket(img, (rw, rh), (left, top, left + crop, top + crop)))
    if not out:
        return torch.zeros(0, 3, crop, crop, dtype=torch.uint8)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
