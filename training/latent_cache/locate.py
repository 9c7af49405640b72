"""Which entries a run needs and where they lie: keys in chunks, locations, the manifest.

A run's entries are named by their keys (`store.entry_key`), uint8 (N, O, 32) digests: N
records, O = 1 or 2 orientations (with flip). `EntryKeys` computes them a chunk of records at a
time, so a run never holds all of them (32 bytes an entry); `Locations` is what a run keeps
instead: the shard and row of every entry, packed into one number (4 bytes an entry).

Finding the locations of N·O keys in the index (`entries`, 64 hex digits and a shard name per
entry) reads about 150 bytes per entry. So the index also keeps, per key array, the result of
its last lookup: a manifest (`manifests`: the digest of the key array, the index's generation
when it was made, the shards and the packed locations). The index counts a generation (meta
`generation`), which triggers on `entries` and `shards` bump on every row written or deleted,
whoever writes; a manifest is used only while the generation is the one it was made at, so a
start over an unchanged folder and cache reads its manifest (4 bytes an entry) instead of the
entries table. The shards themselves are still checked at every build (stamps, sampled rows).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from bucketing import PlacementTable, place_many
from training.image_table import ImageTable
from training.latent_cache.store import DIGEST_BYTES, KEY_VERSION, LOOKUP_CHUNK, transaction

KEY_CHUNK = 1 << 14  # records whose keys are computed at once
MANIFESTS_KEPT = 8  # manifests an index keeps (the newest; stale ones go at every write)


class EntryKeys:
    """The entry keys of N records in O orientations, computed on demand from `compute`
    (rows (n,) int64 -> uint8 (n, O, 32)); `for_records` and `from_array` make one."""

    def __init__(self, count: int, orientations: int,
                 compute: Callable[[np.ndarray], np.ndarray]) -> None:
        self.count, self.orientations, self._compute = count, orientations, compute

    @classmethod
    def for_records(cls, records: ImageTable, placements: PlacementTable,
                    buckets: Sequence[tuple[int, int]], fingerprint: str,
                    flip: bool) -> EntryKeys:
        """The keys of `records` placed by `placements` (row for row) in `buckets`, cropped
        as placed and, with `flip`, mirrored too (orientation 1); `store.entry_key` of each."""
        grid = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)  # (B, 2)
        head = f"ldm-latent-cache/{KEY_VERSION}|"
        tails = [f"|flip={int(f)}|{fingerprint}" for f in ((False, True) if flip else (False,))]

        def compute(rows: np.ndarray) -> np.ndarray:
            images = records.take(rows)
            bw, bh = grid[placements.bucket[rows], 0], grid[placements.bucket[rows], 1]
            rw, rh, left, top = place_many(images.width, images.height, bw, bh)  # (n,) each
            hexes = images.sha256.tobytes().hex()
            digests = []
            for k, (w, h, x, y, u, v) in enumerate(zip(bw.tolist(), bh.tolist(), left.tolist(),
                                                      top.tolist(), rw.tolist(), rh.tolist())):
                text = f"{head}{hexes[64 * k:64 * k + 64]}|{w}x{h}|{u}x{v}|{x},{y},{x + w},{y + h}"
                digests += [hashlib.sha256((text + tail).encode()).digest() for tail in tails]
            return np.frombuffer(b"".join(digests), np.uint8).reshape(len(rows), len(tails),
                                                                      DIGEST_BYTES)

        return cls(len(records), len(tails), compute)

    @classmethod
    def from_array(cls, keys: np.ndarray) -> EntryKeys:
        """Keys held already, uint8 (N, O, 32)."""
        if not (isinstance(keys, np.ndarray) and keys.dtype == np.uint8 and keys.ndim == 3
                and keys.shape[2] == DIGEST_BYTES):
            raise TypeError("keys must be uint8 (N, O, 32) digests; keys_from_hex converts "
                            "hex keys")
        return cls(len(keys), keys.shape[1], lambda rows: keys[rows])

    def __len__(self) -> int:
        return self.count

    def rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 (n, O, 32): the keys of records `rows`."""
        return self._compute(np.asarray(rows, dtype=np.int64).reshape(-1))

    def chunks(self, size: int = KEY_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(first record, its keys and the next ones', uint8 (n <= size, O, 32)), in order."""
        for lo in range(0, self.count, size):
            yield lo, self.rows(np.arange(lo, min(lo + size, self.count)))

    def array(self) -> np.ndarray:
        """Every key at once, uint8 (N, O, 32)."""
        out = np.empty((self.count, self.orientations, DIGEST_BYTES), dtype=np.uint8)
        for lo, part in self.chunks():
            out[lo:lo + len(part)] = part
        return out

    def digest(self) -> str:
        """sha256 of the shape and every key in order: what a manifest is filed under."""
        h = hashlib.sha256(f"{self.count}x{self.orientations}\n".encode())
        for _, part in self.chunks():
            h.update(part.tobytes())
        return h.hexdigest()


@dataclass
class Locations:
    """Where a run's entries lie: in shards `names` laid end to end (shard s's rows are the
    positions starts[s] to starts[s + 1] - 1), entry (i, o) at position `where[i, o]`, -1 when
    the index lacks it. 4 bytes an entry (8 past 2**31 rows)."""

    names: list[str]
    starts: np.ndarray  # (S + 1,) int64
    where: np.ndarray  # (N, O) int32 or int64

    def missing(self) -> np.ndarray:
        """(N, O) bool: the entries the index lacks."""
        return self.where < 0

    def held_by(self, names: Sequence[str]) -> np.ndarray:
        """(N, O) bool: the entries held by shards `names`."""
        out = np.zeros(self.where.shape, dtype=bool)
        index = {name: s for s, name in enumerate(self.names)}
        for s in sorted(index[n] for n in names if n in index):
            out |= (self.where >= self.starts[s]) & (self.where < self.starts[s + 1])
        return out

    def shard_rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of `positions` (>= 0), int64 arrays of their shape."""
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        return shard, positions - self.starts[shard]

    def take(self, rows: Sequence[int] | np.ndarray) -> Locations:
        """The locations of records `rows`, in that order."""
        return Locations(self.names, self.starts, self.where[np.asarray(rows, dtype=np.int64)])


def generation(conn: sqlite3.Connection) -> int:
    """The index's generation: how many rows of `entries` and `shards` were ever written."""
    row = conn.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
    return int(row[0]) if row else 0


def _lookup(conn: sqlite3.Connection, keys: EntryKeys) -> Locations:
    """Locations from the index's `entries`, LOOKUP_CHUNK keys a query; an entry whose row
    lies beyond its shard's (an inconsistent index) counts as missing."""
    shape = (keys.count, keys.orientations)
    where = np.full(shape[0] * shape[1], -1, dtype=np.int64)  # packed once the sizes are known
    shard_of, rows_of = {}, []  # name -> shard number; rows of each shard
    for lo, part in keys.chunks():
        flat = part.reshape(-1, DIGEST_BYTES)  # (n·O, 32)
        base = lo * shape[1]
        for start in range(0, len(flat), LOOKUP_CHUNK):
            wanted: dict[str, list[int]] = {}
            for offset, k in enumerate(flat[start:start + LOOKUP_CHUNK]):
                wanted.setdefault(bytes(k).hex(), []).append(base + start + offset)
            marks = ",".join("?" * len(wanted))  # a key twice: two files of the same bytes
            for key, name, row, size in conn.execute(
                    "SELECT e.key, e.shard, e.row, s.rows FROM entries e JOIN shards s ON "
                    f"s.name = e.shard WHERE e.key IN ({marks})", list(wanted)):
                if 0 <= row < size:
                    s = shard_of.setdefault(name, len(shard_of))
                    if s == len(rows_of):
                        rows_of.append(size)
                    where[wanted[key]] = s << 32 | row
    starts = np.zeros(len(rows_of) + 1, dtype=np.int64)
    starts[1:] = np.cumsum(rows_of)
    found = where >= 0
    where[found] = starts[where[found] >> 32] + (where[found] & 0xFFFFFFFF)
    dtype = np.int32 if starts[-1] < 2**31 else np.int64
    return Locations(list(shard_of), starts, where.astype(dtype).reshape(shape))


def _read_manifest(conn: sqlite3.Connection, digest: str, now: int) -> Locations | None:
    """The manifest filed under `digest` if it was made at generation `now`."""
    row = conn.execute("SELECT generation, shards, locations FROM manifests WHERE digest = ?",
                       (digest,)).fetchone()
    if row is None or row[0] != now:
        return None
    shards = json.loads(row[1])
    names, sizes = [n for n, _ in shards["shards"]], [r for _, r in shards["shards"]]
    starts = np.zeros(len(names) + 1, dtype=np.int64)
    starts[1:] = np.cumsum(sizes, dtype=np.int64)
    where = np.frombuffer(row[2], dtype=shards["dtype"]).reshape(shards["shape"])
    return Locations(names, starts, where)


def _write_manifest(conn: sqlite3.Connection, digest: str, made_at: int,
                    found: Locations) -> None:
    """File `found` under `digest` as of generation `made_at`, unless the index changed since;
    drop stale manifests and all but the newest MANIFESTS_KEPT."""
    sizes = np.diff(found.starts).tolist()
    about = json.dumps({"shards": [[n, r] for n, r in zip(found.names, sizes)],
                        "dtype": found.where.dtype.str, "shape": list(found.where.shape)})
    with transaction(conn):
        if generation(conn) != made_at:
            return
        conn.execute("DELETE FROM manifests WHERE generation != ? OR digest = ?",
                     (made_at, digest))
        conn.execute("DELETE FROM manifests WHERE rowid NOT IN (SELECT rowid FROM manifests "
                     "ORDER BY rowid DESC LIMIT ?)", (MANIFESTS_KEPT - 1,))
        conn.execute("INSERT INTO manifests (digest, generation, shards, locations) "
                     "VALUES (?, ?, ?, ?)", (digest, made_at, about, found.where.tobytes()))


def locate(conn: sqlite3.Connection, keys: EntryKeys) -> tuple[Locations, bool]:
    """Where the index holds each of `keys`: (locations, whether a manifest gave them).

    A manifest of these keys made at the index's present generation is read as it is;
    otherwise the entries are looked up, in one consistent view of the index, and the result
    is filed as the manifest of these keys."""
    digest = keys.digest()
    with transaction(conn, "DEFERRED"):  # generation and manifest from one view
        made_at = generation(conn)
        known = _read_manifest(conn, digest, made_at)
        if known is None:
            found = _lookup(conn, keys)
    if known is not None:
        return known, True
    _write_manifest(conn, digest, made_at, found)
    return found, False
