"""FID and its companions on Inception features, and the sample sets they are computed from.

Metrics (features from `models.inception.InceptionFeatures`; all arithmetic in float64):

- `statistics(pool)` -> (mu, sigma): mean and covariance (divided by N - 1) of pool features.
- `fid(mu1, sigma1, mu2, sigma2)`: the Fréchet distance between the two Gaussians;
  `fid_of_features(features, mu2, sigma2)` the same of features against statistics, faster
  for fewer features than dimensions.
- `inception_score(logits, splits)`: exp(E KL(p(y|x) || p(y))) per split, mean and std.
- `kid(a, b, subsets, subset_size)`: unbiased MMD² with the kernel (x·y / d + 1)³ on random
  subsets, mean and std (torch-fidelity's definition and, for the same seed, its subsets).
- `precision_recall(real, fake, k)`: k-NN manifolds (Kynkäänniemi et al. 2019, as the ADM
  evaluator computes them), in blocks so that 50k x 50k sets fit in memory.

Sample sets (`read_sample_set`): an image folder (every image centre-cropped to a square, then
resized by the network's input path), an ADM sample batch `.npz` (`arr_0`, uint8 N x H x W x 3),
or a statistics `.npz` (`mu`, `sigma`: FID only). An `.npz` with both (an ADM reference batch:
statistics of the whole data set and 10k images) gives FID its stored statistics, as the ADM
evaluator does, and the other metrics its images. The pool features of a folder or an `.npz`
batch are cached under `<cache dir>/fid/`, keyed by the weights' SHA-256 and by each file's
path, size and modification time, so a reference set is processed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
import torch
from PIL import Image

from models.inception import POOL_DIM, InceptionFeatures
from training.images import ImageLoadError, load_image

CACHE_VERSION = 1  # bump when what a cached entry holds, or how its features are made, changes
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
IMAGINARY_TOLERANCE = 1e-3  # pytorch-fid's bound on the imaginary part of sqrtm(sigma1 sigma2)

ArrayLike = np.ndarray | torch.Tensor
T = TypeVar("T")
R = TypeVar("R")


def _float64(x: ArrayLike) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(
        np.float64, copy=False)


# ----------------------------------------------------------------------------------------------
# Metrics


def statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), normalised by N - 1, of features (N, D), in float64.

    Computed with torch on the CPU, like the rest of the linear algebra here: one thread pool
    for the network and the metrics (numpy's BLAS threads and torch's, both spinning, slow each
    other down many times over on a small machine).
    """
    x = torch.from_numpy(_float64(features))
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"statistics need features (N >= 2, D), got shape {tuple(x.shape)}")
    mu = x.mean(0)  # (D,)
    centred = x - mu  # (N, D)
    return mu.numpy(), (centred.T @ centred / (len(x) - 1)).numpy()  # (D,), (D, D)


def _clip_rounding(w: torch.Tensor, what: str) -> torch.Tensor:
    """Ascending eigenvalues `w` of a symmetric positive semi-definite matrix with rounding
    removed: after checking that the negative ones are rounding (the square root of the most
    negative one, the imaginary part it would add, must stay within IMAGINARY_TOLERANCE,
    pytorch-fid's bound), every eigenvalue below the numerical-rank cutoff
    D · eps · max |w| is set to 0, so that a singular covariance's zero eigenvalues add no
    square roots of rounding errors."""
    lowest = float(w[0])
    if lowest < 0 and np.sqrt(-lowest) > IMAGINARY_TOLERANCE:
        raise ValueError(f"fid: {what} has eigenvalue {lowest:.3g}, so the matrix square root "
                         f"would have an imaginary component of {np.sqrt(-lowest):.3g}; the "
                         "covariances are not positive semi-definite")
    cutoff = len(w) * torch.finfo(torch.float64).eps * float(w.abs().max())
    return torch.where(w > cutoff, w, 0.0)


