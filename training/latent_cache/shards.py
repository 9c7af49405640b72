"""One shard file of the latent cache: its safetensors layout, stamp and integrity checks.

A shard is a safetensors file holding tensors `mean` and `logvar`, (rows, C, h, w) fp16, of one
bucket, and `keys`, (rows, 32) uint8, each row's entry key, with the writer's metadata (format,
version, VAE fingerprint). Shards of version 1 (before `keys`) list the rows' keys as hex in
their metadata instead: about 70 bytes a row in a header that every build reads; they stay
readable as they are (`shard_keys` reads either). Its stamp ("size:mtime_ns:inode:sha256 of the
header bytes", `shard_stamp`) is what a build compares with the index to trust a shard without
reading its data; `row_sums` are the per-row checksums (the first ROW_SUM_BYTES of a BLAKE2b of
a row's mean then log-variance bytes) that a build samples and `full_check` compares.
`map_shard` memory-maps the tensors for reading.

Headers and sampled rows are read with readahead off (POSIX_FADV_RANDOM, MADV_RANDOM for the
mappings): they are a few bytes or rows at scattered places, and a disk's readahead window
(8 MiB on some virtual disks) would otherwise read megabytes for each.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROW_SUM_BYTES = 8  # per-row checksum: this many bytes of a BLAKE2b digest
SHARD_VERSION = "2"  # written now: keys as a tensor; "1": keys as hex in the metadata
SHARD_VERSIONS = ("1", "2")  # readable


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
    """The first 8 + header-length bytes of an open safetensors file, read without
    readahead."""
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
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


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of a safetensors file."""
    with open(path, "rb") as f:
        raw = _header_bytes(f, path)
    return len(raw), _parse_header(raw, path)


def shard_stamp(path: Path) -> tuple[str, int, dict]:
    """(stamp, offset of the data section, header) of a shard file, reading only its header.

    The stamp is "size:mtime_ns:inode:sha256 of the header bytes"; a shard whose stamp is the one
    recorded in the index is trusted without reading its data. Raises OSError or ValueError.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        raw = _header_bytes(f, path)
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{hashlib.sha256(raw).hexdigest()}"
    return stamp, len(raw), _parse_header(raw, path)


def row_layout(header: dict, start: int, size: int, path: Path
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


def row_sums(data: np.ndarray, start: int, header: dict, path: Path) -> bytes:
    """Every row's checksum, concatenated, of the shard whose bytes are `data` (uint8)."""
    rows, width, mean_at, logvar_at = row_layout(header, start, len(data), path)
    mean = data[mean_at:mean_at + rows * width].reshape(rows, width)  # (rows, row bytes)
    logvar = data[logvar_at:logvar_at + rows * width].reshape(rows, width)
    return b"".join(_row_sum(m, lv) for m, lv in zip(mean, logvar))


def shard_keys(header: dict, start: int, read: Callable[[int, int], bytes]) -> list[str] | None:
    """The keys of a shard's rows, as hex: its `keys` tensor (version 2; `read(offset, n)`
    gives n bytes of the file at offset, `start` is where its data section begins) or the list
    in its metadata (version 1); None when it names none, or not one per row."""
    meta = header.get("__metadata__")
    try:
        rows = int(header["mean"]["shape"][0])
        if meta.get("version") == "1":
            keys = json.loads(meta.get("keys", "null"))
            good = isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            return keys if good and len(keys) == rows else None
        info = header["keys"]
        lo, hi = info["data_offsets"]
        if (info.get("dtype") != "U8" or info.get("shape") != [rows, 32]
                or hi - lo != 32 * rows):
            return None
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return None
    data = read(start + lo, hi - lo)
    if len(data) != hi - lo:
        return None
    return [data[32 * r:32 * r + 32].hex() for r in range(rows)]


@dataclass
class FullCheck:
    """What reading a whole shard found: `problems` (phrases, empty when whole), its `sha256`,
    and when its header is readable its `stamp`, per-row checksums `sums` and `keys`."""

    problems: list[str]
    sha256: str | None = None
    stamp: str | None = None
    sums: bytes | None = None
    keys: list | None = None


def full_check(path: Path, size: int, sha256: str | None, recorded: bytes | None = None
                ) -> FullCheck:
    """Read a shard file in full and check it against its index row: size, sha256 (unless
    None: a shard not yet listed), header and, where `recorded` per-row checksums are given,
    each row (a mismatch names the row)."""
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return FullCheck(["file missing"])
    if actual != size:
        return FullCheck([f"size {actual} bytes, expected {size}"])
    data = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        check = FullCheck([], hashlib.sha256(data).hexdigest())
        if sha256 is not None and check.sha256 != sha256:
            check.problems.append("sha256 checksum mismatch")
        try:
            check.stamp, start, header = shard_stamp(path)
            check.sums = row_sums(data, start, header, path)
            check.keys = shard_keys(header, start, lambda at, n, d=data: d[at:at + n].tobytes())
        except (ValueError, TypeError, AttributeError) as exc:
            check.problems.append(str(exc).split(": ", 1)[-1])
            return check
    finally:
        del data
    if recorded is not None and len(recorded) == len(check.sums):
        n = ROW_SUM_BYTES
        check.problems += [f"row {r} does not match its checksum"
                           for r in range(len(recorded) // n)
                           if check.sums[r * n:(r + 1) * n] != recorded[r * n:(r + 1) * n]]
    return check


def check_rows(path: Path, layout: tuple[int, int, int, int], rows: Sequence[int],
               recorded: Sequence[bytes]) -> int | None:
    """The first of `rows` whose bytes do not match its `recorded` checksum, or None; reads only
    those rows of the shard file, whose `row_layout` is `layout`."""
    _, width, mean_at, logvar_at = layout
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # only these rows, no readahead
        for row, expected in zip(rows, recorded):
            mean = os.pread(fd, width, mean_at + row * width)
            logvar = os.pread(fd, width, logvar_at + row * width)
            if _row_sum(mean, logvar) != expected:
                return row
    finally:
        os.close(fd)
    return None


def sample_rows(seed: int, shards: Sequence[tuple[str, int]], count: int
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


def map_shard(path: Path) -> dict[str, np.ndarray]:
    """Memory-map a shard: {"mean": (rows, C, h, w), "logvar": ...} fp16 views, one mmap,
    advised MADV_RANDOM: a batch reads single rows, so a page fault reads only its pages."""
    start, header = read_header(path)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    mapping.madvise(mmap.MADV_RANDOM)
    data = np.frombuffer(mapping, dtype=np.uint8)  # keeps the mapping open while in use
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

