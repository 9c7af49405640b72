"""The latent cache: encode every training crop once with the VAE, reuse it across runs.

An entry holds the VAE posterior's mean and log-variance (fp16) of one bucket crop, so training
draws a fresh latent `mean + exp(logvar / 2) · ε` at every step. Its key hashes the image's
content (sha256 of the file), its bucket, resized size and crop box, the horizontal flip, and the
VAE fingerprint (weights and config): a changed image, grid or VAE never meets a stale latent.

Layout of a cache folder (default `$LDM_CACHE_DIR/latents`, shareable by runs and ranks):

    index.sqlite    entries(key -> shard, row), shards(name -> bytes, sha256, rows, ...),
                    checks(shard -> stamp, per-row checksums), dropped(shard -> reason)
    shards/*.safetensors   tensors `mean` and `logvar`, (rows, C, h, w) fp16, one bucket each;
                    names carry the writer's rank and a random token, so writers never collide
    lock            flock: builders, readers, checks and prune dry runs hold it shared; cleanup,
                    deleting shard files and prune exclusive

A shard is written to a temporary file, fsynced and renamed into place, and only then are its
index rows committed, so a kill at any moment loses at most the shard being written. A shard file
the index does not list (its writer died before the commit, or the index was lost) is listed again
from its own metadata by the next build that has the cache to itself.

Start-up reads the index and each reused shard's header (it lists the shard's keys: about 70
bytes per entry), not the shards themselves. A build trusts a shard whose stamp is unchanged: its
size, modification time, inode and the sha256 of its safetensors header, recorded when the shard
was written or last checked in full. A shard whose
stamp changed, or that has none (written before stamps existed: older indexes gain the `checks`
and `dropped` tables in place and nothing is re-encoded), is checked in full once (size, sha256 of
the whole file), and then its stamp and per-row checksums (the first ROW_SUM_BYTES of a BLAKE2b of
each row's mean and log-variance bytes, kept in the index) are recorded. Every build also reads
SAMPLE_ROWS rows drawn among all rows of the shards it trusts and compares their checksums, so
silent corruption that keeps the stamp is still found over time, for the bytes of a few rows. The
sample is seeded with the index's start counter (meta `starts`, which every build increments),
so successive builds read different rows and each build's sample is reproducible. A damaged or
missing shard, or one with a sampled row that does not match, is reported (file, and row where
one is to blame), dropped, and its entries are re-encoded. `cache.py --verify` checks every shard
in full: size, sha256, header, every entry's row and every row's checksum; it records stamps
too, so running it once on a large cache from before stamps spares the next training start
(whose other ranks wait on rank 0's checks) that one full read.

Removal is crash-safe: a shard is first tombstoned (its entries deleted and its name entered in
`dropped`, in one transaction), then its file is deleted, then its index rows; a process killed in
between leaves a tombstone that the next process with the cache to itself completes, so a dropped
shard never comes back and pruned entries never reappear. Only the holder of the exclusive lock
deletes shard files: a build that shares the cache with another process still drops a damaged
shard from the index and re-encodes its entries into new shards, but leaves the file, which the
other process may still map, to a later build, prune or `--verify` that has the cache to itself.

    UV_CACHE_DIR=.uv-cache uv run python cache.py --dataset DIR --vae vae/ --resolution 256 --json
    UV_CACHE_DIR=.uv-cache uv run python cache.py --verify --cache-dir DIR

The folder is meant to be shared: entries of other datasets, resolutions, VAEs and of `--flip`
runs live side by side. `--prune` deletes every entry the invocation does not use, whoever paid
for it. `--prune --dry-run` builds as usual, then lists what a prune would delete (entries and
bytes per VAE and latent size) and deletes nothing.

Under `torchrun` every rank encodes a disjoint share of the missing entries; the result equals
the single-process cache. Across machines the folder must be one folder on a filesystem every
machine shares (checked before any work: ranks that do not see rank 0's probe file refuse).
Training builds or updates the cache itself with `ensure_cache` and reads it with `LatentReader`.
Keys travel as raw sha256 digests, uint8 (records, orientations, 32) (`CacheSummary.keys`;
`record_hex_keys` gives one record's keys as text), and the index is looked up in chunks, so a
rank holds about 40 bytes per entry: the digest, and the reader's shard and row (int32 each).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import socket
import sqlite3
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from training.data import (ImageLoadError, ImageRecord, crop_to_bucket, default_cache_dir,
                           load_image, to_unit_range)
from training.checkpoint import fsync_dir
from training.distributed import DistInfo, all_gather_objects, barrier, broadcast_object

FORMAT_VERSION = 1  # of the index and shard layout: a folder of another version is refused
# Of the key recipe and the pixels an entry is encoded from: bumping it gives every image new
# keys, so entries made by older code are no longer read (and `--prune` removes them). 2: JPEGs
# decoded at reduced scale are resized from the exact area of the file (`load_image`).
KEY_VERSION = 2
INDEX_NAME = "index.sqlite"
SHARD_DIR = "shards"
LOCK_NAME = "lock"
SHARD_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"
TARGET_SHARD_BYTES = 64 << 20  # automatic shard size: about this many bytes per shard file
SAMPLE_ROWS = 8  # rows of trusted shards each build reads and compares with their checksums
ROW_SUM_BYTES = 8  # per-row checksum: this many bytes of a BLAKE2b digest
DIGEST_BYTES = 32  # an entry key is a sha256 digest: 32 bytes, 64 hex digits in the index
LOOKUP_CHUNK = 500  # keys per index query (under sqlite's oldest limit of 999 parameters)
BUSY_TIMEOUT_S = 600.0  # sqlite waits this long for another writer's lock
# How long a rank looks for the file rank 0 just created before it concludes that they do not
# share the cache folder: network filesystems may report a new name as missing for a while.
SHARED_PROBE_WAIT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    name TEXT PRIMARY KEY, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, rows INTEGER NOT NULL,
    fingerprint TEXT NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, shard TEXT NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_shard ON entries (shard);
CREATE TABLE IF NOT EXISTS checks (
    shard TEXT PRIMARY KEY, stamp TEXT NOT NULL, row_sums BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dropped (shard TEXT PRIMARY KEY, reason TEXT NOT NULL) WITHOUT ROWID;
"""
# `checks` and `dropped` came later than FORMAT_VERSION 1: `connect` adds them to older indexes
# (a shard without a `checks` row is checked in full once). They are tables of their own rather
# than columns of `shards`, so code from before them keeps writing into a shared index.


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_latent_dir() -> Path:
    """Where the latent cache lives unless told otherwise: `$LDM_CACHE_DIR/latents`."""
    return default_cache_dir() / "latents"


# ----------------------------------------------------------------------------------------------
# Keys


def _entry_digest(sha256: str, bucket: tuple[int, int], resized: tuple[int, int],
                  crop: tuple[int, int, int, int], flip: bool, fingerprint: str) -> bytes:
    (bw, bh), (rw, rh), (left, top, right, bottom) = bucket, resized, crop
    text = (f"ldm-latent-cache/{KEY_VERSION}|{sha256}|{bw}x{bh}|{rw}x{rh}|"
            f"{left},{top},{right},{bottom}|flip={int(flip)}|{fingerprint}")
    return hashlib.sha256(text.encode()).digest()


def entry_key(sha256: str, bucket: tuple[int, int], resized: tuple[int, int],
              crop: tuple[int, int, int, int], flip: bool, fingerprint: str) -> str:
    """Content address of one cache entry (64 hex digits)."""
    return _entry_digest(sha256, bucket, resized, crop, flip, fingerprint).hex()


def record_keys(records: Sequence[ImageRecord], placements: Sequence, buckets: Sequence,
                fingerprint: str, flip: bool) -> np.ndarray:
    """Every record's entry keys as raw digests, uint8 (N, O, 32): O = 1, or 2 with `flip`
    (orientation 1 is the mirrored crop). `entry_key` is the hex form of one of them."""
    flips = (False, True) if flip else (False,)
    out = np.empty((len(records), len(flips), DIGEST_BYTES), dtype=np.uint8)  # (N, O, 32)
    for i in range(len(records)):
        rec, p = records[i], placements[i]
        bucket, resized, crop = tuple(buckets[p.bucket]), tuple(p.resized), tuple(p.crop)
        for o, f in enumerate(flips):
            out[i, o] = np.frombuffer(_entry_digest(rec.sha256, bucket, resized, crop, f,
                                                    fingerprint), dtype=np.uint8)
    return out


def record_hex_keys(keys: np.ndarray, i: int) -> tuple[str, ...]:
    """The entry keys of record `i` of `keys` (uint8 (N, O, 32)) as 64-digit hex strings."""
    return tuple(bytes(k).hex() for k in keys[i])


def iter_hex_keys(keys: np.ndarray) -> Iterator[str]:
    """Every key of `keys` (uint8 (N, O, 32)) as hex, record by record, one at a time."""
    for k in keys.reshape(-1, DIGEST_BYTES):
        yield bytes(k).hex()


def keys_from_hex(rows: Sequence[Sequence[str]]) -> np.ndarray:
    """uint8 (N, O, 32) digests of per-record hex keys, e.g. [(plain, mirrored), ...]; every
    record must have the same number of keys."""
    width = len(rows[0]) if len(rows) else 1
    if any(len(r) != width for r in rows):
        raise ValueError(f"every record needs {width} key(s); got {sorted({len(r) for r in rows})}")
    flat = bytes.fromhex("".join(k for r in rows for k in r))
    return np.frombuffer(flat, dtype=np.uint8).reshape(len(rows), width, DIGEST_BYTES).copy()


