"""Image folders: scan, robust loading, and the synthetic placeholder set.

`scan_folder` walks a folder once, reads every image's header and checks that it decodes, and
returns the usable files as an `ImageTable` plus a `SkippedFile` (path and reason) for every bad
one and every folder it cannot list. Under torchrun the ranks split the files to read and share
what they found. Results are cached in one SQLite file per folder (`$LDM_CACHE_DIR/scan/`), a
row per file keyed by its relative path and stamped with (size, mtime, ctime, inode), so
rescanning an unchanged folder only stats the files, and only new or changed files are read and
written back. (Scan caches of older versions, JSON files, are ignored: a cache can always be
rebuilt from the folder.) `fold_duplicates` keeps one file of each content. `load_image` turns
any supported file into an RGB uint8 image with correct colours.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import operator
import os
import sqlite3
import struct
import sys
import tempfile
import warnings
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps
from tqdm import tqdm

from training.config import REPO_ROOT, ConfigError, is_synthetic
from training.distributed import DistInfo, all_gather_objects, barrier, on_every_rank

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SCAN_CACHE_VERSION = 4  # bump when `_probe` changes what it records or the table's layout
SYNTHETIC_VERSION = 1
SYNTHETIC_CLASSES = ("discs", "stripes", "checkers", "clouds")
_ORIENTATION_TAG = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees
# No image format stores a side of 2**31 pixels or more: a header that says so is damaged (a
# BMP's signed width of -127 reads as 4294967169), not a decompression bomb.
_MAX_SIDE = 2**31 - 1


class ImageLoadError(ValueError):
    """An image file that cannot be turned into pixels; the message names the file."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image. `width` and `height` are after EXIF orientation."""

    path: str  # absolute path
    rel: str  # path relative to the dataset root, POSIX separators
    width: int
    height: int
    label: int  # class index, or -1 when the data set is unlabelled
    sha256: str  # content hash of the file's bytes


@dataclass(frozen=True)
class SkippedFile:
    """A file that was not used, and why (one line)."""

    path: str
    reason: str


# ----------------------------------------------------------------------------------------------
# Tables of images


# Rows at a time in the vectorised passes over every image: bounds the memory they take.
_CHUNK = 1 << 16


def _index_array(values: Iterable[int] | np.ndarray, limit: int) -> np.ndarray:
    """`values` (row numbers below `limit`) in the smallest unsigned type that holds them."""
    return np.asarray(values, dtype=np.uint32 if limit <= 2**32 else np.int64)


def _frozen(array_: np.ndarray) -> np.ndarray:
    """`array_`, marked read-only: columns are shared by every table cut from a scan."""
    array_.flags.writeable = False
    return array_