def fid(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance |mu1 - mu2|² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½), in float64.

    tr((sigma1 sigma2)^½) is the sum of the square roots of the eigenvalues of the symmetric
    positive semi-definite sigma1^½ sigma2 sigma1^½ (the same eigenvalues as sigma1 sigma2), so
    only symmetric eigenproblems are solved and singular covariances (fewer samples than
    dimensions) need no offset. Raises ValueError for mismatched shapes, non-finite values, or
    a square root whose imaginary part would exceed 1e-3 (pytorch-fid's check).
    """
    m1, s1, m2, s2 = (torch.from_numpy(_float64(a)) for a in (mu1, sigma1, mu2, sigma2))
    d = m1.shape[0] if m1.ndim == 1 else -1
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"fid needs mu (D,) and sigma (D, D) for both sets, got "
                         f"{tuple(m1.shape)}, {tuple(s1.shape)}, {tuple(m2.shape)}, "
                         f"{tuple(s2.shape)}")
    if not all(bool(torch.isfinite(a).all()) for a in (m1, s1, m2, s2)):
        raise ValueError("fid: the statistics hold non-finite values")
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)  # (D,), (D, D)
    root1 = (v * _clip_rounding(w, "sigma1").sqrt()) @ v.T  # sigma1^½, (D, D)
    m = root1 @ s2 @ root1  # (D, D)
    product = _clip_rounding(torch.linalg.eigvalsh((m + m.T) / 2), "sigma1^½ sigma2 sigma1^½")
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * product.sqrt().sum())


def fid_of_features(features: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """`fid(*statistics(features), mu2, sigma2)` for features (N, D), in float64; with N <= D
    without forming their covariance.

    With A the centred features divided by √(N − 1) (so sigma1 = AᵀA), sigma1 sigma2 has the
    nonzero eigenvalues of the symmetric positive semi-definite A sigma2 Aᵀ (N, N), whose
    square roots give the trace term: one (N, D) x (D, D) product and an N x N eigenproblem
    instead of two D x D ones (1000 samples against a full reference: several times faster;
    a few samples, as in tests: from seconds to milliseconds).
    """
    x = torch.from_numpy(_float64(features))
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"fid_of_features needs features (N >= 2, D), got {tuple(x.shape)}")
    if len(x) > x.shape[1]:
        return fid(*statistics(x), mu2, sigma2)
    m2, s2 = torch.from_numpy(_float64(mu2)), torch.from_numpy(_float64(sigma2))
    d = x.shape[1]
    if m2.shape != (d,) or s2.shape != (d, d):
        raise ValueError(f"fid_of_features: features of dimension {d} against mu "
                         f"{tuple(m2.shape)} and sigma {tuple(s2.shape)}")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(m2).all())
            and bool(torch.isfinite(s2).all())):
        raise ValueError("fid: the features or statistics hold non-finite values")
    mu1 = x.mean(0)  # (D,)
    a = (x - mu1) / np.sqrt(len(x) - 1)  # (N, D): sigma1 = aᵀ a
    m = a @ ((s2 + s2.T) / 2) @ a.T  # (N, N)
    product = _clip_rounding(torch.linalg.eigvalsh((m + m.T) / 2), "A sigma2 Aᵀ")
    diff = mu1 - m2
    return float(diff @ diff + a.pow(2).sum() + s2.trace() - 2 * product.sqrt().sum())


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of logits (N, 1008), in float64.

    The samples are split in order into `splits` parts at i·N // splits (the ADM evaluator's
    parts of 5000 for N = 50000 and splits = 10; torch-fidelity's with `samples_shuffle`
    off); each part scores exp(mean KL(p(y|x) || mean p(y|x))). The std is the population std.
    """
    x = torch.from_numpy(_float64(logits))
    n = len(x)
    if x.ndim != 2 or not 1 <= splits <= n:
        raise ValueError(f"inception_score needs logits (N, C) and 1 <= splits <= N, got shape "
                         f"{tuple(x.shape)} and splits={splits}")
    log_p = x.log_softmax(1)  # (N, C)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]  # (n_i, C)
        log_marginal = part.exp().mean(0).log()  # (C,)
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def kid(a: ArrayLike, b: ArrayLike, subsets: int = 100, subset_size: int = 1000, seed: int = 2020,
        device: str | torch.device = "cpu") -> tuple[float, float]:
    """Kernel Inception Distance (mean, population std over subsets) of features (N_a, D) and
    (N_b, D): the unbiased MMD² with the kernel k(x, y) = (x·y / D + 1)³, in float64.

    Each subset draws `subset_size` rows of `a` and then of `b` without replacement from
    `np.random.RandomState(seed)`, as torch-fidelity's `kid_features_to_metric(a, b)` does (its
    input1, the generated set, comes first), so equal seeds give torch-fidelity's numbers.
    """
    fa, fb = _float64(a), _float64(b)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(f"kid needs features (N, D) of equal D, got {fa.shape} and {fb.shape}")
    if not 2 <= subset_size <= min(len(fa), len(fb)) or subsets < 1:
        raise ValueError(f"kid: subset_size {subset_size} must lie in 2..{min(len(fa), len(fb))} "
                         f"(the smaller set) and subsets ({subsets}) must be positive")
    rng = np.random.RandomState(seed)
    ta = torch.from_numpy(fa).to(device)
    tb = torch.from_numpy(fb).to(device)
    m, dim = subset_size, fa.shape[1]
    values = []
    for _ in range(subsets):
        x = ta[torch.from_numpy(rng.choice(len(fa), m, replace=False)).to(device)]  # (m, D)
        y = tb[torch.from_numpy(rng.choice(len(fb), m, replace=False)).to(device)]  # (m, D)
        kxx = (x @ x.T / dim + 1) ** 3  # (m, m)
        kyy = (y @ y.T / dim + 1) ** 3
        kxy = (x @ y.T / dim + 1) ** 3
        within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
        values.append(float(within / (m * (m - 1)) - 2 * kxy.sum() / (m * m)))
    return float(np.mean(values)), float(np.std(values))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (n, m) of rows a (n, D) and b (m, D), clamped at 0."""
    d = a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]  # (n, m)
    return d.clamp_min_(0)


def _knn_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance (N,) from each row of x to its k-th nearest other row (the (k+1)-th
    smallest distance, counting the row itself at 0), one block of rows and columns at a time."""
    radii = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for i in range(0, len(x), block):
        rows = x[i:i + block]
        nearest = x.new_empty(len(rows), 0)  # (rows, <= k+1) smallest distances so far
        for j in range(0, len(x), block):
            d = _squared_distances(rows, x[j:j + block])  # (rows, cols)
            nearest = torch.cat([nearest, d.topk(min(k + 1, d.shape[1]), dim=1,
                                                 largest=False).values], 1)
            nearest = nearest.topk(min(k + 1, nearest.shape[1]), dim=1, largest=False).values
        radii[i:i + block] = nearest[:, k]  # ascending: index 0 is the row itself
    return radii


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3, block: int = 8192,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of features real (N_r, D) and
    fake (N_f, D), as the ADM evaluator computes them.

    Each feature's radius is the distance to its k-th nearest neighbour within its own set.
    Precision: the fraction of fake features within the radius of at least one real feature;
    recall: the fraction of real features within the radius of at least one fake feature.
    Distances are computed in float64 on `device`, `block` x `block` at a time (512 MiB at the
    default), so 50k x 50k sets fit; the fake-to-real block serves both directions.
    """
    r = torch.from_numpy(_float64(real)).to(device)
    f = torch.from_numpy(_float64(fake)).to(device)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"precision_recall needs features (N, D) of equal D, got "
                         f"{tuple(r.shape)} and {tuple(f.shape)}")
    if k < 1 or min(len(r), len(f)) <= k:
        raise ValueError(f"precision_recall: k = {k} needs more than k features in each set, got "
                         f"{len(r)} real and {len(f)} fake")
    radius_r, radius_f = _knn_radii(r, k, block), _knn_radii(f, k, block)
    fake_in = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    real_in = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    for i in range(0, len(f), block):
        for j in range(0, len(r), block):
            d = _squared_distances(f[i:i + block], r[j:j + block])  # (fake rows, real cols)
            fake_in[i:i + block] |= (d <= radius_r[j:j + block][None]).any(1)
            real_in[j:j + block] |= (d <= radius_f[i:i + block][:, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


# ----------------------------------------------------------------------------------------------
# Sample sets


@dataclass
class SampleSet:
    """One side of an evaluation.

    `pool` holds the Inception pool features (N, 2048) as float32, the precision the network
    computes them in (the metrics convert to float64); it is None for a statistics file, whose
    `n` is None too. `mu` (2048,) and `sigma` (2048, 2048) are float64, computed from `pool`
    (`stats_from` "features") or read from the `.npz` (`stats_from` "file"). `skipped` lists the
    folder's unreadable files as "path: reason"; `cached` says whether the features came from
    the cache.
    """

    source: str
    kind: str  # "folder", "npz" (ADM batch: images, perhaps statistics too) or "stats"
    mu: np.ndarray
    sigma: np.ndarray
    pool: np.ndarray | None = None
    n: int | None = None
    skipped: list[str] = field(default_factory=list)
    cached: bool = False
    stats_from: str = "features"


def centre_square(img: Image.Image) -> Image.Image:
    """The centred square of side min(width, height); the odd pixel goes to the right/bottom."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img if w == h else img.crop((left, top, left + side, top + side))


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively; hidden files and folders left out), sorted by
    their POSIX path relative to `folder`."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / name for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn over items on `workers` threads, in order, with at most 4·workers results pending."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _load_square(path: Path) -> np.ndarray | str:
    """The file as a centred RGB square (1, S, S, 3) uint8, or why it cannot be read."""
    try:
        img = load_image(path)
    except ImageLoadError as e:
        return str(e)
    return np.asarray(centre_square(img))[None]  # (1, S, S, 3)