# ----------------------------------------------------------------------------------------------
# Storage: folder, lock, index, shard files


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    conn.execute(f"BEGIN {mode}")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _parse_header(raw: bytes, path: Path) -> dict:
    """The header dict of a safetensors file from its first 8 + header-length bytes `raw`."""
    try:
        header = json.loads(raw[8:])
    except ValueError:
        raise ValueError(f"{path}: damaged safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: damaged safetensors header")
    return header


def _header_bytes(f: io.BufferedReader, path: Path) -> bytes:
    """The first 8 + header-length bytes of an open safetensors file."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    length = int.from_bytes(head, "little")
    if length > 100 << 20:
        raise ValueError(f"{path}: not a safetensors file (header length {length})")
    body = f.read(length)
    if len(body) < length:
        raise ValueError(f"{path}: damaged safetensors header (the file ends inside it)")
    return head + body


def _read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        raw = _header_bytes(f, path)
    return len(raw), _parse_header(raw, path)


def _stamp(path: Path) -> tuple[str, int, dict]:
    """(stamp, offset of the data section, header) of a shard file, reading only its header.

    The stamp is "size:mtime_ns:inode:sha256 of the header bytes"; a shard whose stamp is the one
    recorded in the index is trusted without reading its data. Raises OSError or ValueError.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        raw = _header_bytes(f, path)
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{hashlib.sha256(raw).hexdigest()}"
    return stamp, len(raw), _parse_header(raw, path)


def _row_layout(header: dict, start: int, size: int, path: Path
                ) -> tuple[int, int, int, int]:
    """(rows, bytes per row, file offset of `mean`, file offset of `logvar`) of a shard whose
    data section starts at `start` in a file of `size` bytes; ValueError if they do not fit."""
    try:
        (m_lo, m_hi), (l_lo, l_hi) = (header[n]["data_offsets"] for n in ("mean", "logvar"))
        rows = int(header["mean"]["shape"][0])
        same = header["mean"]["shape"] == header["logvar"]["shape"]
    except (KeyError, TypeError, ValueError, IndexError):
        raise ValueError(f"{path}: expected tensors 'mean' and 'logvar' in the shard") from None
    width = (m_hi - m_lo) // rows if rows > 0 else 0
    if (not same or rows <= 0 or width * rows != m_hi - m_lo or l_hi - l_lo != m_hi - m_lo
            or start + max(m_hi, l_hi) > size):
        raise ValueError(f"{path}: shard tensors do not fit its header; rebuild the cache")
    return rows, width, start + m_lo, start + l_lo


def _row_sum(mean_row, logvar_row) -> bytes:
    """Checksum of one row: its mean's then its log-variance's bytes (any buffers)."""
    h = hashlib.blake2b(digest_size=ROW_SUM_BYTES)
    h.update(mean_row)
    h.update(logvar_row)
    return h.digest()


def _row_sums(data: np.ndarray, start: int, header: dict, path: Path) -> bytes:
    """Every row's checksum, concatenated, of the shard whose bytes are `data` (uint8)."""
    rows, width, mean_at, logvar_at = _row_layout(header, start, len(data), path)
    mean = data[mean_at:mean_at + rows * width].reshape(rows, width)  # (rows, row bytes)
    logvar = data[logvar_at:logvar_at + rows * width].reshape(rows, width)
    return b"".join(_row_sum(m, lv) for m, lv in zip(mean, logvar))


@dataclass
class _FullCheck:
    """What reading a whole shard found: `problems` (phrases, empty when whole), its `sha256`,
    and when its header is readable its `stamp`, per-row checksums `sums` and header `keys`."""

    problems: list[str]
    sha256: str | None = None
    stamp: str | None = None
    sums: bytes | None = None
    keys: list | None = None


