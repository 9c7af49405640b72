"""Scanning an image folder: every file's size, content hash and whether it decodes, cached.

`scan_folder` walks a folder once, reads every image's header and checks that it decodes, and
returns the usable files as an `ImageTable` plus a `SkippedFile` (path and reason) for every bad
one and every folder it cannot list. Under torchrun the ranks split the files to read and share
what they found. Results are cached in one SQLite file per folder (`$LDM_CACHE_DIR/scan/`), a
row per file keyed by its relative path and stamped with (size, mtime, ctime, inode), so
rescanning an unchanged folder only stats the files, and only new or changed files are read and
written back. (Scan caches of older versions, JSON files, are ignored: a cache can always be
rebuilt from the folder.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import struct
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from training.config import ConfigError
from training.distributed import DistInfo, all_gather_objects, barrier, on_every_rank
from training.config import default_cache_dir
from training.image_table import (CHUNK_ROWS, ImageColumns, ImageTable, ScanResult, SkippedFile,
                                  frozen)
from training.images import printable, probe_file


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SCAN_CACHE_VERSION = 4  # bump when `probe_file` changes what it records or the table's layout
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
    process keeps (`training.runtime.keep_freed_memory`).
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
    """`probe_file` of each path, in order; in `num_workers` processes when `parallel`, with a
    bounded number of paths in flight (never a task per file of the whole folder)."""
    if not parallel:
        for path in paths:
            yield probe_file(path, max_pixels)
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
    return [probe_file(path, max_pixels) for path in paths]


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
    to_read = _rows_to_read(root, found, together)  # rows any rank lacks: each reads a share
    mine = _read_rows(str(root), found, to_read[rank::world], max_pixels, num_workers, show)
    shares = all_gather_objects(mine) if together else [mine]
    width, height, sha256, state, verified = _merge_reads(found, shares)
    if writer and (len(found.pending) or found.gone):
        _write_scan_cache(cache_path, root, found, sha256, width, height, verified)
    del verified
    if together:
        barrier()  # a scan that follows at once reads the cache as written
    ok, skipped = _usable(root, found, width, height, state, max_pixels)
    class_names, label = _labels(found, use_classes)
    offsets = found.view("offsets", np.uint32 if found.offsets.typecode == "I" else np.int64,
                         extra=1)
    names = np.frombuffer(found.names, np.uint8, count=int(offsets[-1]))
    columns = ImageColumns(str(root), frozen(names), frozen(offsets), frozen(width),
                           frozen(height), frozen(label), frozen(sha256))
    records = ImageTable(columns, None if ok.all() else np.flatnonzero(ok))
    return ScanResult(str(root), records, sorted(skipped, key=lambda s: s.path), class_names,
                      read=len(to_read))


def _rows_to_read(root: Path, found: _Listing, together: bool) -> np.ndarray:
    """The rows that this process, or under torchrun any rank, has pending (ascending); the
    ranks must list the same files (ConfigError otherwise)."""
    pending = np.zeros(found.rows, dtype=bool)
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
            pending |= np.unpackbits(bits, count=found.rows).astype(bool)
    return np.flatnonzero(pending)


def _merge_reads(found: _Listing, shares: Sequence[_Found]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Enter what the ranks read (`shares`) into the listing's columns, now final, seen as
    arrays (no copies): (width, height (N,), sha256 (N, 32), state (N,), verified (N,))."""
    n = found.rows
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
    return width, height, sha256, state, verified


def _usable(root: Path, found: _Listing, width: np.ndarray, height: np.ndarray,
            state: np.ndarray, max_pixels: int) -> tuple[np.ndarray, list[SkippedFile]]:
    """(usable (N,) bool, every skipped file with its reason): the files listed as skipped,
    those that failed to read, and decompression bombs."""
    def path(row: int) -> str:
        return os.path.join(root, os.fsdecode(found.rel(row)))

    skipped = found.skipped + [SkippedFile(path(row), reason)
                               for row, reason in found.errors.items()]
    ok = state == _OK
    for lo in range(0, found.rows, CHUNK_ROWS):
        area = np.multiply(width[lo:lo + CHUNK_ROWS], height[lo:lo + CHUNK_ROWS], dtype=np.int64)
        for row in (lo + np.flatnonzero(ok[lo:lo + CHUNK_ROWS] & (area > max_pixels))).tolist():
            skipped.append(SkippedFile(path(row), f"decompression bomb: {width[row]}x"
                                                  f"{height[row]} exceeds {max_pixels} pixels"))
            ok[row] = False
    return ok, skipped


def _labels(found: _Listing, use_classes: bool) -> tuple[list[str], np.ndarray]:
    """(class names, label (N,)): with `use_classes` the index of each row's first-level folder
    among the sorted names of those holding an image file (usable or not), int16 below 2**15
    classes; else none, and one broadcast -1 for every row."""
    if not use_classes:
        return [], np.broadcast_to(np.int16(-1), (found.rows,))  # one value stands for all
    top = found.view("top", np.int32)
    used = np.unique(top)  # first-level folders holding an image file, usable or not
    class_names = sorted(found.tops[t] for t in used.tolist())
    where = {name: i for i, name in enumerate(class_names)}
    index = np.full(len(found.tops) + 1, -1, dtype=np.int64)  # index -1: no class
    index[used] = [where[found.tops[t]] for t in used.tolist()]
    label = index[top].astype(np.int16 if len(class_names) < 2**15 else np.int32)
    return class_names, label
