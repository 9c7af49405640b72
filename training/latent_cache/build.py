"""Building the latent cache: encode every training crop once with the VAE, reuse it across runs.

`ensure_cache` makes sure every (record, orientation) has an entry: it cleans up after crashed
writers (when it has the cache to itself), checks the shards it reuses, and encodes what is
missing. An entry holds the VAE posterior's mean and log-variance (fp16) of one bucket crop, so
training draws a fresh latent `mean + exp(logvar / 2) · ε` at every step.

Start-up reads a few bytes per entry, not the shards themselves: the locations of the entries
(`locate`: the index's manifest of this key list while the index is unchanged, else a lookup in
the index that leaves a new manifest), each reused shard's header and a few sampled rows. A
build trusts a shard whose stamp is unchanged (`shards.shard_stamp`); a shard whose stamp
changed, or that has none (written before stamps existed: older indexes gain the tables they
lack in place and nothing is re-encoded), is checked in full once, and then its stamp and
per-row checksums are recorded. Every build also reads SAMPLE_ROWS rows drawn among all rows of
the shards it trusts and compares their checksums, so silent corruption that keeps the stamp is
still found over time, for the bytes of a few rows. The sample is seeded with the index's start
counter (meta `starts`, which every build increments), so successive builds read different rows
and each build's sample is reproducible. A damaged or missing shard, or one with a sampled row
that does not match, is reported (file, and row where one is to blame), dropped, and its entries
are re-encoded; without the exclusive lock its file is left for a later process that has it.

A run keeps the build's `Locations` of its entries (4 bytes each), not their keys: those are
computed a chunk of records at a time (`EntryKeys`), and the locations of what a build encoded
are looked up once it is done.

Under `torchrun` every rank encodes a disjoint share of the missing entries; the result equals
the single-process cache. Across machines the folder must be one folder on a filesystem every
machine shares (checked before any work: ranks that do not see rank 0's probe file refuse).
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from bucketing import PlacementTable
from training.image_table import ImageTable
from training.images import ImageLoadError, crop_to_bucket, load_image, to_unit_range
from training.distributed import DistInfo, all_gather_objects, barrier, broadcast_object
from training.latent_cache.shards import (ROW_SUM_BYTES, check_rows, full_check, row_layout,
                                          sample_rows, shard_stamp)
from training.latent_cache.locate import EntryKeys, Locations, locate
from training.latent_cache.store import (DIGEST_BYTES, ShardInfo, ShardWriter, Store,
                                         default_latent_dir, warn)

SAMPLE_ROWS = 8  # rows of trusted shards each build reads and compares with their checksums
# How long a rank looks for the file rank 0 just created before it concludes that they do not
# share the cache folder: network filesystems may report a new name as missing for a while.
SHARED_PROBE_WAIT_S = 60.0


class _CropSource(torch.utils.data.Dataset):
    """Bucket crops as uint8 (3, H, W), decoded in DataLoader workers.

    The file is read once, checked against the scanned content hash (so an entry is never
    stored under a hash its pixels do not have), then decoded from those bytes.
    """

    def __init__(self, records: ImageTable, placements: PlacementTable,
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
                   log: Callable[[str], None] = warn
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
    locations: Locations  # of the entries, as found in the index before encoding
    reused: int
    repaired: int
    damaged: list[str]
    reused_bytes: int
    reused_shards: int
    leftovers_removed: int
    full_checks: int  # shards read in full (stamp changed or never recorded)
    rows_sampled: int
    from_manifest: bool  # the locations came from the manifest, not an index lookup


def _check_shards(store: Store, conn: sqlite3.Connection, names: Sequence[str],
                  info: dict[str, ShardInfo], seed: int, progress: bool,
                  log: Callable[[str], None]) -> tuple[dict[str, str], int, int]:
    """Check the shards a build reuses without reading them, as far as can be trusted.

    A shard whose stamp (`shard_stamp`: size, mtime, inode, header) is the one recorded is trusted;
    any other is read in full once, and when whole its new stamp and per-row checksums are
    recorded. Then SAMPLE_ROWS rows drawn among all rows of the trusted shards (in name order,
    by a generator seeded with `seed`) are read and compared with their checksums. Returns
    (damaged shard -> problem, shards read in full, rows sampled).
    """
    damaged: dict[str, str] = {}
    trusted: list[tuple[str, int]] = []  # (name, rows)
    layout: dict[str, tuple[int, int, int, int]] = {}  # name -> `row_layout`
    full = 0
    for name in tqdm(names, desc="checking shards", unit="shard", disable=not progress,
                     leave=False):
        shard = info.get(name)
        if shard is None:
            damaged[name] = "not listed in the index"
            continue
        path = store.shard_path(name)
        try:
            stamp, start, header = shard_stamp(path)
            if stamp == shard.stamp and shard.sums_bytes == shard.rows * ROW_SUM_BYTES:
                layout[name] = row_layout(header, start, shard.bytes, path)
                trusted.append((name, shard.rows))
                continue
        except FileNotFoundError:
            damaged[name] = "file missing"
            continue
        except (OSError, ValueError):
            pass  # the full check says what is wrong
        full += 1
        check = full_check(path, shard.bytes, shard.sha256)
        if check.problems:
            damaged[name] = check.problems[0]
        else:
            store.record_check(conn, name, check.stamp, check.sums)
    sample = sample_rows(seed, sorted(trusted), SAMPLE_ROWS)
    for name in dict.fromkeys(name for name, _ in sample):
        rows = [r for n, r in sample if n == name]
        try:
            bad = check_rows(store.shard_path(name), layout[name], rows,
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


def _tidy(store: Store, conn: sqlite3.Connection, log: Callable[[str], None]
          ) -> tuple[bool, int]:
    """Take the exclusive lock if it is free, and then clean up after crashed writers and
    finish earlier removals (`Store.tidy`); else take the shared lock. Returns (whether this
    process has the cache to itself, leftover files removed)."""
    if not store.lock(exclusive=True, blocking=False):
        store.lock(exclusive=False)
        return False, 0
    leftovers, adopted, removed = store.tidy(conn)
    if leftovers:
        log(f"removed {leftovers} leftover file(s) of an interrupted build")
    if adopted:
        log(f"re-indexed {adopted} whole shard(s) the index did not list")
    if removed:
        log(f"deleted {removed} shard file(s) dropped earlier (damaged, or left by an "
            "interrupted removal)")
    return True, leftovers


def _plan(store: Store, keys: EntryKeys, progress: bool, log: Callable[[str], None]
          ) -> _Plan:
    """Clean up after crashed writers and finish earlier removals (if alone), locate `keys`,
    check the shards holding them, drop damaged ones, list what is missing."""
    conn = store.connect()
    try:
        alone, leftovers = _tidy(store, conn, log)
        seed = store.next_start(conn)
        locations, from_manifest = locate(conn, keys)
        names = locations.names
        info = store.shard_info(conn, names)
        damaged, full, sampled = _check_shards(store, conn, names, info, seed, progress, log)
        # Without the exclusive lock another run may map the damaged shards: they leave the
        # index now (so nothing reuses them) and their files wait for a process that has it.
        store.drop_shards(conn, damaged, delete=alone)
        if alone:  # Linux converts an exclusive flock to a shared one atomically
            store.lock(exclusive=False)
    finally:
        conn.close()
    need = locations.missing()  # (N, O)
    stale = locations.held_by(list(damaged)) if damaged else None  # (N, O): to re-encode
    repaired = 0 if stale is None else int(np.count_nonzero(stale))
    if stale is not None:
        need |= stale
    kept = [n for n in names if n not in damaged]
    return _Plan(need=need, locations=locations, reused=need.size - int(np.count_nonzero(need)),
                 repaired=repaired, damaged=sorted(damaged),
                 reused_bytes=sum(info[n].bytes for n in kept), reused_shards=len(kept),
                 leftovers_removed=leftovers, full_checks=full, rows_sampled=sampled,
                 from_manifest=from_manifest)


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
                  keys: EntryKeys, vae, store: Store, fingerprint: str, rank: int,
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
    writer = ShardWriter(store, conn, fingerprint, rank, shard_size)
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
                named = keys.rows(indices)  # (B, O, 32)
                digests = [named[j, 0] for j in plain] + [named[j, 1] for j in mirrored]
                mean, logvar, chunk = encode_moments(vae.encode, x, chunk, log)
                mean, logvar = mean.half(), logvar.half()  # (E, C, h, w)
                finite = (torch.isfinite(mean).flatten(1).all(1)
                          & torch.isfinite(logvar).flatten(1).all(1))  # (E,)
                for e, (i, orientation) in enumerate(owners):
                    if finite[e]:
                        writer.add(bucket_of(i), digests[e], mean[e], logvar[e])
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
    because the shard holding them was damaged or missing. `locations` says where every
    record's entries lie (`LatentReader` reads them), 4 bytes an entry; `keys` computes every
    record's entry keys when asked, uint8 (N, O, 32) digests (`record_hex_keys` gives one
    record's as hex): a run keeps its locations, not its keys."""

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
    locations: Locations = field(default_factory=lambda: Locations(
        [], np.zeros(1, np.int64), np.zeros((0, 1), np.int32)), repr=False, compare=False)
    unusable: list[int] = field(default_factory=list)  # records lacking an entry
    shards_checked_fully: int = 0  # read in full because their stamp changed or was missing
    rows_sampled: int = 0  # rows of trusted shards compared with their checksums
    from_manifest: bool = False  # the index's manifest located the entries (no lookup)
    entry_keys: EntryKeys | None = field(default=None, repr=False, compare=False)

    @property
    def keys(self) -> np.ndarray:
        """Every record's entry keys, uint8 (N, O, 32), computed now (32 bytes an entry)."""
        if self.entry_keys is None:
            return np.zeros((0,) + self.locations.where.shape[1:] + (DIGEST_BYTES,), np.uint8)
        return self.entry_keys.array()

    def to_json(self, scan_skipped: Sequence = ()) -> dict:
        """The machine-readable summary (without the per-record keys).

        `scan_skipped` are the files the scan left out (`SkippedFile`s: path, reason). Counts of
        files: `files` = found by the scan, `cached` + `skipped` (every image whose entries are
        all cached, and every file left out by the scan or at encode time). `skipped_files` lists
        each with its reason and the stage that left it out ("scan" or "encode"; a file whose
        two orientations both failed at encode time is listed twice). The other counts are of
        entries, `entries_per_image` per image.
        """
        out = {k: v for k, v in vars(self).items() if k not in ("locations", "entry_keys")}
        out["entries_per_image"] = int(self.locations.where.shape[1])
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


