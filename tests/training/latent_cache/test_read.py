"""Reading the latent cache: fresh reproducible samples, normalisation, compact memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.images import crop_to_bucket, load_image, to_unit_range
from training.latent_cache.build import ensure_cache
from training.latent_cache.read import (LatentReader, flip_from_seed, step_generator)
from training.latent_cache.store import (keys_from_hex, record_hex_keys)
from tests.training.latent_cache.common import (write_images, tiny_vae, bucketed, build_cache)


def test_read_samples_fresh_and_reproducible(tmp_path: Path) -> None:
    root = write_images(tmp_path / "img", 6)
    vae = tiny_vae(scaling_factor=0.5, shift_factor=0.2)
    summary = build_cache(root, vae, tmp_path / "c", flip=True)
    reader = LatentReader(tmp_path / "c", summary.keys, vae.config.latent_affine())
    idx, flips = [0, 2, 4], [False, True, False]
    a = reader.batch(idx, step_generator(7, 10), flips)
    assert a.shape == (3, 4, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, reader.batch(idx, step_generator(7, 10), flips))
    assert not torch.allclose(a, reader.batch(idx, step_generator(7, 11), flips))
    # split across 3 ranks, each rank's share draws what the whole batch draws for it
    shares = [reader.batch([i], step_generator(7, 10), [f], part=(rank, 3))
              for rank, (i, f) in enumerate(zip(idx, flips))]
    assert torch.equal(torch.cat(shares), a)
    mean, logvar = reader.moments(idx, flips)
    n = 1000
    draws = torch.stack([reader.batch(idx, step_generator(7, s), flips)
                         for s in range(n)])  # (n, B, C, h, w)
    std = (logvar / 2).exp() * 0.5  # of the normalised latent
    assert ((draws.mean(0) - (mean - 0.2) * 0.5).abs() <= 6 * std / n ** 0.5 + 1e-5).all()
    torch.testing.assert_close(draws.std(0).mean(), std.mean(), atol=0, rtol=0.05)
    assert [flip_from_seed(s) for s in range(8)] != [False] * 8
    reader.close()


def test_read_reader_matches_vae_encoding(tmp_path: Path) -> None:
    root, vae = write_images(tmp_path / "img", 4), tiny_vae()
    scan, buckets, placements = bucketed(root)
    summary = ensure_cache(scan.records, placements, buckets, vae, tmp_path / "c",
                           flip=True, batch_size=3, num_workers=1, progress=False)
    reader = LatentReader(tmp_path / "c", summary.keys)
    for i, (rec, p) in enumerate(zip(scan.records, placements)):
        for flip in (False, True):
            img = load_image(rec.path, min_size=p.resized)
            pixels = torch.from_numpy(crop_to_bucket(img, p.resized, p.crop, flip))
            with torch.inference_mode():
                post = vae.encode(to_unit_range(pixels.permute(2, 0, 1)[None]))
            mean, logvar = reader.moments([i], [flip])
            torch.testing.assert_close(mean, post.mean, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(logvar, post.logvar, atol=2e-3, rtol=2e-3)
    reader.close()
    with pytest.raises(KeyError, match="missing"):
        LatentReader(tmp_path / "c", keys_from_hex([("0" * 64,)]))


@pytest.mark.parametrize("stats", [
    {"scaling_factor": 0.5, "shift_factor": 0.2},
    {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.0],
     "latents_std": [0.5, 2.0, 1.0, 4.0]},  # per channel, as diffusers' latents_mean/std
], ids=["scalar", "per-channel"])
def test_read_reader_normalises_as_the_vae(tmp_path: Path, stats: dict) -> None:
    root = write_images(tmp_path / "img", 4)
    vae = tiny_vae(**stats)
    summary = build_cache(root, vae, tmp_path / "c")
    with LatentReader(tmp_path / "c", summary.keys, vae.config.latent_affine()) as reader:
        idx = [0, 1]
        mean, logvar = reader.moments(idx)  # (B, C, h, w) each
        noise = torch.randn(mean.shape, generator=step_generator(3, 5))
        expected = vae.normalize(mean + (logvar / 2).exp() * noise)
        torch.testing.assert_close(reader.batch(idx, step_generator(3, 5)), expected)


def test_read_reader_and_summary_hold_compact_arrays(tmp_path: Path) -> None:
    # Per entry: one int32 location in the summary and in the reader, which the summary's keys
    # (32 bytes an entry, computed on demand) locate alike; no Python object (string, tuple,
    # dict entry) per entry is kept.
    root, vae = write_images(tmp_path / "img", 6), tiny_vae()
    summary = build_cache(root, vae, tmp_path / "c", flip=True)
    entries = summary.total
    where = summary.locations.where
    assert where.dtype == np.int32 and where.shape == (7, 2)
    assert summary.keys.nbytes == 32 * entries and summary.keys.dtype == np.uint8
    assert record_hex_keys(summary.keys, 0) == tuple(
        bytes(k).hex() for k in summary.keys[0])
    for entries_given in (summary.locations, summary.keys):
        with LatentReader(tmp_path / "c", entries_given) as reader:
            assert np.array_equal(reader._where, where) and reader._names == \
                summary.locations.names
    with LatentReader(tmp_path / "c", summary.locations) as reader:
        arrays = {k: v for k, v in vars(reader).items() if isinstance(v, np.ndarray)}
        per_entry = sum(v.nbytes for v in arrays.values() if v.size >= entries) / entries
        assert per_entry == 4, {k: (v.dtype, v.shape) for k, v in arrays.items()}
        shards = len(reader._names)
        assert shards < entries
        for name, value in vars(reader).items():
            if isinstance(value, (list, tuple, dict, set)):
                assert len(value) <= shards, name
        reader.moments([0, 1], [False, True])  # opens shards: still one mapping per shard
        assert len(reader._open) <= shards
    for name, value in vars(summary).items():
        if isinstance(value, (list, tuple, dict, set)):
            assert len(value) < entries, name
