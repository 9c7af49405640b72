"""scripts/evaluate.py: the JSON report of two sets, statistics inputs, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.inception import WEIGHTS_NAME, InceptionFeatures
from scripts import evaluate
from tests.models.inception_file import random_inception_file, varied_images
from training.fid import inception_score, kid, precision_recall, read_sample_set

REQUIRED = ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall", "n_ref", "n_samples")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_inception_file(tmp_path_factory)


@pytest.fixture(scope="module")
def extractor(weights: Path) -> InceptionFeatures:
    return InceptionFeatures(weights)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A reference folder of 4 images of mixed sizes and a sample folder of 4 at 48x48 (more
    than k = 3 each, for precision / recall)."""
    root = tmp_path_factory.mktemp("sets")
    ref, samples = root / "ref", root / "samples"
    ref.mkdir()
    samples.mkdir()
    for i, img in enumerate(varied_images(4, 56, 72, seed=10)):
        Image.fromarray(img if i % 2 else img[:, :56]).save(ref / f"{i}.png")
    for i, img in enumerate(varied_images(4, 48, 48, seed=11)):
        Image.fromarray(img).save(samples / f"{i}.jpg", quality=95)
    return ref, samples


def _last_json(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_reports_every_metric_of_two_folders(weights: Path, extractor: InceptionFeatures,
                                                      folders: tuple[Path, Path],
                                                      cache_dir: Path, capsys) -> None:
    ref, samples = folders
    argv = ["--inception", str(weights), str(ref), str(samples), "--json", "--device", "cpu",
            "--kid-subsets", "10"]
    assert evaluate.main(argv) == 0
    result = _last_json(capsys)
    assert all(key in result for key in REQUIRED)
    assert result["n_ref"] == result["n_samples"] == 4
    assert not result["ref_cached"] and not result["samples_cached"]
    assert result["fid"] > 0  # its value is checked against the samples' own statistics below
    # the other numbers from the library, on the features the run cached
    a = read_sample_set(ref, extractor, cache_dir)
    b = read_sample_set(samples, extractor, cache_dir)
    assert a.cached and b.cached
    assert result["is_splits"] == 2  # at least two samples a split
    mean, std = inception_score(extractor.logits(torch.from_numpy(b.pool)), 2)
    assert (result["is"], result["is_std"]) == pytest.approx((mean, std), rel=1e-12)
    assert result["kid_subset_size"] == 4 and result["kid_subsets"] == 10
    assert (result["kid"], result["kid_std"]) == pytest.approx(kid(b.pool, a.pool, 10, 4),
                                                               rel=1e-9, abs=1e-12)
    assert (result["precision"], result["recall"]) == precision_recall(a.pool, b.pool, k=3)
    assert result["inception_sha256"] == extractor.fingerprint


def test_evaluate_against_statistics_reports_fid_only(weights: Path, extractor: InceptionFeatures,
                                                      folders: tuple[Path, Path],
                                                      cache_dir: Path, tmp_path: Path,
                                                      capsys, monkeypatch) -> None:
    _, samples = folders
    sample_set = read_sample_set(samples, extractor, cache_dir)
    np.savez(tmp_path / "samples_stats.npz", mu=sample_set.mu, sigma=sample_set.sigma)
    monkeypatch.setenv("LDM_INCEPTION", str(weights))  # as .env would set it
    assert evaluate.main([str(tmp_path / "samples_stats.npz"), str(samples), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert abs(result["fid"]) < 1e-6  # the samples against their own statistics
    assert result["n_ref"] is None and result["ref_kind"] == "stats"
    assert result["is"] is not None  # the samples are images
    assert result["kid"] is result["precision"] is result["recall"] is None
    assert "KID        n/a" in out


def test_evaluate_without_weights_is_one_line_error(folders: tuple[Path, Path], tmp_path: Path,
                                                    monkeypatch, error_line) -> None:
    ref, samples = folders
    monkeypatch.setenv("LDM_INCEPTION", "")  # unset, and not taken from a local .env either
    assert evaluate.main([str(ref), str(samples)]) == 2
    line = error_line()
    assert WEIGHTS_NAME in line and "--inception" in line and "LDM_INCEPTION" in line
    assert evaluate.main(["--inception", str(tmp_path / WEIGHTS_NAME), str(ref),
                          str(samples)]) == 2
    line = error_line()
    assert str(tmp_path / WEIGHTS_NAME) in line and "pytorch-fid" in line


def test_evaluate_bad_inputs_are_one_line_errors(weights: Path, folders: tuple[Path, Path],
                                                 tmp_path: Path, error_line) -> None:
    ref, _ = folders
    base = ["--inception", str(weights)]
    assert evaluate.main(base + [str(ref), str(tmp_path / "missing")]) == 2
    assert "missing: not found" in error_line()
    (tmp_path / "empty").mkdir()
    assert evaluate.main(base + [str(ref), str(tmp_path / "empty")]) == 2
    assert "empty: no image files" in error_line()
    np.savez(tmp_path / "odd.npz", labels=np.arange(3))
    assert evaluate.main(base + [str(tmp_path / "odd.npz"), str(ref)]) == 2
    assert "odd.npz: holds neither arr_0" in error_line()
    assert evaluate.main(base + [str(ref), str(ref), "--kid-subsets", "0"]) == 2
    assert "--kid-subsets 0" in error_line()