def _spans(source: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """`source[start[k]:start[k] + length[k]]` for every k, back to back, as one array."""
    length = np.asarray(length, dtype=np.int64)
    ends = np.cumsum(length)  # (K,): where each span ends in the output
    # per output byte: its offset in `source` minus its offset in the output
    shift = np.repeat(np.asarray(start, dtype=np.int64) - (ends - length), length)
    return source[np.arange(int(ends[-1]) if len(ends) else 0) + shift]


@dataclass(frozen=True)
class _Columns:
    """The images of one scan, as columns; every `ImageTable` cut from the scan shares them."""

    root: str  # absolute path of the folder
    names: np.ndarray  # (total bytes,) uint8: every relative path (os.fsencode), back to back
    offsets: np.ndarray  # (M + 1,) uint32 or int64: path j is names[offsets[j]:offsets[j + 1]]
    width: np.ndarray  # (M,) uint16 or int32, after EXIF orientation
    height: np.ndarray  # (M,) uint16 or int32
    label: np.ndarray  # (M,) int16 or int32: class index, or -1 (a broadcast -1: no memory)
    sha256: np.ndarray  # (M, 32) uint8: digest of the file's bytes


class ImageTable:
    """Images as a table: what a list of `ImageRecord`s holds, in under 50 bytes a row plus the
    relative path, where `ImageRecord` objects take several hundred bytes each.

    A scan stores its images once, as columns (numpy arrays) that every table cut from it
    shares: a table is those columns plus the rows it holds, in its own order. `take(indices)`
    and slicing give a smaller table without copying the columns, so splitting off validation
    images or dropping copies costs a few bytes per row kept.

    Read it like a list of records: `len(t)`, `t[i]` (the `ImageRecord` of row i, built on
    demand), `for rec in t`, `t[a:b]`; one field of one row without building a record:
    `t.size(i)`, `t.rel(i)`, `t.path(i)`. For vectorised work it gives whole columns in row
    order: `t.width`, `t.height`, `t.label` (N,) and `t.sha256` (N, 32) uint8, gathered afresh
    by each call (read-only views when the table holds every row of its scan, in order).
    Content comparisons: `duplicates()` and `same_content_as(other)`.
    """

    def __init__(self, columns: _Columns, rows: np.ndarray | None = None) -> None:
        """A table of `rows` (indices into `columns`, in this table's order; None: all of them,
        in order). Tables come from `scan_folder`, `from_records` and `take`."""
        self._cols = columns
        self._rows = None if rows is None else _index_array(rows, len(columns.width))
        self.root = columns.root
        self._copies: tuple[np.ndarray, np.ndarray] | None = None  # `duplicates`, once known

    @classmethod
    def from_records(cls, root: str, records: Iterable[ImageRecord]) -> ImageTable:
        """A table of `records`, all of files under `root`: `rec.path` is `root`/`rec.rel`."""
        records = list(records)
        for rec in records:
            if rec.path != os.path.join(root, rec.rel):
                raise ValueError(f"{rec.path}: not {rec.rel!r} under {root}")
        names = [os.fsencode(rec.rel) for rec in records]
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(n) for n in names])
        digests = b"".join(bytes.fromhex(rec.sha256) for rec in records)
        columns = _Columns(
            root, _frozen(np.frombuffer(b"".join(names), dtype=np.uint8)), _frozen(offsets),
            _frozen(np.array([r.width for r in records], dtype=np.int32)),
            _frozen(np.array([r.height for r in records], dtype=np.int32)),
            _frozen(np.array([r.label for r in records], dtype=np.int32)),
            _frozen(np.frombuffer(digests, dtype=np.uint8).reshape(-1, 32)))
        return cls(columns)

    def __len__(self) -> int:
        return len(self._cols.width) if self._rows is None else len(self._rows)

    def _row(self, i: int) -> int:
        """The column row of table row `i` (negative counts from the end)."""
        n, i = len(self), operator.index(i)
        if not -n <= i < n:
            raise IndexError(f"row {i} of a table of {n} image(s)")
        i %= n
        return i if self._rows is None else int(self._rows[i])

    def _gather(self, column: np.ndarray) -> np.ndarray:
        return column if self._rows is None else column[self._rows]

    def size(self, i: int) -> tuple[int, int]:
        """Row `i`'s (width, height)."""
        r = self._row(i)
        return int(self._cols.width[r]), int(self._cols.height[r])

    def rel_bytes(self, i: int) -> bytes:
        """Row `i`'s path relative to `root`, as the file system's bytes."""
        r, c = self._row(i), self._cols
        return c.names[c.offsets[r]:c.offsets[r + 1]].tobytes()

    def rel(self, i: int) -> str:
        """Row `i`'s path relative to `root`, POSIX separators."""
        return os.fsdecode(self.rel_bytes(i))

    def path(self, i: int) -> str:
        """Row `i`'s absolute path."""
        return os.path.join(self.root, self.rel(i))

    def __getitem__(self, item: int | slice) -> ImageRecord | ImageTable:
        if isinstance(item, slice):
            return self.take(np.arange(len(self))[item])
        r, c, rel = self._row(item), self._cols, self.rel(item)
        return ImageRecord(os.path.join(self.root, rel), rel, int(c.width[r]), int(c.height[r]),
                           int(c.label[r]), c.sha256[r].tobytes().hex())

    def __iter__(self) -> Iterator[ImageRecord]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        if not isinstance(other, ImageTable):
            return NotImplemented
        return (self.root == other.root and len(self) == len(other)
                and all(np.array_equal(getattr(self, k), getattr(other, k))
                        for k in ("width", "height", "label", "sha256"))
                and b"".join(self.rel_lines([b"\0"])) == b"".join(other.rel_lines([b"\0"])))

    def __repr__(self) -> str:
        return f"ImageTable({self.root!r}, {len(self)} image(s))"

    @property
    def width(self) -> np.ndarray:
        """(N,) uint16 or int32: widths after EXIF orientation."""
        return self._gather(self._cols.width)

    @property
    def height(self) -> np.ndarray:
        """(N,) uint16 or int32: heights after EXIF orientation."""
        return self._gather(self._cols.height)

    @property
    def label(self) -> np.ndarray:
        """(N,) integer class indices, -1 when the data set is unlabelled."""
        return self._gather(self._cols.label)

    @property
    def sha256(self) -> np.ndarray:
        """(N, 32) uint8: the sha256 digest of each file's bytes."""
        return self._gather(self._cols.sha256)

    def take(self, indices: Sequence[int] | np.ndarray) -> ImageTable:
        """The table of rows `indices` (in that order), sharing this table's columns."""
        n = len(self)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"rows {idx.min()}..{idx.max()} of a table of {n} image(s)")
        idx = np.where(idx < 0, idx + n, idx)
        table = ImageTable(self._cols, idx if self._rows is None else self._rows[idx])
        if self._copies is not None and not len(self._copies[0]) and (
                idx[1:] > idx[:-1]).all():  # distinct rows of a table without copies
            table._copies = self._copies
        return table

    def relabel(self, mapping: Sequence[int] | np.ndarray) -> ImageTable:
        """This table with each label l >= 0 replaced by `mapping[l]` (-1 stays -1)."""
        mapping = np.append(np.asarray(mapping, dtype=np.int64), -1)  # index -1: unlabelled
        label = mapping[self._cols.label].astype(np.int32)
        return ImageTable(replace(self._cols, label=_frozen(label)), self._rows)

    def rel_lines(self, suffixes: Sequence[bytes], pick: np.ndarray | None = None,
                  chunk: int = 4096) -> Iterator[bytes]:
        """Every row's relative path (as bytes) followed by `suffixes[pick[i]]` (by
        `suffixes[0]` without `pick`), concatenated in row order and yielded `chunk` rows at a
        time: the bytes of `b"".join(rel_bytes(i) + suffixes[pick[i]] for each row i)`."""
        c = self._cols
        tail = np.frombuffer(b"".join(suffixes), dtype=np.uint8)
        tail_length = np.array([len(s) for s in suffixes], dtype=np.int64)
        tail_start = np.cumsum(tail_length) - tail_length
        for lo in range(0, len(self), chunk):
            rows = (np.arange(lo, min(lo + chunk, len(self))) if self._rows is None
                    else self._rows[lo:lo + chunk].astype(np.int64))
            which = np.zeros(len(rows), np.int64) if pick is None else pick[lo:lo + chunk]
            start = c.offsets[rows].astype(np.int64)
            length = c.offsets[rows + 1].astype(np.int64) - start
            names = _spans(c.names, start, length)  # this chunk's paths, back to back
            source = np.concatenate([names, tail])
            # interleave: path k, then its suffix, for every k
            starts = np.stack([np.cumsum(length) - length, len(names) + tail_start[which]], 1)
            lengths = np.stack([length, tail_length[which]], 1)
            yield _spans(source, starts.ravel(), lengths.ravel()).tobytes()

    def content_keys(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(stop - start,) uint64 for rows start..stop (default: all): the first 8 bytes of
        each digest, big-endian, so that sorting rows by them sorts them by digest, up to rows
        whose digests share those bytes."""
        rows = slice(start, stop) if self._rows is None else self._rows[start:stop]
        digests = np.ascontiguousarray(self._cols.sha256[rows, :8])  # (n, 8)
        return digests.view(">u8").ravel().astype(np.uint64)

    def digests(self, rows: np.ndarray) -> np.ndarray:
        """(K, 32) uint8: the digests of table rows `rows`."""
        return self._cols.sha256[rows if self._rows is None else self._rows[rows]]

    def duplicates(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact copies: (copies, originals), (K,) int64 each, `copies` ascending. Row
        `copies[k]` holds the same bytes as row `originals[k]`, the first row (in table order)
        with that content; rows that copy no earlier row are in neither. Found once per table
        (a sort of the digests)."""
        if self._copies is None:
            self._copies = self._find_duplicates()
        return self._copies

    def _find_duplicates(self) -> tuple[np.ndarray, np.ndarray]:
        none = np.zeros(0, np.int64), np.zeros(0, np.int64)
        key = self.content_keys()
        ordered = np.sort(key)  # in place on its copy: the cheap test for the usual case
        if not (ordered[1:] == ordered[:-1]).any():
            return none
        del ordered
        order = np.argsort(key, kind="stable")  # by content, then by row
        sorted_key = key[order]
        del key
        at = np.flatnonzero(sorted_key[1:] == sorted_key[:-1]) + 1  # positions repeating a key
        del sorted_key
        head = np.concatenate([[True], at[1:] != at[:-1] + 1])  # each run of repeats starts
        first = (at - 1)[head][np.cumsum(head) - 1]  # the position before its run
        copies, originals = order[at], order[first]
        if not (self.digests(copies) == self.digests(originals)).all():
            # two contents share their first 8 bytes: group those rows by the whole digest
            copies, originals = self._exact_duplicates(np.union1d(copies, originals))
        by_row = np.argsort(copies)
        return copies[by_row], originals[by_row]

    def _exact_duplicates(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`duplicates` among `rows` (ascending), comparing whole digests."""
        first: dict[bytes, int] = {}
        pairs = []
        for row, digest in zip(rows.tolist(), self.digests(rows)):
            original = first.setdefault(digest.tobytes(), row)
            if original != row:
                pairs.append((row, original))
        out = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        return out[:, 0], out[:, 1]

    def same_content_as(self, other: ImageTable) -> np.ndarray:
        """(N,) bool: whether each row's content (its digest) is that of some row of `other`."""
        theirs = np.unique(other.content_keys())
        hit = np.zeros(len(self), dtype=bool)
        if not len(theirs):
            return hit
        for lo in range(0, len(self), _CHUNK):
            mine = self.content_keys(lo, lo + _CHUNK)
            at = np.minimum(np.searchsorted(theirs, mine), len(theirs) - 1)
            hit[lo:lo + _CHUNK] = theirs[at] == mine
        rows = np.flatnonzero(hit)
        if rows.size:  # equal first 8 bytes: compare whole digests
            known = {d.tobytes() for d in other.sha256}
            hit[rows] = [d.tobytes() in known for d in self.digests(rows)]
        return hit


@dataclass
class Duplicates:
    """Exact copies (files with the same bytes) among a scan's usable images."""

    copies: int = 0  # images whose content an earlier image (by path) already has
    contents: int = 0  # distinct contents that have copies
    mixed_classes: int = 0  # of those, contents whose copies lie in more than one class
    kept: bool = False  # the copies stay (data.keep_duplicates); otherwise they were folded
    example: tuple[str, str] | None = None  # (a copy, the image it copies)

    def describe(self) -> list[str]:
        """The summary's lines about them (none when there are no copies)."""
        if not self.copies:
            return []
        if self.kept:
            lines = [f"  exact duplicates: {self.copies} cop(ies) of {self.contents} "
                     "picture(s), kept (data.keep_duplicates); a validation picture leaves "
                     "training with all its copies"]
        else:
            lines = [f"  exact duplicates: {self.copies} cop(ies) of {self.contents} "
                     "picture(s) folded: each picture is used once, as its first file by path "
                     "(data.keep_duplicates keeps them)"]
        if self.mixed_classes:
            lines.append(f"  {self.mixed_classes} of those picture(s) lie in more than one "
                         "class folder: " + ("its copies train under each of them" if self.kept
                                             else "each kept the class of its first file"))
        if self.example:
            lines.append(f"  e.g. {self.example[0]} copies {self.example[1]}")
        return lines


@dataclass
class ScanResult:
    """Everything a scan found under `root`."""

    root: str
    records: ImageTable
    skipped: list[SkippedFile]
    class_names: list[str]  # empty when the data set is unlabelled
    read: int = 0  # files hashed and decoded by this scan; the others came from the scan cache
    duplicates: Duplicates = field(default_factory=Duplicates)  # set by `fold_duplicates`

    def summary(self) -> str:
        """One paragraph: usable count, skipped count by reason, duplicates and classes."""
        lines = [f"{self.root}: {len(self.records)} usable image(s), {len(self.skipped)} skipped"]
        kinds = Counter(s.reason.split(":")[0] for s in self.skipped)
        lines += [f"  skipped, {kind}: {n}" for kind, n in sorted(kinds.items())]
        if self.read:
            lines.append(f"  {self.read} new or changed file(s) read; the others came from the "
                         "scan cache")
        lines += self.duplicates.describe()
        if self.class_names:
            lines.append(f"  {len(self.class_names)} classes: {', '.join(self.class_names[:10])}"
                         + (" ..." if len(self.class_names) > 10 else ""))
            used = set(np.unique(self.records.label).tolist())
            empty = [name for i, name in enumerate(self.class_names) if i not in used]
            if empty:  # a label the model never trains on, yet previews and sampling offer it
                lines.append(f"  warning: {len(empty)} class(es) without a usable image: "
                             f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
        return printable("\n".join(lines))

    def write_skip_list(self, path: str | os.PathLike[str]) -> None:
        """Write every skipped file with its reason as a JSON list."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(s) for s in self.skipped], indent=1) + "\n")


def fold_duplicates(scan: ScanResult, keep: bool = False) -> None:
    """Find the exact copies among `scan.records` and record them in `scan.duplicates`; unless
    `keep`, keep only the first file (by path) of each content, with its class label.

    Which file stays depends only on the paths: the same one on every rank and every run, until
    a copy whose path sorts before it is added."""
    records = scan.records
    copies, originals = records.duplicates()
    if not copies.size:
        scan.duplicates = Duplicates(kept=keep)
        return
    label = records.label
    mixed = len(np.unique(originals[label[copies] != label[originals]]))
    scan.duplicates = Duplicates(len(copies), len(np.unique(originals)), mixed, keep,
                                 (records.path(int(copies[0])), records.path(int(originals[0]))))
    if not keep:
        unique = np.ones(len(records), dtype=bool)
        unique[copies] = False
        scan.records = records.take(np.flatnonzero(unique))
        scan.records._copies = np.zeros(0, np.int64), np.zeros(0, np.int64)  # none left


def printable(text: str) -> str:
    """`text` safe to print on a UTF-8 stream: what UTF-8 cannot encode becomes an escape.

    File names that are not valid UTF-8 reach Python with stand-in characters (\\udcNN for the
    byte NN) that printing refuses; they are shown as those escapes instead.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def default_cache_dir() -> Path:
    """Folder for the scan cache, synthetic data and latents: $LDM_CACHE_DIR or `.cache/`."""
    return Path(os.environ.get("LDM_CACHE_DIR") or REPO_ROOT / ".cache")


# ----------------------------------------------------------------------------------------------
# Opening and converting images


def _open(data: bytes | str | os.PathLike[str]) -> Image.Image:
    """Open without Pillow's own bomb check: callers apply the configured pixel limit instead."""
    Image.MAX_IMAGE_PIXELS = None  # our limit is `max_image_pixels`, checked on the header
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Palette images with transparency ..."
        return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) still to be applied to `img`; 1 when there is none."""
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not make the image unusable
        return 1
    return orientation if orientation in range(1, 9) else 1  # `exif_transpose` ignores others


def _turn_pending(img: Image.Image) -> bool:
    """Whether the EXIF orientation still to be applied to `img` turns it by 90 or 270 degrees.

    Pillow's TIFF reader applies the orientation itself: it reports the turned size from the
    start, and turns the pixels and drops the tag on `load()`. The other readers leave both to
    `exif_transpose`. So after `load()`, whatever the format, the header's size swapped when
    this holds is the size `to_rgb` returns.
    """
    return _orientation(img) in _SWAPPED_ORIENTATIONS


def _oriented_box(box: tuple[float, float, float, float], size: tuple[int, int],
                  orientation: int) -> tuple[float, float, float, float]:
    """`box` (l, t, r, b) of an image of `size` (w, h), moved to where `exif_transpose` puts it.

    Orientations 5-8 transpose the image (swap x and y), then these and 2-4 mirror it.
    """
    left, top, right, bottom = box
    width, height = size
    if orientation in _SWAPPED_ORIENTATIONS:
        left, top, right, bottom, width, height = top, left, bottom, right, height, width
    if orientation in (2, 3, 6, 7):  # mirrored left to right
        left, right = width - right, width - left
    if orientation in (3, 4, 7, 8):  # mirrored top to bottom
        top, bottom = height - bottom, height - top
    return left, top, right, bottom


def _same_aspect(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether two (width, height) sizes have one aspect ratio, to within rounding to pixels."""
    (w, h), (ow, oh) = size, other
    return abs(w * oh - h * ow) <= w + h + ow + oh


def _srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """`img` as 8-bit RGB; its colours converted from the ICC profile `icc` to sRGB if given."""
    if img.mode not in ("RGB", "CMYK"):
        img = img.convert("RGB")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception:  # unusable profile, e.g. a greyscale one: plain conversion
            pass
    return img.convert("RGB") if img.mode == "CMYK" else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image (first frame, orientation applied) to 8-bit RGB.

    16-bit and 32-bit integer greyscale are scaled from 0..65535; float images are taken as
    0..1 when they lie in that range; RGB and CMYK colour profiles are converted to sRGB; then
    transparency (an alpha channel or a transparent colour) is composited on white.
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)  # (H, W), 0..65535
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    icc = img.info.get("icc_profile")
    if "transparency" in img.info or mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        return Image.composite(_srgb(rgba.convert("RGB"), icc), white, rgba.getchannel("A"))
    return _srgb(img, icc)  # 1, L, P, RGB, CMYK, YCbCr, LAB, HSV, RGBX ...


def load_image(path: str | os.PathLike[str], max_pixels: int = 100_000_000,
               min_size: tuple[int, int] | None = None) -> Image.Image:
    """Load an image file as RGB uint8 (first frame, EXIF orientation applied).

    `min_size` (width, height after orientation), when given, is the size the caller resizes
    the image to. It lets JPEGs decode at a reduced scale that is still at least that large
    (Pillow's draft mode), which is much faster for big photographs that are resized down
    anyway; such an image comes back resized to exactly `min_size`, from the same area of the
    photograph that a full decode would be resized from. Other images come back at full size.
    An image whose aspect ratio differs from `min_size` (say, a file replaced since it was
    scanned) is refused rather than stretched. Raises `ImageLoadError` naming the file.
    """
    source = None  # the area of a reduced-scale decode that stands for the whole file
    try:
        with _open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{path}: decompression bomb: {w}x{h} pixels exceeds the "
                                     f"limit of {max_pixels}")
            if min_size is not None and img.format == "JPEG":
                # A decode at 1/s scale rounds each side up to whole pixels (617 at 1/8: 78,
                # which stand for 624), so its last column and row reach past the file's edge.
                # `draft` returns the area that stands for the file; the EXIF turn, still to
                # come, can move the excess to the left or top.
                orientation = _orientation(img)
                turned = orientation in _SWAPPED_ORIENTATIONS
                drafted = img.draft("RGB", min_size[::-1] if turned else min_size)
                if drafted is not None and img.size != (w, h):
                    source = _oriented_box(drafted[1], img.size, orientation)
            img.load()
            rgb = to_rgb(img)
    except ImageLoadError:
        raise
    except Exception as exc:  # Pillow raises many types for bad files
        raise ImageLoadError(f"{path}: cannot decode: {exc}") from None
    if min_size is not None and not _same_aspect(rgb.size, min_size):
        raise ImageLoadError(f"{path}: wrong shape: decodes to {rgb.size[0]}x{rgb.size[1]}, not "
                             f"the aspect ratio of {min_size[0]}x{min_size[1]}; rescan the folder")
    return rgb if source is None else _resize(rgb, min_size, source)




