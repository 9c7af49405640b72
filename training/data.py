"""Data sets for training: where they come from and how their pixels reach a batch.

`resolve_dataset` turns a `--dataset` value into a folder (generating the synthetic set of
`training/synthetic.py` when asked); `PixelDataset` serves bucket-cropped uint8 images in the
order of the batch schedule (`bucketing.ScheduleSampler` as its batch sampler), so a resumed run
sees exactly the same pixels. Scanning lives in `training/scan.py`, the table of images in
`training/image_table.py`, decoding in `training/images.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from training.config import default_cache_dir, is_synthetic
from training.image_table import ImageTable
from training.images import (ImageLoadError, crop_to_bucket, load_image, printable,
                             random_crop_box)
from training.synthetic import SYNTHETIC_VERSION, make_synthetic


def resolve_dataset(spec: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Turn a `--dataset` value into a folder: a path, or `synthetic` / `synthetic:N`."""
    if not spec:
        raise ValueError("no dataset given: name an image folder or synthetic[:N]")
    if is_synthetic(spec):
        try:
            count = int(spec.split(":", 1)[1]) if ":" in spec else 256
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{spec}: expected synthetic:N with N a positive image count")
        base = Path(cache_dir) if cache_dir else default_cache_dir()
        return make_synthetic(base / "synthetic" / f"v{SYNTHETIC_VERSION}_n{count}", count)
    path = Path(spec).expanduser()
    if path.is_file():
        raise FileNotFoundError(f"{spec}: a file, not a dataset folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: dataset folder not found")
    return path


class PixelDataset:
    """Bucket-cropped RGB images as uint8 tensors, addressed by (sample index, augment seed).

    Used through a DataLoader whose batch sampler yields lists of such pairs (see
    `bucketing.ScheduleSampler`), so every random choice (flip, random crop) is fixed by the
    schedule and a resumed run sees exactly the same pixels. A file that fails to load is
    reported and replaced by another image of the same bucket (tried in an order fixed by the
    augment seed), so a batch never changes shape; `ImageLoadError` when no image of the bucket
    loads.
    `placements` (a `bucketing.PlacementTable`) belongs to `records`, row for row.
    """

    def __init__(self, records: ImageTable, placements, buckets: list,
                 flip: bool = False, random_crop: bool = False,
                 max_pixels: int = 100_000_000) -> None:
        self.records, self.placements, self.buckets = records, placements, buckets
        self.flip, self.random_crop, self.max_pixels = flip, random_crop, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def _pixels(self, index: int, seed: int) -> np.ndarray:
        rec, place = self.records[index], self.placements[index]
        rng = np.random.default_rng(seed)
        flip = self.flip and bool(rng.integers(2))
        if self.random_crop:
            resized, box = random_crop_box(rec.width, rec.height,
                                           tuple(self.buckets[place.bucket]), rng)
        else:
            resized, box = place.resized, place.crop
        img = load_image(rec.path, self.max_pixels, min_size=resized)
        return crop_to_bucket(img, resized, box, flip)

    def _replacement(self, index: int, seed: int, error: ImageLoadError
                     ) -> tuple[int, np.ndarray]:
        """(index, pixels) of the first other image of `index`'s bucket that loads, trying
        them in an order fixed by `seed`; `ImageLoadError` naming the files when none does."""
        bucket = self.placements[index].bucket
        others = np.flatnonzero(self.placements.bucket == bucket)
        others = others[others != index]
        errors = [str(error)]
        for other in np.random.default_rng(seed).permutation(others).tolist():
            try:
                pixels = self._pixels(other, seed)
            except ImageLoadError as exc:
                errors.append(str(exc))
                continue
            print(printable(f"warning: {'; '.join(errors)}; using {self.records[other].path} "
                            "instead, an image of the same bucket"), flush=True)
            return other, pixels
        w, h = self.buckets[bucket]
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise ImageLoadError(f"none of the {len(errors)} image(s) of bucket {w}x{h} loads: {shown}")

    def __getitem__(self, item: tuple[int, ...]) -> dict:
        index, seed, *position = item  # position: (epoch, batch index) from ScheduleSampler
        try:
            source, pixels = index, self._pixels(index, seed)
        except ImageLoadError as exc:
            source, pixels = self._replacement(index, seed, exc)
        out = {"pixels": torch.from_numpy(pixels).permute(2, 0, 1),  # (3, H, W) uint8
               "label": self.records[source].label, "index": index}
        if position:
            out["epoch"], out["batch_index"] = position
        return out
