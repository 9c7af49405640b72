"""The latent cache's command line: build, --json, --prune, --verify and its errors."""

from __future__ import annotations

import fractions
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cache
from models.vae_weights import save_vae
from training.config import DataConfig
from training.latent_cache.build import ensure_cache
from training.latent_cache.store import Store
from tests.training.latent_cache.common import (make_image, write_images, tiny_vae, build_cache,
                                                index_keys, cli_args, REPO_ROOT, RESOLUTION)


def test_cache_cli_json_fields_and_errors(tmp_path: Path, capsys) -> None:
    root = write_images(tmp_path / "img", 4)
    save_vae(tiny_vae(), tmp_path / "vae")
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
    args = cli_args(tmp_path)
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
    assert cache.main([*cli_args(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda was asked for, but CUDA is not available" in error_line()
    assert not (tmp_path / "c").exists()


def test_cache_cli_no_usable_image_is_an_error(tmp_path: Path, capsys) -> None:
    args = cli_args(tmp_path)
    small = tmp_path / "small"
    small.mkdir()
    make_image(8, 8, np.random.default_rng(2)).save(small / "a.png")
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
    args = cli_args(tmp_path)
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


def test_cache_cli_dry_run_needs_prune_and_still_builds(tmp_path: Path, capsys) -> None:
    root = write_images(tmp_path / "img", 2)
    save_vae(tiny_vae(), tmp_path / "vae")
    c = tmp_path / "c"
    args = ["--dataset", str(root), "--vae", str(tmp_path / "vae"), "--resolution",
            str(RESOLUTION), "--cache-dir", str(c), "--num-workers", "0", "--device", "cpu",
            "--global-batch", "0", "--step", "16", "--json", "--no-flip"]
    assert cache.main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prune" in err
    assert not c.exists()  # refused before building anything
    other = build_cache(root, tiny_vae(1), c)  # another VAE's entries: a prune deletes them all
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
    assert len(index_keys(c)) == other.total + out["total"]


def test_cache_cli_defaults_are_the_training_defaults() -> None:
    from training.config import REPO_ROOT, load_config

    trained = load_config(REPO_ROOT / "configs" / "default.json")
    args = cache.build_parser().parse_args([])
    assert (args.resolution, args.step, args.flip, args.global_batch, args.holdout) == (
        trained.data.resolution, trained.data.step, trained.data.flip, trained.batch_size,
        trained.data.holdout)
    assert cache.build_parser().parse_args(["--no-flip"]).flip is False


def test_cache_cli_prune_of_a_busy_cache_is_one_line_error(tmp_path: Path, capsys) -> None:
    args = cli_args(tmp_path)
    assert cache.main(args) == 0
    capsys.readouterr()
    reader = Store(tmp_path / "c")  # a training run reading the cache holds this
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
    from training.plan import plan_data

    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "ldm"))
    rng = np.random.default_rng(0)
    root = tmp_path / "img"
    root.mkdir()
    for i in range(40):
        side = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
        area = rng.uniform(1.1, 4.0) * RESOLUTION**2
        image = make_image(int((area * side) ** 0.5), int((area / side) ** 0.5), rng)
        image.save(root / f"{i}.png")
    save_vae(tiny_vae(), tmp_path / "vae")
    cfg = Config()
    cfg.batch_size = 5
    cfg.data = DataConfig(dataset=str(root), resolution=RESOLUTION, step=8, holdout=10,
                          num_workers=0, flip=False)
    plan = plan_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    vae = tiny_vae()
    encoded = {}
    for holdout in ("10", "0"):
        cache_dir = tmp_path / f"c{holdout}"
        assert cache.main(["--dataset", str(root), "--vae", str(tmp_path / "vae"), "--resolution",
                           str(RESOLUTION), "--step", "8", "--cache-dir", str(cache_dir),
                           "--global-batch", "5", "--holdout", holdout, "--num-workers", "0",
                           "--device", "cpu", "--no-flip"]) == 0
        encoded[holdout] = sum(
            ensure_cache(records, placements, plan.buckets, vae, cache_dir, flip=False,
                         num_workers=0, progress=False, log=lambda m: None).encoded
            for records, placements in ((plan.records, plan.placements),
                                        (plan.eval_records, plan.eval_placements)))
    assert encoded["10"] == 0 and encoded["0"] > 0, encoded


def test_cache_cli_json_counts_every_file(tmp_path: Path) -> None:
    # files found = cached + skipped, the scan's skips included; the rest counts entries.
    root = write_images(tmp_path / "img", 2)  # 3 images
    (root / "empty.png").write_bytes(b"")
    png = (root / "img01.png").read_bytes()
    (root / "truncated.png").write_bytes(png[:len(png) // 2])
    (root / "notes.jpg").write_text("not a picture\n")
    make_image(8, 8, np.random.default_rng(4)).save(root / "tiny.png")
    save_vae(tiny_vae(), tmp_path / "vae")
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