# ----------------------------------------------------------------------------------------------
# Scanning


_capture_file: tuple[int, int] | None = None  # (process id, file descriptor) of `_fd2_captured`


@contextlib.contextmanager
def _fd2_captured() -> Iterator[list[str]]:
    """Catch what C libraries write to file descriptor 2 inside the block: libtiff prints its
    warnings and errors there ("WEBP compression support is not configured") without naming the
    file. The list yielded holds the lines once the block is left.

    Python's own `sys.stderr` is flushed first, so that its pending text is not caught.
    """
    global _capture_file
    if _capture_file is None or _capture_file[0] != os.getpid():  # one file per process
        with tempfile.TemporaryFile() as file:  # already unlinked: gone with the process
            _capture_file = (os.getpid(), os.dup(file.fileno()))
    fd = _capture_file[1]
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        size = os.lseek(fd, 0, os.SEEK_CUR)
        if size:
            data = os.pread(fd, size, 0)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            # Pillow hands libtiff an in-memory file under this made-up name
            found = (line.strip().removeprefix("tempfile.tif: ")
                     for line in data.decode("utf-8", "replace").splitlines())
            lines += dict.fromkeys(line for line in found if line)  # once each, in order


def _probe(path: str, max_pixels: int) -> dict:
    """Hash a file and check that it is a decodable image. Runs in worker processes.

    Returns "sha256" (32 bytes, when readable), and either "error" (one line) or "width",
    "height" (after EXIF orientation) and "verified" (False when it is too large to decode, so
    only its header was read). What the decoders printed on file descriptor 2 is in "messages":
    folded into the error, or for the caller to print with the file's name.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {"error": f"unreadable: {exc.strerror or exc}"}
    if not data:
        return {"error": "empty file: zero bytes"}
    info: dict = {"sha256": hashlib.sha256(data).digest()}
    with _fd2_captured() as printed, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Pillow's "Corrupt EXIF data"
        info.update(_decode(data, max_pixels))
    if printed and "error" in info:
        info["error"] += f" (the decoder said: {'; '.join(printed)})"
    elif printed:
        info["messages"] = printed
    return info


def _decode(data: bytes, max_pixels: int) -> dict:
    """`_probe`'s check of a file's bytes: "error", or "width", "height" and "verified"."""
    try:
        img = _open(data)
    except Exception:
        kind = _signature(data)
        if kind:
            return {"error": f"unsupported: a {kind} file that Pillow cannot read "
                             "(unusual encoding or damaged header)"}
        return {"error": "not an image: content is not a known image format"}
    try:
        with img:
            w, h = img.size
            if not (0 < w <= _MAX_SIDE and 0 < h <= _MAX_SIDE):
                return {"error": f"corrupt: the header's size {w}x{h} is impossible (a side of "
                                 "0, or of 2**31 pixels or more: a damaged or forged header)"}
            if w * h > max_pixels:  # too large to decode safely; only the area counts then
                return {"width": w, "height": h, "verified": False}
            if img.format == "JPEG":  # a reduced-scale decode still reads every byte
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
            w, h = (h, w) if _turn_pending(img) else (w, h)
    except Exception as exc:
        text = str(exc)
        kind = "truncated" if "truncat" in text.lower() else "corrupt"
        return {"error": f"{kind}: {text}"}
    return {"width": w, "height": h, "verified": True}


def _signature(data: bytes) -> str | None:
    """The image format named by a file's first bytes, if any."""
    signatures = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP",
                  b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"II+\x00": "BigTIFF",
                  b"MM\x00+": "BigTIFF"}
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    return "WebP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None


