"""Looking after a latent cache folder: verify every shard in full, prune unused entries.

`verify_cache` (`cache.py --verify`) reads every shard: size, sha256, header, every entry's row
and every row's checksum; it records stamps too, so running it once on a large cache from before
stamps spares the next training start (whose other ranks wait on rank 0's checks) that one full
read. `prune_cache` (`cache.py --prune`) deletes every entry not in a given set, whoever paid for
it, and with `dry_run` only reports what it would delete.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.latent_cache.shards import ROW_SUM_BYTES, full_check, map_shard
from training.latent_cache.store import (INDEX_NAME, SHARD_SUFFIX, Store, keys_from_hex,
                                         transaction, warn)

def verify_cache(cache_dir: str | os.PathLike[str], *, repair: bool = False,
                 progress: bool = False, log: Callable[[str], None] = warn) -> list[str]:
    """Check every shard in full and return the problems, one line each naming the shard file
    (or the index, for an entry whose shard it does not list).

    Reads every shard: its size and sha256 against the index, its header, every entry's row
    (the key the shard names for it) and every row's checksum (a mismatch names the
    row). A whole shard's stamp and per-row checksums are recorded (so a shard from before
    stamps needs no full check at the next build). Runs under the shared lock, beside builds
    and readers. With `repair`, damaged shards are dropped (tombstoned: the next build re-encodes
    their entries) and so are entries whose shard the index does not list; the files are
    deleted if the cache is free to take the exclusive lock afterwards, else by the next build,
    prune or repair that gets it. Tombstoned shards awaiting deletion are not problems.
    """
    store = Store(cache_dir, create=False)
    index = store.root / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no latent cache index; build the cache first")
    store.lock(exclusive=False)
    problems: list[str] = []
    damaged: dict[str, str] = {}
    try:
        conn = store.connect(readahead=True)  # it reads whole tables and shards
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
                with transaction(conn):
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
    check = full_check(path, size, sha256, recorded)
    problems = check.problems
    if check.keys is not None:
        if len(check.keys) != rows or len(check.sums) != rows * ROW_SUM_BYTES:
            problems.append(f"holds {len(check.keys)} rows, the index says {rows}")
        else:
            problems += [f"row {row} does not hold entry {key}" for key, row in conn.execute(
                "SELECT key, row FROM entries WHERE shard = ?", (path.name,))
                if row >= rows or check.keys[row] != key]
    elif not problems:
        problems.append("names no key for its rows (no keys tensor or key list)")
    if not problems:
        Store.record_check(conn, path.name, check.stamp, check.sums)
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
    store = Store(cache_dir, create=False)
    if not (store.root / INDEX_NAME).is_file():
        raise FileNotFoundError(f"{store.root / INDEX_NAME}: no latent cache index; build the "
                                "cache first")
    store.lock(exclusive=False)
    try:
        conn = store.connect(readonly=True, readahead=True)
        try:
            with transaction(conn, "DEFERRED"):  # one consistent snapshot of the index
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
                log: Callable[[str], None] = warn, dry_run: bool = False) -> dict:
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
    (as _SHARD_USAGE's). Every shard is removed tombstone first (`Store.drop_shards`), so a
    kill at any point leaves no file that a later `tidy` would list again: pruned entries
    never come back."""
    store = Store(cache_dir)
    if not store.lock(exclusive=True, blocking=False):
        raise RuntimeError(f"{cache_dir}: another process is using the latent cache; prune "
                           "when it is done")
    conn = store.connect(readahead=True)
    try:
        leftovers, result["shards_reindexed"], removed = store.tidy(conn)
        result["leftovers_removed"] = leftovers + removed
        with transaction(conn):
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
                arrays = map_shard(store.shard_path(name))
                live_rows = list(conn.execute(
                    "SELECT key, row FROM entries WHERE shard = ? ORDER BY row", (name,)))
                picks = [row for _, row in live_rows]
                mean = torch.from_numpy(np.ascontiguousarray(arrays["mean"][picks]))
                logvar = torch.from_numpy(np.ascontiguousarray(arrays["logvar"][picks]))
                del arrays
                new = f"{fingerprint[:12]}-{prefix}-{w}x{h}-{n:05d}{SHARD_SUFFIX}"
                written = store.write_shard(conn, new, mean, logvar,
                                            keys_from_hex([[k] for k, _ in live_rows]),
                                            fingerprint)
                store.drop_shards(conn, {name: "pruned: rewritten"}, delete=True)
                result["shards_rewritten"] += 1
                result["bytes_freed"] += size - written
        conn.execute("VACUUM")
    finally:
        conn.close()
        store.unlock()
    return usage