def _load_placed(path: Path, size: tuple[int, int]) -> np.ndarray | str:
    """The file resized to cover `size` (w, h) and centre-cropped to it, as training places
    an image in its bucket: (1, h, w, 3) uint8, or why it cannot be read."""
    from bucketing import place
    from training.images import crop_to_bucket

    try:
        img = load_image(path)
    except ImageLoadError as e:
        return str(e)
    placement = place(*img.size, *size, 0)
    return crop_to_bucket(img, placement.resized, placement.crop)[None]  # (1, h, w, 3)


def _npz_members(path: Path) -> set[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return set(z.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None


def _arr0_shape(f: BinaryIO, path: Path) -> tuple[int, ...]:
    """Read the `.npy` header of `arr_0` from its open archive member `f` and check that it is
    an ADM sample batch, uint8 N x H x W x 3 in C order; returns the shape."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
    except ValueError as e:
        raise ValueError(f"{path}: arr_0 is not a readable .npy array ({e})") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise ValueError(f"{path}: arr_0 should be uint8 N x H x W x 3 (ADM sample batch), "
                         f"got {dtype} {shape}{' (Fortran order)' if fortran else ''}")
    return shape


def _npz_images(path: Path, batch: int) -> Iterator[np.ndarray]:
    """Batches (n, H, W, 3) uint8 of an ADM sample batch's `arr_0`, read without loading it
    whole (a 50k x 512² batch is 39 GB)."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        shape = _arr0_shape(f, path)
        item = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            data = f.read(n * item)
            if len(data) != n * item:
                raise ValueError(f"{path}: arr_0 ends after {start} of {shape[0]} images")
            yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def inspect_input(path: str | Path) -> tuple[str, list[Path]]:
    """What `path` is, checked without decoding an image: ("folder", its image files),
    ("npz", [path]) for an ADM batch (with or without statistics) or ("stats", [path]).

    Raises FileNotFoundError or ValueError, naming the path, for anything else.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; expected an image folder, an ADM sample "
                                "batch .npz (arr_0) or a statistics .npz (mu, sigma)")
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise ValueError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return "folder", files
    members = _npz_members(path)
    if "arr_0.npy" in members:
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            _arr0_shape(f, path)
        return "npz", [path]
    if {"mu.npy", "sigma.npy"} <= members:
        return "stats", [path]
    found = ", ".join(sorted(members)) or "nothing"
    raise ValueError(f"{path}: holds neither arr_0 (an ADM sample batch) nor mu and sigma "
                     f"(statistics); it has {found}")


def _read_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The `mu` (2048,) and `sigma` (2048, 2048) of an `.npz`, as float64."""
    with np.load(path, allow_pickle=False) as data:
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.shape != (POOL_DIM,) or sigma.shape != (POOL_DIM, POOL_DIM):
        raise ValueError(f"{path}: mu should be ({POOL_DIM},) and sigma ({POOL_DIM}, {POOL_DIM}) "
                         f"(Inception pool statistics), got {mu.shape} and {sigma.shape}")
    return mu, sigma


def _cache_key(kind: str, root: Path, files: list[Path], fingerprint: str) -> str:
    """SHA-256 of what the features depend on: weights, the input's files (path relative to the
    input, size, modification time in ns), the input's resolved path and the cache version."""
    listing = []
    for p in files:
        st = p.stat()
        listing.append([p.relative_to(root).as_posix() if p != root else p.name,
                        st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "weights": fingerprint, "kind": kind,
                       "root": str(root.resolve()), "files": listing})
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None:
    """(pool, mu, sigma, skipped) of a cache entry, or None when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as data:
            pool, mu, sigma = data["pool"], data["mu"], data["sigma"]
            skipped = [str(s) for s in data["skipped"]]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if pool.ndim != 2 or pool.shape[1] != POOL_DIM or mu.shape != (POOL_DIM,):
        return None
    return pool, mu, sigma, skipped


def _write_cache(path: Path, pool: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
                 skipped: list[str], source: str) -> None:
    """Write a cache entry atomically: a temporary file in the same folder, flushed, renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, pool=pool, mu=mu, sigma=sigma,
                     skipped=np.array(skipped, dtype=np.str_), source=np.array(source))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_sample_set(path: str | Path, extractor: InceptionFeatures,
                    cache_dir: Path | None = None, workers: int = 4,
                    progress: Callable[[int], None] | None = None) -> SampleSet:
    """Read an image folder, an ADM `.npz` batch or a statistics `.npz` (see the module doc).

    Folder images are loaded as RGB (`training.images.load_image`: EXIF orientation applied,
    transparency on white), centre-cropped to a square, and resized by the extractor (bilinear
    to 299, pytorch-fid's path); `workers` threads decode them. Unreadable files are skipped
    and listed. With `cache_dir`, the pool features of a folder or `.npz` batch are read from,
    or written to, `cache_dir / "fid"`. `progress(n)` is called with the number of images done.
    A cache entry that cannot be written is a warning. Raises FileNotFoundError or ValueError
    naming the path.
    """
    path = Path(path)
    kind, files = inspect_input(path)
    stored = None  # (mu, sigma) of an .npz that has them
    if kind != "folder" and {"mu.npy", "sigma.npy"} <= _npz_members(path):
        stored = _read_stats(path)
    if kind == "stats":
        return SampleSet(str(path), "stats", *stored, stats_from="file")
    if kind == "folder":
        return read_image_files(files, extractor, cache_dir, workers=workers,
                                progress=progress, root=path)
    got = _features_set(kind, path, files, lambda skipped: _npz_images(path, extractor.batch_size),
                        extractor, cache_dir, progress)
    return got if stored is None else _with_stored(got, stored)


def read_image_files(files: list[Path], extractor: InceptionFeatures,
                     cache_dir: Path | None = None, size: tuple[int, int] | None = None,
                     workers: int = 4, progress: Callable[[int], None] | None = None,
                     root: Path | None = None) -> SampleSet:
    """The sample set of image `files`, cached like a folder's (see `read_sample_set`).

    Each image is centre-cropped to a square, or with `size` (w, h) resized to cover it
    (bicubic) and centre-cropped to it, as training places an image in a bucket of that size;
    the extractor then resizes it to 299. `root` (default: the files' common folder) names the
    set and keys its cache entry, with the file list and `size`. Unreadable files are skipped
    and listed; raises ValueError when fewer than two can be read.
    """
    root = Path(root) if root is not None else Path(os.path.commonpath(files))
    key = "folder" if size is None else f"files:{size[0]}x{size[1]}"  # how they are prepared
    load = _load_square if size is None else lambda p: _load_placed(p, size)

    def images(skipped: list[str]) -> Iterator[np.ndarray]:
        for item in _ordered_map(load, files, workers):
            if isinstance(item, str):
                skipped.append(item)
            else:
                yield item

    return _features_set("folder", root, files, images, extractor, cache_dir, progress, key)


def _features_set(kind: str, path: Path, files: list[Path],
                  stream: Callable[[list[str]], Iterable[np.ndarray]],
                  extractor: InceptionFeatures, cache_dir: Path | None,
                  progress: Callable[[int], None] | None, key_kind: str | None = None
                  ) -> SampleSet:
    """The pool features and statistics of `stream(skipped)` (uint8 image batches; it lists
    the files it skips in `skipped`), read from or written to the cache entry of
    (`key_kind` (default `kind`), `path`, `files`) under `cache_dir / "fid"`."""
    cache = None
    if cache_dir is not None:
        key = _cache_key(key_kind or kind, path, files, extractor.fingerprint)
        cache = Path(cache_dir) / "fid" / f"{key}.npz"
        hit = _read_cache(cache)
        if hit is not None:
            pool, mu, sigma, skipped = hit
            return SampleSet(str(path), kind, mu, sigma, pool, len(pool), skipped, cached=True)
    skipped: list[str] = []
    chunks, done = [], 0
    for feats in extractor.pool_features(stream(skipped)):
        chunks.append(feats.numpy().astype(np.float32))  # exact: the network's own precision
        done += len(feats)
        if progress is not None:
            progress(done)
    if not chunks:
        raise ValueError(f"{path}: no image could be read ({len(skipped)} skipped"
                         + (f", e.g. {skipped[0]})" if skipped else ")"))
    pool = np.concatenate(chunks)  # (N, 2048)
    if len(pool) < 2:
        raise ValueError(f"{path}: one image; statistics need at least two")
    mu, sigma = statistics(pool)
    if cache is not None:
        try:
            _write_cache(cache, pool, mu, sigma, skipped, str(path))
        except OSError as e:  # a read-only or full disk costs the next run time, not this one
            warnings.warn(f"{cache}: could not write the feature cache ({e})", stacklevel=3)
    return SampleSet(str(path), kind, mu, sigma, pool, len(pool), skipped)


def _with_stored(got: SampleSet, stored: tuple[np.ndarray, np.ndarray]) -> SampleSet:
    """`got` with the statistics stored in its `.npz` in place of those of its features."""
    got.mu, got.sigma = stored
    got.stats_from = "file"
    return got
