"""The latent cache folder: entry keys, the sqlite index, the lock, and writing shards.

Layout of a cache folder (default `$LDM_CACHE_DIR/latents`, shareable by runs and ranks):

    index.sqlite    entries(key -> shard, row), shards(name -> bytes, sha256, rows, ...),
                    checks(shard -> stamp, per-row checksums), dropped(shard -> reason),
                    manifests(digest of a run's keys -> their locations; `locate`)
    shards/*.safetensors   tensors `mean` and `logvar`, (rows, C, h, w) fp16, one bucket each,
                    and `keys` (rows, 32) uint8; names carry the writer's rank and a random
                    token, so writers never collide
    lock            flock: builders, readers, checks and prune dry runs hold it shared; cleanup,
                    deleting shard files and prune exclusive

An entry's key hashes the image's content (sha256 of the file), its bucket, resized size and
crop box, the horizontal flip, and the VAE fingerprint (weights and config): a changed image,
grid or VAE never meets a stale latent. Keys travel as raw sha256 digests, uint8 (records,
orientations, 32), computed a chunk at a time (`locate.EntryKeys`).

Index format 2 added the manifests and the generation counter (meta `generation`, bumped by
triggers on every row written to or deleted from `entries` and `shards`, by any code); an index
of format 1 is upgraded in place by the first process that opens it for writing, keeping every
entry and shard (older code then refuses the folder rather than misread it).

A shard is written to a temporary file, fsynced and renamed into place, and only then are its
index rows committed, so a kill at any moment loses at most the shard being written. A shard file
the index does not list (its writer died before the commit, or the index was lost) is listed again
from its own keys by the next build that has the cache to itself (`Store.tidy`). Removal is
crash-safe: a shard is first tombstoned (its entries deleted and its name entered in `dropped`, in
one transaction), then its file is deleted, then its index rows; a process killed in between
leaves a tombstone that the next process with the cache to itself completes, so a dropped shard
never comes back and pruned entries never reappear. Only the holder of the exclusive lock deletes
shard files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from training.checkpoint import fsync_dir
from training.config import default_cache_dir
from training.latent_cache.shards import (ROW_SUM_BYTES, SHARD_VERSION, SHARD_VERSIONS,
                                          full_check, read_header, row_sums, shard_keys,
                                          shard_stamp)

FORMAT_VERSION = 2  # of the index: 1 is upgraded in place, another is refused
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
DIGEST_BYTES = 32  # an entry key is a sha256 digest: 32 bytes, 64 hex digits in the index
LOOKUP_CHUNK = 500  # keys per index query (under sqlite's oldest limit of 999 parameters)
BUSY_TIMEOUT_S = 600.0  # sqlite waits this long for another writer's lock
# `sums_bytes` (the length of `row_sums`) comes before the blob: sqlite reads a row's columns
# in order, so a column after a blob costs reading the blob.
_CHECKS = """CREATE TABLE IF NOT EXISTS {name} (
    shard TEXT PRIMARY KEY, stamp TEXT NOT NULL, sums_bytes INTEGER NOT NULL,
    row_sums BLOB NOT NULL) WITHOUT ROWID"""
_BUMP = "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE name = 'generation'"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS shards (
        name TEXT PRIMARY KEY, bytes INTEGER NOT NULL, sha256 TEXT NOT NULL,
        rows INTEGER NOT NULL, fingerprint TEXT NOT NULL, width INTEGER NOT NULL,
        height INTEGER NOT NULL, created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS entries (
        key TEXT PRIMARY KEY, shard TEXT NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS entries_by_shard ON entries (shard)",
    _CHECKS.format(name="checks"),
    """CREATE TABLE IF NOT EXISTS dropped (
        shard TEXT PRIMARY KEY, reason TEXT NOT NULL) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS manifests (
        digest TEXT UNIQUE NOT NULL, generation INTEGER NOT NULL, shards TEXT NOT NULL,
        locations BLOB NOT NULL)""",
    "INSERT OR IGNORE INTO meta VALUES ('generation', '0')",
    *(f"CREATE TRIGGER IF NOT EXISTS {table}_{event.lower()} AFTER {event} ON {table} "
      f"BEGIN {_BUMP}; END" for table in ("entries", "shards")
      for event in ("INSERT", "UPDATE", "DELETE")),
)
_RECORD_CHECK = ("INSERT OR REPLACE INTO checks (shard, stamp, row_sums, sums_bytes) "
                 "VALUES (?, ?, ?, ?)")
# `checks` and `dropped` came in format 1 after it was first written, and format 2 added
# `manifests`, `generation` and its triggers, and `checks.sums_bytes` (which sqlite would read
# the whole blob to measure): `connect` adds what an index lacks (a shard without a `checks`
# row is checked in full once).


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_latent_dir() -> Path:
    """Where the latent cache lives unless told otherwise: `$LDM_CACHE_DIR/latents`."""
    return default_cache_dir() / "latents"


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


def _read_header_page(index: Path) -> None:
    """Read the first page of `index` (if there is one) with readahead off, before sqlite
    reads its header: sqlite's first read would otherwise start a readahead window, whose
    marked pages go on widening it as sqlite's next reads meet them, whatever its descriptor's
    advice says by then."""
    try:
        fd = os.open(index, os.O_RDONLY)
    except OSError:
        return  # not there yet: sqlite creates it
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 4096, 0)
    finally:
        os.close(fd)


def _no_readahead(index: Path) -> None:
    """Turn the kernel's readahead off for this process's open files of `index`, sqlite's
    among them (POSIX_FADV_RANDOM on each descriptor found in /proc/self/fd; nothing where
    there is no /proc). sqlite opens the file when it connects and reads it lazily."""
    target = os.path.realpath(index)
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                os.posix_fadvise(int(fd), 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:  # closed meanwhile, or not a file
            continue


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    conn.execute(f"BEGIN {mode}")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@dataclass(frozen=True)
class ShardInfo:
    """A shard's index row: size, whole-file sha256, rows, and its recorded stamp and length
    of per-row checksums (None, 0 when it was never checked since stamps exist)."""

    bytes: int
    sha256: str
    rows: int
    stamp: str | None
    sums_bytes: int


class Store:
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
    def connect(self, readonly: bool = False, readahead: bool = False) -> sqlite3.Connection:
        """Open the index, waiting up to BUSY_TIMEOUT_S for other writers: creating it (or
        adding the tables an older index lacks), or with `readonly` only an existing one,
        opened so that nothing in the folder is written.

        Without `readahead` the kernel reads only the pages sqlite asks for: a start reads a
        few scattered pages and blobs of the index, around each of which a disk's readahead
        window (8 MiB on some virtual disks) would read megabytes of the entries table.
        Maintenance that scans whole tables (`verify_cache`, `prune_cache`) keeps it."""
        index = self.root / INDEX_NAME
        if not readahead:
            _read_header_page(index)
        if readonly:  # sqlite refuses every write, even rolling back an interrupted one
            conn = sqlite3.connect(f"{index.resolve().as_uri()}?mode=ro", uri=True,
                                   timeout=BUSY_TIMEOUT_S, isolation_level=None)
        else:
            conn = sqlite3.connect(index, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        if not readahead:  # before sqlite reads its first page
            _no_readahead(index)
        try:
            if readonly:
                row = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
                found = row[0] if row else None
                if found == "1":  # read as it is; the next writer upgrades it
                    found = str(FORMAT_VERSION)
            else:
                with transaction(conn):
                    found = self._create_or_upgrade(conn)
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
    def _create_or_upgrade(conn: sqlite3.Connection) -> str | None:
        """Create the index's tables, or add those an older index lacks (format 1 becomes 2,
        keeping every row), inside the caller's transaction; returns the format found."""
        for statement in _SCHEMA:
            conn.execute(statement)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(checks)")]
        if columns != ["shard", "stamp", "sums_bytes", "row_sums"]:  # format 1's: rebuilt
            conn.execute(_CHECKS.format(name="checks_upgraded"))
            conn.execute("INSERT INTO checks_upgraded SELECT shard, stamp, length(row_sums), "
                         "row_sums FROM checks")
            conn.execute("DROP TABLE checks")
            conn.execute("ALTER TABLE checks_upgraded RENAME TO checks")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(FORMAT_VERSION),))
        conn.execute("UPDATE meta SET value = ? WHERE name = 'format' AND value = '1'",
                     (str(FORMAT_VERSION),))
        row = conn.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        return row[0]

    @staticmethod
    def next_start(conn: sqlite3.Connection) -> int:
        """Count one more build in the index (meta `starts`) and return the new count: the seed
        of this build's row sample."""
        with transaction(conn):
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('starts', '0')")
            conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                         "WHERE name = 'starts'")
            (value,) = conn.execute("SELECT value FROM meta WHERE name = 'starts'").fetchone()
        return int(value)

    @staticmethod
    def shard_info(conn: sqlite3.Connection, names: Iterable[str]) -> dict[str, ShardInfo]:
        """The index rows of those of `names` the index lists and has not dropped."""
        out = {}
        names = list(names)
        for i in range(0, len(names), LOOKUP_CHUNK):
            part = names[i:i + LOOKUP_CHUNK]
            marks = ",".join("?" * len(part))
            for name, size, sha, rows, stamp, sums in conn.execute(
                    "SELECT s.name, s.bytes, s.sha256, s.rows, c.stamp, c.sums_bytes "
                    "FROM shards s LEFT JOIN checks c ON c.shard = s.name "
                    f"WHERE s.name IN ({marks}) AND s.name NOT IN (SELECT shard FROM dropped)",
                    part):
                out[name] = ShardInfo(size, sha, rows, stamp, sums or 0)
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
        with transaction(conn):
            conn.execute(_RECORD_CHECK, (name, stamp, sums, len(sums)))

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
        with transaction(conn):
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
        with transaction(conn):
            for name in names:
                conn.execute("DELETE FROM shards WHERE name = ?", (name,))
                conn.execute("DELETE FROM checks WHERE shard = ?", (name,))
                conn.execute("DELETE FROM dropped WHERE shard = ?", (name,))
        return len(names)

    def write_shard(self, conn: sqlite3.Connection, name: str, mean: torch.Tensor,
                    logvar: torch.Tensor, keys: np.ndarray, fingerprint: str) -> int:
        """Write one shard atomically, then commit its index rows, stamp and per-row checksums;
        returns its size in bytes.

        mean, logvar: (rows, C, h, w) fp16 on the CPU; keys: (rows, 32) uint8 digests.
        """
        keys = np.ascontiguousarray(keys, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        data = safetensors_bytes({"mean": mean.contiguous(), "logvar": logvar.contiguous(),
                                  "keys": torch.from_numpy(keys)},
                                 metadata={"format": "ldm-latent-cache",
                                           "version": SHARD_VERSION,
                                           "fingerprint": fingerprint})
        hex_keys = keys.tobytes().hex()
        final = self.shard_path(name)
        tmp = final.with_name(f".{name}{TMP_SUFFIX}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.shard_dir)
        stamp, start, header = shard_stamp(final)
        sums = row_sums(np.frombuffer(data, dtype=np.uint8), start, header, final)
        height, width = mean.shape[-2:]
        with transaction(conn):
            conn.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (name, len(data), hashlib.sha256(data).hexdigest(), len(keys),
                          fingerprint, int(width), int(height), time.time()))
            conn.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)",
                             ((hex_keys[64 * row:64 * row + 64], name, row)
                              for row in range(len(keys))))
            conn.execute(_RECORD_CHECK, (name, stamp, sums, len(sums)))
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
        with transaction(conn):  # checks of shards that code predating them dropped
            conn.execute("DELETE FROM checks WHERE shard NOT IN (SELECT name FROM shards)")
        known = {name for (name,) in conn.execute("SELECT name FROM shards")}
        leftovers, unlisted, _ = self.tidy_plan(known, {})
        adopted = 0
        for path, (size, keys, fingerprint, width, height) in unlisted:
            check = full_check(path, size, None)
            if check.problems:
                leftovers.append(path)
                continue
            adopted += 1
            with transaction(conn):
                conn.execute("INSERT INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (path.name, size, check.sha256, len(keys), fingerprint,
                              width, height, path.stat().st_mtime))
                conn.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?)",
                                 ((k, path.name, row) for row, k in enumerate(keys)))
                conn.execute(_RECORD_CHECK, (path.name, check.stamp, check.sums,
                                             len(check.sums)))
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
        """(bytes, keys, fingerprint, width, height) of a shard file from its own header and
        keys, or None if it is not a whole shard."""
        try:
            start, header = read_header(path)
            meta = header.get("__metadata__", {})
            names = [n for n in header if n != "__metadata__"]
            shapes = {name: header[name]["shape"] for name in ("mean", "logvar")}
            end = max(header[name]["data_offsets"][1] for name in names)
            size = path.stat().st_size
            if (meta.get("format") != "ldm-latent-cache"
                    or meta.get("version") not in SHARD_VERSIONS or len(shapes["mean"]) != 4
                    or shapes["mean"] != shapes["logvar"] or size != start + end):
                return None
            with open(path, "rb") as f:
                keys = shard_keys(header, start, lambda at, n: os.pread(f.fileno(), n, at))
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None
        if keys is None:
            return None
        height, width = shapes["mean"][-2:]
        return size, keys, meta.get("fingerprint", ""), int(width), int(height)


class ShardWriter:
    """Collects encoded entries of one bucket at a time and writes them as shards."""

    def __init__(self, store: Store, conn: sqlite3.Connection, fingerprint: str, rank: int,
                 shard_size: int) -> None:
        self.store, self.conn, self.fingerprint = store, conn, fingerprint
        self.shard_size = shard_size
        self.prefix = f"{fingerprint[:12]}-r{rank}-{secrets.token_hex(4)}"
        self.seq = 0
        self.bucket: tuple[int, int] | None = None
        self.keys: list[np.ndarray] = []  # (32,) uint8 digests
        self.means: list[torch.Tensor] = []
        self.logvars: list[torch.Tensor] = []
        self.bytes_written = 0
        self.shards_written = 0

    def add(self, bucket: tuple[int, int], key: np.ndarray, mean: torch.Tensor,
            logvar: torch.Tensor) -> None:
        """Queue one entry; key: (32,) uint8 digest; mean, logvar: (C, h, w) fp16."""
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
            self.conn, name, torch.stack(self.means), torch.stack(self.logvars),
            np.stack(self.keys), self.fingerprint)  # (rows, C, h, w) each, keys (rows, 32)
        self.shards_written += 1
        self.keys, self.means, self.logvars = [], [], []