def _collectives(dist_info: DistInfo | None) -> tuple[int, int, Callable, Callable, Callable]:
    """(rank, world size, gather, share, wait): the collectives of a build, which only a build
    given a `dist_info` uses (one rank may build a cache alone inside a process group)."""
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    if world == 1:
        return rank, world, lambda obj: [obj], lambda obj: obj, lambda: None
    return rank, world, all_gather_objects, broadcast_object, barrier


def _from_rank0(rank: int, share: Callable, work: Callable, what: str):
    """`work()` on rank 0, its result on every rank; a failure there is raised on rank 0 and
    reported on the others, so that none waits forever on the others."""
    result = None
    if rank == 0:
        try:
            result = work()
        except Exception as exc:
            share(f"rank 0: {type(exc).__name__}: {exc}")
            raise
    result = share(result)
    if isinstance(result, str):
        raise RuntimeError(f"latent cache {what} failed on {result}")
    return result


def _relocate(store: Store, keys: EntryKeys) -> Locations:
    """The locations of `keys` once the build has written its shards (files it could not
    encode stay missing), filed as their manifest."""
    conn = store.connect()
    try:
        return locate(conn, keys)[0]
    finally:
        conn.close()


def ensure_cache(records: ImageTable, placements: PlacementTable, buckets: Sequence,
                 vae, cache_dir: str | os.PathLike[str] | None = None, flip: bool = False,
                 batch_size: int = 8, num_workers: int = 2, dist_info: DistInfo | None = None,
                 *, shard_size: int = 0, max_pixels: int = 100_000_000, progress: bool = True,
                 log: Callable[[str], None] = warn,
                 fingerprint: str | None = None) -> CacheSummary:
    """Build or update the cache so that every (record, orientation) has an entry.

    `placements[i]` (a `PlacementTable`) belongs to `records[i]` (an `ImageTable`); `vae` sits
    on the device that encodes. With `flip`, the mirrored crop is cached too. Under torchrun
    (`dist_info` with world_size > 1) every rank must call this with the same arguments: rank 0
    checks and plans, each rank encodes pending entries i with i % world_size == rank, and all
    ranks return the same summary after a barrier. Without `dist_info` it runs alone, even
    inside a process group. `shard_size` is entries per shard (0: about 64 MiB per shard).
    Images that fail to load or encode to NaN/inf are reported, skipped and listed in
    `unusable` (record indices). `fingerprint` is `vae_fingerprint(vae)` when the caller has it
    already.
    """
    from models.vae_weights import vae_fingerprint

    start = time.perf_counter()
    if len(records) != len(placements):
        raise ValueError(f"{len(records)} records but {len(placements)} placements")
    rank, world, gather, share, wait = _collectives(dist_info)
    _check_buckets(placements, buckets, vae.downsample_factor)
    fingerprint = fingerprint or vae_fingerprint(vae)
    if len(set(gather(fingerprint))) > 1:
        raise RuntimeError("ranks hold different VAE weights; every rank must load the same VAE")
    keys = EntryKeys.for_records(records, placements, buckets, fingerprint, flip)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_latent_dir()
    store = Store(cache_dir)
    try:
        if world > 1:
            _check_shared(store.root, rank, share, gather)
        plan = _from_rank0(rank, share, lambda: _plan(store, keys, progress, log), "planning")
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
        if error is None and not any("error" in s for s in every) and (
                plan.damaged or any(s["encoded"] for s in every)):  # the index changed
            plan.locations = _from_rank0(rank, share, lambda: _relocate(store, keys),
                                         "locating")
    finally:
        store.unlock()
    if error is not None:
        raise error
    failed = [s["error"] for s in every if "error" in s]
    if failed:
        raise RuntimeError(f"latent cache building failed on {failed[0]}")
    return _summary(plan, every, keys, str(cache_dir), fingerprint, time.perf_counter() - start)