_EXTENSIONS = frozenset(os.fsencode(e) for e in IMAGE_EXTENSIONS)
_STAMP = struct.Struct("<QqqQ")  # size, mtime_ns, ctime_ns, inode


class _Names:
    """Names to sort, kept compact: a folder of a million files holds them as fixed-width byte
    strings (numpy's "S" type, as long as the longest name) rather than as a million Python
    objects of about 60 bytes each."""

    def __init__(self) -> None:
        self.recent: list[bytes] = []
        self.parts: list[np.ndarray] = []

    def append(self, name: bytes) -> None:
        self.recent.append(name)
        if len(self.recent) == 4096:
            self.parts.append(np.array(self.recent, dtype=bytes))
            self.recent = []

    def sorted(self) -> Sequence[bytes]:
        """The names in byte order (as numpy bytes in a big folder)."""
        if not self.parts:
            return sorted(self.recent)
        parts = self.parts + [np.array(self.recent, dtype=bytes)] * bool(self.recent)
        self.parts = self.recent = []
        width = max(part.itemsize for part in parts)
        names = np.concatenate([part.astype(f"S{width}") for part in parts])
        names.sort()
        return names


def _walk_images(root: bytes, unlisted: list[SkippedFile], tops: list[str]
                 ) -> Iterator[tuple[bytes, int, bytes | str]]:
    """Every image file under `root` (bytes), following symlinks without loops, as
    (relative path, top, stamp or the reason it cannot be read), in the byte order of the
    relative paths: the order of the scan cache's rows, which this walk is merged with.

    `top` is the index in `tops` (extended here) of the first-level folder holding the file,
    -1 for a file directly under `root`. The stamp packs (size, mtime, ctime, inode): the
    change time too, since a copy that keeps the modification time (cp -p, rsync -a, tar) or an
    edit within the file system's timestamp resolution can leave size and mtime as they were,
    but not ctime, which no program can set back. Folders that cannot be listed are added to
    `unlisted`. Hidden files and folders (names starting with '.') are ignored.
    """
    seen: set[tuple[int, int]] = set()

    def visit(folder: bytes, rel: bytes, top: int) -> Iterator[tuple[bytes, int, bytes | str]]:
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            keys = _Names()  # names, folders with a trailing "/": sorted, they order the paths
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(b"."):
                        continue
                    try:
                        is_dir = entry.is_dir()  # follows symlinks
                    except OSError:
                        is_dir = False
                    if is_dir:
                        keys.append(name + b"/")
                    elif os.path.splitext(name)[1].lower() in _EXTENSIONS:
                        keys.append(name)
        except OSError as exc:
            unlisted.append(SkippedFile(os.fsdecode(folder), "unreadable folder: "
                                        f"{exc.strerror or exc}; its images are left out"))
            return
        for key in keys.sorted():
            key = bytes(key)
            if key.endswith(b"/"):
                if not rel:
                    tops.append(os.fsdecode(key[:-1]))
                yield from visit(os.path.join(folder, key[:-1]), rel + key,
                                 len(tops) - 1 if not rel else top)
                continue
            try:
                st = os.stat(os.path.join(folder, key))
            except OSError as exc:  # e.g. a dangling symlink
                yield rel + key, top, f"unreadable: {exc.strerror or exc}"
                continue
            yield rel + key, top, _STAMP.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                                              st.st_ino)

    yield from visit(root, b"", -1)


