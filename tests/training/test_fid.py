"""training/fid.py: FID against pytorch-fid, IS and KID against torch-fidelity, precision / recall
against a brute-force k-NN, and the sample sets (folders, ADM batches, statistics, the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.inception import WEIGHTS_NAME, InceptionFeatures
from tests.models.inception_file import peer_hub, random_inception_file, varied_images
from training.fid import (_cache_key, fid, fid_of_features, inception_score, kid,
                          precision_recall, read_sample_set, statistics)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_inception_file(tmp_path_factory)


@pytest.fixture(scope="module")
def extractor(weights: Path) -> InceptionFeatures:
    return InceptionFeatures(weights, "cpu", batch_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 64x64 PNGs (square and of one size, so pytorch-fid reads them as we do)."""
    root = tmp_path_factory.mktemp("folder")
    for i, img in enumerate(varied_images(6, 64, 64, seed=2)):
        Image.fromarray(img).save(root / f"{i:03d}.png")
    return root


# pytorch-fid 0.3.0 passes `disp` to scipy's sqrtm (to be removed in SciPy 1.18), and scipy warns
# that a singular product may have no square root: neither concerns our FID
peer_sqrtm_quiet = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning",
                                              "ignore:Matrix is singular")


def _stats(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> tuple[np.ndarray, ...]:
    """mu, sigma of n correlated Gaussian features of dimension d."""
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return statistics(rng.normal(size=(n, d)) @ mix + shift)


@peer_sqrtm_quiet
def test_fid_equals_pytorch_fid_on_the_same_folder(weights: Path, extractor: InceptionFeatures,
                                                   folder: Path) -> None:
    from pytorch_fid import fid_score
    from pytorch_fid.inception import InceptionV3

    files = sorted(folder.glob("*.png"))
    with peer_hub(weights, WEIGHTS_NAME):
        peer = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    acts = fid_score.get_activations(files, peer, batch_size=6, dims=2048, device="cpu",
                                     num_workers=0)  # (6, 2048): its own loading and resize
    ours = read_sample_set(folder, extractor)  # single images regrouped into batches of 4
    assert ours.kind == "folder" and ours.n == 6 and not ours.cached
    assert np.abs(ours.pool - acts).max() / np.abs(acts).max() < 1e-5
    mu_p, sigma_p = np.mean(acts, axis=0), np.cov(acts, rowvar=False)  # pytorch-fid's statistics
    assert np.abs(ours.mu - mu_p).max() < 1e-5 * np.abs(mu_p).max()
    assert np.abs(ours.sigma - sigma_p).max() < 1e-4 * np.abs(sigma_p).max()
    # FID of two halves on 256 of the 2048 dimensions: scipy's sqrtm takes ~15 s at 2048 on
    # two cores (bench/inception.py compares the full FID)
    a, b, dims = ours.pool[:3], ours.pool[3:], slice(0, 256)
    (m1, s1), (m2, s2) = statistics(a[:, dims]), statistics(b[:, dims])
    (p1, q1), (p2, q2) = statistics(acts[:3, dims]), statistics(acts[3:, dims])
    expected = fid_score.calculate_frechet_distance(p1, q1, p2, q2)
    assert abs(fid(m1, s1, m2, s2) - expected) < 1e-3 * expected


@peer_sqrtm_quiet
@pytest.mark.parametrize("n", [8, 300])  # singular covariances (n < d) and full rank
def test_fid_equals_pytorch_fid_frechet_distance(n: int) -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(n)
    (m1, s1), (m2, s2) = _stats(rng, n, 128), _stats(rng, n, 128, shift=0.1)
    expected = calculate_frechet_distance(m1, s1, m2, s2)
    assert abs(fid(m1, s1, m2, s2) - expected) < 1e-6 * expected


def test_fid_of_a_set_against_itself_is_zero_and_fid_is_symmetric() -> None:
    rng = np.random.default_rng(0)
    for n in (10, 300):
        (m1, s1), (m2, s2) = _stats(rng, n, 128), _stats(rng, n, 128, shift=0.2)
        assert abs(fid(m1, s1, m1, s1)) < 1e-8 * np.trace(s1)
        assert fid(m1, s1, m2, s2) > 1
        assert fid(m1, s1, m2, s2) == pytest.approx(fid(m2, s2, m1, s1), rel=1e-10)


def test_fid_of_features_equals_fid_of_their_statistics() -> None:
    rng = np.random.default_rng(0)
    ref = statistics(rng.normal(size=(300, 64)) + 0.5)  # full rank
    for n in (3, 40, 64, 100):  # fewer, as many and more features than dimensions
        x = rng.normal(size=(n, 64)) * rng.uniform(0.5, 2, 64)
        assert fid_of_features(x, *ref) == pytest.approx(fid(*statistics(x), *ref), rel=1e-9)
    pool = rng.normal(size=(5, 48))
    assert fid_of_features(pool, *statistics(pool)) == pytest.approx(0, abs=1e-9)


def test_fid_refuses_an_imaginary_square_root_and_bad_shapes() -> None:
    mu = np.zeros(4)
    bad = np.diag([1.0, 1.0, 1.0, -0.01])  # not a covariance: sqrt gives 0.1i
    with pytest.raises(ValueError, match="imaginary component of 0.1"):
        fid(mu, np.eye(4), mu, bad)
    tiny = np.diag([1.0, 1.0, 1.0, -1e-9])  # rounding-sized: sqrt gives 3e-5i, within 1e-3
    assert fid(mu, np.eye(4), mu, tiny) == pytest.approx(1.0)  # 4 + 3 - 2·3
    with pytest.raises(ValueError, match="fid needs mu"):
        fid(mu, np.eye(4), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("splits", [10, 3])  # 3 splits of 100: uneven parts at i·N // splits
def test_fid_inception_score_equals_torch_fidelity(splits: int) -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.from_numpy(np.random.default_rng(splits).normal(0, 3, (100, 1008)))
    expected = isc_features_to_metric(logits, splits=splits, shuffle=False)
    mean, std = inception_score(logits, splits)
    assert mean == pytest.approx(expected["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(expected["inception_score_std"], rel=1e-8)
    assert mean > 1.5


@pytest.mark.parametrize("subset_size", [40, 120])  # random subsets, and the whole smaller set
def test_fid_kid_equals_torch_fidelity(subset_size: int) -> None:
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 1, (150, 32))
    b = rng.normal(0.6, 1.1, (120, 32))
    expected = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b),
                                      kid_subsets=20, kid_subset_size=subset_size, rng_seed=7,
                                      verbose=False)
    mean, std = kid(a, b, subsets=20, subset_size=subset_size, seed=7)
    assert mean == pytest.approx(expected["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(expected["kernel_inception_distance_std"], rel=1e-6, abs=1e-12)
    assert mean > 0


def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray,
                                  k: int) -> tuple[float, float]:
    """Kynkäänniemi et al.'s definition spelled out with explicit differences and sorting."""
    def dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))

    radius_real = np.sort(dist(real, real), axis=1)[:, k]  # index 0 is the point itself
    radius_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = np.mean([(dist(f[None], real)[0] <= radius_real).any() for f in fake])
    recall = np.mean([(dist(r[None], fake)[0] <= radius_fake).any() for r in real])
    return float(precision), float(recall)


