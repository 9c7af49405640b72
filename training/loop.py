"""What both training stages share: run folder, data plan, precision, schedules, guarded steps.

A stage (`training/vae_stage.py`, `training/dit_stage.py`) reads top to bottom as one loop and
calls these helpers for everything that is not specific to its model.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from bucketing import (BatchSchedule, PlacementTable, bucket_dataset, make_buckets,
                       nearest_buckets, resolve_first, split_validation)
from training.checkpoint import (CHECKPOINTS, STATE_FILE, read_state,
                                 resolve_resume, set_aside_newer)
from training.config import (Config, ConfigError, DataConfig, TrainConfig, TrainingAborted,
                             TrainingStopped, absolute_config, from_dict, get_dotted,
                             portable_config, resolve_path, save_config, to_dict)
from training.data import PixelDataset, ScheduleSampler
from training.image_table import Duplicates, ImageTable, ScanResult, SkippedFile, fold_duplicates
from training.scan import scan_folder
from training.distributed import (DistInfo, all_gather_objects, barrier, main_first,
                                  on_every_rank)


@dataclass
class DataPlan:
    """Scanned, bucketed, split data and its batch schedule.

    `records` (an `ImageTable`) are the training images and `placements` (a `PlacementTable`)
    their buckets, row for row; `eval_records` and `eval_placements` the validation images'.
    """

    records: ImageTable
    placements: PlacementTable
    buckets: list[tuple[int, int]]
    schedule: BatchSchedule
    eval_records: ImageTable
    eval_placements: PlacementTable  # bucket placements of the validation images
    class_names: list[str]
    skipped: list
    duplicates: Duplicates = field(default_factory=Duplicates)  # of the training folder

    def fingerprint(self) -> str:
        """sha256 of the training images in schedule order with their buckets.

        With `SCHEDULE_KEYS` and the global batch this fixes the batch schedule: an equal
        fingerprint means a checkpoint's (epoch, index) points at the same next batch. Images
        added, removed, renamed or moved to another bucket change it; an image edited in place
        into the same bucket does not (its batch position is unchanged). It hashes the bytes
        "{rel}\0{w}x{h}\n" of each image in turn, rel as the file system's bytes.
        """
        digest = hashlib.sha256()
        suffixes = [f"\0{w}x{h}\n".encode() for w, h in self.buckets]
        for block in self.records.rel_lines(suffixes, self.placements.bucket):
            digest.update(block)
        return digest.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` ("auto", "bf16", "fp32") on `device`, None for fp32.

    "auto" picks bf16 on CUDA devices that support it and on CPUs with native bf16 matmuls
    (AVX-512 BF16 / AMX), fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    cap = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if cap in ("AVX512_BF16", "AMX") or _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or a no-op context for fp32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at `step`: linear warmup, then constant, or a cosine
    from 1 down to 0.1 at max_steps (a floor of 10 % of the base rate)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"train.lr_schedule must be constant or cosine, got {schedule!r}")


def checkpoint_due(step: int, t: TrainConfig, stopping: bool) -> bool:
    """Whether a stage saves after `step` (TrainConfig `t`): on a stop, at max_steps, and every
    ckpt_every steps (0: only those two). Stages save before validation and previews."""
    return stopping or step == t.max_steps or bool(t.ckpt_every and step % t.ckpt_every == 0)


def clip_and_check(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients (when max_norm > 0) and return the total norm before clipping."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class NonFiniteGuard:
    """Decides whether an optimizer step may touch the weights.

    A non-finite loss or gradient norm skips the step, logs the step and the batch's files,
    and after `limit` such steps in a row aborts the run with `TrainingAborted`.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def ok(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
           files: list[str]) -> bool:
        """Whether optimizer step `step` may apply: True when `loss` and `grad_norm` are finite.
        Otherwise counts it, prints it with the batch's `files`, and returns False, or raises
        `TrainingAborted` once `limit` steps in a row were non-finite."""
        if bool(torch.isfinite(loss).item() and torch.isfinite(grad_norm).item()):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        print(f"step {step}: non-finite loss {loss.item()} or gradient norm {grad_norm.item()};"
              f" optimizer step skipped; batch: {files}", flush=True)
        if self.in_a_row >= self.limit:
            raise TrainingAborted(f"{self.in_a_row} non-finite steps in a row at step {step}; "
                                  "lower the learning rate or check the files listed above")
        return False


