"""The latent cache: keys, reuse, repair, crash safety, ranks, reading and the command line."""

from __future__ import annotations

import contextlib
import fcntl
import fractions
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache
from bucketing import bucket_dataset
from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import save_vae
from training.config import DataConfig
from training.data import crop_to_bucket, load_image, to_unit_range

REPO_ROOT = Path(__file__).resolve().parent.parent
RESOLUTION = 32


def _image(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """A smooth random picture (a coarse random grid, bicubically upsampled)."""
    coarse = rng.integers(0, 256, size=(h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BICUBIC)


def _write_images(root: Path, count: int, seed: int = 0) -> Path:
    """`count` PNG/JPEG files of 34..60 px a side, plus one wide image (its own bucket)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = _image(int(rng.integers(34, 61)), int(rng.integers(34, 61)), rng)
        img.save(root / f"img{i:02d}.png") if i % 2 else img.save(root / f"img{i:02d}.jpg",
                                                                    quality=90)
    _image(120, 32, rng).save(root / "wide.png")
    return root


def _vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    cfg = VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                    layers_per_block=1, mid_block_add_attention=False, sample_size=32,
                    use_quant_conv=False, use_post_quant_conv=False, **overrides)
    return AutoencoderKL(cfg).eval()


def _plan(root: Path, resolution: int = RESOLUTION):
    cfg = DataConfig(dataset=str(root), resolution=resolution, step=16, num_workers=1,
                     merge_small_buckets=False)
    return bucket_dataset(cfg)


def _build(root: Path, vae: AutoencoderKL, cache_dir: Path, flip: bool = False,
           resolution: int = RESOLUTION, logs: list | None = None, **kwargs):
    scan, buckets, placements = _plan(root, resolution)
    return cache.ensure_cache(scan.records, placements, buckets, vae, cache_dir, flip=flip,
                              batch_size=4, num_workers=0, progress=False,
                              log=(logs.append if logs is not None else lambda m: None),
                              **kwargs)


def _index_keys(cache_dir: Path) -> list[str]:
    with sqlite3.connect(cache_dir / cache.INDEX_NAME) as conn:
        return sorted(k for (k,) in conn.execute("SELECT key FROM entries"))


def _entries(cache_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every entry of a cache: key -> (mean, logvar)."""
    keys = _index_keys(cache_dir)
    reader = cache.LatentReader(cache_dir, cache.keys_from_hex([(k,) for k in keys]))
    try:
        return {k: tuple(t[0] for t in reader.moments([i])) for i, k in enumerate(keys)}
    finally:
        reader.close()


def _changed(a: np.ndarray, b: np.ndarray) -> list[int]:
    """The records whose keys differ between two summaries' keys (uint8 (N, O, 32) each)."""
    return np.flatnonzero((a != b).any(axis=(1, 2))).tolist()


def _assert_same_entries(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:  # batch composition may move fp32 results by an fp16 ulp
        torch.testing.assert_close(a[key][0], b[key][0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(a[key][1], b[key][1], atol=2e-3, rtol=2e-3)


def test_cache_rerun_reuses_everything(tmp_path: Path) -> None:
    root, vae = _write_images(tmp_path / "img", 6), _vae()
    first = _build(root, vae, tmp_path / "c", flip=True)
    assert (first.total, first.encoded, first.reused, first.skipped) == (14, 14, 0, 0)
    assert first.keys.shape == (7, 2, 32) and first.keys.dtype == np.uint8
    again = _build(root, vae, tmp_path / "c", flip=True)
    assert (again.total, again.encoded, again.reused, again.repaired) == (14, 0, 14, 0)
    assert (again.bytes, again.shards) == (first.bytes, first.shards)
    assert np.array_equal(again.keys, first.keys)
    assert again.bytes == sum(p.stat().st_size for p in (tmp_path / "c" / "shards").iterdir())
    assert cache.verify_cache(tmp_path / "c") == []


def test_cache_edited_image_reencodes_only_it(tmp_path: Path) -> None:
    root, vae = _write_images(tmp_path / "img", 6), _vae()
    first = _build(root, vae, tmp_path / "c")
    path = root / "img03.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[:4, :4] = 255 - pixels[:4, :4]  # same size, same format, new content
    Image.fromarray(pixels).save(path)
    second = _build(root, vae, tmp_path / "c")
    assert (second.encoded, second.reused) == (1, 6)
    assert _changed(first.keys, second.keys) == [3]


def test_cache_edit_that_keeps_size_and_mtime_reencodes(tmp_path: Path) -> None:
    # cp -p, rsync -a and tar restore the modification time; the scan must still see the edit
    root, vae = _write_images(tmp_path / "img", 3), _vae()
    path = root / "edit.bmp"  # uncompressed: an edit keeps the size
    _image(40, 40, np.random.default_rng(1)).save(path)
    first = _build(root, vae, tmp_path / "c")
    before = path.stat()
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = _build(root, vae, tmp_path / "c")
    assert (second.encoded, second.reused, second.skipped) == (1, 4, 0)
    records = _plan(root)[0].records
    changed = _changed(first.keys, second.keys)
    assert [records[i].path for i in changed] == [str(path.resolve())]


def test_cache_lost_index_is_rebuilt_from_the_shards(tmp_path: Path) -> None:
    root, vae = _write_images(tmp_path / "img", 6), _vae()
    c = tmp_path / "c"
    first = _build(root, vae, c, flip=True, shard_size=3)
    entries = _entries(c)
    (c / cache.INDEX_NAME).unlink()
    logs: list[str] = []
    again = _build(root, vae, c, flip=True, shard_size=3, logs=logs)
    assert (again.reused, again.encoded) == (first.total, 0)
    assert any(f"re-indexed {first.shards} whole shard(s)" in m for m in logs)
    assert cache.verify_cache(c) == []
    _assert_same_entries(_entries(c), entries)
    # A shard that is not whole is deleted, not listed.
    (c / cache.INDEX_NAME).unlink()
    victim = sorted((c / "shards").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    repaired = _build(root, vae, c, flip=True, shard_size=3)
    assert not victim.exists() and repaired.encoded > 0
    assert repaired.reused + repaired.encoded == first.total
    assert cache.verify_cache(c) == []


def test_cache_unreadable_index_named_and_lock_released(tmp_path: Path) -> None:
    root, vae = _write_images(tmp_path / "img", 2), _vae()
    c = tmp_path / "c"
    built = _build(root, vae, c)
    (c / cache.INDEX_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=f"{c / cache.INDEX_NAME}: the latent cache index is "
                                         "unreadable"):
        cache.LatentReader(c, built.keys)
    assert cache._Store(c).lock(exclusive=True, blocking=False)  # the reader let go of it


def test_cache_other_vae_or_grid_reencodes(tmp_path: Path) -> None:
    root = _write_images(tmp_path / "img", 5)
    vae_a, vae_b = _vae(0), _vae(1)
    first = _build(root, vae_a, tmp_path / "c")
    other = _build(root, vae_b, tmp_path / "c")
    assert (other.encoded, other.reused) == (6, 0)
    assert other.fingerprint != first.fingerprint
    assert _build(root, vae_a, tmp_path / "c").reused == 6  # both VAEs' entries coexist
    bigger = _build(root, vae_a, tmp_path / "c", resolution=48)
    assert bigger.total > 0 and (bigger.encoded, bigger.reused) == (bigger.total, 0)
    assert not set(cache.iter_hex_keys(bigger.keys)) & set(cache.iter_hex_keys(first.keys))


def test_cache_damaged_shard_detected_and_repaired(tmp_path: Path) -> None:
    root, vae = _write_images(tmp_path / "img", 8), _vae()
    c = tmp_path / "c"
    first = _build(root, vae, c, shard_size=2)
    before = _entries(c)
    shards = sorted((c / "shards").iterdir())
    assert len(shards) >= 4
    truncated, flipped, missing = shards[:3]
    truncated.write_bytes(truncated.read_bytes()[:-10])
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes
    flipped.write_bytes(bytes(data))
    missing.unlink()
    logs: list[str] = []
    second = _build(root, vae, c, shard_size=2, logs=logs)
    assert sorted(second.damaged_shards) == sorted(p.name for p in (truncated, flipped, missing))
    assert second.repaired == second.encoded == 6 and second.reused == first.total - 6
    for p, why in ((truncated, "size"), (flipped, "checksum"), (missing, "missing")):
        assert any(p.name in m and why in m for m in logs), (p.name, logs)
    assert cache.verify_cache(c) == []
    _assert_same_entries(_entries(c), before)
    assert _build(root, vae, c, shard_size=2).reused == first.total


def _committed(cache_dir: Path) -> int:
    """Entries in the index, or 0 while a (stopped) writer holds its lock."""
    try:
        with contextlib.closing(sqlite3.connect(cache_dir / cache.INDEX_NAME, timeout=0)) as c:
            return c.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
    except sqlite3.OperationalError:  # locked, or the schema is not there yet
        return 0


def test_cache_killed_build_completes_on_rerun(tmp_path: Path) -> None:
    root = _write_images(tmp_path / "img", 11)
    save_vae(_vae(), tmp_path / "vae")
    c = tmp_path / "c"
    args = [sys.executable, "cache.py", "--dataset", str(root), "--vae", str(tmp_path / "vae"),
            "--resolution", str(RESOLUTION), "--cache-dir", str(c), "--flip",
            "--shard-size", "2", "--batch-size", "2", "--num-workers", "0",
            "--global-batch", "0", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log", "wb") as log:
        child = subprocess.Popen(args, cwd=REPO_ROOT, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 120
        while not (c / cache.INDEX_NAME).exists():  # free run through imports and the scan
            assert child.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "log").read_text()
            time.sleep(0.01)
        # Then single-step it: run 2 ms, stop, look. Once the first shard of 2 entries is
        # committed, it is killed while stopped, so it cannot have finished.
        while True:
            os.kill(child.pid, signal.SIGSTOP)
            os.waitpid(child.pid, os.WUNTRACED)
            if _committed(c) >= 2:
                break
            assert child.poll() is None and time.monotonic() < deadline
            os.kill(child.pid, signal.SIGCONT)
            time.sleep(0.002)
        child.kill()
        assert child.wait() == -signal.SIGKILL
    partial = _committed(c)
    assert 2 <= partial < 24  # it died mid-way, after at least one shard
    rerun = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                           env=env)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    # A shard renamed into place just before the kill, but not yet committed, is re-indexed.
    assert summary["total"] == 24 and summary["reused"] >= partial
    assert summary["encoded"] == 24 - summary["reused"] and summary["skipped"] == 0
    assert cache.verify_cache(c) == []
    indexed = {name for (name,) in sqlite3.connect(c / cache.INDEX_NAME).execute(
        "SELECT name FROM shards")}
    assert {p.name for p in (c / "shards").iterdir()} == indexed  # no leftovers
    clean = _build(root, _vae(), tmp_path / "clean", flip=True)
    assert clean.total == 24
    _assert_same_entries(_entries(c), _entries(tmp_path / "clean"))


def test_cache_two_ranks_match_one_process(tmp_path: Path, capsys) -> None:
    root = _write_images(tmp_path / "img", 9)
    save_vae(_vae(), tmp_path / "vae")
    common = ["--dataset", str(root), "--vae", str(tmp_path / "vae"), "--resolution",
              str(RESOLUTION), "--flip", "--shard-size", "3", "--num-workers", "0",
              "--device", "cpu", "--json", "--global-batch", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "cache.py", *common,
                          "--cache-dir", str(tmp_path / "two")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads(out.stdout.strip().splitlines()[-1])
    assert (two["total"], two["encoded"], two["skipped"]) == (20, 20, 0)
    names = [p.name for p in (tmp_path / "two" / "shards").iterdir()]
    assert any("-r0-" in n for n in names) and any("-r1-" in n for n in names)
    assert not list((tmp_path / "two").glob(".probe-*"))  # the shared-folder check cleans up
    assert cache.main([*common, "--cache-dir", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one["total"] == 20 and one["fingerprint"] == two["fingerprint"]
    _assert_same_entries(_entries(tmp_path / "two"), _entries(tmp_path / "one"))


SEPARATE_FOLDERS = """
import os, sys
import cache
cache.SHARED_PROBE_WAIT_S = 1.0
sys.exit(cache.main([*sys.argv[2:], "--cache-dir", f"{sys.argv[1]}/r{os.environ['RANK']}"]))
"""


def test_cache_ranks_without_a_shared_folder_refused(tmp_path: Path) -> None:
    # Two machines, each with its own cache folder: each would hold half of the cache. Both
    # ranks stop before encoding anything, with the same one-line reason.
    root = _write_images(tmp_path / "img", 3)
    save_vae(_vae(), tmp_path / "vae")
    script = tmp_path / "separate.py"
    script.write_text(SEPARATE_FOLDERS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(script), str(tmp_path), "--dataset",
                          str(root), "--vae", str(tmp_path / "vae"), "--resolution",
                          str(RESOLUTION), "--num-workers", "0", "--device", "cpu"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    # one error from each rank (their lines may interleave on the shared stderr pipe)
    assert out.stderr.count("do not see the latent cache") == 2, out.stderr
    assert out.stderr.count("rank(s) 1 (") == 2 and "every machine shares" in out.stderr
    assert 'cache.py", line' not in out.stderr  # no traceback from a rank (torchrun has its own)
    for rank in (0, 1):
        assert not list((tmp_path / f"r{rank}" / "shards").iterdir())
        assert not list((tmp_path / f"r{rank}").glob(".probe-*"))


def test_cache_samples_fresh_and_reproducible(tmp_path: Path) -> None:
    root = _write_images(tmp_path / "img", 6)
    vae = _vae(scaling_factor=0.5, shift_factor=0.2)
    summary = _build(root, vae, tmp_path / "c", flip=True)
    reader = cache.LatentReader(tmp_path / "c", summary.keys, vae.config.latent_affine())
    idx, flips = [0, 2, 4], [False, True, False]
    a = reader.batch(idx, cache.step_generator(7, 10), flips)
    assert a.shape == (3, 4, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, reader.batch(idx, cache.step_generator(7, 10), flips))
    assert not torch.allclose(a, reader.batch(idx, cache.step_generator(7, 11), flips))
    # split across 3 ranks, each rank's share draws what the whole batch draws for it
    shares = [reader.batch([i], cache.step_generator(7, 10), [f], part=(rank, 3))
              for rank, (i, f) in enumerate(zip(idx, flips))]
    assert torch.equal(torch.cat(shares), a)
    mean, logvar = reader.moments(idx, flips)
    n = 1000
    draws = torch.stack([reader.batch(idx, cache.step_generator(7, s), flips)
                         for s in range(n)])  # (n, B, C, h, w)
    std = (logvar / 2).exp() * 0.5  # of the normalised latent
    assert ((draws.mean(0) - (mean - 0.2) * 0.5).abs() <= 6 * std / n ** 0.5 + 1e-5).all()
    torch.testing.assert_close(draws.std(0).mean(), std.mean(), atol=0, rtol=0.05)
    assert [cache.flip_from_seed(s) for s in range(8)] != [False] * 8
    reader.close()


def test_cache_reader_matches_vae_encoding(tmp_path: Path) -> None:
    root, vae = _write_images(tmp_path / "img", 4), _vae()
    scan, buckets, placements = _plan(root)
    summary = cache.ensure_cache(scan.records, placements, buckets, vae, tmp_path / "c",
                                 flip=True, batch_size=3, num_workers=1, progress=False)
    reader = cache.LatentReader(tmp_path / "c", summary.keys)
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
        cache.LatentReader(tmp_path / "c", cache.keys_from_hex([("0" * 64,)]))


def test_cache_nonfinite_latent_skipped_and_named(tmp_path: Path) -> None:
    root = tmp_path / "img"
    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        pixels = np.asarray(_image(40, 40 + i, rng)).copy()
        pixels[..., 0] = 0  # no red at all
        Image.fromarray(pixels).save(root / f"clean{i}.png")
    Image.new("RGB", (44, 40), (255, 0, 0)).save(root / "red.png")
    vae = _vae()
    with torch.no_grad():  # channel 0 of the first conv overflows to inf on saturated red
        vae.encoder.conv_in.weight[0].zero_()
        vae.encoder.conv_in.weight[0, 0, 1, 1] = 2e38
        vae.encoder.conv_in.bias[0] = 2e38
    logs: list[str] = []
    summary = _build(root, vae, tmp_path / "c", flip=True, logs=logs)
    red = str((root / "red.png").resolve())
    assert (summary.total, summary.encoded, summary.skipped) == (10, 8, 2)
    assert [p for p, _ in summary.skipped_files] == [red, red]
    assert any(red in m and "non-finite" in m for m in logs)
    records = _plan(root)[0].records
    assert [records[i].path for i in summary.unusable] == [red]
    out = summary.to_json()  # files: 5 found, the red one skipped at encode time
    assert out["files"] == {"found": 5, "cached": 4, "skipped": 1}
    assert [(s["path"], s["stage"]) for s in out["skipped_files"]] == [(red, "encode")] * 2
    assert len(_index_keys(tmp_path / "c")) == 8
    again = _build(root, vae, tmp_path / "c", flip=True)
    assert (again.reused, again.encoded, again.skipped) == (8, 0, 2)


def test_cache_cli_json_fields_and_errors(tmp_path: Path, capsys) -> None:
    root = _write_images(tmp_path / "img", 4)
    save_vae(_vae(), tmp_path / "vae")
    args = ["--dataset", str(root), "--vae", str(tmp_path / "vae"), "--resolution",
            str(RESOLUTION), "--cache-dir", str(tmp_path / "c"), "--num-workers", "0",
            "--device", "cpu", "--json", "--global-batch", "0", "--no-flip"]
    assert cache.main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for field in ("total", "encoded", "reused", "skipped", "repaired", "bytes"):
        assert isinstance(first[field], int), field
    assert (first["total"], first["encoded"], first["reused"]) == (5, 5, 0)
    assert first["bytes"] > 0 and first["skipped_files"] == []
    assert cache.main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (second["encoded"], second["reused"]) == (0, 5)
    for bad, name in (("--dataset", tmp_path / "nope"), ("--vae", tmp_path / "novae")):
        assert cache.main([*args, bad, str(name)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(name) in err


def _cli_args(tmp_path: Path) -> list[str]:
    """A valid invocation on two images and one too small to keep (whose skip line only a scan
    prints), caching into tmp_path/c."""
    root = _write_images(tmp_path / "img", 2)
    _image(8, 8, np.random.default_rng(1)).save(root / "tiny.png")
    if not (tmp_path / "vae").exists():
        save_vae(_vae(), tmp_path / "vae")
    return ["--dataset", str(root), "--vae", str(tmp_path / "vae"), "--resolution",
            str(RESOLUTION), "--cache-dir", str(tmp_path / "c"), "--num-workers", "0",
            "--device", "cpu", "--json", "--no-flip"]


@pytest.mark.parametrize("flags, phrase", [
    (["--global-batch", "-1"], "--global-batch -1: must be 0 or more"),
    (["--holdout", "-1"], "--holdout -1: must be 0 or more"),
    (["--num-workers", "-2"], "--num-workers -2: must be 0 or more"),
    (["--device", "foo"], "--device 'foo': expected auto, cpu or cuda"),
    (["--cache-dir", "{tmp}/file"], "--cache-dir {tmp}/file: not a folder ({tmp}/file is a"),
    (["--cache-dir", "{tmp}/file/sub"], "not a folder ({tmp}/file is a file)"),
    (["--vae", "{tmp}/missing"], "{tmp}/missing: VAE not found"),
    (["--step", "0"], "step 0 must be positive"),
], ids=["global-batch", "holdout", "num-workers", "device-name", "cache-dir-file",
        "cache-dir-under-file", "vae-missing", "step"])
def test_cache_cli_bad_flag_is_one_line_error_before_scanning(
        tmp_path: Path, error_line, monkeypatch, flags: list[str], phrase: str) -> None:
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "ldm"))  # where a scan caches its work
    args = _cli_args(tmp_path)
    (tmp_path / "file").write_text("# not weights, not a folder\n")
    (tmp_path / "vae.safetensors").write_text("# not weights either\n")
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert cache.main([*args, *flags]) == 2
    err = error_line()  # one line: no scan ran, so no skip line came first
    assert phrase.format(tmp=tmp_path) in err
    assert not (tmp_path / "c").exists() and not (tmp_path / "ldm").exists()
    assert cache.main(args) == 0  # the same invocation without the bad flag scans and builds
    assert (tmp_path / "c").is_dir() and (tmp_path / "ldm" / "scan").is_dir()


def test_cache_cli_unavailable_cuda_device_is_one_line_error(tmp_path: Path,
                                                           error_line) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert cache.main([*_cli_args(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda was asked for, but CUDA is not available" in error_line()
    assert not (tmp_path / "c").exists()


def test_cache_cli_no_usable_image_is_an_error(tmp_path: Path, capsys) -> None:
    args = _cli_args(tmp_path)
    small = tmp_path / "small"
    small.mkdir()
    _image(8, 8, np.random.default_rng(2)).save(small / "a.png")
    (small / "notes.txt").write_text("not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, listed in ((small, " (1 skipped, listed above)"), (empty, "")):
        assert cache.main([*args, "--dataset", str(folder)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1] == f"error: {folder.resolve()}: no usable image to cache{listed}"
        assert len(lines) == (2 if listed else 1)  # the skip line, then the error
    assert not (tmp_path / "c").exists()


def test_cache_cli_unloadable_vae_is_one_line_error(tmp_path: Path, capsys) -> None:
    args = _cli_args(tmp_path)
    pickled = tmp_path / "vae.ckpt"  # a torch checkpoint, but not of tensors only
    torch.save({"ratio": fractions.Fraction(1, 3)}, pickled)
    text = tmp_path / "README.ckpt"
    text.write_text("# not weights at all\n")
    broken = tmp_path / "vae.safetensors"
    broken.write_text("# not weights either\n")
    for weights, message in (
            (pickled, "not a torch checkpoint of tensors alone (UnpicklingError)"),
            (text, "not a torch checkpoint of tensors alone (UnpicklingError)"),
            (broken, "cannot read as safetensors")):
        assert cache.main([*args, "--vae", str(weights)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith(f"error: {weights}: {message}"), lines
        assert len(lines) == 2 and lines[0].startswith("skipped ")  # the scan ran first
    assert not (tmp_path / "c").exists()


def test_cache_prune_removes_unreferenced(tmp_path: Path) -> None:
    root = _write_images(tmp_path / "img", 8)
    c = tmp_path / "c"
    _build(root, _vae(1), c, shard_size=3)  # another VAE's entries: all unreferenced later
    kept = _build(root, _vae(0), c, shard_size=3)
    before = _entries(c)
    for name in ("img01.png", "img04.jpg", "img06.jpg"):
        (root / name).unlink()
    now = _build(root, _vae(0), c, shard_size=3)
    assert (now.encoded, now.reused) == (0, 6)
    keep = list(cache.iter_hex_keys(now.keys))
    result = cache.prune_cache(c, keep, log=lambda m: None)
    assert result["entries_removed"] == 2 * kept.total - 6  # all of VAE 1's, 3 of VAE 0's
    assert result["shards_removed"] >= 3 and result["bytes_freed"] > 0
    assert _index_keys(c) == sorted(keep)
    assert cache.verify_cache(c) == []
    after = _entries(c)
    _assert_same_entries(after, {k: before[k] for k in keep})
    indexed = {name for (name,) in sqlite3.connect(c / cache.INDEX_NAME).execute(
        "SELECT name FROM shards")}
    assert {p.name for p in (c / "shards").iterdir()} == indexed
    assert _build(root, _vae(0), c, shard_size=3).reused == 6


def _snapshot(cache_dir: Path) -> tuple[list, list, list]:
    """Every path under a cache folder (name, size, mtime_ns, sha256), then its index rows."""
    files = []
    for path in sorted(cache_dir.rglob("*")):
        st = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        files.append((str(path.relative_to(cache_dir)), st.st_size, st.st_mtime_ns, digest))
    uri = f"{(cache_dir / cache.INDEX_NAME).as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return (files, sorted(conn.execute("SELECT * FROM entries")),
                sorted(conn.execute("SELECT * FROM shards")))


def test_cache_prune_dry_run_reports_groups_and_changes_nothing(tmp_path: Path) -> None:
    root, vae = _write_images(tmp_path / "img", 6), _vae()
    c = tmp_path / "c"
    # Two configurations share the folder: 32 px with mirrored crops, and 48 px.
    latent_of = {}
    for resolution, flip in ((RESOLUTION, True), (48, False)):
        built = _build(root, vae, c, flip=flip, resolution=resolution, shard_size=3)
        _, buckets, placements = _plan(root, resolution)
        for i, p in enumerate(placements):
            w, h = (side // vae.downsample_factor for side in buckets[p.bucket])
            latent_of.update({k: (built.fingerprint[:12], f"{w}x{h}")
                              for k in cache.record_hex_keys(built.keys, i)})
        if flip:  # what a 32 px run without --flip uses
            keep = [cache.record_hex_keys(built.keys, i)[0] for i in range(len(built.keys))]
    expected = Counter(latent_of[k] for k in set(_index_keys(c)) - set(keep))
    assert len(expected) >= 3 and sum(expected.values()) > len(keep)
    # A shard of kept and removed entries the index lost (a prune re-indexes it first; a dry
    # run counts it but cannot preview it), and a crashed writer's temporary file.
    with contextlib.closing(sqlite3.connect(c / cache.INDEX_NAME)) as conn, conn:
        (mixed,) = next(row for row in conn.execute(
            "SELECT shard FROM entries GROUP BY shard HAVING SUM(key IN (%s)) BETWEEN 1 AND "
            "COUNT(*) - 1" % ",".join("?" * len(keep)), keep))
        lost = {k for (k,) in conn.execute("SELECT key FROM entries WHERE shard = ?", (mixed,))}
        conn.execute("DELETE FROM entries WHERE shard = ?", (mixed,))
        conn.execute("DELETE FROM shards WHERE name = ?", (mixed,))
    (c / "shards" / ".crashed.safetensors.tmp").write_bytes(b"partial")
    previewed = expected - Counter(latent_of[k] for k in lost - set(keep))
    before = _snapshot(c)
    logs: list[str] = []
    dry = cache.prune_cache(c, keep, log=logs.append, dry_run=True)
    assert _snapshot(c) == before
    assert dry["dry_run"] is True
    assert {(g["fingerprint"], g["latent"]): g["entries"] for g in dry["groups"]} == previewed
    assert [g["entries"] for g in dry["groups"]] == sorted(previewed.values(), reverse=True)
    assert dry["entries_removed"] == sum(previewed.values())
    assert (dry["shards_reindexed"], dry["leftovers_removed"]) == (1, 1)
    assert dry["shards_removed"] > 0 and dry["shards_rewritten"] > 0
    assert sum(g["bytes"] for g in dry["groups"]) == dry["bytes_freed"] > 0
    assert logs[0].startswith(f"dry run, nothing pruned: prune would remove "
                              f"{dry['entries_removed']} entries (")
    assert len(logs) == 2 + len(previewed) and "(not counted above)" in logs[-1]
    for group, line in zip(dry["groups"], logs[1:]):
        assert f"VAE {group['fingerprint']}, latents {group['latent']}: would remove " \
               f"{group['entries']} entr" in line and ", about " in line
    real = cache.prune_cache(c, keep, log=logs.append)
    assert real["dry_run"] is False
    assert {(g["fingerprint"], g["latent"]): g["entries"] for g in real["groups"]} == expected
    assert real["entries_removed"] == sum(expected.values())
    assert real["shards_rewritten"] == dry["shards_rewritten"] + 1  # the re-indexed one
    for field in ("shards_removed", "leftovers_removed", "shards_reindexed"):
        assert real[field] == dry[field], field
    assert _index_keys(c) == sorted(keep)
    assert cache.verify_cache(c) == []


def test_cache_cli_dry_run_needs_prune_and_still_builds(tmp_path: Path, capsys) -> None:
    root = _write_images(tmp_path / "img", 2)
    save_vae(_vae(), tmp_path / "vae")
    c = tmp_path / "c"
    args = ["--dataset", str(root), "--vae", str(tmp_path / "vae"), "--resolution",
            str(RESOLUTION), "--cache-dir", str(c), "--num-workers", "0", "--device", "cpu",
            "--global-batch", "0", "--step", "16", "--json", "--no-flip"]
    assert cache.main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prune" in err
    assert not c.exists()  # refused before building anything
    other = _build(root, _vae(1), c)  # another VAE's entries: a prune would delete them all
    assert cache.main([*args, "--flip", "--prune", "--dry-run"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert (out["encoded"], out["total"]) == (6, 6)  # the build step still ran
    assert out["pruned"]["dry_run"] is True
    assert out["pruned"]["entries_removed"] == other.total
    groups = out["pruned"]["groups"]
    assert {g["fingerprint"] for g in groups} == {other.fingerprint[:12]}
    assert sum(g["entries"] for g in groups) == other.total
    assert "would remove" in captured.err
    assert len(_index_keys(c)) == other.total + out["total"]


def test_cache_out_of_memory_halves_batch(tmp_path: Path) -> None:
    vae = _vae()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    sizes: list[int] = []

    def encode(batch: torch.Tensor):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return vae.encode(batch)

    logs: list[str] = []
    with torch.inference_mode():
        mean, logvar, chunk = cache.encode_moments(encode, x, 8, logs.append)
        expected = vae.encode(x)
    assert chunk == 2 and sizes == [6, 4, 2, 2, 2] and len(logs) == 2
    torch.testing.assert_close(mean, expected.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar, expected.logvar, atol=1e-5, rtol=1e-5)

    def broken(batch: torch.Tensor):
        raise RuntimeError("bad shape")

    with pytest.raises(RuntimeError, match="bad shape"):  # other errors are not retried
        cache.encode_moments(broken, x, 4)


def test_cache_cli_defaults_are_the_training_defaults() -> None:
    from training.config import REPO_ROOT, load_config

    trained = load_config(REPO_ROOT / "configs" / "default.json")
    args = cache.build_parser().parse_args([])
    assert (args.resolution, args.step, args.flip, args.global_batch, args.holdout) == (
        trained.data.resolution, trained.data.step, trained.data.flip, trained.batch_size,
        trained.data.holdout)
    assert cache.build_parser().parse_args(["--no-flip"]).flip is False


def test_cache_cli_prune_of_a_busy_cache_is_one_line_error(tmp_path: Path, capsys) -> None:
    args = _cli_args(tmp_path)
    assert cache.main(args) == 0
    capsys.readouterr()
    reader = cache._Store(tmp_path / "c")  # a training run reading the cache holds this
    reader.lock(exclusive=False)
    try:
        assert cache.main([*args, "--prune"]) == 1
    finally:
        reader.unlock()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "another process is using the latent cache" in err[-1]
    assert cache.main([*args, "--prune"]) == 0  # once it is done


def test_cache_cli_builds_what_training_reads(tmp_path: Path, monkeypatch, capsys) -> None:
    # cache.py given training's global batch and holdout places every image as training does, so
    # training encodes nothing; with another holdout, other buckets merge and some entries differ.
    from training.config import Config
    from training.distributed import DistInfo
    from training.loop import plan_data

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "ldm"))
    rng = np.random.default_rng(0)
    root = tmp_path / "img"
    root.mkdir()
    for i in range(40):
        side = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
        area = rng.uniform(1.1, 4.0) * RESOLUTION**2
        _image(int((area * side) ** 0.5), int((area / side) ** 0.5), rng).save(root / f"{i}.png")
    save_vae(_vae(), tmp_path / "vae")
    cfg = Config()
    cfg.batch_size = 5
    cfg.data = DataConfig(dataset=str(root), resolution=RESOLUTION, step=8, holdout=10,
                          num_workers=0, flip=False)
    plan = plan_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    vae = _vae()
    encoded = {}
    for holdout in ("10", "0"):
        cache_dir = tmp_path / f"c{holdout}"
        assert cache.main(["--dataset", str(root), "--vae", str(tmp_path / "vae"), "--resolution",
                           str(RESOLUTION), "--step", "8", "--cache-dir", str(cache_dir),
                           "--global-batch", "5", "--holdout", holdout, "--num-workers", "0",
                           "--device", "cpu", "--no-flip"]) == 0
        encoded[holdout] = sum(
            cache.ensure_cache(records, placements, plan.buckets, vae, cache_dir, flip=False,
                               num_workers=0, progress=False, log=lambda m: None).encoded
            for records, placements in ((plan.records, plan.placements),
                                        (plan.eval_records, plan.eval_placements)))
    assert encoded["10"] == 0 and encoded["0"] > 0, encoded


def test_cache_keys_change_with_the_key_version(monkeypatch) -> None:
    # Entries encoded by an older pixel pipeline must not be read as current ones.
    args = ("ab" * 32, (32, 32), (40, 32), (4, 0, 36, 32), False, "f" * 64)
    key = cache.entry_key(*args)
    assert key == cache.entry_key(*args) and len(key) == 64
    monkeypatch.setattr(cache, "KEY_VERSION", cache.KEY_VERSION - 1)
    assert cache.entry_key(*args) != key


@pytest.mark.parametrize("stats", [
    {"scaling_factor": 0.5, "shift_factor": 0.2},
    {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.0],
     "latents_std": [0.5, 2.0, 1.0, 4.0]},  # per channel, as diffusers' latents_mean/std
], ids=["scalar", "per-channel"])
def test_cache_reader_normalises_as_the_vae(tmp_path: Path, stats: dict) -> None:
    root = _write_images(tmp_path / "img", 4)
    vae = _vae(**stats)
    summary = _build(root, vae, tmp_path / "c")
    with cache.LatentReader(tmp_path / "c", summary.keys, vae.config.latent_affine()) as reader:
        idx = [0, 1]
        mean, logvar = reader.moments(idx)  # (B, C, h, w) each
        noise = torch.randn(mean.shape, generator=cache.step_generator(3, 5))
        expected = vae.normalize(mean + (logvar / 2).exp() * noise)
        torch.testing.assert_close(reader.batch(idx, cache.step_generator(3, 5)), expected)


def _corrupt_row(shard: Path, row: int) -> None:
    """Flip a byte of `row`'s mean in place, keeping the shard's size, mtime and inode."""
    before = shard.stat()
    start, header = cache._read_header(shard)
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


def _shard_rows(cache_dir: Path) -> dict[str, int]:
    """Every listed shard that is not dropped: name -> rows."""
    with contextlib.closing(sqlite3.connect(cache_dir / cache.INDEX_NAME)) as conn:
        return dict(conn.execute("SELECT name, rows FROM shards WHERE name NOT IN "
                                 "(SELECT shard FROM dropped)"))


def _next_sample(cache_dir: Path, skip: Iterable[str] = ()) -> set[tuple[str, int]]:
    """The (shard, row)s the next build samples when it trusts every shard but `skip`: the
    module's rule, seeded with the index's start counter plus one."""
    with contextlib.closing(sqlite3.connect(cache_dir / cache.INDEX_NAME)) as conn:
        (starts,) = conn.execute("SELECT value FROM meta WHERE name = 'starts'").fetchone()
    skip = set(skip)
    trusted = sorted((n, r) for n, r in _shard_rows(cache_dir).items() if n not in skip)
    return set(cache._sample_rows(int(starts) + 1, trusted, cache.SAMPLE_ROWS))


def _unsampled(cache_dir: Path, sample: set, avoid: Iterable[str]) -> tuple[str, int]:
    """A (shard, row) outside `sample`, in a shard not in `avoid`."""
    avoid = set(avoid)
    return next((n, r) for n, rows in sorted(_shard_rows(cache_dir).items()) for r in range(rows)
                if (n, r) not in sample and n not in avoid)


def test_cache_rebuild_trusts_stamps_and_samples_rows(tmp_path: Path) -> None:
    # Start-up reads headers and a seeded sample of rows, never whole shards: a byte changed in
    # place behind an unchanged stamp goes unnoticed unless its row is sampled, until the stamp
    # changes or --verify reads everything.
    root = _write_images(tmp_path / "img", 6)
    vae, c = _vae(), tmp_path / "c"
    first = _build(root, vae, c, flip=True, shard_size=2)
    assert first.total == 14 and first.total > cache.SAMPLE_ROWS
    before = _entries(c)
    sample = _next_sample(c)
    sampled = min(sample)
    hidden = _unsampled(c, sample, avoid=[sampled[0]])
    _corrupt_row(c / "shards" / sampled[0], sampled[1])
    _corrupt_row(c / "shards" / hidden[0], hidden[1])
    logs: list[str] = []
    again = _build(root, vae, c, flip=True, shard_size=2, logs=logs)
    assert again.damaged_shards == [sampled[0]]  # found by the sample, named with its row
    assert any(sampled[0] in m and f"row {sampled[1]} does not match" in m for m in logs), logs
    assert (again.shards_checked_fully, again.rows_sampled) == (0, cache.SAMPLE_ROWS)
    assert again.encoded == again.repaired == first.total - again.reused > 0
    # A changed stamp (here the mtime alone) makes the next build read the shard in full.
    later = _next_sample(c, skip=[hidden[0]])
    unseen = _unsampled(c, later, avoid=[hidden[0]])
    _corrupt_row(c / "shards" / unseen[0], unseen[1])
    os.utime(c / "shards" / hidden[0])
    logs.clear()
    third = _build(root, vae, c, flip=True, shard_size=2, logs=logs)
    assert third.damaged_shards == [hidden[0]] and third.shards_checked_fully == 1
    assert any(hidden[0] in m and "sha256 checksum mismatch" in m for m in logs), logs
    # --verify reads every shard: it names the file and row, exits 1, and drops the shard.
    out = subprocess.run([sys.executable, "cache.py", "--verify", "--cache-dir", str(c)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    path = c / "shards" / unseen[0]
    assert out.stdout.splitlines() == [f"{path}: sha256 checksum mismatch",
                                       f"{path}: row {unseen[1]} does not match its checksum"]
    assert not path.exists()  # nobody else used the cache: the file went too
    fourth = _build(root, vae, c, flip=True, shard_size=2)
    assert fourth.encoded > 0 and fourth.damaged_shards == []
    assert fourth.reused + fourth.encoded == first.total
    assert cache.main(["--verify", "--cache-dir", str(c)]) == 0
    _assert_same_entries(_entries(c), before)


def test_cache_index_from_before_stamps_is_checked_once_and_kept(tmp_path: Path) -> None:
    # An index written before stamps existed has no `checks` or `dropped` table: its shards are
    # read in full once (which finds damage hidden behind an unchanged stamp), nothing whole is
    # re-encoded, and from then on stamps are trusted.
    root, vae, c = _write_images(tmp_path / "img", 6), _vae(), tmp_path / "c"
    first = _build(root, vae, c, shard_size=3)
    with contextlib.closing(sqlite3.connect(c / cache.INDEX_NAME)) as conn, conn:
        conn.execute("DROP TABLE checks")
        conn.execute("DROP TABLE dropped")
    with contextlib.closing(sqlite3.connect(c / cache.INDEX_NAME)) as conn:
        shards = dict(conn.execute("SELECT name, rows FROM shards"))
    victim = sorted(shards)[0]
    _corrupt_row(c / "shards" / victim, 0)
    migrated = _build(root, vae, c, shard_size=3)
    assert migrated.shards_checked_fully == len(shards)
    assert migrated.damaged_shards == [victim]
    assert (migrated.encoded, migrated.reused) == (shards[victim], first.total - shards[victim])
    with contextlib.closing(sqlite3.connect(c / cache.INDEX_NAME)) as conn:
        recorded = dict(conn.execute("SELECT shard, length(row_sums) FROM checks"))
        listed = dict(conn.execute("SELECT name, rows FROM shards"))
    assert recorded == {n: r * cache.ROW_SUM_BYTES for n, r in listed.items()}
    settled = _build(root, vae, c, shard_size=3)
    assert (settled.shards_checked_fully, settled.encoded) == (0, 0)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the point where it is raised runs."""


def test_cache_removal_is_crash_safe(tmp_path: Path, monkeypatch) -> None:
    root = _write_images(tmp_path / "img", 8)
    c = tmp_path / "c"
    _build(root, _vae(1), c, shard_size=3)  # another VAE's entries: pruned below
    kept = _build(root, _vae(0), c, shard_size=3)
    # A build dropping damaged shards, killed after the tombstone (x) or after unlinking (y):
    # neither comes back, and their entries are re-encoded.
    rows = _shard_rows(c)
    x, y = sorted(n for n in rows if n.startswith(kept.fingerprint[:12]))[:2]
    store = cache._Store(c)
    with contextlib.closing(store.connect()) as conn:
        store.tombstone(conn, {x: "test", y: "test"})
    (c / "shards" / y).unlink()
    again = _build(root, _vae(0), c, shard_size=3)
    assert (again.encoded, again.reused) == (rows[x] + rows[y], kept.total - rows[x] - rows[y])
    assert not (c / "shards" / x).exists() and x not in _shard_rows(c)
    # A prune killed after tombstoning the shards it empties (first removal), or the first
    # shard it rewrote (second removal: the first prune was killed before any rewrite): the
    # files still hold pruned entries, yet a later tidy never lists them again.
    for name in ("img01.png", "img04.jpg", "img06.jpg"):
        (root / name).unlink()
    now = _build(root, _vae(0), c, shard_size=3)
    keep = list(cache.iter_hex_keys(now.keys))
    real = cache._Store.remove_dropped
    for kill_at in (1, 2):
        calls = []

        def remove_dropped(self, conn, names=None, kill_at=kill_at, calls=calls):
            if names is not None:  # not tidy's clean-up of earlier tombstones
                calls.append(names)
                if len(calls) == kill_at:
                    raise _Killed
            return real(self, conn, names)

        monkeypatch.setattr(cache._Store, "remove_dropped", remove_dropped)
        with pytest.raises(_Killed):
            cache.prune_cache(c, keep, log=lambda m: None)
        monkeypatch.setattr(cache._Store, "remove_dropped", real)
        assert calls[-1], kill_at  # shards were tombstoned, their files still there
        assert all((c / "shards" / n).exists() for n in calls[-1])
        assert set(_index_keys(c)) >= set(keep)
        logs: list[str] = []
        rebuilt = _build(root, _vae(0), c, shard_size=3, logs=logs)  # its tidy finishes up
        assert (rebuilt.reused, rebuilt.encoded) == (now.total, 0)
        assert any(f"deleted {len(calls[-1])} shard file(s) dropped earlier" in m
                   for m in logs), logs
        assert not set(_index_keys(c)) - set(keep)  # nothing pruned came back
        indexed = set(_shard_rows(c))
        assert {p.name for p in (c / "shards").iterdir()} == indexed
    assert _index_keys(c) == sorted(keep)
    assert cache.verify_cache(c) == []


def test_cache_build_sharing_the_lock_keeps_damaged_files(tmp_path: Path) -> None:
    # Another process holds the shared lock (it may map the shard): the build does not delete
    # the damaged file, yet never reuses it; it re-encodes its entries into a new shard.
    root, vae, c = _write_images(tmp_path / "img", 6), _vae(), tmp_path / "c"
    first = _build(root, vae, c, shard_size=2)
    before = _entries(c)
    rows = _shard_rows(c)
    victim = c / "shards" / sorted(rows)[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    fd = os.open(c / cache.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        logs: list[str] = []
        shared = _build(root, vae, c, shard_size=2, logs=logs)
        assert shared.damaged_shards == [victim.name] and victim.exists()
        assert (shared.encoded, shared.repaired) == (rows[victim.name], rows[victim.name])
        assert victim.name not in _shard_rows(c)  # dropped from the index: never reused
        _assert_same_entries(_entries(c), before)
        assert _build(root, vae, c, shard_size=2).reused == first.total
        assert victim.exists()
    finally:
        os.close(fd)
    logs.clear()
    alone = _build(root, vae, c, shard_size=2, logs=logs)
    assert (alone.reused, alone.encoded) == (first.total, 0)
    assert not victim.exists() and any("deleted 1 shard file(s) dropped" in m for m in logs)
    assert cache.verify_cache(c) == []


def test_cache_reader_and_summary_hold_compact_arrays(tmp_path: Path) -> None:
    # Per entry: a 32-byte digest in the summary, two int32 in the reader; no Python object
    # (string, tuple, dict entry) per entry is kept.
    root, vae = _write_images(tmp_path / "img", 6), _vae()
    summary = _build(root, vae, tmp_path / "c", flip=True)
    entries = summary.total
    assert summary.keys.nbytes == 32 * entries and summary.keys.dtype == np.uint8
    assert cache.record_hex_keys(summary.keys, 0) == tuple(
        bytes(k).hex() for k in summary.keys[0])
    with cache.LatentReader(tmp_path / "c", summary.keys) as reader:
        arrays = {k: v for k, v in vars(reader).items() if isinstance(v, np.ndarray)}
        per_entry = sum(v.nbytes for v in arrays.values() if v.size >= entries) / entries
        assert per_entry == 8, {k: (v.dtype, v.shape) for k, v in arrays.items()}
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


def test_cache_cli_json_counts_every_file(tmp_path: Path) -> None:
    # files found = cached + skipped, the scan's skips included; the rest counts entries.
    root = _write_images(tmp_path / "img", 2)  # 3 images
    (root / "empty.png").write_bytes(b"")
    png = (root / "img01.png").read_bytes()
    (root / "truncated.png").write_bytes(png[:len(png) // 2])
    (root / "notes.jpg").write_text("not a picture\n")
    _image(8, 8, np.random.default_rng(4)).save(root / "tiny.png")
    save_vae(_vae(), tmp_path / "vae")
    out = subprocess.run(
        [sys.executable, "cache.py", "--dataset", str(root), "--vae", str(tmp_path / "vae"),
         "--resolution", str(RESOLUTION), "--cache-dir", str(tmp_path / "c"), "--flip",
         "--num-workers", "0", "--device", "cpu", "--global-batch", "0", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    files = len(list(root.iterdir()))
    assert summary["files"] == {"found": files, "cached": 3, "skipped": 4}
    assert summary["images"] == 3 and summary["entries_per_image"] == 2
    assert summary["total"] == 6 == summary["reused"] + summary["encoded"] + summary["skipped"]
    bad = {str((root / n).resolve()) for n in ("empty.png", "truncated.png", "notes.jpg",
                                               "tiny.png")}
    assert {s["path"] for s in summary["skipped_files"]} == bad
    assert all(s["stage"] == "scan" and s["reason"] for s in summary["skipped_files"])