def _full_check(path: Path, size: int, sha256: str | None, recorded: bytes | None = None
                ) -> _FullCheck:
    """Read a shard file in full and check it against its index row: size, sha256 (unless
    None: a shard not yet listed), header and, where `recorded` per-row checksums are given,
    each row (a mismatch names the row)."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return _FullCheck(["file missing"])
    if actual != size:
        return _FullCheck([f"size {actual} bytes, expected {size}"])
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        check = _FullCheck([], hashlib.sha256(data).hexdigest())
        if sha256 is not None and check.sha256 != sha256:
            check.problems.append("sha256 checksum mismatch")
        try:
            check.stamp, start, header = _stamp(path)
            check.sums = _row_sums(data, start, header, path)
            keys = json.loads(header.get("__metadata__", {}).get("keys", "null"))
        except (ValueError, TypeError, AttributeError) as exc:
            check.problems.append(str(exc).split(": ", 1)[-1])
            return check
    finally:
        del data
    check.keys = keys if isinstance(keys, list) else None
    if recorded is not None and len(recorded) == len(check.sums):
        n = ROW_SUM_BYTES
        check.problems += [f"row {r} does not match its checksum"
                           for r in range(len(recorded) // n)
                           if check.sums[r * n:(r + 1) * n] != recorded[r * n:(r + 1) * n]]
    return check


def _check_rows(path: Path, layout: tuple[int, int, int, int], rows: Sequence[int],
                recorded: Sequence[bytes]) -> int | None:
    """The first of `rows` whose bytes do not match its `recorded` checksum, or None; reads only
    those rows of the shard file, whose `_row_layout` is `layout`."""
    _, width, mean_at, logvar_at = layout
    fd = os.open(path, os.O_RDONLY)
    try:
        for row, expected in zip(rows, recorded):
            mean = os.pread(fd, width, mean_at + row * width)
            logvar = os.pread(fd, width, logvar_at + row * width)
            if _row_sum(mean, logvar) != expected:
                return row
    finally:
        os.close(fd)
    return None


def _sample_rows(seed: int, shards: Sequence[tuple[str, int]], count: int
                 ) -> list[tuple[str, int]]:
    """`count` distinct (shard, row) drawn uniformly among all rows of `shards` ((name, rows),
    in the given order) by a generator seeded with `seed`, in shard order."""
    sizes = np.asarray([rows for _, rows in shards], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0 or count <= 0:
        return []
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(count, total),
                                                       replace=False))
    ends = np.cumsum(sizes)
    owner = np.searchsorted(ends, picks, side="right")
    return [(shards[s][0], int(p - ends[s] + sizes[s])) for s, p in zip(owner, picks)]


def _map_shard(path: Path) -> dict[str, np.ndarray]:
    """Memory-map a shard: {"mean": (rows, C, h, w), "logvar": ...} fp16 views, one mmap."""
    start, header = _read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name in ("mean", "logvar"):
        info = header.get(name)
        if not info or info.get("dtype") != "F16":
            raise ValueError(f"{path}: expected an F16 tensor {name!r} in the shard")
        lo, hi = info["data_offsets"]
        if start + hi > len(data):
            raise ValueError(f"{path}: shard is shorter than its header says; rebuild the cache")
        out[name] = data[start + lo:start + hi].view(np.float16).reshape(info["shape"])
    return out


@dataclass(frozen=True)
class _ShardInfo:
    """A shard's index row: size, whole-file sha256, rows, and its recorded stamp and length
    of per-row checksums (None, 0 when it was never checked since stamps exist)."""

    bytes: int
    sha256: str
    rows: int
    stamp: str | None
    sums_bytes: int


class _Store:
    """A cache folder: its sqlite index, shard files and lock."""

    def __init__(self, root: str | os.PathLike[str], create: bool = True) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / SHARD_DIR
        if create:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None

    # -- locking ----------------------------------------------------------------------------
    def lock(self, exclusive: bool, blocking: bool = True) -> bool:
        """Take (or convert to) the shared or exclusive lock; False if not free (non-blocking)."""
        if self._lock_fd is None:
            self._lock_fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking
                                                                    else fcntl.LOCK_NB)
        try:
            fcntl.flock(self._lock_fd, flags)
        except BlockingIOError:
            return False
        return True

    def unlock(self) -> None:
        """Release the lock (shared or exclusive)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- index ------------------------------------------------------------------------------
    def connect(self, readonly: bool = False) -> sqlite3.Connection:
        """Open the index, waiting up to BUSY_TIMEOUT_S for other writers: creating it (or
        adding the tables an older index lacks), or with `readonly` only an existing one,
        opened so that nothing in the folder is written."""
        index = self.root / INDEX_NAME
        if readonly:  # sqlite refuses every write, even rolling back an interrupted one
            conn = sqlite3.connect(f"{index.resolve().as_uri()}?mode=ro", uri=True,
                                   timeout=BUSY_TIMEOUT_S, isolation_level=None)
        else:
            conn = sqlite3.connect(index, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            if readonly:
                row = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
                found = row[0] if row else None
            else:
                with _transaction(conn):
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)",
                                 (str(FORMAT_VERSION),))
                    (found,) = conn.execute(
                        "SELECT value FROM meta WHERE name = 'format'").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            if readonly and "readonly" in str(exc):
                raise ValueError(f"{index}: cannot be read without writing ({exc}); an "
                                 "interrupted write needs rolling back: run a build first"
                                 ) from None
            raise ValueError(f"{index}: the latent cache index is unreadable ({exc}); move it "
                             "aside and rerun: the next build re-indexes the shards from their "
                             "own metadata") from None
        if found != str(FORMAT_VERSION):
            conn.close()
            raise ValueError(f"{self.root}: latent cache format {found}, this code writes "
                             f"{FORMAT_VERSION}; use another --cache-dir")
        return conn

    @staticmethod
    def next_start(conn: sqlite3.Connection) -> int:
        """Count one more build in the index (meta `starts`) and return the new count: the seed
        of this build's row sample."""
        with _transaction(conn):
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('starts', '0')")
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                         "WHERE name = 'starts'")
            (value,) = conn.execute("SELECT value FROM meta WHERE name = 'starts'").fetchone()
        return int(value)

    @staticmethod
    def lookup(conn: sqlite3.Connection, keys: np.ndarray
               ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Where the index holds each of `keys` (uint8 (N, O, 32) digests), read LOOKUP_CHUNK
        keys at a time: (shard names, shard (N, O) int32 position in the names or -1 where the
        index lacks the key, row (N, O) int32)."""
        flat = keys.reshape(-1, DIGEST_BYTES)  # (N·O, 32)
        shard = np.full(len(flat), -1, dtype=np.int32)
        row = np.zeros(len(flat), dtype=np.int32)
        ids: dict[str, int] = {}
        for start in range(0, len(flat), LOOKUP_CHUNK):
            part = [bytes(k).hex() for k in flat[start:start + LOOKUP_CHUNK]]
            where: dict[str, list[int]] = {}
            for offset, key in enumerate(part):  # a key twice: two files of the same bytes
                where.setdefault(key, []).append(start + offset)
            marks = ",".join("?" * len(where))
            for key, name, r in conn.execute(
                    f"SELECT key, shard, row FROM entries WHERE key IN ({marks})", list(where)):
                shard[where[key]] = ids.setdefault(name, len(ids))
                row[where[key]] = r
        return list(ids), shard.reshape(keys.shape[:2]), row.reshape(keys.shape[:2])

    @staticmethod
    def shard_info(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, _ShardInfo]:
        """The index rows of those of `names` the index lists and has not dropped."""
        out = {}
        names = list(names)
        for i in range(0, len(names), LOOKUP_CHUNK):
            part = names[i:i + LOOKUP_CHUNK]
            marks = ",".join("?" * len(part))
            for name, size, sha, rows, stamp, sums in conn.execute(
                    "SELECT s.name, s.bytes, s.sha256, s.rows, c.stamp, length(c.row_sums) "
                    "FROM shards s LEFT JOIN checks c ON c.shard = s.name "
                    f"WHERE s.name IN ({marks}) AND s.name NOT IN (SELECT shard FROM dropped)",
                    part):
                out[name] = _ShardInfo(size, sha, rows, stamp, sums or 0)
        return out

    @staticmethod
    def row_sums(conn: sqlite3.Connection, name: str, rows: Sequence[int]) -> list[bytes]:
        """The recorded checksums of rows `rows` of shard `name`."""
        return [conn.execute("SELECT substr(row_sums, ?, ?) FROM checks WHERE shard = ?",
                             (r * ROW_SUM_BYTES + 1, ROW_SUM_BYTES, name)).fetchone()[0]
                for r in rows]

    @staticmethod
    def record_check(conn: sqlite3.Connection, name: str, stamp: str, sums: bytes) -> None:
        """Record a shard's stamp and per-row checksums (written or checked in full)."""
        with _transaction(conn):
            conn.execute("INSERT OR REPLACE INTO checks VALUES (?, ?, ?)", (name, stamp, sums))

    @staticmethod
    def dropped(conn: sqlite3.Connection) -> dict[str, str]:
        """Tombstoned shards (name -> why) whose files still await deletion; works on an
        index that predates the `dropped` table (opened read-only), which has none."""
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'dropped'").fetchone() is None:
            return {}
        return dict(conn.execute("SELECT shard, reason FROM dropped"))

    def shard_path(self, name: str) -> Path:
        """The file of shard `name`."""
        return self.shard_dir / name

    def drop_shards(self, conn: sqlite3.Connection, reasons: dict[str, str],
                    delete: bool) -> None:
        """Remove shards (name -> why) crash-safely: tombstone them, then, with `delete` (only
        while holding the exclusive lock: another process may map them), delete their files
        and index rows (`remove_dropped`)."""
        self.tombstone(conn, reasons)
        if delete:
            self.remove_dropped(conn, list(reasons))

    @staticmethod
    def tombstone(conn: sqlite3.Connection, reasons: dict[str, str]) -> None:
        """First step of removing shards (name -> why), one transaction: forget their entries
        and enter them in `dropped`. Their files stay until `remove_dropped`; until then the
        index still lists them, so no `tidy` takes them for unlisted shards to re-index."""
        if not reasons:
            return
        with _transaction(conn):
            for name, reason in reasons.items():
                conn.execute("DELETE FROM entries WHERE shard = ?", (name,))
                conn.execute("INSERT OR REPLACE INTO dropped VALUES (?, ?)", (name, reason))

    def remove_dropped(self, conn: sqlite3.Connection, names: Sequence[str] | None = None
                       ) -> int:
        """Second step (exclusive lock only): delete the files of tombstoned shards (`names`,
        or all), then their index rows; returns how many. A kill in between leaves tombstones
        whose files are gone, which the next call completes."""
        if names is None:
            names = sorted(self.dropped(conn))
        if not names:
            return 0
        for name in names:
            self.shard_path(name).unlink(missing_ok=True)
        fsync_dir(self.shard_dir)
        with _transaction(conn):
            for name in names:
                conn.execute("DELETE FROM shards WHERE name = ?", (name,))
                conn.execute("DELETE FROM checks WHERE shard = ?", (name,))
                conn.execute("DELETE FROM dropped WHERE shard = ?", (name,))
        return len(names)

    def write_shard(self, conn: sqlite3.Connection, name: str, mean: torch.Tensor,
                    logvar: torch.Tensor, keys: Sequence[str], fingerprint: str) -> int:
        """Write one shard atomically, then commit its index rows, stamp and per-row checksums;
        returns its size in bytes.

        mean, logvar: (rows, C, h, w) fp16 on the CPU.
        """
        data = safetensors_bytes({"mean": mean.contiguous(), "logvar": logvar.contiguous()},
                                 metadata={"format": "ldm-latent-cache",
                                           "version": str(FORMAT_VERSION),
                                           "fingerprint": fingerprint,
                                           "keys": json.dumps(list(keys))})
        final = self.shard_path(name)
        tmp = final.with_name(f".{name}{TMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.shard_dir)
        stamp, start, header = _stamp(final)
        sums = _row_sums(np.frombuffer(data, dtype=np.uint8), start, header, final)
        height, width = mean.shape[-2:]
        with _transaction(conn):
            conn.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (name, len(data), hashlib.sha256(data).hexdigest(), len(keys),
                          fingerprint, int(width), int(height), time.time()))
            conn.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)",
                             ((k, name, row) for row, k in enumerate(keys)))
            conn.execute("INSERT OR REPLACE INTO checks VALUES (?, ?, ?)", (name, stamp, sums))
        return len(data)

    def tidy(self, conn: sqlite3.Connection) -> tuple[int, int, int]:
        """Finish removing tombstoned shards, delete temporary files and re-index whole shard
        files the index does not list; returns (files deleted, shards re-indexed, dropped
        shards deleted). Call only while holding the exclusive lock: no other writer is then
        mid-shard and no reader maps a dropped shard.

        A shard is renamed into place before its index rows are committed, so an unlisted shard
        is one whose writer died in between, or the index was lost or replaced. Its own metadata
        names its keys and VAE fingerprint: when its header and size are whole it is listed
        again (keys that another shard holds keep that shard), checked in full, otherwise it is
        deleted. A tombstoned shard stays listed until its file is gone, so it never returns.
        """
        removed = self.remove_dropped(conn)
        with _transaction(conn):  # checks of shards that code predating them dropped
            conn.execute("DELETE FROM checks WHERE shard NOT IN (SELECT name FROM shards)")
        known = {name for (name,) in conn.execute("SELECT name FROM shards")}
        leftovers, unlisted, _ = self.tidy_plan(known, {})
        adopted = 0
        for path, (size, keys, fingerprint, width, height) in unlisted:
            check = _full_check(path, size, None)
            if check.problems:
                leftovers.append(path)
                continue
            adopted += 1
            with _transaction(conn):
                conn.execute("INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (path.name, size, check.sha256, len(keys), fingerprint,
                              width, height, path.stat().st_mtime))
                conn.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)",
                                 ((k, path.name, row) for row, k in enumerate(keys)))
                conn.execute("INSERT OR REPLACE INTO checks VALUES (?, ?, ?)",
                             (path.name, check.stamp, check.sums))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers), adopted, removed

    def tidy_plan(self, known: set[str], dropped: dict[str, str]
                  ) -> tuple[list[Path], list[tuple[Path, tuple]], list[str]]:
        """What `tidy` would do, found by reading only: (files it deletes, whole shard files the
        index does not list with their (bytes, keys, fingerprint, width, height), tombstoned
        shards it deletes), by name. `known`: the shards the index lists; `dropped`: the
        tombstoned ones."""
        leftovers, unlisted = [], []
        known = known | set(dropped)
        paths = sorted(self.shard_dir.iterdir()) if self.shard_dir.is_dir() else []
        for path in paths:
            if path.name.endswith(SHARD_SUFFIX) and path.name not in known:
                info = self._shard_metadata(path)
                if info is not None:
                    unlisted.append((path, info))
                    continue
            elif not path.name.endswith(TMP_SUFFIX):
                continue
            leftovers.append(path)
        return leftovers, unlisted, sorted(dropped)

    @staticmethod
    def _shard_metadata(path: Path) -> tuple[int, list[str], str, int, int] | None:
        """(bytes, keys, fingerprint, width, height) of a shard file from its own metadata, or
        None if it is not a whole shard."""
        try:
            start, header = _read_header(path)
            meta = header.get("__metadata__", {})
            keys = json.loads(meta.get("keys", "null"))
            shapes = {name: header[name]["shape"] for name in ("mean", "logvar")}
            end = max(header[name]["data_offsets"][1] for name in shapes)
            size = path.stat().st_size
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None
        if (meta.get("format") != "ldm-latent-cache" or meta.get("version") != str(FORMAT_VERSION)
                or not isinstance(keys, list) or len(shapes["mean"]) != 4
                or shapes["mean"] != shapes["logvar"] or shapes["mean"][0] != len(keys)
                or size != start + end):
            return None
        height, width = shapes["mean"][-2:]
        return size, keys, meta.get("fingerprint", ""), int(width), int(height)


