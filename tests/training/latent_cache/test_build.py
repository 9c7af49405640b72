"""Building the latent cache: reuse, edits, repair, stamps and row samples, crash safety, ranks."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache
from models.vae_weights import save_vae
from training.latent_cache.build import (SAMPLE_ROWS, encode_moments)
from training.latent_cache.maintenance import verify_cache
from training.latent_cache.read import LatentReader
from training.latent_cache.shards import ROW_SUM_BYTES
from training.latent_cache.store import (INDEX_NAME, LOCK_NAME, Store, iter_hex_keys)
from tests.training.latent_cache.common import (make_image, write_images, tiny_vae, bucketed,
                                                build_cache, index_keys, cache_entries,
                                                changed_records, assert_same_entries,
                                                committed_rows, corrupt_row, shard_rows,
                                                next_sample, unsampled_row, SEPARATE_FOLDERS,
                                                REPO_ROOT, RESOLUTION)


def test_build_rerun_reuses_everything(tmp_path: Path) -> None:
    root, vae = write_images(tmp_path / "img", 6), tiny_vae()
    first = build_cache(root, vae, tmp_path / "c", flip=True)
    assert (first.total, first.encoded, first.reused, first.skipped) == (14, 14, 0, 0)
    assert first.keys.shape == (7, 2, 32) and first.keys.dtype == np.uint8
    again = build_cache(root, vae, tmp_path / "c", flip=True)
    assert (again.total, again.encoded, again.reused, again.repaired) == (14, 0, 14, 0)
    assert (again.bytes, again.shards) == (first.bytes, first.shards)
    assert np.array_equal(again.keys, first.keys)
    assert again.bytes == sum(p.stat().st_size for p in (tmp_path / "c" / "shards").iterdir())
    assert verify_cache(tmp_path / "c") == []


def test_build_edited_image_reencodes_only_it(tmp_path: Path) -> None:
    root, vae = write_images(tmp_path / "img", 6), tiny_vae()
    first = build_cache(root, vae, tmp_path / "c")
    path = root / "img03.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[:4, :4] = 255 - pixels[:4, :4]  # same size, same format, new content
    Image.fromarray(pixels).save(path)
    second = build_cache(root, vae, tmp_path / "c")
    assert (second.encoded, second.reused) == (1, 6)
    assert changed_records(first.keys, second.keys) == [3]


def test_build_edit_that_keeps_size_and_mtime_reencodes(tmp_path: Path) -> None:
    # cp -p, rsync -a and tar restore the modification time; the scan must still see the edit
    root, vae = write_images(tmp_path / "img", 3), tiny_vae()
    path = root / "edit.bmp"  # uncompressed: an edit keeps the size
    make_image(40, 40, np.random.default_rng(1)).save(path)
    first = build_cache(root, vae, tmp_path / "c")
    before = path.stat()
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = build_cache(root, vae, tmp_path / "c")
    assert (second.encoded, second.reused, second.skipped) == (1, 4, 0)
    records = bucketed(root)[0].records
    changed = changed_records(first.keys, second.keys)
    assert [records[i].path for i in changed] == [str(path.resolve())]


def test_build_lost_index_is_rebuilt_from_the_shards(tmp_path: Path) -> None:
    root, vae = write_images(tmp_path / "img", 6), tiny_vae()
    c = tmp_path / "c"
    first = build_cache(root, vae, c, flip=True, shard_size=3)
    entries = cache_entries(c)
    (c / INDEX_NAME).unlink()
    logs: list[str] = []
    again = build_cache(root, vae, c, flip=True, shard_size=3, logs=logs)
    assert (again.reused, again.encoded) == (first.total, 0)
    assert any(f"re-indexed {first.shards} whole shard(s)" in m for m in logs)
    assert verify_cache(c) == []
    assert_same_entries(cache_entries(c), entries)
    # A shard that is not whole is deleted, not listed.
    (c / INDEX_NAME).unlink()
    victim = sorted((c / "shards").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    repaired = build_cache(root, vae, c, flip=True, shard_size=3)
    assert not victim.exists() and repaired.encoded > 0
    assert repaired.reused + repaired.encoded == first.total
    assert verify_cache(c) == []


def test_build_unreadable_index_named_and_lock_released(tmp_path: Path) -> None:
    root, vae = write_images(tmp_path / "img", 2), tiny_vae()
    c = tmp_path / "c"
    built = build_cache(root, vae, c)
    (c / INDEX_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=f"{c / INDEX_NAME}: the latent cache index is "
                                         "unreadable"):
        LatentReader(c, built.keys)
    assert Store(c).lock(exclusive=True, blocking=False)  # the reader let go of it


def test_build_other_vae_or_grid_reencodes(tmp_path: Path) -> None:
    root = write_images(tmp_path / "img", 5)
    vae_a, vae_b = tiny_vae(0), tiny_vae(1)
    first = build_cache(root, vae_a, tmp_path / "c")
    other = build_cache(root, vae_b, tmp_path / "c")
    assert (other.encoded, other.reused) == (6, 0)
    assert other.fingerprint != first.fingerprint
    assert build_cache(root, vae_a, tmp_path / "c").reused == 6  # both VAEs' entries coexist
    bigger = build_cache(root, vae_a, tmp_path / "c", resolution=48)
    assert bigger.total > 0 and (bigger.encoded, bigger.reused) == (bigger.total, 0)
    assert not set(iter_hex_keys(bigger.keys)) & set(iter_hex_keys(first.keys))


def test_build_damaged_shard_detected_and_repaired(tmp_path: Path) -> None:
    root, vae = write_images(tmp_path / "img", 8), tiny_vae()
    c = tmp_path / "c"
    first = build_cache(root, vae, c, shard_size=2)
    before = cache_entries(c)
    shards = sorted((c / "shards").iterdir())
    assert len(shards) >= 4
    truncated, flipped, missing = shards[:3]
    truncated.write_bytes(truncated.read_bytes()[:-10])
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes
    flipped.write_bytes(bytes(data))
    missing.unlink()
    logs: list[str] = []
    second = build_cache(root, vae, c, shard_size=2, logs=logs)
    assert sorted(second.damaged_shards) == sorted(p.name for p in (truncated, flipped, missing))
    assert second.repaired == second.encoded == 6 and second.reused == first.total - 6
    for p, why in ((truncated, "size"), (flipped, "checksum"), (missing, "missing")):
        assert any(p.name in m and why in m for m in logs), (p.name, logs)
    assert verify_cache(c) == []
    assert_same_entries(cache_entries(c), before)
    assert build_cache(root, vae, c, shard_size=2).reused == first.total


def test_build_killed_build_completes_on_rerun(tmp_path: Path) -> None:
    root = write_images(tmp_path / "img", 11)
    save_vae(tiny_vae(), tmp_path / "vae")
    c = tmp_path / "c"
    args = [sys.executable, "cache.py", "--dataset", str(root), "--vae", str(tmp_path / "vae"),
            "--resolution", str(RESOLUTION), "--cache-dir", str(c), "--flip",
            "--shard-size", "2", "--batch-size", "2", "--num-workers", "0",
            "--global-batch", "0", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log", "wb") as log:
        child = subprocess.Popen(args, cwd=REPO_ROOT, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 120
        while not (c / INDEX_NAME).exists():  # free run through imports and the scan
            assert child.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "log").read_text()
            time.sleep(0.01)
        # Then single-step it: run 2 ms, stop, look. Once the first shard of 2 entries is
        # committed, it is killed while stopped, so it cannot have finished.
        while True:
            os.kill(child.pid, signal.SIGSTOP)
            os.waitpid(child.pid, os.WUNTRACED)
            if committed_rows(c) >= 2:
                break
            assert child.poll() is None and time.monotonic() < deadline
            os.kill(child.pid, signal.SIGCONT)
            time.sleep(0.002)
        child.kill()
        assert child.wait() == -signal.SIGKILL
    partial = committed_rows(c)
    assert 2 <= partial < 24  # it died mid-way, after at least one shard
    rerun = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                           env=env)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    # A shard renamed into place just before the kill, but not yet committed, is re-indexed.
    assert summary["total"] == 24 and summary["reused"] >= partial
    assert summary["encoded"] == 24 - summary["reused"] and summary["skipped"] == 0
    assert verify_cache(c) == []
    indexed = {name for (name,) in sqlite3.connect(c / INDEX_NAME).execute(
        "SELECT name FROM shards")}
    assert {p.name for p in (c / "shards").iterdir()} == indexed  # no leftovers
    clean = build_cache(root, tiny_vae(), tmp_path / "clean", flip=True)
    assert clean.total == 24
    assert_same_entries(cache_entries(c), cache_entries(tmp_path / "clean"))


def test_build_two_ranks_match_one_process(tmp_path: Path, capsys) -> None:
    root = write_images(tmp_path / "img", 9)
    save_vae(tiny_vae(), tmp_path / "vae")
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
    assert_same_entries(cache_entries(tmp_path / "two"), cache_entries(tmp_path / "one"))


def test_build_ranks_without_a_shared_folder_refused(tmp_path: Path) -> None:
    # Two machines, each with its own cache folder: each would hold half of the cache. Both
    # ranks stop before encoding anything, with the same one-line reason.
    root = write_images(tmp_path / "img", 3)
    save_vae(tiny_vae(), tmp_path / "vae")
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


def test_build_nonfinite_latent_skipped_and_named(tmp_path: Path) -> None:
    root = tmp_path / "img"
    root.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        pixels = np.asarray(make_image(40, 40 + i, rng)).copy()
        pixels[..., 0] = 0  # no red at all
        Image.fromarray(pixels).save(root / f"clean{i}.png")
    Image.new("RGB", (44, 40), (255, 0, 0)).save(root / "red.png")
    vae = tiny_vae()
    with torch.no_grad():  # channel 0 of the first conv overflows to inf on saturated red
        vae.encoder.conv_in.weight[0].zero_()
        vae.encoder.conv_in.weight[0, 0, 1, 1] = 2e38
        vae.encoder.conv_in.bias[0] = 2e38
    logs: list[str] = []
    summary = build_cache(root, vae, tmp_path / "c", flip=True, logs=logs)
    red = str((root / "red.png").resolve())
    assert (summary.total, summary.encoded, summary.skipped) == (10, 8, 2)
    assert [p for p, _ in summary.skipped_files] == [red, red]
    assert any(red in m and "non-finite" in m for m in logs)
    records = bucketed(root)[0].records
    assert [records[i].path for i in summary.unusable] == [red]
    out = summary.to_json()  # files: 5 found, the red one skipped at encode time
    assert out["files"] == {"found": 5, "cached": 4, "skipped": 1}
    assert [(s["path"], s["stage"]) for s in out["skipped_files"]] == [(red, "encode")] * 2
    assert len(index_keys(tmp_path / "c")) == 8
    again = build_cache(root, vae, tmp_path / "c", flip=True)
    assert (again.reused, again.encoded, again.skipped) == (8, 0, 2)


def test_build_out_of_memory_halves_batch(tmp_path: Path) -> None:
    vae = tiny_vae()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    sizes: list[int] = []

    def encode(batch: torch.Tensor):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return vae.encode(batch)

    logs: list[str] = []
    with torch.inference_mode():
        mean, logvar, chunk = encode_moments(encode, x, 8, logs.append)
        expected = vae.encode(x)
    assert chunk == 2 and sizes == [6, 4, 2, 2, 2] and len(logs) == 2
    torch.testing.assert_close(mean, expected.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar, expected.logvar, atol=1e-5, rtol=1e-5)

    def broken(batch: torch.Tensor):
        raise RuntimeError("bad shape")

    with pytest.raises(RuntimeError, match="bad shape"):  # other errors are not retried
        encode_moments(broken, x, 4)


def test_build_rebuild_trusts_stamps_and_samples_rows(tmp_path: Path) -> None:
    # Start-up reads headers and a seeded sample of rows, never whole shards: a byte changed in
    # place behind an unchanged stamp goes unnoticed unless its row is sampled, until the stamp
    # changes or --verify reads everything.
    root = write_images(tmp_path / "img", 6)
    vae, c = tiny_vae(), tmp_path / "c"
    first = build_cache(root, vae, c, flip=True, shard_size=2)
    assert first.total == 14 and first.total > SAMPLE_ROWS
    before = cache_entries(c)
    sample = next_sample(c)
    sampled = min(sample)
    hidden = unsampled_row(c, sample, avoid=[sampled[0]])
    corrupt_row(c / "shards" / sampled[0], sampled[1])
    corrupt_row(c / "shards" / hidden[0], hidden[1])
    logs: list[str] = []
    again = build_cache(root, vae, c, flip=True, shard_size=2, logs=logs)
    assert again.damaged_shards == [sampled[0]]  # found by the sample, named with its row
    assert any(sampled[0] in m and f"row {sampled[1]} does not match" in m for m in logs), logs
    assert (again.shards_checked_fully, again.rows_sampled) == (0, SAMPLE_ROWS)
    assert again.encoded == again.repaired == first.total - again.reused > 0
    # A changed stamp (here the mtime alone) makes the next build read the shard in full.
    later = next_sample(c, skip=[hidden[0]])
    unseen = unsampled_row(c, later, avoid=[hidden[0]])
    corrupt_row(c / "shards" / unseen[0], unseen[1])
    os.utime(c / "shards" / hidden[0])
    logs.clear()
    third = build_cache(root, vae, c, flip=True, shard_size=2, logs=logs)
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
    fourth = build_cache(root, vae, c, flip=True, shard_size=2)
    assert fourth.encoded > 0 and fourth.damaged_shards == []
    assert fourth.reused + fourth.encoded == first.total
    assert cache.main(["--verify", "--cache-dir", str(c)]) == 0
    assert_same_entries(cache_entries(c), before)


def test_build_index_from_before_stamps_is_checked_once_and_kept(tmp_path: Path) -> None:
    # An index written before stamps existed has no `checks` or `dropped` table: its shards are
    # read in full once (which finds damage hidden behind an unchanged stamp), nothing whole is
    # re-encoded, and from then on stamps are trusted.
    root, vae, c = write_images(tmp_path / "img", 6), tiny_vae(), tmp_path / "c"
    first = build_cache(root, vae, c, shard_size=3)
    with contextlib.closing(sqlite3.connect(c / INDEX_NAME)) as conn, conn:
        conn.execute("DROP TABLE checks")
        conn.execute("DROP TABLE dropped")
    with contextlib.closing(sqlite3.connect(c / INDEX_NAME)) as conn:
        shards = dict(conn.execute("SELECT name, rows FROM shards"))
    victim = sorted(shards)[0]
    corrupt_row(c / "shards" / victim, 0)
    migrated = build_cache(root, vae, c, shard_size=3)
    assert migrated.shards_checked_fully == len(shards)
    assert migrated.damaged_shards == [victim]
    assert (migrated.encoded, migrated.reused) == (shards[victim], first.total - shards[victim])
    with contextlib.closing(sqlite3.connect(c / INDEX_NAME)) as conn:
        recorded = dict(conn.execute("SELECT shard, length(row_sums) FROM checks"))
        listed = dict(conn.execute("SELECT name, rows FROM shards"))
    assert recorded == {n: r * ROW_SUM_BYTES for n, r in listed.items()}
    settled = build_cache(root, vae, c, shard_size=3)
    assert (settled.shards_checked_fully, settled.encoded) == (0, 0)


def test_build_sharing_the_lock_keeps_damaged_files(tmp_path: Path) -> None:
    # Another process holds the shared lock (it may map the shard): the build does not delete
    # the damaged file, yet never reuses it; it re-encodes its entries into a new shard.
    root, vae, c = write_images(tmp_path / "img", 6), tiny_vae(), tmp_path / "c"
    first = build_cache(root, vae, c, shard_size=2)
    before = cache_entries(c)
    rows = shard_rows(c)
    victim = c / "shards" / sorted(rows)[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    fd = os.open(c / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        logs: list[str] = []
        shared = build_cache(root, vae, c, shard_size=2, logs=logs)
        assert shared.damaged_shards == [victim.name] and victim.exists()
        assert (shared.encoded, shared.repaired) == (rows[victim.name], rows[victim.name])
        assert victim.name not in shard_rows(c)  # dropped from the index: never reused
        assert_same_entries(cache_entries(c), before)
        assert build_cache(root, vae, c, shard_size=2).reused == first.total
        assert victim.exists()
    finally:
        os.close(fd)
    logs.clear()
    alone = build_cache(root, vae, c, shard_size=2, logs=logs)
    assert (alone.reused, alone.encoded) == (first.total, 0)
    assert not victim.exists() and any("deleted 1 shard file(s) dropped" in m for m in logs)
    assert verify_cache(c) == []