def _scan_cache_path(root: Path, cache_dir: Path) -> Path:
    key = hashlib.sha1(os.fsencode(root)).hexdigest()[:16]  # any name, UTF-8 or not
    return cache_dir / "scan" / f"{key}.sqlite"


# One row per file that was read; `rel` orders the rows as `_walk_images` orders the files.
_SCAN_SCHEMA = (
    """CREATE TABLE files (
        rel BLOB PRIMARY KEY,  -- path relative to the folder, as the file system's bytes
        stamp BLOB NOT NULL,   -- size, mtime_ns, ctime_ns, inode (`_STAMP`)
        sha256 BLOB,           -- 32 bytes, NULL when the file could not be read
        width INTEGER,         -- after EXIF orientation, NULL with an error
        height INTEGER,
        verified INTEGER NOT NULL,  -- 1: decoded in full, 0: too large to decode (header only)
        error TEXT             -- why the file is unusable (one line), or NULL
    ) WITHOUT ROWID""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)",  # the folder, for people
)


class _CachedRows:
    """The rows of a scan cache in `rel` order, read one at a time; none when the file is
    missing, of another version or damaged (the scan then reads those files again). `size` is
    (rows, bytes of their paths)."""

    def __init__(self, path: Path) -> None:
        self.conn, self.rows, self.size = None, iter(()), (0, 0)
        try:
            self.conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True, timeout=60)
            if self.conn.execute("PRAGMA user_version").fetchone()[0] == SCAN_CACHE_VERSION:
                rows, name_bytes = self.conn.execute(
                    "SELECT count(*), total(length(rel)) FROM files").fetchone()
                self.size = int(rows), int(name_bytes)
                self.rows = self.conn.execute(
                    "SELECT rel, stamp, sha256, width, height, verified, error FROM files "
                    "ORDER BY rel")
        except sqlite3.Error:  # missing, unreadable or not a database: start afresh
            pass

    def next(self) -> tuple | None:
        """The next row, or None at the end."""
        try:
            return next(self.rows, None)
        except sqlite3.Error:  # damaged part way: the remaining files are read again
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class _Listing:
    """A folder as one process saw it: its image files in path order, each either known (from
    the scan cache or read now) or pending, as columns filled row by row (`add`). Files without
    a class, under `use_classes`, are not rows: they are skipped at once.

    The columns are allocated at once for `rows` rows whose paths take `name_bytes` (what the
    scan cache holds: all of an unchanged folder) and grow only past that. Columns grown a row
    at a time would leave freed copies of themselves all over the heap, which a training
    process keeps (`training.loop.keep_freed_memory`).
    """

    def __init__(self, rows: int, name_bytes: int, classes: bool) -> None:
        self.rows = 0  # filled so far
        self.names = bytearray(name_bytes)  # relative paths, back to back
        self.offsets = array("I" if name_bytes < 2**32 else "q", [0]) * (rows + 1)
        self.width = array("H", [0]) * rows  # 2 bytes a side until one needs more (`fit`)
        self.height = array("H", [0]) * rows
        self.classes = classes  # whether `top` notes each row's first-level folder
        self.top = array("i", [0]) * (rows if classes else 0)  # index into `tops`
        self.sha256 = bytearray(32 * rows)
        self.state = bytearray(rows)  # a row's `_OK`, `_BAD` or `_PENDING`
        self.errors: dict[int, str] = {}  # row -> why it is unusable
        self.pending = array("q")  # rows this process must read
        self.stamps = bytearray()  # their stamps, 32 bytes each
        self.tops: list[str] = []  # first-level folder names
        self.skipped: list[SkippedFile] = []
        self.gone: list[bytes] = []  # cached paths no longer in the folder
        self.files = 0  # image files found, rows or not
        self.digest = hashlib.sha256()  # of their paths

    def add(self, rel: bytes, top: int, state: int, width: int = 0, height: int = 0,
            sha256: bytes | None = None) -> int:
        """Fill the next row; returns its number."""
        r = self.rows
        if r == len(self.state):
            self._grow(max(1024, r // 4))
        start = self.offsets[r]
        end = start + len(rel)
        if end > len(self.names):
            self.names.extend(bytes(max(len(rel), len(self.names) // 4, 1 << 16)))
        if end >= 2**32 and self.offsets.typecode == "I":
            self.offsets = array("q", self.offsets)
        self.names[start:end] = rel
        self.offsets[r + 1] = end
        if width > 0xFFFF or height > 0xFFFF:
            self.fit(max(width, height))
        self.width[r], self.height[r], self.state[r] = width, height, state
        if self.classes:
            self.top[r] = top
        if sha256 is not None:
            self.sha256[32 * r:32 * r + 32] = sha256
        self.rows = r + 1
        return r

    def _grow(self, more: int) -> None:
        """Room for `more` rows."""
        for column in (self.offsets, self.width, self.height) + ((self.top,) * self.classes):
            column.extend(array(column.typecode, [0]) * more)
        self.sha256.extend(bytes(32 * more))
        self.state.extend(bytes(more))

    def fit(self, side: int) -> None:
        """Make the width and height columns hold `side`."""
        if side > 0xFFFF and self.width.typecode == "H":
            self.width, self.height = array("i", self.width), array("i", self.height)

    def rel(self, row: int) -> bytes:
        """Row `row`'s relative path."""
        return bytes(self.names[self.offsets[row]:self.offsets[row + 1]])

    def view(self, name: str, dtype: type, per_row: int = 1, extra: int = 0) -> np.ndarray:
        """The filled part of column `name` ((rows + extra) * per_row items) as an array."""
        return np.frombuffer(getattr(self, name), dtype, count=(self.rows + extra) * per_row)


_OK, _BAD, _PENDING = 0, 1, 2


def _list_folder(root: Path, cache_path: Path, max_pixels: int, use_classes: bool,
                 note_gone: bool, show: bool) -> _Listing:
    """Walk `root` merged with its scan cache: a cached row whose stamp still matches is
    reused, other files are pending (`_Listing.pending`). With `note_gone`, cached paths no
    longer in the folder are collected to delete."""
    cached = _CachedRows(cache_path)
    out = _Listing(*cached.size, use_classes)
    bar = tqdm(desc=f"listing {root.name}", unit=" files", disable=not show, delay=1.0,
               dynamic_ncols=True)
    try:
        row = cached.next()
        for rel, top, stamp in _walk_images(os.fsencode(root), out.skipped, out.tops):
            out.files += 1
            out.digest.update(rel + b"\0")
            if not out.files % 4096:
                bar.update(4096)
            while row is not None and row[0] < rel:
                if note_gone:
                    out.gone.append(row[0])
                row = cached.next()
            known = None
            if row is not None and row[0] == rel:
                known, row = row, cached.next()
            if use_classes and top < 0:
                out.skipped.append(SkippedFile(os.path.join(root, os.fsdecode(rel)),
                                               "no class: not inside a class sub-folder"))
            elif isinstance(stamp, str):  # it cannot even be stat'ed
                out.errors[out.add(rel, top, _BAD)] = stamp
            elif known is not None and known[1] == stamp and (
                    known[6] is not None or known[5] or known[3] * known[4] > max_pixels):
                if known[6] is not None:
                    out.errors[out.add(rel, top, _BAD)] = known[6]
                else:
                    out.add(rel, top, _OK, known[3], known[4], known[2])
            else:
                out.pending.append(out.add(rel, top, _PENDING))
                out.stamps += stamp
        while note_gone and row is not None:
            out.gone.append(row[0])
            row = cached.next()
    finally:
        cached.close()
        bar.close()
    return out


@dataclass
class _Found:
    """What reading some rows found, in a form cheap to send between ranks."""

    rows: np.ndarray  # (K,) int64
    width: np.ndarray  # (K,) int32; 0 where unusable
    height: np.ndarray  # (K,) int32
    sha256: np.ndarray  # (K, 32) uint8; zeros where unreadable
    verified: np.ndarray  # (K,) bool
    errors: dict[int, str]  # row -> reason, for the unusable ones


def _probe_all(paths: Iterable[str], max_pixels: int, num_workers: int,
               parallel: bool) -> Iterator[dict]:
    """`_probe` of each path, in order; in `num_workers` processes when `parallel`, with a
    bounded number of paths in flight (never a task per file of the whole folder)."""
    if not parallel:
        for path in paths:
            yield _probe(path, max_pixels)
        return
    paths = iter(paths)
    with ProcessPoolExecutor(num_workers) as pool:
        pending: deque = deque()
        while True:
            while len(pending) < 4 * num_workers:
                chunk = [p for _, p in zip(range(16), paths)]
                if not chunk:
                    break
                pending.append(pool.submit(_probe_chunk, chunk, max_pixels))
            if not pending:
                return
            yield from pending.popleft().result()


def _probe_chunk(paths: list[str], max_pixels: int) -> list[dict]:
    return [_probe(path, max_pixels) for path in paths]


def _read_rows(root: str, listing: _Listing, rows: np.ndarray, max_pixels: int,
               num_workers: int, show: bool) -> _Found:
    """Hash and decode the files of `rows`, printing what their decoders said, named."""
    n = len(rows)
    found = _Found(rows.astype(np.int64), np.zeros(n, np.int32), np.zeros(n, np.int32),
                   np.zeros((n, 32), np.uint8), np.zeros(n, bool), {})
    paths = (os.path.join(root, os.fsdecode(listing.rel(r))) for r in rows.tolist())
    with tqdm(total=n, desc="reading images", unit=" files", disable=not show, delay=1.0,
              dynamic_ncols=True) as bar:
        probed = _probe_all(paths, max_pixels, num_workers, num_workers > 1 and n > 32)
        for k, (row, info) in enumerate(zip(rows.tolist(), probed)):
            if "sha256" in info:
                found.sha256[k] = np.frombuffer(info["sha256"], np.uint8)
            if "error" in info:
                found.errors[row] = info["error"]
            else:
                found.width[k], found.height[k] = info["width"], info["height"]
                found.verified[k] = info["verified"]
            for line in info.get("messages", []):
                path = os.path.join(root, os.fsdecode(listing.rel(row)))
                tqdm.write(printable(f"warning: {path}: {line}"), file=sys.stderr)
            bar.update(1)
    return found


def _write_scan_cache(path: Path, root: Path, listing: _Listing, sha256: np.ndarray,
                      width: np.ndarray, height: np.ndarray, verified: np.ndarray) -> None:
    """Store the rows this process had pending, now read (the columns sha256 (M, 32), width,
    height, verified (M,) and `listing.errors` hold what was found), and forget the paths gone
    from the folder. A cache that cannot be written is reported, not fatal: the next start
    reads those files again."""
    def rows() -> Iterator[tuple]:
        for k, row in enumerate(listing.pending.tolist()):
            error, digest = listing.errors.get(row), sha256[row].tobytes()
            yield (listing.rel(row), bytes(listing.stamps[32 * k:32 * k + 32]),
                   digest if any(digest) else None,
                   None if error else int(width[row]), None if error else int(height[row]),
                   int(verified[row]), error)

    for attempt in range(2):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(sqlite3.connect(path, timeout=60,
                                                    isolation_level=None)) as conn:
                conn.execute("BEGIN IMMEDIATE")
                if conn.execute("PRAGMA user_version").fetchone()[0] != SCAN_CACHE_VERSION:
                    conn.execute("DROP TABLE IF EXISTS files")
                    conn.execute("DROP TABLE IF EXISTS meta")
                    for statement in _SCAN_SCHEMA:
                        conn.execute(statement)
                    conn.execute("INSERT INTO meta VALUES ('root', ?)",
                                 (os.fsencode(root).decode("utf-8", "backslashreplace"),))
                    conn.execute(f"PRAGMA user_version = {SCAN_CACHE_VERSION}")
                conn.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 rows())
                conn.executemany("DELETE FROM files WHERE rel = ?", ((g,) for g in listing.gone))
                conn.execute("COMMIT")
            return
        except sqlite3.DatabaseError as exc:
            if attempt == 0 and ("not a database" in str(exc) or "malformed" in str(exc)):
                path.unlink(missing_ok=True)  # damaged: only a cache, so start it afresh
                continue
            error = exc
        except (sqlite3.Error, OSError) as exc:
            error = exc
        break
    tqdm.write(printable(f"warning: {path}: scan cache not updated ({error}); the next start "
                         "reads these files again"), file=sys.stderr)


