"""The DiT stage: a diffusion transformer trained with rectified flow on cached latents.

One step: take this rank's slice of the next single-bucket global batch from the schedule,
draw fresh latents `mean + σ·ε` from the memory-mapped cache, compute the flow loss under
autocast, all-reduce gradients (DDP), check that loss and gradient norm are finite, step AdamW,
update the EMA. Around it: validation loss per timestep bin on held-out latents, EMA sample
grids at several bucket shapes, checkpoints, and a clean stop on SIGTERM/SIGINT.

The next micro-batch is read from the cache on a background thread while the current one
trains (`BatchPrefetcher`): its samples, noise and flips depend only on the schedule and the
step index, so reading ahead changes no number, and the loop rarely waits for data.

Under torchrun every rank draws a micro-step's randomness (the latents' ε, then the flow's t,
noise and label dropout) for the whole global batch from generators seeded without the rank,
and keeps its own slice (`part` = (rank, world size)), so a run does not depend on how its
batch is split across processes: 2 ranks × batch 2 train as 1 rank × batch 4 does. The world
size × more draws are negligible next to the model.
"""

from __future__ import annotations

import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from bucketing import BatchSchedule, assign
from inference.pipelines import generate, image_grid, parse_size, tensor_to_pil
from models.dit import DiT, upgrade_state_dict
from models.registry import MODEL_NAMES, build_dit
from models.vae import AutoencoderKL
from models.vae_weights import kept_vae_folder, load_vae, vae_fingerprint
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import Config, ConfigError, portable_path, resolve_path, validate_config
from training.data import ScheduleSampler
from training.distributed import DistInfo, agree, setup, teardown
from training.ema import EMA
from training.flow import RectifiedFlow
from training.latent_cache.build import ensure_cache
from training.latent_cache.read import LatentReader, flip_from_seed, step_generator
from training.logging import RunLogger
from training.loop import (NonFiniteGuard, StepRate, StopSignal, checkpoint_due, clip_and_check,
                           lr_factor, stopped)
from training.plan import plan_data, warn_unused
from training.resume import (data_state, find_resume, load_optimizer, prepare_run_dir,
                             refuse_finished, resume_position, state_for_json)
from training.runtime import autocast, autocast_dtype, keep_freed_memory, seed_everything


def load_stage_vae(cfg: Config, device: torch.device) -> AutoencoderKL:
    """The VAE named by `dit.vae`, in fp32 and eval mode; errors name the path."""
    path = resolve_path(cfg.dit.vae)
    if not path.exists():
        raise FileNotFoundError(f"{path}: VAE not found (set --vae to a folder, config.json or "
                                "weights file)")
    return load_vae(path, device=device).float().eval().requires_grad_(False)


def flow_generator(noise_gen: torch.Generator, device: torch.device) -> torch.Generator:
    """The generator of a micro-step's flow times and noise on `device`, seeded from
    `noise_gen`, the CPU generator that drew the latent sample x0 (`cache.step_generator`),
    after that draw (of the global batch's ε, so the seed is the same on every rank).

    Seeding it with `noise_gen`'s own seed instead would, on a CPU (the same generator
    algorithm), replay x0's noise as the flow's noise, which rectified flow assumes
    independent of x0.
    """
    return torch.Generator(device).manual_seed(
        int(torch.randint(2**62, (), generator=noise_gen)))


def check_resume_compatible(cfg: Config, state: dict, class_names: list[str],
                            vae: AutoencoderKL, fingerprint: str, path: Path) -> None:
    """Refuse a checkpoint of another model, class set or VAE (`fingerprint`, that of `vae`,
    against the checkpoint's where it records one). When a VAE export replaced the recorded
    VAE and kept it (`models.vae.kept_vae_folder`), the error names that folder for `--vae`."""
    saved = state.get("config", {})
    problems = []
    if saved.get("stage") != "dit":
        problems.append(f"stage {saved.get('stage')!r}")
    if saved.get("dit", {}).get("model") != cfg.dit.model:
        problems.append(f"model {saved.get('dit', {}).get('model')!r} vs {cfg.dit.model!r}")
    theirs = state.get("class_names", [])
    if theirs != class_names:
        gone, new = sorted(set(theirs) - set(class_names)), sorted(set(class_names) - set(theirs))
        problems.append(f"classes only in the checkpoint {gone[:5]}, only in the data {new[:5]}")
    latent = vae.config.latent_channels
    if state.get("latent_channels") != latent:
        problems.append(f"{state.get('latent_channels')} latent channels vs {latent}")
    elif state.get("vae_fingerprint", fingerprint) != fingerprint:
        kept = kept_vae_folder(resolve_path(state.get("vae") or cfg.dit.vae),
                               state["vae_fingerprint"])
        problems.append(f"VAE fingerprint {state['vae_fingerprint'][:12]} vs {fingerprint[:12]}"
                        + (f"; the VAE it was trained with was kept in {kept}: resume with "
                           f"--vae {kept}" if kept.is_dir() else ""))
    if problems:
        raise ConfigError(f"{path}: checkpoint is of another model ({'; '.join(problems)})")


