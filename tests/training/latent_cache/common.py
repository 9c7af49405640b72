"""Shared helpers of the latent cache tests: tiny images, a tiny VAE, builds and index reads."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.plan import bucket_dataset
from models.vae import (AutoencoderKL, VAEConfig)
from models.vae_weights import save_vae
from training.config import DataConfig
from training.latent_cache.build import (SAMPLE_ROWS, ensure_cache)
from training.latent_cache.read import LatentReader
from training.latent_cache.shards import (read_header, sample_rows)
from training.latent_cache.store import (INDEX_NAME, keys_from_hex)


REPO_ROOT = Path(__file__).resolve().parents[3]


RESOLUTION = 32


def make_image(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """A smooth random picture (a coarse random grid, bicubically upsampled)."""
    coarse = rng.integers(0, 256, size=(h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BICUBIC)


def write_images(root: Path, count: int, seed: int = 0) -> Path:
    """`count` PNG/JPEG files of 34..60 px a side, plus one wide image (its own bucket)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = make_image(int(rng.integers(34, 61)), int(rng.integers(34, 61)), rng)
        img.save(root / f"img{i:02d}.png") if i % 2 else img.save(root / f"img{i:02d}.jpg",
                                                                  quality=90)
    make_image(120, 32, rng).save(root / "wide.png")
    return root


def tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    cfg = VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                    layers_per_block=1, mid_block_add_attention=False, sample_size=32,
                    use_quant_conv=False, use_post_quant_conv=False, **overrides)
    return AutoencoderKL(cfg).eval()


def bucketed(root: Path, resolution: int = RESOLUTION):
    cfg = DataConfig(dataset=str(root), resolution=resolution, step=16, num_workers=1,
                     merge_small_buckets=False)
    return bucket_dataset(cfg)


def build_cache(root: Path, vae: AutoencoderKL, cache_dir: Path, flip: bool = False,
                resolution: int = RESOLUTION, logs: list | None = None, **kwargs):
    scan, buckets, placements = bucketed(root, resolution)
    return ensure_cache(scan.records, placements, buckets, vae, cache_dir, flip=flip,
                        batch_size=4, num_workers=0, progress=False,
                        log=(logs.append if logs is not None else lambda m: None),
                        **kwargs)


def index_keys(cache_dir: Path) -> list[str]:
    with sqlite3.connect(cache_dir / INDEX_NAME) as conn:
        return sorted(k for (k,) in conn.execute("SELECT key FROM entries"))


def cache_entries(cache_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every entry of a cache: key -> (mean, logvar)."""
    keys = index_keys(cache_dir)
    reader = LatentReader(cache_dir, keys_from_hex([(k,) for k in keys]))
    try:
        return {k: tuple(t[0] for t in reader.moments([i])) for i, k in enumerate(keys)}
    finally:
        reader.close()


def changed_records(a: np.ndarray, b: np.ndarray) -> list[int]:
    """The records whose keys differ between two summaries' keys (uint8 (N, O, 32) each)."""
    return np.flatnonzero((a != b).any(axis=(1, 2))).tolist()


def assert_same_entries(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:  # batch composition may move fp32 results by an fp16 ulp
        torch.testing.assert_close(a[key][0], b[key][0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(a[key][1], b[key][1], atol=2e-3, rtol=2e-3)


def committed_rows(cache_dir: Path) -> int:
    """Entries in the index, or 0 while a (stopped) writer holds its lock."""
    try:
        with contextlib.closing(sqlite3.connect(cache_dir / INDEX_NAME, timeout=0)) as c:
            return c.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.OperationalError:  # locked, or the schema is not there yet
        return 0


SEPARATE_FOLDERS = """
import os, sys
import cache
import training.latent_cache.build as build
build.SHARED_PROBE_WAIT_S = 1.0  # the probe file never shows up here: wait 1 s, not 60
sys.exit(cache.main([*sys.argv[2:], "--cache-dir", f"{sys.argv[1]}/r{os.environ['RANK']}"]))
"""


def cli_args(tmp_path: Path) -> list[str]:
    """A valid invocation on two images and one too small to keep (whose skip line only a scan
    prints), caching into tmp_path/c."""
    root = write_images(tmp_path / "img", 2)
    make_image(8, 8, np.random.default_rng(1)).save(root / "tiny.png")
    if not (tmp_path / "vae").exists():
        save_vae(tiny_vae(), tmp_path / "vae")
    return ["--dataset", str(root), "--vae", str(tmp_path / "vae"), "--resolution",
            str(RESOLUTION), "--cache-dir", str(tmp_path / "c"), "--num-workers", "0",
            "--device", "cpu", "--json", "--no-flip"]


def snapshot(cache_dir: Path) -> tuple[list, list, list]:
    """Every path under a cache folder (name, size, mtime_ns, sha256), then its index rows."""
    files = []
    for path in sorted(cache_dir.rglob("*")):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        files.append((str(path.relative_to(cache_dir)), st.st_size, st.st_mtime_ns, digest))
    uri = f"{(cache_dir / INDEX_NAME).as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return (files, sorted(conn.execute("SELECT * FROM entries")),
                sorted(conn.execute("SELECT * FROM shards")))


def corrupt_row(shard: Path, row: int) -> None:
    """Flip a byte of `row`'s mean in place, keeping the shard's size, mtime and inode."""
    before = shard.stat()
    start, header = read_header(shard)
    lo, hi = header["mean"]["data_offsets"]
    at = start + lo + row * (hi - lo) // header["mean"]["shape"][0]
    with open(shard, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)


def shard_rows(cache_dir: Path) -> dict[str, int]:
    """Every listed shard that is not dropped: name -> rows."""
    with contextlib.closing(sqlite3.connect(cache_dir / INDEX_NAME)) as conn:
        return dict(conn.execute("SELECT name, rows FROM shards WHERE name NOT IN "
                                 "(SELECT shard FROM dropped)"))


def next_sample(cache_dir: Path, skip: Iterable[str] = ()) -> set[tuple[str, int]]:
    """The (shard, row)s the next build samples when it trusts every shard but `skip`: the
    module's rule, seeded with the index's start counter plus one."""
    with contextlib.closing(sqlite3.connect(cache_dir / INDEX_NAME)) as conn:
        (starts,) = conn.execute("SELECT value FROM meta WHERE name = 'starts'").fetchone()
    skip = set(skip)
    trusted = sorted((n, r) for n, r in shard_rows(cache_dir).items() if n not in skip)
    return set(sample_rows(int(starts) + 1, trusted, SAMPLE_ROWS))


def unsampled_row(cache_dir: Path, sample: set, avoid: Iterable[str]) -> tuple[str, int]:
    """A (shard, row) outside `sample`, in a shard not in `avoid`."""
    avoid = set(avoid)
    return next((n, r) for n, rows in sorted(shard_rows(cache_dir).items()) for r in range(rows)
                if (n, r) not in sample and n not in avoid)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the point where it is raised runs."""
