"""The images of a data set as a table: records, skipped files, exact duplicates.

An `ImageTable` holds what a list of `ImageRecord`s would, as shared numpy columns (a few dozen
bytes a row where a record object takes several hundred), and reads like that list. A scan
(`training/scan.py`) returns one inside a `ScanResult`; `fold_duplicates` keeps one file of each
content.
"""

from __future__ import annotations

import json
import operator
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from training.images import printable


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


# Rows at a time in the vectorised passes over every image: bounds the memory they take.
CHUNK_ROWS = 1 << 16


def _index_array(values: Iterable[int] | np.ndarray, limit: int) -> np.ndarray:
    """`values` (row numbers below `limit`) in the smallest unsigned type that holds them."""
    return np.asarray(values, dtype=np.uint32 if limit <= 2**32 else np.int64)


def frozen(array_: np.ndarray) -> np.ndarray:
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
class ImageColumns:
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

    def __init__(self, columns: ImageColumns, rows: np.ndarray | None = None) -> None:
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
        columns = ImageColumns(
            root, frozen(np.frombuffer(b"".join(names), dtype=np.uint8)), frozen(offsets),
            frozen(np.array([r.width for r in records], dtype=np.int32)),
            frozen(np.array([r.height for r in records], dtype=np.int32)),
            frozen(np.array([r.label for r in records], dtype=np.int32)),
            frozen(np.frombuffer(digests, dtype=np.uint8).reshape(-1, 32)))
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
        return ImageTable(replace(self._cols, label=frozen(label)), self._rows)

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
        for lo in range(0, len(self), CHUNK_ROWS):
            mine = self.content_keys(lo, lo + CHUNK_ROWS)
            at = np.minimum(np.searchsorted(theirs, mine), len(theirs) - 1)
            hit[lo:lo + CHUNK_ROWS] = theirs[at] == mine
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