class StepRate:
    """The step rate of the current logging window: samples per second and the share of the
    time spent waiting for data, with the time spent on checkpoints, validation and previews
    (`paused`) left out of both."""

    def __init__(self, step: int) -> None:
        self._restart(step)

    def _restart(self, step: int) -> None:
        self.start, self.step = time.perf_counter(), step
        self.waited = self.paused = 0.0

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around fetching a batch: the time inside counts as waiting for data."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.waited += time.perf_counter() - started

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Around checkpoints, validation and previews: the time inside is left out."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - started

    def scalars(self, step: int, samples_per_step: int) -> dict[str, float]:
        """The window's rates up to `step` (`samples_per_step` over all ranks), as logged;
        starts the next window."""
        elapsed = max(time.perf_counter() - self.start - self.paused, 1e-9)
        values = {"train/samples_per_s": samples_per_step * (step - self.step) / elapsed,
                  "train/data_wait_fraction": self.waited / elapsed}
        self._restart(step)
        return values


def stopped(stop: StopSignal, step: int, run_dir: Path) -> NoReturn:
    """End a run that stopped on a signal after saving `step`: raise `TrainingStopped` on every
    rank once all of them are here (rank 0 has then saved; torchrun ends the other ranks as soon
    as one exits with an error)."""
    barrier()
    signum = stop.received or signal.SIGTERM  # ranks the signal did not reach stop with it too
    raise TrainingStopped(f"signal {stop.received or 'on another process'}: saved step {step} "
                          f"and stopped; `train.py --resume {run_dir}` continues it", signum)