@pytest.mark.parametrize("block", [8192, 16])  # one block, and many blocks of rows and columns
def test_fid_precision_recall_equals_brute_force_knn(block: int) -> None:
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    rng = np.random.default_rng(3)
    real = rng.normal(0, 1, (70, 8))
    fake = np.concatenate([rng.normal(0.3, 0.7, (40, 8)), rng.normal(3, 1, (10, 8))])
    expected = _brute_force_precision_recall(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, fake, k=3, block=block) == expected
    # torch-fidelity: its input1 is the generated set
    assert calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real),
                                           neighborhood=3) == pytest.approx(expected)
    assert precision_recall(real, real, k=3, block=block) == (1.0, 1.0)


def test_fid_metrics_refuse_too_few_samples() -> None:
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(x, x, k=3)
    with pytest.raises(ValueError, match="subset_size"):
        kid(x, x, subset_size=4)
    with pytest.raises(ValueError, match="splits"):
        inception_score(x, splits=4)
    with pytest.raises(ValueError, match="N >= 2"):
        statistics(x[:1])


def test_fid_sample_set_caches_folder_features(extractor: InceptionFeatures,
                                               tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(varied_images(2, 40, 40, seed=7)):
        Image.fromarray(img).save(folder / f"{i}.png")
    tmp_path = tmp_path / "cache"
    first = read_sample_set(folder, extractor, tmp_path)
    entries = list((tmp_path / "fid").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".npz"  # no temporary file left behind
    again = read_sample_set(folder, extractor, tmp_path)
    assert again.cached and not first.cached
    assert np.array_equal(again.pool, first.pool) and np.array_equal(again.sigma, first.sigma)
    assert again.pool.dtype == np.float32 and again.mu.dtype == np.float64
    files = sorted(folder.glob("*.png"))
    key = _cache_key("folder", folder, files, extractor.fingerprint)
    assert key != _cache_key("folder", folder, files, "0" * 64)  # other weights, other entry
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a rewritten file
    assert key != _cache_key("folder", folder, files, extractor.fingerprint)
    assert not read_sample_set(folder, extractor, tmp_path).cached
    assert len(list((tmp_path / "fid").iterdir())) == 2


def test_fid_sample_set_centre_crops_and_skips_unreadable_files(extractor: InceptionFeatures,
                                                                tmp_path: Path) -> None:
    wide, tall = varied_images(1, 64, 80, seed=4)[0], varied_images(1, 70, 50, seed=5)[0]
    Image.fromarray(wide).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(tall).save(tmp_path / "sub" / "b.jpg")
    (tmp_path / "c.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    got = read_sample_set(tmp_path, extractor)
    assert got.n == 2 and len(got.skipped) == 1 and "c.png" in got.skipped[0]
    tall_jpeg = np.asarray(Image.open(tmp_path / "sub" / "b.jpg").convert("RGB"))
    crops = [wide[None, :, 8:72], tall_jpeg[None, 10:60]]  # the centred 64² of 64x80, 50² of 70x50
    expected = torch.cat(list(extractor.pool_features(crops)))
    assert np.allclose(got.pool, expected.numpy(), rtol=0, atol=1e-6)


def test_fid_sample_set_reads_adm_batches_and_statistics(extractor: InceptionFeatures,
                                                         tmp_path: Path) -> None:
    images = varied_images(2, 48, 48, seed=6)  # (2, 48, 48, 3) uint8: the ADM layout
    np.savez(tmp_path / "batch.npz", arr_0=images)
    expected, _ = extractor(images)
    got = read_sample_set(tmp_path / "batch.npz", extractor, tmp_path / "cache")
    assert got.kind == "npz" and got.n == 2 and got.stats_from == "features"
    assert np.array_equal(got.pool, expected.numpy().astype(np.float32))
    np.savez(tmp_path / "stats.npz", mu=got.mu, sigma=got.sigma)
    stats = read_sample_set(tmp_path / "stats.npz", extractor)
    assert stats.kind == "stats" and stats.pool is None and stats.n is None
    assert np.array_equal(stats.sigma, got.sigma)
    # an ADM reference batch (compressed here): FID takes the stored statistics, the other
    # metrics the images
    np.savez_compressed(tmp_path / "reference.npz", arr_0=images, mu=got.mu + 1,
                        sigma=got.sigma * 2)
    for _ in range(2):  # computed, then cached
        ref = read_sample_set(tmp_path / "reference.npz", extractor, tmp_path / "cache")
        assert ref.stats_from == "file" and np.array_equal(ref.mu, got.mu + 1)
        assert np.array_equal(ref.sigma, got.sigma * 2) and np.array_equal(ref.pool, got.pool)
    assert ref.cached
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"other\.npz: holds neither arr_0"):
        read_sample_set(tmp_path / "other.npz", extractor)
    np.savez(tmp_path / "floats.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match=r"floats\.npz: arr_0 should be uint8"):
        read_sample_set(tmp_path / "floats.npz", extractor)
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"small\.npz: mu should be \(2048,\)"):
        read_sample_set(tmp_path / "small.npz", extractor)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_sample_set(tmp_path / "nowhere", extractor)