class _ShardWriter:
    """Collects encoded entries of one bucket at a time and writes them as shards."""

    def __init__(self, store: _Store, conn: sqlite3.Connection, fingerprint: str, rank: int,
                 shard_size: int) -> None:
        self.store, self.conn, self.fingerprint = store, conn, fingerprint
        self.shard_size = shard_size
        self.prefix = f"{fingerprint[:12]}-r{rank}-{secrets.token_hex(4)}"
        self.seq = 0
        self.bucket: tuple[int, int] | None = None
        self.keys: list[str] = []
        self.means: list[torch.Tensor] = []
        self.logvars: list[torch.Tensor] = []
        self.bytes_written = 0
        self.shards_written = 0

    def add(self, bucket: tuple[int, int], key: str, mean: torch.Tensor,
            logvar: torch.Tensor) -> None:
        """Queue one entry; mean, logvar: (C, h, w) fp16."""
        if bucket != self.bucket:
            self.flush()
            self.bucket = bucket
        self.keys.append(key)
        self.means.append(mean)
        self.logvars.append(logvar)
        capacity = self.shard_size or max(1, TARGET_SHARD_BYTES // (4 * mean.numel()))
        if len(self.keys) >= capacity:
            self.flush()

    def flush(self) -> None:
        """Write what is queued as one shard."""
        if not self.keys:
            return
        w, h = self.bucket
        name = f"{self.prefix}-{w}x{h}-{self.seq:05d}{SHARD_SUFFIX}"
        self.seq += 1
        self.bytes_written += self.store.write_shard(
            self.conn, name, torch.stack(self.means), torch.stack(self.logvars), self.keys,
            self.fingerprint)  # (rows, C, h, w) each
        self.shards_written += 1
        self.keys, self.means, self.logvars = [], [], []


# ----------------------------------------------------------------------------------------------
# Encoding


class _CropSource(torch.utils.data.Dataset):
    """Bucket crops as uint8 (3, H, W), decoded in DataLoader workers.

    The file is read once, checked against the scanned content hash (so an entry is never
    stored under a hash its pixels do not have), then decoded from those bytes.
    """

    def __init__(self, records: Sequence[ImageRecord], placements: Sequence,
                 max_pixels: int) -> None:
        self.records, self.placements, self.max_pixels = records, placements, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        rec, place = self.records[index], self.placements[index]
        try:
            data = Path(rec.path).read_bytes()
        except OSError as exc:
            return index, None, f"{rec.path}: unreadable: {exc.strerror or exc}"
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            return index, None, f"{rec.path}: changed since it was scanned; rerun to pick it up"
        try:
            img = load_image(io.BytesIO(data), self.max_pixels, min_size=tuple(place.resized))
        except ImageLoadError as exc:
            return index, None, f"{rec.path}: {str(exc).split(': ', 1)[-1]}"
        pixels = crop_to_bucket(img, tuple(place.resized), tuple(place.crop))  # (H, W, 3)
        return index, torch.from_numpy(pixels).permute(2, 0, 1), None  # (3, H, W) uint8


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, px) for i, px, err in items if err is None]
    errors = [(i, err) for i, _, err in items if err is not None]
    pixels = torch.stack([px for _, px in good]) if good else None  # (B, 3, H, W) uint8
    return [i for i, _ in good], pixels, errors


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def encode_moments(encode: Callable, x: torch.Tensor, chunk: int,
                   log: Callable[[str], None] = _warn
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Posterior moments of images x (N, 3, H, W) in [-1, 1], `chunk` images per call.

    An out-of-memory error halves the chunk and retries (down to 1). Returns float32 CPU
    (mean, logvar), each (N, C, h, w), and the chunk size that worked.
    """
    means, logvars = [], []
    start = 0
    while start < len(x):
        try:
            posterior = encode(x[start:start + chunk])
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            if not _is_out_of_memory(exc) or chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            log(f"warning: out of memory while encoding; retrying with batches of {chunk}")
            if x.is_cuda:
                torch.cuda.empty_cache()
            continue
        means.append(posterior.mean.float().cpu())
        logvars.append(posterior.logvar.float().cpu())
        start += len(means[-1])
    return torch.cat(means), torch.cat(logvars), chunk


@dataclass
class _Plan:
    need: np.ndarray  # (N, O) bool: the entries to encode
    reused: int
    repaired: int
    damaged: list[str]
    reused_bytes: int
    reused_shards: int
    leftovers_removed: int
    full_checks: int  # shards read in full (stamp changed or never recorded)
    rows_sampled: int


def _check_shards(store: _Store, conn: sqlite3.Connection, names: Sequence[str],
                  info: dict[str, _ShardInfo], seed: int, progress: bool,
                  log: Callable[[str], None]) -> tuple[dict[str, str], int, int]:
    """Check the shards a build reuses without reading them, as far as can be trusted.

    A shard whose stamp (`_stamp`: size, mtime, inode, header) is the one recorded is trusted;
    any other is read in full once, and when whole its new stamp and per-row checksums are
    recorded. Then SAMPLE_ROWS rows drawn among all rows of the trusted shards (in name order,
    by a generator seeded with `seed`) are read and compared with their checksums. Returns
    (damaged shard -> problem, shards read in full, rows sampled).
    """
    damaged: dict[str, str] = {}
    trusted: list[tuple[str, int]] = []  # (name, rows)
    layout: dict[str, tuple[int, int, int, int]] = {}  # name -> `_row_layout`
    full = 0
    for name in tqdm(names, desc="checking shards", unit="shard", disable=not progress,
                     leave=False):
        shard = info.get(name)
        if shard is None:
            damaged[name] = "not listed in the index"
            continue
        path = store.shard_path(name)
        try:
            stamp, start, header = _stamp(path)
            if stamp == shard.stamp and shard.sums_bytes == shard.rows * ROW_SUM_BYTES:
                layout[name] = _row_layout(header, start, shard.bytes, path)
                trusted.append((name, shard.rows))
                continue
        except FileNotFoundError:
            damaged[name] = "file missing"
            continue
        except (OSError, ValueError):
            pass  # the full check says what is wrong
        full += 1
        check = _full_check(path, shard.bytes, shard.sha256)
        if check.problems:
            damaged[name] = check.problems[0]
        else:
            store.record_check(conn, name, check.stamp, check.sums)
    sample = _sample_rows(seed, sorted(trusted), SAMPLE_ROWS)
    for name in dict.fromkeys(name for name, _ in sample):
        rows = [r for n, r in sample if n == name]
        try:
            bad = _check_rows(store.shard_path(name), layout[name], rows,
                              store.row_sums(conn, name, rows))
        except OSError as exc:  # e.g. deleted since its stamp was read
            damaged[name] = f"unreadable: {exc.strerror or exc}"
            continue
        if bad is not None:
            damaged[name] = f"row {bad} does not match its checksum"
    for name, problem in damaged.items():
        log(f"warning: {store.shard_path(name)}: damaged shard ({problem}); its entries are "
            "re-encoded")
    return damaged, full, len(sample)


def _plan(store: _Store, keys: np.ndarray, progress: bool, log: Callable[[str], None]
          ) -> _Plan:
    """Clean up after crashed writers and finish earlier removals (if alone), check the shards
    holding `keys` (uint8 (N, O, 32)), drop damaged ones, list what is missing."""
    conn = store.connect()
    try:
        leftovers = 0
        alone = store.lock(exclusive=True, blocking=False)
        if alone:
            leftovers, adopted, removed = store.tidy(conn)
            if leftovers:
                log(f"removed {leftovers} leftover file(s) of an interrupted build")
            if adopted:
                log(f"re-indexed {adopted} whole shard(s) the index did not list")
            if removed:
                log(f"deleted {removed} shard file(s) dropped earlier (damaged, or left by an "
                    "interrupted removal)")
        else:
            store.lock(exclusive=False)
        seed = store.next_start(conn)
        names, shard, _ = store.lookup(conn, keys)  # (N, O) each
        info = store.shard_info(conn, names)
        damaged, full, sampled = _check_shards(store, conn, names, info, seed, progress, log)
        # Without the exclusive lock another run may map the damaged shards: they leave the
        # index now (so nothing reuses them) and their files wait for a process that has it.
        store.drop_shards(conn, damaged, delete=alone)
        if alone:  # Linux converts an exclusive flock to a shared one atomically
            store.lock(exclusive=False)
    finally:
        conn.close()
    bad = np.zeros(len(names) + 1, dtype=bool)  # per shard; the last one stands for "none"
    bad[[names.index(n) for n in damaged]] = True
    found = shard >= 0
    stale = bad[shard]  # (N, O): held by a damaged shard (shard -1 reads the last, False)
    kept = [n for n in names if n not in damaged]
    return _Plan(need=~found | stale, reused=int((found & ~stale).sum()),
                 repaired=int(stale.sum()), damaged=sorted(damaged),
                 reused_bytes=sum(info[n].bytes for n in kept), reused_shards=len(kept),
                 leftovers_removed=leftovers, full_checks=full, rows_sampled=sampled)


class _Batches:
    """The batch sampler of a build: lists of at most `size` record indices of one bucket,
    records ordered by bucket (width, height), then index; made as the loader asks."""

    def __init__(self, work: np.ndarray, sides: np.ndarray, size: int) -> None:
        order = np.lexsort((work, sides[:, 1], sides[:, 0]))  # work (M,), sides (M, 2)
        self.work, self.sides, self.size = work[order], sides[order], size

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for j, i in enumerate(self.work):
            if batch and (len(batch) >= self.size
                          or (self.sides[j] != self.sides[j - 1]).any()):
                yield batch
                batch = []
            batch.append(int(i))
        if batch:
            yield batch


def _encode_share(work: np.ndarray, need: np.ndarray, records, placements, buckets,
                  keys: np.ndarray, vae, store: _Store, fingerprint: str, rank: int,
                  batch_size: int, num_workers: int, shard_size: int, max_pixels: int,
                  progress: bool, log: Callable[[str], None]) -> dict:
    """Encode and store this rank's entries: those `need` (N, O) marks of records `work` (M,);
    returns counters for the summary."""
    stats = {"encoded": 0, "skipped_files": [], "unusable": set(), "bytes": 0, "shards": 0,
             "encode_seconds": 0.0}
    if not len(work):
        return stats
    grid = np.asarray(buckets)  # (buckets, 2) sides

    def bucket_of(i: int) -> tuple[int, int]:
        return tuple(buckets[placements[i].bucket])

    placed = np.fromiter((placements[int(i)].bucket for i in work), dtype=np.int64,
                         count=len(work))  # (M,)
    batches = _Batches(work, grid[placed], batch_size)
    device = next(vae.parameters()).device
    loader = torch.utils.data.DataLoader(
        _CropSource(records, placements, max_pixels), batch_sampler=batches,
        num_workers=num_workers, collate_fn=_collate, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None)
    batch_iter = iter(loader)  # fork the workers before opening the index connection
    conn = store.connect()
    writer = _ShardWriter(store, conn, fingerprint, rank, shard_size)
    bar = tqdm(total=int(need[work].sum()), unit="img", desc=f"encoding (rank {rank})",
               disable=not progress, dynamic_ncols=True)
    chunk = batch_size
    start = time.perf_counter()
    flip = need.shape[1] > 1

    def skip(i: int, reason: str, count: int) -> None:
        stats["skipped_files"].append((records[i].path, reason))
        stats["unusable"].add(i)
        log(f"warning: {reason}; not cached")
        bar.update(count)

    try:
        with torch.inference_mode():
            for indices, pixels, errors in batch_iter:
                for i, reason in errors:
                    skip(i, reason, int(need[i].sum()))
                if pixels is None:
                    continue
                x = to_unit_range(pixels.to(device, non_blocking=True))  # (B, 3, H, W)
                plain = [j for j, i in enumerate(indices) if need[i, 0]]
                mirrored = [j for j, i in enumerate(indices) if flip and need[i, 1]]
                owners = [(indices[j], 0) for j in plain] + [(indices[j], 1) for j in mirrored]
                x = torch.cat([x[plain], x[mirrored].flip(-1)])  # (E, 3, H, W), E = entries
                mean, logvar, chunk = encode_moments(vae.encode, x, chunk, log)
                mean, logvar = mean.half(), logvar.half()  # (E, C, h, w)
                finite = (torch.isfinite(mean).flatten(1).all(1)
                          & torch.isfinite(logvar).flatten(1).all(1))  # (E,)
                for e, (i, orientation) in enumerate(owners):
                    if finite[e]:
                        writer.add(bucket_of(i), bytes(keys[i, orientation]).hex(), mean[e],
                                   logvar[e])
                        stats["encoded"] += 1
                        bar.update(1)
                    else:
                        side = " (mirrored)" if orientation else ""
                        skip(i, f"{records[i].path}: the VAE gave a non-finite latent (NaN or "
                                f"inf){side}", 1)
            writer.flush()
    finally:
        bar.close()
        conn.close()
    stats["encode_seconds"] = time.perf_counter() - start
    stats["bytes"], stats["shards"] = writer.bytes_written, writer.shards_written
    return stats


@dataclass
class CacheSummary:
    """What a build found and did, counted in entries (one per image, two with flip) except
    `images`. `total = reused + encoded + skipped`; `repaired` counts the entries re-encoded
    because the shard holding them was damaged or missing. `keys` are every record's entry keys,
    uint8 (N, O, 32) digests (`record_hex_keys` gives one record's as hex)."""

    cache_dir: str
    fingerprint: str
    images: int
    total: int
    reused: int
    encoded: int
    repaired: int
    skipped: int
    bytes: int  # size of the shards holding this data's entries
    shards: int
    seconds: float
    images_per_s: float  # encoded entries per second of encoding (all ranks)
    damaged_shards: list[str] = field(default_factory=list)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    leftovers_removed: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.empty((0, 1, DIGEST_BYTES), np.uint8),
                             repr=False, compare=False)  # (N, O, 32) uint8, per record
    unusable: list[int] = field(default_factory=list)  # records lacking an entry
    shards_checked_fully: int = 0  # read in full because their stamp changed or was missing
    rows_sampled: int = 0  # rows of trusted shards compared with their checksums

    def to_json(self, scan_skipped: Sequence = ()) -> dict:
        """The machine-readable summary (without the per-record keys).

        `scan_skipped` are the files the scan left out (`SkippedFile`s: path, reason). Counts of
        files: `files` = found by the scan, `cached` + `skipped` (every image whose entries are
        all cached, and every file left out by the scan or at encode time). `skipped_files` lists
        each with its reason and the stage that left it out ("scan" or "encode"; a file whose
        two orientations both failed at encode time is listed twice). The other counts are of
        entries, `entries_per_image` per image.
        """
        out = {k: v for k, v in vars(self).items() if k != "keys"}
        out["entries_per_image"] = int(self.keys.shape[1])
        out["files"] = {"found": self.images + len(scan_skipped),
                        "cached": self.images - len(self.unusable),
                        "skipped": len(scan_skipped) + len(self.unusable)}
        listed = [(s.path, s.reason, "scan") for s in scan_skipped]
        listed += [(p, r, "encode") for p, r in self.skipped_files]
        out["skipped_files"] = [{"path": p, "reason": r, "stage": stage}
                                for p, r, stage in sorted(listed)]
        return out

    def format(self) -> str:
        """A few human-readable lines."""
        lines = [f"{self.cache_dir}: {self.total} entries for {self.images} images "
                 f"(VAE {self.fingerprint[:12]})",
                 f"  reused {self.reused}, encoded {self.encoded} (repaired {self.repaired}), "
                 f"skipped {self.skipped}; {self.bytes / 1e6:.1f} MB in {self.shards} shard(s); "
                 f"{self.seconds:.1f} s, {self.images_per_s:.1f} images/s encoding",
                 f"  checked: {self.shards_checked_fully} shard(s) read in full, the rest by "
                 f"stamp and {self.rows_sampled} sampled row(s)"]
        lines += [f"  damaged shard re-encoded: {name}" for name in self.damaged_shards]
        lines += [f"  skipped: {reason}" for _, reason in self.skipped_files]
        return "\n".join(lines)


def _check_shared(root: Path, rank: int, share: Callable, gather: Callable) -> None:
    """Refuse, on every rank, a cache folder that is not one folder for all ranks.

    Ranks encode disjoint shares into one index, so a multi-machine run whose cache folders are
    each machine's own disk would leave every machine with part of the cache. Rank 0 creates a
    probe file; each rank looks for it (waiting up to SHARED_PROBE_WAIT_S).
    """
    token = None
    if rank == 0:
        try:
            token = secrets.token_hex(8)
            (root / f".probe-{token}").touch()
        except OSError as exc:
            token = f"error: {exc}"
    token = share(token)
    if token.startswith("error: "):
        raise ValueError(f"{root}: rank 0 cannot write to the latent cache ({token[7:]})")
    probe = root / f".probe-{token}"
    deadline = time.monotonic() + SHARED_PROBE_WAIT_S
    while not probe.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = gather((probe.exists(), socket.gethostname()))
    if rank == 0:
        probe.unlink()
    blind = [f"{r} ({host})" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise ValueError(
            f"{root}: rank(s) {', '.join(blind)} do not see the latent cache folder rank 0 "
            f"({seen[0][1]}) writes to; across machines the cache ($LDM_CACHE_DIR or --cache-dir) "
            "must be on a filesystem every machine shares")


def ensure_cache(records: Sequence[ImageRecord], placements: Sequence, buckets: Sequence,
                 vae, cache_dir: str | os.PathLike[str] | None = None, flip: bool = False,
                 batch_size: int = 8, num_workers: int = 2, dist_info: DistInfo | None = None,
                 *, shard_size: int = 0, max_pixels: int = 100_000_000, progress: bool = True,
                 log: Callable[[str], None] = _warn,
                 fingerprint: str | None = None) -> CacheSummary:
    """Build or update the cache so that every (record, orientation) has an entry.

    `placements[i]` belongs to `records[i]`; `vae` sits on the device that encodes. With
    `flip`, the mirrored crop is cached too. Under torchrun (`dist_info` with world_size > 1)
    every rank must call this with the same arguments: rank 0 checks and plans, each rank
    encodes pending entries i with i % world_size == rank, and all ranks return the same
    summary after a barrier. Without `dist_info` it runs alone, even inside a process group.
    `shard_size` is entries per shard (0: about 64 MiB per shard). Images that fail to load or
    encode to NaN/inf are reported, skipped and listed in `unusable` (record indices).
    `fingerprint` is `vae_fingerprint(vae)` when the caller has it already.
    """
    from models.vae_weights import vae_fingerprint

    start = time.perf_counter()
    if len(records) != len(placements):
        raise ValueError(f"{len(records)} records but {len(placements)} placements")
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    # Collectives only with a dist_info: one rank may build a cache alone in a process group.
    together = world > 1
    gather = all_gather_objects if together else (lambda obj: [obj])
    share = broadcast_object if together else (lambda obj: obj)
    wait = barrier if together else (lambda: None)
    factor = vae.downsample_factor
    bad = sorted({tuple(buckets[p.bucket]) for p in placements
                  if buckets[p.bucket][0] % factor or buckets[p.bucket][1] % factor})
    if bad:
        raise ValueError(f"buckets {bad} are not multiples of the VAE's downsampling factor "
                         f"{factor}; choose a bucket step that is")
    fingerprint = fingerprint or vae_fingerprint(vae)
    if len(set(gather(fingerprint))) > 1:
        raise RuntimeError("ranks hold different VAE weights; every rank must load the same VAE")
    keys = record_keys(records, placements, buckets, fingerprint, flip)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_latent_dir()
    store = _Store(cache_dir)
    try:
        if together:
            _check_shared(store.root, rank, share, gather)
        # A failure on one rank is passed to all of them, so none waits forever on the others.
        plan: _Plan | str | None = None
        if rank == 0:
            try:
                plan = _plan(store, keys, progress, log)
            except Exception as exc:
                share(f"rank 0: {type(exc).__name__}: {exc}")
                raise
        plan = share(plan)
        if isinstance(plan, str):
            raise RuntimeError(f"latent cache planning failed on {plan}")
        if rank != 0:
            store.lock(exclusive=False)
        error: Exception | None = None
        try:
            pending = np.flatnonzero(plan.need.any(axis=1))  # records with an entry to encode
            stats = _encode_share(pending[rank::world], plan.need, records, placements,
                                  buckets, keys, vae, store, fingerprint, rank, batch_size,
                                  num_workers, shard_size, max_pixels, progress, log)
        except Exception as exc:
            error, stats = exc, {"error": f"rank {rank}: {type(exc).__name__}: {exc}"}
        wait()
        every = gather(stats)
    finally:
        store.unlock()
    if error is not None:
        raise error
    failed = [s["error"] for s in every if "error" in s]
    if failed:
        raise RuntimeError(f"latent cache building failed on {failed[0]}")
    encoded = sum(s["encoded"] for s in every)
    skipped_files = [item for s in every for item in s["skipped_files"]]
    encode_seconds = max(s["encode_seconds"] for s in every)
    return CacheSummary(
        cache_dir=str(cache_dir), fingerprint=fingerprint, images=len(records),
        total=keys.shape[0] * keys.shape[1], reused=plan.reused, encoded=encoded,
        repaired=plan.repaired, skipped=keys.shape[0] * keys.shape[1] - plan.reused - encoded,
        bytes=plan.reused_bytes + sum(s["bytes"] for s in every),
        shards=plan.reused_shards + sum(s["shards"] for s in every),
        seconds=time.perf_counter() - start,
        images_per_s=encoded / encode_seconds if encode_seconds > 0 else 0.0,
        damaged_shards=plan.damaged, skipped_files=sorted(skipped_files),
        leftovers_removed=plan.leftovers_removed, keys=keys,
        unusable=sorted({int(i) for s in every for i in s["unusable"]}),
        shards_checked_fully=plan.full_checks, rows_sampled=plan.rows_sampled)


# ----------------------------------------------------------------------------------------------
# Maintenance


def verify_cache(cache_dir: str | os.PathLike[str], *, repair: bool = False,
                 progress: bool = False, log: Callable[[str], None] = _warn) -> list[str]:
    """Check every shard in full and return the problems, one line each naming the shard file
    (or the index, for an entry whose shard it does not list).

    Reads every shard: its size and sha256 against the index, its header, every entry's row
    (the key the shard's header names there) and every row's checksum (a mismatch names the
    row). A whole shard's stamp and per-row checksums are recorded (so a shard from before
    stamps needs no full check at the next build). Runs under the shared lock, beside builds
    and readers. With `repair`, damaged shards are dropped (tombstoned: the next build re-encodes
    their entries) and so are entries whose shard the index does not list; the files are
    deleted if the cache is free to take the exclusive lock afterwards, else by the next build,
    prune or repair that gets it. Tombstoned shards awaiting deletion are not problems.
    """
    store = _Store(cache_dir, create=False)
    index = store.root / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no latent cache index; build the cache first")
    store.lock(exclusive=False)
    problems: list[str] = []
    damaged: dict[str, str] = {}
    try:
        conn = store.connect()
        try:
            dropped = store.dropped(conn)
            shards = [row for row in conn.execute(
                "SELECT name, bytes, sha256, rows FROM shards ORDER BY name")
                if row[0] not in dropped]
            for name, size, sha, rows in tqdm(shards, desc="verifying shards", unit="shard",
                                              disable=not progress):
                path = store.shard_path(name)
                recorded = conn.execute("SELECT row_sums FROM checks WHERE shard = ?",
                                        (name,)).fetchone()
                found = _verify_shard(conn, path, size, sha, rows, recorded and recorded[0])
                problems += [f"{path}: {problem}" for problem in found]
                if found:
                    damaged[name] = found[0]
            orphans = conn.execute(
                "SELECT e.key, e.shard FROM entries e LEFT JOIN shards s ON s.name = e.shard "
                "WHERE s.name IS NULL").fetchall()
            problems += [f"{index}: entry {key} names shard {shard}, which the index does not "
                         "list" for key, shard in orphans]
            if repair:
                store.tombstone(conn, damaged)
                with _transaction(conn):
                    conn.executemany("DELETE FROM entries WHERE key = ?",
                                     ((key,) for key, _ in orphans))
                if store.lock(exclusive=True, blocking=False):
                    store.remove_dropped(conn)
            waiting = len(store.dropped(conn))
        finally:
            conn.close()
    finally:
        store.unlock()
    if waiting:
        log(f"{waiting} dropped shard file(s) await deletion by a build, prune or --verify that "
            "has the cache to itself")
    return problems


def _verify_shard(conn: sqlite3.Connection, path: Path, size: int, sha256: str, rows: int,
                  recorded: bytes | None) -> list[str]:
    """What is wrong with one shard (phrases; empty when whole, whose stamp is then recorded)."""
    check = _full_check(path, size, sha256, recorded)
    problems = check.problems
    if check.keys is not None:
        if len(check.keys) != rows or len(check.sums) != rows * ROW_SUM_BYTES:
            problems.append(f"holds {len(check.keys)} rows, the index says {rows}")
        else:
            problems += [f"row {row} does not hold entry {key}" for key, row in conn.execute(
                "SELECT key, row FROM entries WHERE shard = ?", (path.name,))
                if row >= rows or check.keys[row] != key]
    elif not problems:
        problems.append("no key list in its header")
    if not problems:
        _Store.record_check(conn, path.name, check.stamp, check.sums)
    return problems


# Per shard, with the keys to keep in the temporary table `keep`: (name, bytes, rows, fingerprint,
# width, height, entries kept, entries removed).
_SHARD_USAGE = (
    "SELECT s.name, s.bytes, s.rows, s.fingerprint, s.width, s.height, COUNT(k.key), "
    "COUNT(e.key) - COUNT(k.key) FROM shards s LEFT JOIN entries e ON e.shard = s.name "
    "LEFT JOIN keep k ON k.key = e.key GROUP BY s.name")


def _fill_keep(conn: sqlite3.Connection, keep: Iterable[str]) -> None:
    """(Re)create the temporary table `keep` holding `keep`."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS keep (key TEXT PRIMARY KEY) WITHOUT ROWID")
    conn.execute("DELETE FROM keep")
    conn.executemany("INSERT OR IGNORE INTO keep VALUES (?)", ((k,) for k in keep))


def _freed_estimate(size: int, rows: int, kept: int) -> int:
    """Bytes a prune frees from a shard: all of them when no entry is kept, else about the share
    of rows it does not keep (the shard is rewritten with the kept rows)."""
    if kept == 0:
        return size
    return size * (rows - kept) // rows if kept < rows else 0


def _prune_groups(usage: Iterable[tuple]) -> list[dict]:
    """Entries removed and bytes freed (estimated) per (VAE fingerprint, latent size), most
    entries first; `usage` rows are those of _SHARD_USAGE."""
    groups: dict[tuple[str, str], list[int]] = {}
    for _, size, rows, fingerprint, width, height, kept, removed in usage:
        freed = _freed_estimate(size, rows, kept)
        if removed or freed:
            group = groups.setdefault((fingerprint[:12], f"{width}x{height}"), [0, 0])
            group[0] += removed
            group[1] += freed
    ordered = sorted(groups.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    return [{"fingerprint": fingerprint, "latent": latent, "entries": entries, "bytes": freed}
            for (fingerprint, latent), (entries, freed) in ordered]


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _preview_prune(cache_dir: str | os.PathLike[str], keep: Iterable[str], result: dict
                   ) -> list[tuple]:
    """What a prune would do, found by reading only: fills `result`'s counts, returns the
    per-shard usage rows (as _SHARD_USAGE's) a prune would act on. Whole shard files the index
    does not list (a build re-indexes them when it has the cache to itself, as `cache.py` just
    did unless another process was using it) are counted but not previewed."""
    store = _Store(cache_dir, create=False)
    if not (store.root / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{store.root / INDEX_NAME}: no latent cache index; build the "
                                "cache first")
    store.lock(exclusive=False)
    try:
        conn = store.connect(readonly=True)
        try:
            with _transaction(conn, "DEFERRED"):  # one consistent snapshot of the index
                known = {name for (name,) in conn.execute("SELECT name FROM shards")}
                dropped = store.dropped(conn)
                leftovers, unlisted, doomed = store.tidy_plan(known, dropped)
                _fill_keep(conn, keep)
                usage = [u for u in conn.execute(_SHARD_USAGE) if u[0] not in dropped]
                (removed,) = conn.execute("SELECT COUNT(*) FROM entries WHERE key NOT IN "
                                          "(SELECT key FROM keep)").fetchone()
                conn.execute("DROP TABLE keep")
        finally:
            conn.close()
    finally:
        store.unlock()
    result.update(entries_removed=removed, shards_removed=sum(u[6] == 0 for u in usage),
                  shards_rewritten=sum(0 < u[6] < u[2] for u in usage),
                  bytes_freed=sum(_freed_estimate(u[1], u[2], u[6]) for u in usage),
                  leftovers_removed=len(leftovers) + len(doomed),
                  shards_reindexed=len(unlisted))
    return usage


def prune_cache(cache_dir: str | os.PathLike[str], keep: Iterable[str],
                log: Callable[[str], None] = _warn, dry_run: bool = False) -> dict:
    """Remove every entry not in `keep`, delete shards left empty and rewrite partly used ones.

    The folder may be shared by other runs: whatever `keep` does not name goes, whichever run
    paid for it. A prune needs the cache to itself (no build or reader running). With `dry_run`
    it only reads, under the shared lock (alongside builds and readers), and reports what a
    prune would do; nothing on disk changes.

    `keep` is read once (a generator of hex keys does: `iter_hex_keys(summary.keys)`).

    Returns entries_removed, shards_removed, shards_rewritten, bytes_freed, leftovers_removed
    (temporary files of crashed writers, and files of shards dropped as damaged or of removals
    a kill interrupted), shards_reindexed (whole shard files the index did not list: they are
    listed, then pruned like the rest), `groups` (one dict per VAE fingerprint's
    first 12 hex digits and latent size "WxH": entries removed and about how many bytes they
    free, most entries first) and `dry_run`. In a dry run the counts are what a prune would do
    now, and bytes_freed is an estimate (exact for shards that empty).
    """
    result = {"entries_removed": 0, "shards_removed": 0, "shards_rewritten": 0,
              "bytes_freed": 0, "leftovers_removed": 0, "shards_reindexed": 0, "groups": [],
              "dry_run": dry_run}
    usage = (_preview_prune if dry_run else _prune)(cache_dir, keep, result)
    result["groups"] = _prune_groups(usage)
    entries, removed = result["entries_removed"], result["shards_removed"]
    rewritten, freed = result["shards_rewritten"], _size(result["bytes_freed"])
    if dry_run:
        log(f"dry run, nothing pruned: prune would remove {_entries(entries)} ({removed} "
            f"shard(s) deleted, {rewritten} rewritten) and would free about {freed}")
    else:
        log(f"pruned {_entries(entries)}: {removed} shard(s) removed, {rewritten} rewritten, "
            f"{freed} freed")
    verb = "would remove" if dry_run else "removed"
    for group in result["groups"]:
        log(f"  VAE {group['fingerprint']}, latents {group['latent']}: {verb} "
            f"{_entries(group['entries'])}, about {_size(group['bytes'])}")
    if result["shards_reindexed"] or result["leftovers_removed"]:
        counted = "not counted above" if dry_run else "counted above"
        log(f"  first {'would re-index' if dry_run else 're-indexed'} "
            f"{result['shards_reindexed']} shard file(s) the index did not list ({counted}) "
            f"and {'would delete' if dry_run else 'deleted'} "
            f"{result['leftovers_removed']} leftover file(s) of interrupted builds or "
            "dropped shards")
    return result


def _prune(cache_dir: str | os.PathLike[str], keep: Iterable[str], result: dict
           ) -> list[tuple]:
    """The prune itself: fills `result`'s counts, returns the per-shard usage rows it acted on
    (as _SHARD_USAGE's). Every shard is removed tombstone first (`_Store.drop_shards`), so a
    kill at any point leaves no file that a later `tidy` would list again: pruned entries
    never come back."""
    store = _Store(cache_dir)
    if not store.lock(exclusive=True, blocking=False):
        raise RuntimeError(f"{cache_dir}: another process is using the latent cache; prune "
                           "when it is done")
    conn = store.connect()
    try:
        leftovers, result["shards_reindexed"], removed = store.tidy(conn)
        result["leftovers_removed"] = leftovers + removed
        with _transaction(conn):
            _fill_keep(conn, keep)
            usage = list(conn.execute(_SHARD_USAGE))
            result["entries_removed"] = conn.execute(
                "DELETE FROM entries WHERE key NOT IN (SELECT key FROM keep)").rowcount
            conn.execute("DROP TABLE keep")
        empty = [u[0] for u in usage if u[6] == 0]
        store.drop_shards(conn, dict.fromkeys(empty, "pruned"), delete=True)
        result["shards_removed"] = len(empty)
        result["bytes_freed"] = sum(u[1] for u in usage if u[6] == 0)
        prefix = f"prune-{secrets.token_hex(4)}"
        for n, (name, size, rows, fingerprint, w, h, kept, _) in enumerate(usage):
            if 0 < kept < rows:  # copy the kept rows into a new shard, then drop the old one
                arrays = _map_shard(store.shard_path(name))
                live_rows = list(conn.execute(
                    "SELECT key, row FROM entries WHERE shard = ? ORDER BY row", (name,)))
                picks = [row for _, row in live_rows]
                mean = torch.from_numpy(np.ascontiguousarray(arrays["mean"][picks]))
                logvar = torch.from_numpy(np.ascontiguousarray(arrays["logvar"][picks]))
                del arrays
                new = f"{fingerprint[:12]}-{prefix}-{w}x{h}-{n:05d}{SHARD_SUFFIX}"
                written = store.write_shard(conn, new, mean, logvar,
                                            [k for k, _ in live_rows], fingerprint)
                store.drop_shards(conn, {name: "pruned: rewritten"}, delete=True)
                result["shards_rewritten"] += 1
                result["bytes_freed"] += size - written
        conn.execute("VACUUM")
    finally:
        conn.close()
        store.unlock()
    return usage


# ----------------------------------------------------------------------------------------------
# Reading


def step_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the latent noise of one training (micro-)step, the same on every rank:
    `LatentReader.batch` draws from it for the global batch (reproducible)."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def flip_from_seed(augment_seed: int) -> bool:
    """The flip a sample's augment seed asks for (the rule `PixelDataset` uses)."""
    return bool(np.random.default_rng(augment_seed).integers(2))


class LatentReader:
    """Serves training batches from memory-mapped shards.

    `keys` are the samples' entry keys, uint8 (N, O, 32) digests as `CacheSummary.keys` (or
    `keys_from_hex`): keys[i, 0] the plain crop of sample i, keys[i, 1] the mirrored one when
    O = 2. Each shard is mapped once (at most `max_open` stay open, least recently used closed
    first); the index is read once, here, in chunks, into two int32 arrays (N, O): 8 bytes per
    entry. Holds the cache's shared lock until `close`, so a prune cannot pull shards away
    underneath it.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], keys: np.ndarray,
                 affine: tuple[Sequence[float], Sequence[float]] | None = None,
                 max_open: int = 256) -> None:
        if not (isinstance(keys, np.ndarray) and keys.dtype == np.uint8 and keys.ndim == 3
                and keys.shape[2] == DIGEST_BYTES):
            raise TypeError("keys must be uint8 (N, O, 32) digests, as CacheSummary.keys; "
                            "keys_from_hex converts hex keys")
        self.store = _Store(cache_dir)
        self.store.lock(exclusive=False)
        # normalisation (latent - shift) * scale, per channel: `VAEConfig.latent_affine`
        shift, scale = affine if affine is not None else ([0.0], [1.0])
        self.shift = np.asarray(shift, dtype=np.float32).reshape(-1, 1, 1)  # (C or 1, 1, 1)
        self.scale = np.asarray(scale, dtype=np.float32).reshape(-1, 1, 1)  # (C or 1, 1, 1)
        self.max_open = max_open
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        try:
            conn = self.store.connect()
            try:
                self._names, self._shard, self._row = self.store.lookup(conn, keys)  # (N, O)
            finally:
                conn.close()
            missing = np.argwhere(self._shard < 0)  # (M, 2) (sample, orientation)
            if len(missing):
                example = bytes(keys[tuple(missing[0])]).hex()
                raise KeyError(f"{len(missing)} of {self._shard.size} entries are missing from "
                               f"{cache_dir} (e.g. {example}); build the cache first")
        except BaseException:
            self.close()  # release the lock, so this process can still prune or rebuild
            raise

    def __len__(self) -> int:
        return len(self._shard)

    def _arrays(self, shard: int) -> dict[str, np.ndarray]:
        arrays = self._open.get(shard)
        if arrays is None:
            arrays = _map_shard(self.store.shard_path(self._names[shard]))
            self._open[shard] = arrays
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return arrays

    def _gather(self, indices: Sequence[int], flip_flags: Sequence[bool] | None
                ) -> tuple[np.ndarray, np.ndarray]:
        """float32 (mean, logvar) arrays (B, C, h, w) of samples `indices`."""
        flips = np.zeros(len(indices), np.int64) if flip_flags is None else \
            np.asarray(flip_flags, dtype=np.int64)
        if flips.any() and self._shard.shape[1] < 2:
            raise ValueError("a mirrored latent was asked for, but the cache was built "
                             "without flip")
        samples = np.asarray(indices, dtype=np.int64)
        shards, rows = self._shard[samples, flips], self._row[samples, flips]  # (B,) each
        means, logvars = [], []
        for shard, row in zip(shards.tolist(), rows.tolist()):
            arrays = self._arrays(shard)
            means.append(arrays["mean"][row])
            logvars.append(arrays["logvar"][row])
        if len({m.shape for m in means}) > 1:
            raise ValueError("samples of one batch must share a bucket; got latent shapes "
                             f"{sorted({m.shape for m in means})}")
        return np.stack(means).astype(np.float32), np.stack(logvars).astype(np.float32)

    def moments(self, indices: Sequence[int], flip_flags: Sequence[bool] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (mean, logvar) of samples `indices`, float32 (B, C, h, w) each."""
        mean, logvar = self._gather(indices, flip_flags)
        return torch.from_numpy(mean), torch.from_numpy(logvar)

    def batch(self, indices: Sequence[int], generator: torch.Generator,
              flip_flags: Sequence[bool] | None = None,
              part: tuple[int, int] = (0, 1)) -> torch.Tensor:
        """Fresh normalised latents (B, C, h, w) float32: ((mean + exp(logvar / 2)·ε) − shift)
        × scale (per channel, see `affine`), with ε drawn from `generator` (`step_generator`).

        `indices` are one rank's share of a global batch, `part` = (rank, world size): ε is
        drawn for the whole global batch (world size × B samples) and this rank keeps rows
        rank·B to (rank + 1)·B, so a run does not depend on how its batch is split across
        processes. The extra draws cost little next to reading the batch.
        """
        mean, logvar = self._gather(indices, flip_flags)
        (rank, world), B = part, len(indices)
        noise = torch.randn((world * B, *mean.shape[1:]), generator=generator)  # (W·B, C, h, w)
        noise = noise[rank * B:(rank + 1) * B].numpy()  # (B, C, h, w)
        # NumPy for the arithmetic: single-threaded, so no thread-pool wake-ups per batch
        latent = mean + np.exp(0.5 * logvar) * noise
        latent -= self.shift
        latent *= self.scale
        return torch.from_numpy(latent)

    def close(self) -> None:
        """Unmap the shards and release the lock."""
        self._open = OrderedDict()
        self.store.unlock()

    def __enter__(self) -> LatentReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its default (read after .env is loaded)."""
    from training.config import REPO_ROOT, load_config

    defaults = load_config(REPO_ROOT / "configs" / "default.json")  # what training uses
    d = defaults.data
    parser = argparse.ArgumentParser(
        description="Build or update the latent cache of an image folder and print a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default=os.environ.get("LDM_DATASET", d.dataset),
                        help="image folder, or synthetic[:N] (env LDM_DATASET)")
    parser.add_argument("--vae", default=str(REPO_ROOT / "vae"),
                        help="VAE folder (config.json + safetensors) or single weights file")
    parser.add_argument("--resolution", type=int, default=d.resolution,
                        help="bucket area is at most resolution²")
    parser.add_argument("--step", type=int, default=d.step, help="bucket sides are multiples")
    parser.add_argument("--min-area-ratio", type=float, default=d.min_area_ratio,
                        help="bucket area is at least this × resolution²")
    parser.add_argument("--max-aspect", type=float, default=d.max_aspect,
                        help="buckets range from 1:max-aspect to max-aspect:1")
    parser.add_argument("--allow-upscale", action="store_true",
                        help="keep images smaller than every bucket by upscaling them")
    parser.add_argument("--classes", action="store_true", help="label = first sub-folder")
    parser.add_argument("--global-batch", type=int, default=defaults.batch_size,
                        help="training's batch size × ranks: smaller buckets are merged into "
                             "their neighbours exactly as training does (0: no merging)")
    parser.add_argument("--holdout", type=int, default=d.holdout,
                        help="training's data.holdout: the images it keeps for validation do "
                             "not count towards a bucket's size when merging (0 when training "
                             "validates on --eval-dataset)")
    parser.add_argument("--cache-dir", default=str(default_latent_dir()),
                        help="latent cache folder (env LDM_CACHE_DIR sets its parent)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=d.flip,
                        help="cache the mirrored crops too, as training with data.flip does")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder call")
    parser.add_argument("--num-workers", type=int, default=d.num_workers,
                        help="decoding worker processes")
    parser.add_argument("--shard-size", type=int, default=0,
                        help="entries per shard file (0: about 64 MiB per shard)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--prune", action="store_true",
                        help="after building, delete every cached entry this invocation "
                             "does not use. The cache folder may be shared by other runs: "
                             "entries of other datasets, resolutions, VAEs and the mirrored "
                             "crops of --flip runs are deleted too; --dry-run shows what would "
                             "go")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --prune: only report what it would delete (entries and "
                             "bytes per VAE and latent size) and delete nothing; the cache is "
                             "still built or updated for this invocation first")
    parser.add_argument("--verify", action="store_true",
                        help="check the cache folder instead of building: read every shard "
                             "in full (size, sha256, header, every entry's row, every row's "
                             "checksum), print each problem on one line naming the shard file, "
                             "and exit 1 if there are any. It repairs: damaged shards are "
                             "dropped from the index, so the next build re-encodes their "
                             "entries, and their files are deleted if no other process is "
                             "using the cache (else by the next build or prune that has it to "
                             "itself). Runs beside builds and training; needs only --cache-dir")
    parser.add_argument("--json", action="store_true",
                        help="end with one JSON object. files: image files the scan found = "
                             "cached + skipped, each skipped one listed in skipped_files (path, "
                             "reason, stage: scan or encode); images: usable images; total, "
                             "reused, encoded, repaired, skipped count entries (one per image, "
                             "entries_per_image = 2 with --flip). With --verify: the problems")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before any scan or VAE load (ValueError or FileNotFoundError naming the
    flag or path)."""
    from bucketing import make_buckets
    from training.data import resolve_dataset

    if args.dry_run and not args.prune:
        raise ValueError("--dry-run previews a prune; add --prune (nothing is deleted "
                         "with --dry-run)")
    for flag, value, least in (("--batch-size", args.batch_size, 1),
                               ("--global-batch", args.global_batch, 0),
                               ("--holdout", args.holdout, 0),
                               ("--shard-size", args.shard_size, 0),
                               ("--num-workers", args.num_workers, 0)):
        if value < least:
            raise ValueError(f"{flag} {value}: must be {'positive' if least else '0 or more'}")
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: expected auto, cpu or cuda")
    make_buckets(args.resolution, args.step, args.min_area_ratio, args.max_aspect)
    cache_dir = Path(args.cache_dir)
    existing = next(p for p in (cache_dir, *cache_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--cache-dir {cache_dir}: not a folder ({existing} is a file)")
    if not Path(args.vae).exists():
        raise FileNotFoundError(f"{args.vae}: VAE not found; expected a folder with "
                                "config.json and weights, or a weights file")
    resolve_dataset(args.dataset)  # last: synthetic data is generated here


def _verify_main(args: argparse.Namespace) -> int:
    """`cache.py --verify`: problems on stdout, one a line; 0 when there are none, 1 when there
    are, 2 when the folder is no cache."""
    if args.prune or args.dry_run:
        print("error: --verify checks the cache and builds nothing; run --prune on its own",
              file=sys.stderr)
        return 2
    try:
        problems = verify_cache(args.cache_dir, repair=True, progress=not args.json)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    _warn(f"{args.cache_dir}: {len(problems)} problem(s)"
          + ("; damaged shards dropped, the next build re-encodes their entries" if problems
             else ""))
    if args.json:
        print(json.dumps({"cache_dir": str(args.cache_dir), "problems": problems}))
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python cache.py`."""
    from dotenv import load_dotenv

    from bucketing import bucket_dataset
    from models.vae_weights import load_vae
    from training.config import REPO_ROOT, DataConfig
    from training.distributed import setup, teardown

    load_dotenv(REPO_ROOT / ".env")
    args = build_parser().parse_args(argv)
    if args.verify:
        return _verify_main(args)
    try:
        _check_args(args)
        info = setup(None if args.device == "auto" else args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = DataConfig(dataset=args.dataset, resolution=args.resolution, step=args.step,
                         min_area_ratio=args.min_area_ratio, max_aspect=args.max_aspect,
                         use_classes=args.classes, allow_upscale=args.allow_upscale,
                         merge_small_buckets=args.global_batch > 0, holdout=args.holdout,
                         num_workers=args.num_workers)
        try:
            # the ranks split the files to read; all end with the same scan
            scan, buckets, placements = bucket_dataset(cfg, args.global_batch or None,
                                                       dist=info)
            for s in scan.skipped if info.is_main else []:
                _warn(f"skipped {s.path}: {s.reason}")
            if not scan.records:
                listed = f" ({len(scan.skipped)} skipped, listed above)" if scan.skipped else ""
                raise ValueError(f"{scan.root}: no usable image to cache{listed}")
            vae = load_vae(args.vae, device=info.device)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            summary = ensure_cache(scan.records, placements, buckets, vae, args.cache_dir,
                                   flip=args.flip, batch_size=args.batch_size,
                                   num_workers=args.num_workers, dist_info=info,
                                   shard_size=args.shard_size, max_pixels=cfg.max_image_pixels)
            pruned = None
            barrier()  # every rank has released its share lock before rank 0 takes it whole
            if args.prune and info.is_main:
                pruned = prune_cache(args.cache_dir, iter_hex_keys(summary.keys),
                                     dry_run=args.dry_run)
        except (RuntimeError, OSError, ValueError) as exc:  # a busy cache, a full disk...
            print(f"error: {exc}", file=sys.stderr)
            return 1
        barrier()
        if info.is_main:
            print(summary.format())
            if args.json:
                out = summary.to_json(scan.skipped)
                if pruned is not None:
                    out["pruned"] = pruned
                print(json.dumps(out))
        return 0
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