class StopSignal:
    """Turns SIGTERM and SIGINT into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        """Reinstall the handlers that were in place before this object took the signals."""
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let the process reuse freed host memory instead of returning it to the OS; True if set.

    By default glibc serves blocks above a threshold (at most 32 MiB) with a fresh mmap and
    gives freed memory at the top of the heap back to the kernel. A CPU training step allocates
    and frees the same activation tensors every step, so each step then faults every page of
    them back in and the kernel zeroes it: about 100,000 faults (0.4 GB) per fp32 step for
    dit-s/2 at batch 16, which then takes about 10 % longer (README, Figures). Raising the mmap
    threshold to 1 GiB and the trim threshold to 2 GiB keeps those blocks in the heap for the
    next step. The resident set then stays near its peak between steps, which a training
    process reaches every step anyway; freed blocks that a later request does not fit stay
    resident too, but measured peak memory is unchanged (`bench/train.py --default-malloc`).
    A no-op returning False where the C library has no glibc `mallopt` (macOS, musl).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # older glibc refuses an mmap threshold above 32 MiB: fall back to that
    mmap_set = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap_set) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def close_loader(batches) -> None:
    """Stop the worker processes of a DataLoader iterator now (a no-op for other iterables).

    Needed where an error may escape a loop over a `pixel_loader`: its workers ignore SIGTERM
    (`ignore_stop_signals`), so while a traceback keeps the iterator alive, Python's exit would
    wait for them forever. torch has no public call for this; the iterator's own is used.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM and SIGINT.

    Schedulers (SLURM's scancel, `timeout`, Ctrl-C in a terminal) signal the whole process
    group. A worker killed by that signal would crash the main process's next batch before it
    could save its checkpoint; ignoring it lets `StopSignal` stop the loop cleanly, after which
    the main process shuts the workers down (and they exit on their own if it dies).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# What fixes the batch schedule (which images, bucketed how, in which order). A resume keeps
# these and the global batch, so that its saved (epoch, index) points at the same next batch;
# the images themselves may change (`resume_position`).
SCHEDULE_KEYS = ("seed", "train.grad_accum", "data.dataset", "data.eval_dataset", "data.holdout",
                 "data.use_classes", "data.max_image_pixels", "data.resolution", "data.step",
                 "data.min_area_ratio", "data.max_aspect", "data.allow_upscale",
                 "data.merge_small_buckets", "data.keep_duplicates")


def saved_config(state: dict, checkpoint: Path) -> Config:
    """The config in a checkpoint's `state` (its state.json), with its paths made absolute."""
    try:
        return absolute_config(from_dict(Config, state["config"]))
    except (KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{checkpoint / STATE_FILE}: no usable config ({exc})") from None


def find_resume(cfg: Config, resume: str | None, world_size: int) -> Path | None:
    """The checkpoint to resume, None for a new run: `resume` (a run, its checkpoints/ or one
    checkpoint), or the newest of `cfg.run_dir` when it is "".

    Refuses (ConfigError naming what differs) a config whose batch schedule differs from the
    checkpoint's: `SCHEDULE_KEYS` and the global batch (batch_size × processes). Under torchrun
    every rank must find the same checkpoint: ranks on machines that see another run folder (or
    an older state of it) would train from other weights and another position.
    """
    found = all_gather_objects(on_every_rank(lambda: _find_resume(cfg, resume, world_size)))
    if len(set(found)) > 1:
        seen = ", ".join(f"rank {r}: {path}" for r, path in enumerate(found))
        raise ConfigError(f"the ranks found different checkpoints to resume ({seen}); across "
                          "machines the run folder must be on a filesystem every machine shares")
    return found[0]


def _find_resume(cfg: Config, resume: str | None, world_size: int) -> Path | None:
    """`find_resume` on this process alone."""
    if resume is None:
        return None
    path = resolve_resume(resolve_path(resume or cfg.run_dir))
    state = read_state(path)
    before, now = portable_config(saved_config(state, path)), portable_config(cfg)
    changed = [f"{key} {get_dotted(before, key)!r} -> {get_dotted(now, key)!r}"
               for key in SCHEDULE_KEYS if get_dotted(before, key) != get_dotted(now, key)]
    saved_batch = before.batch_size * state.get("world_size", world_size)
    if saved_batch != cfg.batch_size * world_size:
        changed.append(f"global batch (batch_size × processes) {saved_batch} -> "
                       f"{cfg.batch_size * world_size}")
    if changed:
        raise ConfigError(f"{path}: {'; '.join(changed)}: a resumed run keeps the batch "
                          "schedule it was saved with (data, bucketing, global batch, "
                          "accumulation, seed); start a new run to change it")
    return path


def data_state(plan: DataPlan) -> dict:
    """What a checkpoint records about its training images and their schedule, for
    `resume_position`."""
    return {"data_fingerprint": plan.fingerprint(), "num_images": len(plan.records),
            "schedule_version": BatchSchedule.VERSION}


def resume_position(state: dict, plan: DataPlan, checkpoint: Path,
                    main: bool = True) -> tuple[int, int]:
    """The (epoch, index) of the batch after a checkpoint's `state` with this data `plan`.

    The saved position when the training images and their buckets are those the checkpoint was
    saved with (`DataPlan.fingerprint`; checkpoints from before it was recorded are trusted).
    Otherwise the saved index would point into another order of other images, skipping some
    and repeating others, so training goes on from the start of the next epoch, with a warning
    (printed when `main`) saying so. The same holds for a checkpoint saved mid-epoch under an
    older batch schedule (`BatchSchedule.VERSION`; none recorded means 1): its index counts
    batches of another plan.
    """
    epoch, index = int(state["epoch"]), int(state["index"])
    if index and state.get("schedule_version", 1) != BatchSchedule.VERSION:
        if main:
            print(f"note: {checkpoint} was saved with an older batch schedule, which dropped "
                  f"each bucket's remainder; continuing from the start of epoch {epoch + 1} "
                  "with the current one", flush=True)
        return epoch + 1, 0
    saved = state.get("data_fingerprint")
    if saved is None or index == 0 or saved == plan.fingerprint():
        return epoch, index
    if main:
        print(f"warning: {checkpoint}: the training images differ from those it was saved with "
              f"({state.get('num_images', '?')} -> {len(plan.records)} images; added, removed, "
              f"renamed or re-bucketed), so its place in epoch {epoch} no longer exists; "
              f"continuing from the start of epoch {epoch + 1} with the current images",
              flush=True)
    return epoch + 1, 0


def refuse_finished(checkpoint: Path, step: int, max_steps: int) -> None:
    """ConfigError when resuming `checkpoint`, saved at `step`, leaves nothing to train."""
    if step >= max_steps:
        raise ConfigError(f"{checkpoint} is at step {step}, so train.max_steps {max_steps} "
                          "leaves nothing to train; raise --max-steps")


def load_optimizer(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state (moments, step counts) but keep the hyperparameters `opt`
    was built with from this run's config (lr, betas, weight decay...), which
    `load_state_dict` alone would replace with the saved ones."""
    built = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, settings in zip(opt.param_groups, built):
        group.update(settings)


def prepare_run_dir(cfg: Config, resume: Path | None, dist: DistInfo,
                    plan: DataPlan) -> Path:
    """Create the run folder, save the resolved config and the skip list. Called after
    everything that can fail on bad input has been checked.

    Refuses a folder holding checkpoints unless `resume` (the checkpoint being resumed) is one of
    them. Resuming an older one of them first moves the newer ones aside (`set_aside_newer`), so
    that the newest checkpoint is always the branch being trained.
    """
    run_dir = resolve_path(cfg.run_dir)

    def prepare() -> None:
        existing = run_dir / CHECKPOINTS
        ours = resume is not None and resume.parent.resolve() == existing.resolve()
        if not ours and existing.is_dir() and any(existing.glob("step_*")):
            if resume is None:
                raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to "
                                  "continue it or choose another --run-dir")
            raise ConfigError(f"{run_dir} already holds checkpoints of another run; to resume "
                              f"{resume} leave out --run-dir (it continues in "
                              f"{resume.parent.parent}) or choose an empty one")
        if ours:
            moved = set_aside_newer(resume)
            if moved:
                print(f"note: continuing from {resume.name}, so the newer "
                      f"{', '.join(p.name for p in moved)} moved to {moved[0].parent} "
                      "(nothing deleted)", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(portable_config(cfg), run_dir / "config.json")
        (run_dir / "skipped.json").write_text(json.dumps(
            [{"path": s.path, "reason": s.reason} for s in plan.skipped], indent=1) + "\n")

    main_first(dist, prepare)  # a refusal is raised on every process
    return run_dir


def plan_data(cfg: Config, dist: DistInfo) -> DataPlan:
    """Scan and bucket the data, split off the validation images, and build the batch schedule
    for this world size. Under torchrun the ranks split the reading of new or changed files
    between them (`scan_folder`), every rank must end with the same plan, and bad input found
    on any rank stops all of them."""
    buckets = make_buckets(cfg.data.resolution, cfg.data.step, cfg.data.min_area_ratio,
                           cfg.data.max_aspect)
    validation = (on_every_rank(lambda: _scan_validation(cfg, dist, buckets))
                  if cfg.data.eval_dataset else None)
    scanned = bucket_dataset(cfg.data, cfg.batch_size, dist.world_size, progress=dist.is_main,
                             dist=dist, keep_out=None if validation is None else validation[1])
    plan = on_every_rank(lambda: _plan_from_scan(cfg, dist, scanned, validation))
    # The ranks list the folders alike (`scan_folder` refuses otherwise) and share what they
    # read; this check covers what they decide on their own from it.
    views = all_gather_objects((plan.fingerprint(), len(plan.records), len(plan.eval_records)))
    if len(set(views)) > 1:
        seen = ", ".join(f"rank {r}: {n} images, {e} for validation"
                         for r, (_, n, e) in enumerate(views))
        raise ConfigError(f"the ranks see different training data ({seen}; or other names or "
                          "buckets); every machine must see the same dataset, unchanged while "
                          "the run starts")
    return plan


def _scan_validation(cfg: Config, dist: DistInfo, buckets: list[tuple[int, int]]
                     ) -> tuple[ScanResult, ImageTable, PlacementTable, list[SkippedFile]]:
    """The validation folder (`data.eval_dataset`): its scan, its images that cover a bucket
    with their placements, and its skipped files, these images included."""
    scan = scan_folder(resolve_first(cfg.data.eval_dataset, dist),
                       use_classes=cfg.data.use_classes, max_pixels=cfg.data.max_image_pixels,
                       num_workers=cfg.data.num_workers, dist=dist)
    fold_duplicates(scan, cfg.data.keep_duplicates)
    if not scan.records:
        raise ConfigError(f"{cfg.data.eval_dataset}: no usable validation image "
                          f"({len(scan.skipped)} file(s) skipped)")
    images = scan.records
    bucket = nearest_buckets(images.width, images.height, buckets, cfg.data.allow_upscale)
    skipped = list(scan.skipped)
    for row in np.flatnonzero(bucket < 0).tolist():
        w, h = images.size(row)
        skipped.append(SkippedFile(images.path(row), f"too small or too thin: {w}x{h} covers "
                                                     "no bucket (validation image)"))
    fits = np.flatnonzero(bucket >= 0)
    if not fits.size:
        raise ConfigError(f"{cfg.data.eval_dataset}: none of its {len(images)} usable validation "
                          "images covers a bucket (too small or too thin; allow upscaling to "
                          "keep them)")
    images = images.take(fits)
    return scan, images, PlacementTable(images, bucket[fits], buckets), skipped


def _plan_from_scan(cfg: Config, dist: DistInfo, scanned: tuple,
                    validation: tuple | None) -> DataPlan:
    """`plan_data` from the training folder's (scan, buckets, placements) and the validation
    folder's `_scan_validation` (None without one)."""
    scan, buckets, placements = scanned
    if dist.is_main:
        print(scan.summary(), flush=True)
    records = scan.records
    if not records:
        raise ConfigError(f"{scan.root}: no usable image (see the skip list above)")
    skipped = list(scan.skipped)  # with the validation folder's, for skipped.json
    eval_records = None
    if validation is not None:
        eval_scan, eval_records, eval_placements, eval_skipped = validation
        if dist.is_main:
            print(eval_scan.summary(), flush=True)
        skipped += eval_skipped
        unknown = sorted(set(eval_scan.class_names) - set(scan.class_names))
        if unknown:
            raise ConfigError(f"{cfg.data.eval_dataset}: validation classes {unknown} are not "
                              f"among the training classes {scan.class_names}")
        if eval_scan.class_names:  # by name: the folder may hold only some of the classes
            eval_records = eval_records.relabel([scan.class_names.index(name)
                                                 for name in eval_scan.class_names])
            eval_placements = PlacementTable(eval_records, eval_placements.bucket, buckets)
    # Validation images, and every copy of their pictures, stay out of training.
    held, train = split_validation(records, cfg.data, eval_records)
    if validation is None:
        eval_records, eval_placements = records.take(held), placements.take(held)
    copies = len(records) - int(train.sum()) - len(held)
    if copies and dist.is_main:
        print(f"note: {copies} training image(s) are copies of validation images and are left "
              "out of training", flush=True)
    keep = np.flatnonzero(train)
    records = records.take(keep)
    placements = PlacementTable(records, placements.bucket[keep], buckets)
    if not records:
        raise ConfigError(f"data.holdout={cfg.data.holdout} leaves no training image"
                          if validation is None else
                          f"every training image is a copy of a validation image in "
                          f"{cfg.data.eval_dataset}")
    schedule = BatchSchedule(placements.bucket, cfg.batch_size, dist.world_size, cfg.seed)
    if schedule.batches_per_epoch() == 0:
        held = (f" of the {len(records)} left for training after data.holdout="
                f"{cfg.data.holdout}" if cfg.data.holdout and not cfg.data.eval_dataset else "")
        raise ConfigError(f"no bucket holds a global batch of {schedule.global_batch} "
                          f"images{held}; lower --batch-size"
                          f"{' or --holdout' if held else ''}")
    if dist.is_main:
        warn_unused(schedule)
    return DataPlan(records, placements, buckets, schedule, eval_records, eval_placements,
                    scan.class_names, skipped, scan.duplicates)


def warn_unused(schedule: BatchSchedule) -> None:
    """Print how many images sit in buckets too small for one global batch, if any."""
    if schedule.unused_samples():
        print(f"warning: {schedule.unused_samples()} image(s) sit in buckets smaller than one "
              "global batch and are never used", flush=True)


def pixel_loader(cfg: Config, plan: DataPlan, dist: DistInfo, epoch: int, index: int,
                 random_crop: bool = False) -> torch.utils.data.DataLoader:
    """DataLoader of uint8 pixel batches following the schedule from (epoch, index)."""
    dataset = PixelDataset(plan.records, plan.placements, plan.buckets, flip=cfg.data.flip,
                           random_crop=random_crop, max_pixels=cfg.data.max_image_pixels)
    sampler = ScheduleSampler(plan.schedule, dist.rank, cfg.seed, epoch, index)
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                       worker_init_fn=ignore_stop_signals,
                                       pin_memory=dist.device.type == "cuda",
                                       persistent_workers=False,
                                       prefetch_factor=4 if workers else None)


def eval_crops(records: ImageTable, crop: int, limit: int,
               max_pixels: int = DataConfig.max_image_pixels) -> torch.Tensor:
    """Validation images: up to three crop×crop squares per image (start, centre, end of the
    long side) at native scale, or the image resized to cover the square when smaller.
    `max_pixels` is the run's `data.max_image_pixels` (its default when not given): larger
    images are refused as decompression bombs.

    Returns uint8 (N, 3, crop, crop).
    """
    from training.images import crop_to_bucket, load_image

    out = []
    for rec in records[:limit]:
        img = load_image(rec.path, max_pixels)
        w, h = img.size
        scale = max(1.0, crop / w, crop / h)
        rw, rh = max(crop, round(w * scale)), max(crop, round(h * scale))
        spots = [0.0, 0.5, 1.0] if max(rw, rh) >= 2 * crop else [0.5]
        for f in spots:
            left = int((rw - crop) * f) if rw >= rh else (rw - crop) // 2
            top = int((rh - crop) * f) if rh > rw else (rh - crop) // 2
            out.append(crop_to_bucket(img, (rw, rh), (left, top, left + crop, top + crop)))
    if not out:
        return torch.zeros(0, 3, crop, crop, dtype=torch.uint8)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def state_for_json(cfg: Config, step: int, epoch: int, index: int, world_size: int,
                   extra: dict) -> dict:
    """The JSON part of a checkpoint."""
    return {"step": step, "epoch": epoch, "index": index, "world_size": world_size,
            "config": to_dict(portable_config(cfg)), **extra}