def scan_folder(root: str | os.PathLike[str], *, use_classes: bool = False,
                max_pixels: int = 100_000_000, num_workers: int = 2,
                cache_dir: str | os.PathLike[str] | None = None, progress: bool = False,
                dist: DistInfo | None = None) -> ScanResult:
    """Scan `root` recursively for images; see the module docstring.

    With `use_classes`, the label is the index of the first-level sub-folder's name in the
    sorted list of such names; files directly under `root` are then skipped. `progress` shows
    tqdm bars (listing, then reading with files/s) when they take over a second.

    Under torchrun (`dist`, a `DistInfo` with world_size > 1; every rank must call this with
    the same arguments) each rank lists the folder and merges it with its own scan cache; the
    ranks refuse to go on (`ConfigError`) unless they list the same files; the files that any
    rank lacks in its cache are split over the ranks, each reads every world_size-th one, and
    all ranks share what they found, so each returns the same result. The process with local
    rank 0 writes its machine's cache; `progress` is then rank 0's.
    """
    together = dist is not None and dist.world_size > 1
    rank, world = (dist.rank, dist.world_size) if together else (0, 1)
    writer = not together or dist.local_rank == 0
    show = progress and rank == 0
    root = Path(root).expanduser().resolve()
    cache_path = _scan_cache_path(root, Path(cache_dir) if cache_dir else default_cache_dir())

    def listing() -> _Listing:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: dataset folder not found")
        return _list_folder(root, cache_path, max_pixels, use_classes, writer, show)

    found = on_every_rank(listing) if together else listing()
    n = found.rows
    pending = np.zeros(n, dtype=bool)
    pending[np.frombuffer(found.pending, np.int64)] = True
    if together:
        views = all_gather_objects((found.files, found.digest.hexdigest(),
                                    np.packbits(pending)))
        if len({(files, digest) for files, digest, _ in views}) > 1:
            seen = ", ".join(f"rank {r}: {files} images" for r, (files, _, _) in enumerate(views))
            raise ConfigError(f"{root}: the ranks see different files ({seen}; or other names); "
                              "every machine must see the same dataset, unchanged while the run "
                              "starts")
        for _, _, bits in views:
            pending |= np.unpackbits(bits, count=n).astype(bool)
    to_read = np.flatnonzero(pending)  # rows any rank lacks: every rank reads its share
    mine = _read_rows(str(root), found, to_read[rank::world], max_pixels, num_workers, show)
    shares = all_gather_objects(mine) if together else [mine]

    # Columns: the listing's buffers, now final, seen as arrays (no copies).
    for share in shares:
        found.fit(int(max(share.width.max(initial=0), share.height.max(initial=0))))
    side = np.uint16 if found.width.typecode == "H" else np.int32
    width, height = found.view("width", side), found.view("height", side)
    sha256 = found.view("sha256", np.uint8, 32).reshape(n, 32)
    state = found.view("state", np.uint8)
    verified = np.zeros(n, dtype=bool)
    for share in shares:
        width[share.rows], height[share.rows] = share.width, share.height
        sha256[share.rows], verified[share.rows] = share.sha256, share.verified
        state[share.rows] = _OK
        state[list(share.errors)] = _BAD
        if found.errors:  # a row this rank had cached as bad may have been read again
            for row in share.rows.tolist():
                found.errors.pop(row, None)
        found.errors.update(share.errors)
    if writer and (len(found.pending) or found.gone):
        _write_scan_cache(cache_path, root, found, sha256, width, height, verified)
    del verified
    if together:
        barrier()  # a scan that follows at once reads the cache as written

    def path(row: int) -> str:
        return os.path.join(root, os.fsdecode(found.rel(row)))

    skipped = found.skipped + [SkippedFile(path(row), reason)
                               for row, reason in found.errors.items()]
    ok = state == _OK
    for lo in range(0, n, _CHUNK):
        area = np.multiply(width[lo:lo + _CHUNK], height[lo:lo + _CHUNK], dtype=np.int64)
        for row in (lo + np.flatnonzero(ok[lo:lo + _CHUNK] & (area > max_pixels))).tolist():
            skipped.append(SkippedFile(path(row), f"decompression bomb: {width[row]}x"
                                                  f"{height[row]} exceeds {max_pixels} pixels"))
            ok[row] = False
    class_names: list[str] = []
    label = np.broadcast_to(np.int16(-1), (n,))  # unlabelled: one value stands for all
    if use_classes:
        top = found.view("top", np.int32)
        used = np.unique(top)  # first-level folders holding an image file, usable or not
        class_names = sorted(found.tops[t] for t in used.tolist())
        where = {name: i for i, name in enumerate(class_names)}
        index = np.full(len(found.tops) + 1, -1, dtype=np.int64)  # index -1: no class
        index[used] = [where[found.tops[t]] for t in used.tolist()]
        label = index[top].astype(np.int16 if len(class_names) < 2**15 else np.int32)
    offsets = found.view("offsets", np.uint32 if found.offsets.typecode == "I" else np.int64,
                         extra=1)
    names = np.frombuffer(found.names, np.uint8, count=int(offsets[-1]))
    columns = _Columns(str(root), _frozen(names), _frozen(offsets), _frozen(width),
                       _frozen(height), _frozen(label), _frozen(sha256))
    records = ImageTable(columns, None if ok.all() else np.flatnonzero(ok))
    return ScanResult(str(root), records, sorted(skipped, key=lambda s: s.path), class_names,
                      read=len(to_read))


