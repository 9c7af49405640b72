"""Quality metrics during training: FID and KID of the DiT's EMA samples, rFID of the VAE.

Both need the FID Inception weights (`train.inception`, filled from LDM_INCEPTION by
`training.config.resolve_run_config`); without them a run says once that the metrics are off
and trains on. `open_inception` is called where a stage starts, before any training work, so
that a file that is missing or not the weights is refused with one line naming it.

DiT (`SampleQuality`, every `train.fid_every` steps, on every rank): the EMA model samples
`train.fid_samples` images at the run's bucket nearest 1:1 (the square `data.resolution`
bucket when the grid has it) with the preview grids' sampler, steps and guidance. Sample i
(global index) draws its noise from a generator seeded with `seed + i` and, for a
class-conditional model, has class i mod classes, so the labels are balanced and the set does
not depend on how many processes share it: rank r samples the r-th contiguous share, and the
ranks gather Inception features, never images. The main process compares them with the
statistics of up to `train.fid_ref_images` training images (`reference_set`: spread evenly over
the sorted training files, placed in the same bucket as training places them, and cached in
`$LDM_CACHE_DIR/fid/` by `training.fid`, so a resumed or repeated run reads them back), logs
`quality/fid` and `quality/kid`, and keeps the best step in `RUN_DIR/best_fid.json`.

VAE (`ReconstructionFID`, at its evaluations, on the main process): FID of the EMA
reconstructions of the validation crops against the crops themselves, `quality/rfid`.

None of this draws from a random stream that training uses (sampling has its own seeded
generators; KID its own `RandomState`), so exact resume still holds, and the models it runs
are left in the train/eval mode they were in.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from inference.pipelines import decode_latents, sample_latents
from models.dit import DiT
from models.inception import WEIGHTS_NAME, InceptionFeatures
from models.vae import AutoencoderKL
from training.config import Config, ConfigError, default_cache_dir, resolve_path
from training.distributed import DistInfo, on_every_rank
from training.fid import SampleSet, fid_of_features, kid, read_image_files, statistics
from training.image_table import ImageTable
from training.logging import RunLogger

BEST_FILE = "best_fid.json"
KID_SUBSETS = 100  # KID: mean over this many subsets of up to KID_SUBSET_SIZE samples each
KID_SUBSET_SIZE = 1000
INCEPTION_BATCH = 32  # images per Inception forward pass
OFF_MESSAGE = (f"quality metrics off (FID/KID of the DiT, rFID of the VAE): no Inception "
               f"weights; set LDM_INCEPTION=PATH in .env, train.inception or --inception to "
               f"{WEIGHTS_NAME} to turn them on")


def open_inception(cfg: Config, info: DistInfo) -> InceptionFeatures | None:
    """The Inception network of `train.inception` on this process's device, or None when the
    metrics are off (`train.fid_every` 0; or no file, which the main process says once).

    Call it on every rank where a stage starts: a file missing or not in the pt_inception
    layout on any rank is a ConfigError naming it, on one line, on every rank.
    """
    if not cfg.train.fid_every:
        return None
    if not cfg.train.inception:
        if info.is_main:
            print(OFF_MESSAGE, flush=True)
        return None
    path = resolve_path(cfg.train.inception)

    def load() -> InceptionFeatures:
        try:
            return InceptionFeatures(path, info.device, batch_size=INCEPTION_BATCH)
        except (FileNotFoundError, ValueError) as err:  # one line, whatever torch said
            raise ConfigError(f"train.inception: {' '.join(str(err).split())}") from None

    return on_every_rank(load)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 (rounded as `inference.pipelines.tensor_to_pil` does)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """`modules` in eval mode inside, each back in the mode it had (sub-modules included)."""
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for saved in modes:
            for m, training in saved:
                m.training = training


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` as JSON to `path` through a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BestFID:
    """The step with the lowest FID so far, kept in `RUN_DIR/best_fid.json`.

    A record of a later step than the one the run starts from belongs to a branch no longer
    trained (the run was resumed from an older checkpoint): it is ignored, and replaced at the
    next evaluation.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = Path(run_dir) / BEST_FILE
        self.best: dict | None = None
        try:
            saved = json.loads(self.path.read_text())
            if int(saved["step"]) <= start_step:
                self.best = saved
        except (OSError, ValueError, KeyError, TypeError):
            pass

    def offer(self, record: dict) -> bool:
        """Keep `record` (step, fid, ...) when it beats the best; returns whether it did."""
        if self.best is not None and self.best.get("fid", float("inf")) <= record["fid"]:
            return False
        write_json_atomic(self.path, record)
        self.best = record
        return True


