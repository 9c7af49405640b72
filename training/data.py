"""Data sets for training: where they come from and how their pixels reach a batch.

`resolve_dataset` turns a `--dataset` value into a folder (generating the synthetic set when
asked); `PixelDataset` and `ScheduleSampler` serve bucket-cropped uint8 batches that follow the
batch schedule, so a resumed run sees exactly the same pixels. Scanning lives in
`training/scan.py`, the table of images in `training/image_table.py`, decoding in
`training/images.py`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.config import is_synthetic
from training.config import default_cache_dir
from training.image_table import ImageTable
from training.images import (ImageLoadError, crop_to_bucket, load_image, printable,
                             random_crop_box)


SYNTHETIC_VERSION = 1
SYNTHETIC_CLASSES = ("discs", "stripes", "checkers", "clouds")


def _synthetic_image(index: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One smooth, structured picture of class `kind`, shape (H, W, 3) uint8."""
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
    area = rng.uniform(300, 400) ** 2
    w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    tint = rng.uniform(0, 255, size=3)
    gradient = (xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1))[..., None]
    img = base + 60 * gradient  # (H, W, 3)
    if kind == "discs":
        for _ in range(rng.integers(3, 8)):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 80)
            mask = np.clip(r - np.hypot(xx - cx, yy - cy), 0, 1)[..., None]
            img = img * (1 - mask) + rng.uniform(0, 255, size=3) * mask
    elif kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(12, 48)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        img = img * 0.5 + tint * (0.5 + 0.5 * wave[..., None]) * 0.5
    elif kind == "checkers":
        cell = rng.uniform(16, 56)
        board = ((xx // cell + yy // cell) % 2)[..., None]
        img = img * (1 - board) + tint * board
    else:  # clouds: smooth noise, bilinearly upsampled from a coarse grid
        coarse = rng.uniform(0, 255, size=(max(2, h // 40), max(2, w // 40), 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    noise = rng.normal(0, 3, size=img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_synthetic(root: str | os.PathLike[str], count: int, seed: int = 0) -> Path:
    """Write `count` deterministic PNG/JPEG files of varied shapes in class sub-folders.

    Aspect ratios spread log-uniformly over 1:3..3:1 and areas over 300²..400² pixels; classes
    (discs, stripes, checkers, clouds) look distinct. The folder is built in a temporary
    sibling and renamed into place, so an interrupted build is never mistaken for a finished one.
    """
    root = Path(root)
    if (root / "DONE").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for i in range(count):
        kind = SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]
        rng = np.random.default_rng([seed, i])
        pixels = _synthetic_image(i, kind, rng)
        folder = tmp / kind
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=95)
        else:
            Image.fromarray(pixels).save(folder / f"{i:05d}.png", compress_level=1)
    (tmp / "DONE").write_text(f"{count} images, seed {seed}\n")
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        if not (root / "DONE").exists():
            raise
    return root


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
    `ScheduleSampler`), so every random choice (flip, random crop) is fixed by the schedule
    and a resumed run sees exactly the same pixels. A file that fails to load is reported and
    replaced by another image of the same bucket (tried in an order fixed by the augment seed),
    so a batch never changes shape; `ImageLoadError` when no image of the bucket loads.
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


class ScheduleSampler:
    """Batch sampler over a `BatchSchedule` for one rank, starting at (epoch, index).

    Yields lists of (sample index, augment seed, epoch, batch index); after a batch from
    (epoch, i) is consumed, the schedule state to save is (epoch, i + 1).
    """

    def __init__(self, schedule, rank: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.schedule, self.rank, self.seed = schedule, rank, seed
        self.start = (epoch, index)

    def __iter__(self):
        for epoch, index, batch in self.schedule.iterate(self.rank, *self.start):
            yield [(int(i), int(np.random.SeedSequence([self.seed, epoch, int(i)])
                                .generate_state(1)[0]), epoch, index) for i in batch]