def _check_buckets(placements: PlacementTable, buckets: Sequence, factor: int) -> None:
    """Refuse buckets whose sides the VAE cannot downsample to whole latents."""
    used = np.unique(placements.bucket)
    bad = sorted({tuple(buckets[b]) for b in used.tolist()
                  if buckets[b][0] % factor or buckets[b][1] % factor})
    if bad:
        raise ValueError(f"buckets {bad} are not multiples of the VAE's downsampling factor "
                         f"{factor}; choose a bucket step that is")


def _summary(plan: _Plan, every: list[dict], keys: EntryKeys, cache_dir: str,
             fingerprint: str, seconds: float) -> CacheSummary:
    """The summary of a build from its plan and every rank's counters."""
    encoded = sum(s["encoded"] for s in every)
    encode_seconds = max(s["encode_seconds"] for s in every)
    total = len(keys) * keys.orientations
    return CacheSummary(
        cache_dir=cache_dir, fingerprint=fingerprint, images=len(keys), total=total,
        reused=plan.reused, encoded=encoded, repaired=plan.repaired,
        skipped=total - plan.reused - encoded,
        bytes=plan.reused_bytes + sum(s["bytes"] for s in every),
        shards=plan.reused_shards + sum(s["shards"] for s in every), seconds=seconds,
        images_per_s=encoded / encode_seconds if encode_seconds > 0 else 0.0,
        damaged_shards=plan.damaged,
        skipped_files=sorted(item for s in every for item in s["skipped_files"]),
        leftovers_removed=plan.leftovers_removed, locations=plan.locations,
        unusable=sorted({int(i) for s in every for i in s["unusable"]}),
        shards_checked_fully=plan.full_checks, rows_sampled=plan.rows_sampled,
        from_manifest=plan.from_manifest, entry_keys=keys)