def reference_files(records: ImageTable, limit: int) -> list[Path]:
    """The files of up to `limit` of `records`, spread evenly over them in the table's order
    (the scan's, sorted by path: every class and folder is represented in proportion, and the
    choice depends on the data alone)."""
    n = len(records)
    picks = range(n) if n <= limit else np.linspace(0, n - 1, limit).round().astype(int)
    return [Path(records.path(int(i))) for i in picks]


def reference_set(extractor: InceptionFeatures, files: list[Path],
                  size: tuple[int, int]) -> SampleSet:
    """Inception statistics of the training images `files` placed at `size` (w, h), read
    from `$LDM_CACHE_DIR/fid/` when computed before, with a progress bar otherwise."""
    with tqdm(total=len(files), desc="FID reference images", dynamic_ncols=True,
              leave=False) as bar:
        ref = read_image_files(files, extractor, default_cache_dir(), size=size,
                               progress=lambda done: bar.update(done - bar.n))
    for line in ref.skipped:
        print(f"warning: FID reference: skipped {line}", flush=True)
    print(f"FID reference: {ref.n} training images at {size[0]}x{size[1]}"
          f"{' (from the cache)' if ref.cached else ''}", flush=True)
    return ref


def gather_rows(rows: torch.Tensor, share: int, device: torch.device) -> torch.Tensor | None:
    """Every rank's `rows` (n_r, D), in rank order, on the CPU; None when some rank has fewer
    than its `share` (it stopped early). A single process returns its own rows."""
    if not dist.is_initialized():
        return rows if len(rows) == share else None
    world = dist.get_world_size()
    counts = torch.tensor([len(rows), share], device=device)  # (2,)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    width = max(int(c[0]) for c in all_counts)
    padded = torch.zeros(max(width, 1), rows.shape[1], dtype=rows.dtype, device=device)
    padded[:len(rows)] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    if any(int(c[0]) != int(c[1]) for c in all_counts):
        return None
    return torch.cat([p[:int(c[0])] for p, c in zip(parts, all_counts)]).cpu()