def train_dit(cfg: Config, resume: str | None = None) -> Path:
    """Run the DiT stage; returns the run folder. A signal that stops it before
    `train.max_steps` raises `TrainingStopped` once the checkpoint is saved."""
    validate_config(cfg)  # also when called from Python, not train.py
    info = setup(cfg.train.device)
    try:
        return _train(cfg, resume, info)
    finally:
        teardown()


PREVIEW_ASPECTS = (1.0, 5 / 3, 3 / 5)  # width / height of the default preview grids
# Images per VAE encoder call when building the latent caches: the training batch, but at
# least this many. The build encodes under inference mode (no activations kept for a backward
# pass), so it can take more at once than a training step, and a small training batch (1 or 2)
# does not turn it into many small encoder calls.
MIN_CACHE_ENCODE_BATCH = 8
# Held-out latents per validation forward pass (grouped by bucket): bounds the pass's memory.
# The validation noise depends on each chunk's shape (`RectifiedFlow.validation_losses`), so
# changing it changes the reported losses and their comparison with earlier runs.
VAL_CHUNK = 16


def preview_sizes(sizes: list[str], buckets: list[tuple[int, int]],
                  step_px: int) -> list[tuple[int, int]]:
    """(width, height) in pixels of the preview grids: `sizes` ("WxH") rounded down to whole
    tokens (multiples of `step_px`), or when empty the buckets of the run nearest in aspect to
    `PREVIEW_ASPECTS` (ties: the larger), so the previews follow `data.resolution`."""
    if sizes:
        out = [parse_size(size) for size in sizes]
        return [(max(step_px, w // step_px * step_px), max(step_px, h // step_px * step_px))
                for w, h in out]
    grid = np.asarray(buckets)
    # an image far larger than any bucket, of the aspect wanted, covers them all
    picks = [buckets[assign(round(10_000 * a), 10_000, grid).bucket] for a in PREVIEW_ASPECTS]
    return list(dict.fromkeys(picks))  # distinct, in order


# One sample of a scheduled batch, as `ScheduleSampler` yields them:
# (sample index, augment seed, epoch, batch index).
ScheduleItem = tuple[int, int, int, int]


class BatchPrefetcher:
    """Reads the next micro-batch from the latent cache on one background thread while the
    current one trains.

    `get()` returns (schedule items, the noise generator that drew x0 (`cache.step_generator`),
    x0 (B, C, h, w), the class labels (B,) or None when `labels` is None) for global micro-steps
    `start`, `start + 1`, ... in turn; x0 and the labels are on the CPU, pinned when training on
    CUDA, so that both copies to the device are asynchronous. (A tensor made on the device from a
    Python list is a synchronous copy: it waits for every kernel queued before it, here the
    previous step's optimizer and EMA updates.) One read is in flight at a time, so the reader
    and the schedule iterator are never used by two threads at once.
    """

    def __init__(self, reader: LatentReader, batches: Iterator[list[ScheduleItem]],
                 labels: Sequence[int] | None, seed: int, part: tuple[int, int], flip: bool,
                 pin: bool, start: int) -> None:
        self.reader, self.batches, self.labels = reader, batches, labels
        self.seed, self.part, self.flip, self.pin = seed, part, flip, pin
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="latent-prefetch")
        self.pending = self.pool.submit(self._read, start)

    def _read(self, k: int) -> tuple[int, list[ScheduleItem], torch.Generator, torch.Tensor,
                                     torch.Tensor | None]:
        items = next(self.batches)
        noise_gen = step_generator(self.seed, k)
        flips = [flip_from_seed(s) for _, s, _, _ in items] if self.flip else None
        indices = [i for i, _, _, _ in items]
        x0 = self.reader.batch(indices, noise_gen, flips, self.part)  # (B, C, h, w)
        y = None if self.labels is None else torch.tensor([int(self.labels[i])
                                                           for i in indices])  # (B,) int64
        if self.pin:
            x0, y = x0.pin_memory(), None if y is None else y.pin_memory()
        return k, items, noise_gen, x0, y

    def get(self) -> tuple[list[ScheduleItem], torch.Generator, torch.Tensor,
                           torch.Tensor | None]:
        """The next micro-batch (waiting for its read if needed); starts reading the one after."""
        k, items, noise_gen, x0, y = self.pending.result()
        self.pending = self.pool.submit(self._read, k + 1)
        return items, noise_gen, x0, y

    def close(self) -> None:
        """Wait for the read in flight and stop the thread."""
        self.pool.shutdown(wait=True)


def _train(cfg: Config, resume: str | None, info: DistInfo) -> Path:
    t, d = cfg.train, cfg.dit
    device, main = info.device, info.is_main
    if d.model not in MODEL_NAMES:
        raise ConfigError(f"unknown model {d.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    seed_everything(cfg.seed)
    keep_freed_memory()  # no page faults re-zeroing activations every step
    resume_path = find_resume(cfg, resume, info.world_size)
    vae = load_stage_vae(cfg, device)
    fingerprint = vae_fingerprint(vae)  # once: the resume check and the cache keys use it
    plan = plan_data(cfg, info)
    num_classes = len(plan.class_names)
    model: DiT = build_dit(d.model, vae.config.latent_channels, num_classes).to(device)
    step_px = vae.downsample_factor * model.config.patch_size
    if cfg.data.step % step_px:
        raise ConfigError(f"data.step {cfg.data.step} must be a multiple of VAE factor × patch "
                          f"= {step_px}")
    model.gradient_checkpointing = t.grad_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, d.adam_beta2),
                            weight_decay=t.weight_decay, fused=True)
    ema = EMA(model, t.ema_decay)
    step, epoch, index, saved_state = 0, 0, 0, None
    if resume_path is not None:  # refuse another model before anything is written
        ckpt = load_checkpoint(resume_path)
        check_resume_compatible(cfg, ckpt.state, plan.class_names, vae, fingerprint,
                                resume_path)
        model.load_state_dict(ckpt.group("model"))
        ema.load_state_dict(upgrade_state_dict(ckpt.group("ema")), ckpt.state["ema_updates"])
        load_optimizer(opt, ckpt.torch_state["optimizer"])
        step, saved_state = ckpt.step, ckpt.state  # (epoch, index) once the images are known
        refuse_finished(resume_path, step, t.max_steps)
    run_dir = prepare_run_dir(cfg, resume_path, info, plan)
    if main and resume_path is not None:  # once nothing is left to refuse it
        print(f"resumed from {resume_path} at step {step}", flush=True)

    # Latent cache: build or update, then read from memory-mapped shards.
    cache_dir = resolve_path(d.cache_dir) if d.cache_dir else None
    build = dict(flip=cfg.data.flip, batch_size=max(cfg.batch_size, MIN_CACHE_ENCODE_BATCH),
                 num_workers=cfg.data.num_workers, dist_info=info,
                 max_pixels=cfg.data.max_image_pixels, progress=main, fingerprint=fingerprint)
    summary = ensure_cache(plan.records, plan.placements, plan.buckets, vae, cache_dir, **build)
    if main:
        print(summary.format(), flush=True)
    keys = summary.keys
    if summary.unusable:  # reported above; train on the rest
        keep = np.setdiff1d(np.arange(len(plan.records)), summary.unusable)
        plan.records = plan.records.take(keep)
        plan.placements = plan.placements.take(keep)
        keys = keys[keep]  # (kept, O, 32) digests
        plan.schedule = BatchSchedule(plan.placements.bucket, cfg.batch_size,
                                      info.world_size, cfg.seed)
        if main:  # their buckets stay as they were cached, so some may now be too small
            warn_unused(plan.schedule)
    if saved_state is not None:
        epoch, index = resume_position(saved_state, plan, resume_path, main)
    data = data_state(plan)  # recorded in every checkpoint
    reader = LatentReader(summary.cache_dir, keys, vae.config.latent_affine())
    # Validation set: chunks of one bucket each, val_x[k] (n_k, C, h, w) with labels val_y[k]
    # (n_k,), n_k <= VAL_CHUNK.
    val_x: list[torch.Tensor] = []
    val_y: list[torch.Tensor] = []
    if plan.eval_records and main:
        n = min(d.val_images, len(plan.eval_records))
        val = ensure_cache(plan.eval_records[:n], plan.eval_placements[:n], plan.buckets, vae,
                           cache_dir, **{**build, "flip": False, "dist_info": None})
        print(val.format(), flush=True)
        unusable = set(val.unusable)  # reported by that summary; validate on the rest
        usable = [i for i in range(n) if i not in unusable]
        # raw moments: their means are normalised by the VAE below
        val_reader = LatentReader(val.cache_dir, val.keys[usable])
        groups = defaultdict(list)  # bucket -> positions in the reader, i.e. in `usable`
        for pos, i in enumerate(usable):
            groups[plan.eval_placements[i].bucket].append(pos)
        for members in groups.values():
            for j in range(0, len(members), VAL_CHUNK):
                chunk = members[j:j + VAL_CHUNK]
                mean, _ = val_reader.moments(chunk)  # the posterior mean: a fixed target
                val_x.append(vae.normalize(mean))  # (len(chunk), C, h, w)
                val_y.append(torch.tensor([plan.eval_records[usable[p]].label for p in chunk]))
        val_reader.close()

    flow = RectifiedFlow(num_classes, model.config.patch_size, d.base_tokens, d.logit_mean,
                         d.logit_std, d.label_dropout)
    if main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{d.model}: {n_params / 1e6:.2f}M parameters, {num_classes or 'no'} classes, "
              f"{vae.config.latent_channels} latent channels", flush=True)

    train_model = model
    if info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    amp = autocast_dtype(t.precision, device)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)  # eager: previews, validation
    if t.compile:
        model.compile_blocks()  # in place, so DDP and checkpoints see the same module
    part = (info.rank, info.world_size)  # this rank's slice of every step's random draws
    batches = BatchPrefetcher(reader, iter(ScheduleSampler(plan.schedule, info.rank, cfg.seed,
                                                           epoch, index)),
                              plan.records.label if num_classes else None,
                              cfg.seed, part, cfg.data.flip, device.type == "cuda",
                              start=step * t.grad_accum)
    logger = RunLogger(run_dir, main, resumed_step=step if resume_path is not None else None)
    stop = StopSignal()
    guard = NonFiniteGuard(t.max_nonfinite)
    params = list(model.parameters())
    bar = tqdm(total=t.max_steps, initial=step, disable=not main, dynamic_ncols=True)

    def checkpoint() -> None:
        if main:
            extra = {"stage": "dit", "ema_updates": ema.num_updates,
                     "num_classes": num_classes, "latent_channels": vae.config.latent_channels,
                     "class_names": plan.class_names,
                     "model_config": model.config.to_dict(),
                     "vae": portable_path(resolve_path(d.vae)),
                     "vae_fingerprint": summary.fingerprint, **data}
            save_checkpoint(run_dir, step, {"model": model.state_dict(),
                                            "ema": ema.state_dict()},
                            {"optimizer": opt.state_dict()},
                            state_for_json(cfg, step, epoch, index, info.world_size, extra),
                            keep_last=t.keep_last)
            logger.flush()  # the events logged up to the checkpoint reach disk with it

    grid_sizes = preview_sizes(d.sample_sizes, plan.buckets, step_px)

    def previews() -> None:
        ema.copy_to(ema_model)
        samples_dir = run_dir / "samples"
        samples_dir.mkdir(exist_ok=True)
        for k, (w, h) in enumerate(grid_sizes):
            if stop.received:  # a stop request must not wait for the remaining grids
                return
            labels = [i % num_classes for i in range(d.num_samples)] if num_classes else None
            images = generate(ema_model, vae, h, w, d.num_samples, labels, d.cfg_scale,
                              d.sample_steps, seed=cfg.seed + k, base_tokens=d.base_tokens,
                              autocast_dtype=amp)
            grid = image_grid(images)  # (3, H', W') in [-1, 1]
            logger.image(f"samples/{w}x{h}", (grid + 1) / 2, step)
            tensor_to_pil(grid).save(samples_dir / f"step_{step:07d}_{w}x{h}.png")

    def validate() -> None:
        ema.copy_to(ema_model)
        per_bin, count = torch.zeros(d.val_bins), 0  # (bins,): sample-weighted loss sums
        with autocast(device, amp):
            for x0, y in zip(val_x, val_y):  # (n_k, C, h, w), (n_k,)
                losses = flow.validation_losses(ema_model, x0.to(device),
                                                y.to(device) if num_classes else None,
                                                d.val_bins, seed=cfg.seed)  # (bins,)
                per_bin += losses.float().cpu() * len(x0)
                count += len(x0)
        per_bin /= count  # (bins,): mean loss per timestep bin
        values = {f"val/loss_bin{i}": float(v) for i, v in enumerate(per_bin)}
        values["val/loss"] = float(per_bin.mean())
        logger.scalars(values, step)
        bar.write(f"step {step}: validation loss {values['val/loss']:.4f}")

    rate = StepRate(step)
    bucket_losses: dict[str, list[float]] = defaultdict(list)
    try:
        while step < t.max_steps:
            for group in opt.param_groups:
                group["lr"] = t.lr * lr_factor(step, t.warmup_steps, t.max_steps, t.lr_schedule)
            total, files = torch.zeros((), device=device), []
            for micro in range(t.grad_accum):
                with rate.waiting():
                    # micro-step step * grad_accum + micro
                    items, noise_gen, x0, y = batches.get()
                    x0 = x0.to(device, non_blocking=True)  # (B, C, h, w)
                    y = None if y is None else y.to(device, non_blocking=True)  # (B,)
                indices = [i for i, _, _, _ in items]
                epoch, index = items[0][2], items[0][3] + 1
                files += [plan.records[i].path for i in indices]
                gen = flow_generator(noise_gen, device)
                sync = micro == t.grad_accum - 1 or info.world_size == 1
                no_sync = contextlib.nullcontext() if sync else train_model.no_sync()
                with no_sync, autocast(device, amp):
                    per_sample = flow.loss(train_model, x0, y, gen, part)  # (B,)
                    loss = per_sample.mean()
                (loss / t.grad_accum).backward()
                total += loss.detach() / t.grad_accum
                bw, bh = x0.shape[-1] * vae.downsample_factor, x0.shape[-2] * vae.downsample_factor
                if main:  # read at log time (no sync), which only the main process does
                    bucket_losses[f"{bw}x{bh}"].append(loss.detach())
            total, stopping = agree(total, stop.received is not None)  # the same on every rank
            grad_norm = clip_and_check(params, t.grad_clip)
            if guard.ok(step + 1, total, grad_norm, files):  # numbered as it is logged
                opt.step()
                ema.update(model)
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if main and (step % t.log_every == 0 or step == 1):
                values = {"train/loss": total.item(), "train/lr": opt.param_groups[0]["lr"],
                          "train/grad_norm": grad_norm.item(),
                          **rate.scalars(step, t.grad_accum * cfg.batch_size * info.world_size)}
                values.update({f"loss_bucket/{k}": torch.stack(v).mean().item()
                               for k, v in bucket_losses.items()})
                logger.scalars(values, step)
                bar.set_postfix(loss=f"{total.item():.4f}")
                bucket_losses.clear()
            # Save first: a failure in validation or previews then loses no training. A stop
            # request skips them (it is acted on at the next step): the scheduler's grace period
            # after SIGTERM is short, and they can take longer than a step.
            with rate.pause():
                if checkpoint_due(step, t, stopping):
                    checkpoint()
                if stopping:
                    break
                due = step == t.max_steps
                if main and val_x and not stop.received and (step % t.eval_every == 0 or due):
                    validate()
                if main and not stop.received and (step % t.sample_every == 0 or due):
                    previews()
    finally:  # also when the loop raised: stop the prefetch thread, free the shards
        batches.close()
        reader.close()
        stop.restore()
    bar.close()
    logger.close()
    if step < t.max_steps:  # stopped early by a signal (at the last step it is done anyway)
        stopped(stop, step, run_dir)
    return run_dir