# ----------------------------------------------------------------------------------------------
# Synthetic data


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


# ----------------------------------------------------------------------------------------------
# Pixel batches for training


def _resize(img: Image.Image, size: tuple[int, int],
            box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """`box` (l, t, r, b; all of `img` by default) of `img` resampled to `size` (w, h)."""
    # Pillow's reducing_gap resamples large downscales in two cheap stages, nearly losslessly
    return img.resize(size, Image.BICUBIC, box=box, reducing_gap=3.0)


def crop_to_bucket(img: Image.Image, resized: tuple[int, int],
                   crop: tuple[int, int, int, int], flip: bool = False) -> np.ndarray:
    """Resize `img` to `resized` (w, h), cut `crop` (l, t, r, b), optionally mirror: (H, W, 3)."""
    if img.size != resized:
        img = _resize(img, resized)
    out = np.array(img.crop(crop))  # a writable copy, (H, W, 3)
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def random_crop_box(width: int, height: int, bucket: tuple[int, int], rng: np.random.Generator
                    ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """A random bucket-sized crop at a random scale between 'cover' and native resolution.

    Returns (resized size, crop box). Images smaller than the bucket are upscaled to cover it.
    """
    bw, bh = bucket
    cover = max(bw / width, bh / height)
    scale = cover if cover >= 1 else math.exp(rng.uniform(math.log(cover), 0.0))
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = int(rng.integers(0, rw - bw + 1)), int(rng.integers(0, rh - bh + 1))
    return (rw, rh), (left, top, left + bw, top + bh)


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


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)