class SampleQuality:
    """FID and KID of the DiT's EMA samples against the training images (module docstring).

    `measure(model, vae, step, stop_requested)` runs on every rank; `reference` is needed on
    the main process only (None elsewhere). `chunk` samples are drawn per sampler call.
    """

    def __init__(self, cfg: Config, info: DistInfo, extractor: InceptionFeatures,
                 reference: SampleSet | None, size: tuple[int, int], classes: int,
                 chunk: int, autocast_dtype: torch.dtype | None, logger: RunLogger,
                 best: BestFID | None) -> None:
        self.cfg, self.info, self.extractor, self.reference = cfg, info, extractor, reference
        self.size, self.classes, self.chunk, self.amp = size, classes, chunk, autocast_dtype
        self.logger, self.best = logger, best

    def share(self) -> range:
        """The global sample indices this rank draws: its contiguous part of fid_samples."""
        n, rank, world = self.cfg.train.fid_samples, self.info.rank, self.info.world_size
        return range(rank * n // world, (rank + 1) * n // world)

    @torch.inference_mode()
    def features(self, model: DiT, vae: AutoencoderKL, indices: range,
                 stop_requested: Callable[[], bool]) -> torch.Tensor:
        """Pool features (n, 2048) float64 of samples `indices`; fewer when a stop was
        requested (it returns at the next chunk)."""
        d, (w, h), f = self.cfg.dit, self.size, vae.downsample_factor
        feats = [torch.zeros(0, 2048, dtype=torch.float64)]
        bar = tqdm(total=len(indices), desc=f"FID samples {w}x{h}", leave=False,
                   disable=not self.info.is_main, dynamic_ncols=True)
        with bar, eval_mode(model, vae):
            for start in range(indices.start, indices.stop, self.chunk):
                if stop_requested():
                    break
                count = min(self.chunk, indices.stop - start)
                cond = (model.condition.batch([i % self.classes
                                               for i in range(start, start + count)])
                        if self.classes else None)
                z = sample_latents(model, (h // f, w // f), num_samples=count, cond=cond,
                                   cfg_scale=d.cfg_scale, steps=d.sample_steps,
                                   sampler=d.sampler, seed=self.cfg.seed,
                                   base_tokens=d.base_tokens, autocast_dtype=self.amp,
                                   first=start)  # (count, C, h/f, w/f)
                images = to_uint8(decode_latents(vae, z))  # (count, 3, h, w)
                feats += list(self.extractor.pool_features([images]))
                bar.update(count)
        return torch.cat(feats)  # (n, 2048)

    def measure(self, model: DiT, vae: AutoencoderKL, step: int,
                stop_requested: Callable[[], bool]) -> dict | None:
        """Sample, gather and score (see the class); the main process logs the scores and
        returns them, the others None, and so do all when a stop cut the sampling short."""
        indices = self.share()
        pool = gather_rows(self.features(model, vae, indices, stop_requested), len(indices),
                           self.info.device)
        if pool is None or not self.info.is_main:
            return None
        ref = self.reference
        score = fid_of_features(pool, ref.mu, ref.sigma)
        size = min(KID_SUBSET_SIZE, len(pool), len(ref.pool))
        kid_mean, _ = kid(pool, ref.pool, KID_SUBSETS, size, device=self.info.device)
        self.logger.scalars({"quality/fid": score, "quality/kid": kid_mean}, step)
        (w, h), d = self.size, self.cfg.dit
        record = {"step": step, "fid": score, "kid": kid_mean, "n": len(pool),
                  "n_ref": len(ref.pool), "size": f"{w}x{h}", "sampler": d.sampler,
                  "sample_steps": d.sample_steps, "cfg_scale": d.cfg_scale}
        best = self.best is not None and self.best.offer(record)
        tqdm.write(f"step {step}: FID {score:.2f}, KID {kid_mean:.4f} ({len(pool)} EMA samples "
                   f"vs {len(ref.pool)} training images){' (best so far)' if best else ''}")
        return record


def dit_quality(cfg: Config, info: DistInfo, extractor: InceptionFeatures | None,
                records: ImageTable, size: tuple[int, int], classes: int, start_step: int,
                autocast_dtype: torch.dtype | None, logger: RunLogger,
                run_dir: Path) -> SampleQuality | None:
    """The DiT stage's `SampleQuality` at `size` (w, h) against the training images
    `records`, or None when the metrics are off or no evaluation falls between `start_step`
    and `train.max_steps`. The main process says which, and reads the reference statistics
    now (computing them the first time, with a progress bar)."""
    t = cfg.train
    if extractor is None:
        return None
    if t.max_steps // t.fid_every <= start_step // t.fid_every:
        if info.is_main:
            print(f"quality: no FID this run (train.fid_every {t.fid_every}, "
                  f"train.max_steps {t.max_steps})", flush=True)
        return None
    reference, best = None, None
    if info.is_main:
        print(f"quality: FID/KID of {t.fid_samples} EMA samples at {size[0]}x{size[1]} every "
              f"{t.fid_every} steps", flush=True)
        reference = reference_set(extractor, reference_files(records, t.fid_ref_images), size)
        best = BestFID(run_dir, start_step)
    chunk = max(cfg.batch_size, 8)  # no activations kept: more than a training micro-batch
    return SampleQuality(cfg, info, extractor, reference, size, classes, chunk,
                         autocast_dtype, logger, best)


class ReconstructionFID:
    """rFID of the VAE: FID of reconstructions against their originals, uint8 (N, 3, H, W)
    with N >= 2; the originals' statistics are computed once."""

    def __init__(self, extractor: InceptionFeatures, originals: torch.Tensor) -> None:
        self.extractor = extractor
        self.originals = originals
        self._ref: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, reconstructions: torch.Tensor) -> float:
        """FID of `reconstructions` (N, 3, H, W) in [-1, 1] against the originals."""
        if self._ref is None:
            self._ref = statistics(self.extractor(self.originals)[0])
        pool, _ = self.extractor(to_uint8(reconstructions))  # (N, 2048)
        return fid_of_features(pool, *self._ref)


def vae_quality(extractor: InceptionFeatures | None, originals: torch.Tensor | None,
                info: DistInfo) -> ReconstructionFID | None:
    """The VAE stage's rFID on the main process's validation crops `originals`, or None: off,
    another process, or fewer than two crops (said once)."""
    if extractor is None or not info.is_main:
        return None
    if originals is None or len(originals) < 2:
        print("quality: rFID off: it needs at least 2 validation images (data.holdout or "
              "data.eval_dataset)", flush=True)
        return None
    return ReconstructionFID(extractor, originals)
