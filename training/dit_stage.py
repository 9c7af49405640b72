"""The DiT stage: a diffusion transformer trained with rectified flow on cached latents.

One step: take this rank's slice of the next single-bucket global batch from the schedule,
draw fresh latents `mean + σ·ε` from the memory-mapped cache, compute the flow loss under
autocast, all-reduce gradients (DDP), check that loss and gradient norm are finite, step AdamW,
update the EMA. Around it: validation loss per timestep bin on held-out latents, EMA sample
grids at several bucket shapes, FID/KID of EMA samples (`training/quality.py`), checkpoints,
and a clean stop on SIGTERM/SIGINT.

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

import copy
from concurrent.futures import ThreadPoolExecutor
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from bucketing import BatchSchedule, ScheduleSampler, assign
from inference.pipelines import generate, image_grid, parse_size, tensor_to_pil
from models.dit import DiT, upgrade_state_dict
from models.registry import MODEL_NAMES, build_dit
from models.vae import AutoencoderKL
from models.vae_weights import kept_vae_folder, load_vae, vae_fingerprint
from training.checkpoint import load_checkpoint
from training.conditions import RunCondition, check_text_resume, run_condition
from training.config import Config, ConfigError, portable_path, resolve_path, validate_config
from training.distributed import DistInfo, setup, teardown
from training.flow import RectifiedFlow
from training.latent_cache.build import ensure_cache
from training.latent_cache.read import LatentReader, flip_from_seed, step_generator
from training.logging import RunLogger
from training.loop import EMA, Batch, StageSteps, train_loop
from training.plan import DataPlan, plan_data, warn_unused
from training.quality import SampleQuality, dit_quality, open_inception
from training.resume import (data_state, find_resume, load_optimizer, prepare_run_dir,
                             refuse_finished, resume_position)
from training.runtime import (autocast_dtype, keep_freed_memory, seed_everything,
                              set_threads)


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
                            vae: AutoencoderKL, fingerprint: str, path: Path,
                            text: dict | None = None) -> None:
    """Refuse a checkpoint of another model, class set, text encoder (`text`, this run's
    `RunCondition.state`) or VAE (`fingerprint`, that of `vae`, against the checkpoint's where
    it records one). When a VAE export replaced the recorded VAE and kept it
    (`models.vae.kept_vae_folder`), the error names that folder for `--vae`."""
    saved = state.get("config", {})
    problems = []
    text_problem = check_text_resume(state.get("text", {}), text or {})
    if text_problem:
        problems.append(text_problem)
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
    threads = torch.get_num_threads()  # the stage sets its own (`set_threads`)
    try:
        return _train(cfg, resume, info)
    finally:
        torch.set_num_threads(threads)
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
    current one trains, and yields them as the loop's `Batch`es.

    A batch's data is (x0 (B, C, h, w) on the device, its condition (`cond_of(sample indices,
    augment seeds)`, `RunCondition.train`; None without) on the device, the noise generator
    that drew x0 (`step_generator` of global micro-step k = start, start + 1, ...)). x0 and
    the condition are read on the CPU and pinned when training on CUDA, so that both copies to
    the device are asynchronous. (A tensor made on the device from a Python list is a
    synchronous copy: it waits for every kernel queued before it, here the previous step's
    optimizer and EMA updates.) One read is in flight at a time, so the reader and the
    schedule iterator are never used by two threads at once.
    """

    def __init__(self, reader: LatentReader, items: Iterator[list[ScheduleItem]],
                 cond_of: Callable[[list[int], list[int]], Any] | None, seed: int,
                 part: tuple[int, int], flip: bool, device: torch.device, start: int) -> None:
        self.reader, self.items, self.cond_of = reader, items, cond_of
        self.seed, self.part, self.flip = seed, part, flip
        self.device, self.pin = device, device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="latent-prefetch")
        self.pending = self.pool.submit(self._read, start)

    def _read(self, k: int) -> tuple[int, list[ScheduleItem], torch.Generator, torch.Tensor,
                                     torch.Tensor | None]:
        items = next(self.items)
        noise_gen = step_generator(self.seed, k)
        flips = [flip_from_seed(s) for _, s, _, _ in items] if self.flip else None
        indices = [i for i, _, _, _ in items]
        x0 = self.reader.batch(indices, noise_gen, flips, self.part)  # (B, C, h, w)
        cond = (None if self.cond_of is None
                else self.cond_of(indices, [s for _, s, _, _ in items]))
        if self.pin:
            x0, cond = x0.pin_memory(), None if cond is None else cond.pin_memory()
        return k, items, noise_gen, x0, cond

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        """The next micro-batch (waiting for its read if needed); starts reading the one after."""
        k, items, noise_gen, x0, cond = self.pending.result()
        self.pending = self.pool.submit(self._read, k + 1)
        x0 = x0.to(self.device, non_blocking=True)  # (B, C, h, w)
        cond = None if cond is None else cond.to(self.device, non_blocking=True)
        epoch, index = items[0][2], items[0][3]
        return Batch((x0, cond, noise_gen), [i for i, _, _, _ in items], (epoch, index + 1))

    def close(self) -> None:
        """Wait for the read in flight and stop the thread."""
        self.pool.shutdown(wait=True)


def _train(cfg: Config, resume: str | None, info: DistInfo) -> Path:
    """`train_dit` once the process group is set up: the stage's setup, then `train_loop`."""
    d, device, main = cfg.dit, info.device, info.is_main
    if d.model not in MODEL_NAMES:
        raise ConfigError(f"unknown model {d.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    inception = open_inception(cfg, info)  # a bad file is refused before any work
    seed_everything(cfg.seed)
    # The latent cache build decodes images in `data.num_workers` processes beside the encoder;
    # training then reads the cache in a thread, so it takes every CPU (set below, printed).
    set_threads(cfg.train.threads, cfg.data.num_workers, main=False)
    keep_freed_memory()  # no page faults re-zeroing activations every step
    resume_path = find_resume(cfg, resume, info.world_size)
    vae = load_stage_vae(cfg, device)
    fingerprint = vae_fingerprint(vae)  # once: the resume check and the cache keys use it
    plan = plan_data(cfg, info)
    run = run_condition(cfg, plan, info)  # frozen text encoders cache every caption here
    model = build_dit(d.model, vae.config.latent_channels, **run.model_fields).to(device)
    model.condition = run.condition
    step_px = vae.downsample_factor * model.config.patch_size
    if cfg.data.step % step_px:
        raise ConfigError(f"data.step {cfg.data.step} must be a multiple of VAE factor × patch "
                          f"= {step_px}")
    model.gradient_checkpointing = cfg.train.grad_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, d.adam_beta2),
                            weight_decay=cfg.train.weight_decay, fused=True)
    ema = EMA(model, cfg.train.ema_decay)
    step, saved_state = 0, None
    if resume_path is not None:  # refuse another model before anything is written
        ckpt = load_checkpoint(resume_path)
        check_resume_compatible(cfg, ckpt.state, plan.class_names, vae, fingerprint,
                                resume_path, run.state)
        model.load_state_dict(ckpt.group("model"))
        ema.load_state_dict(upgrade_state_dict(ckpt.group("ema")), ckpt.state["ema_updates"])
        load_optimizer(opt, ckpt.torch_state["optimizer"])
        step, saved_state = ckpt.step, ckpt.state  # (epoch, index) once the images are known
        refuse_finished(resume_path, step, cfg.train.max_steps)
    run_dir = prepare_run_dir(cfg, resume_path, info, plan)
    if main and resume_path is not None:  # once nothing is left to refuse it
        print(f"resumed from {resume_path} at step {step}", flush=True)
    reader, fingerprint = cache_latents(cfg, plan, vae, info, fingerprint)
    epoch, index = (resume_position(saved_state, plan, resume_path, main)
                    if saved_state is not None else (0, 0))
    val = validation_latents(cfg, plan, vae, info, fingerprint, run.evaluate) if main else []
    set_threads(cfg.train.threads, 0, main)  # no worker processes from here on
    if main:
        n_params = sum(p.numel() for p in model.parameters())
        conditioned = (f"captions ({cfg.text.encoder} text encoder)" if cfg.data.captions
                       else f"{len(plan.class_names) or 'no'} classes")
        print(f"{d.model}: {n_params / 1e6:.2f}M parameters, {conditioned}, "
              f"{vae.config.latent_channels} latent channels", flush=True)
    train_model = model
    if info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model.compile_blocks()  # in place, so DDP and checkpoints see the same module
    logger = RunLogger(run_dir, main, resumed_step=step if resume_path is not None else None)
    batches = BatchPrefetcher(reader, iter(ScheduleSampler(plan.schedule, info.rank, cfg.seed,
                                                           epoch, index)),
                              run.train, cfg.seed, (info.rank, info.world_size),
                              cfg.data.flip, device, start=step * cfg.train.grad_accum)
    extra = {"stage": "dit", "num_classes": len(plan.class_names),
             "latent_channels": vae.config.latent_channels, "class_names": plan.class_names,
             "model_config": model.config.to_dict(), "vae": portable_path(resolve_path(d.vae)),
             "vae_fingerprint": fingerprint, "text": run.state, **data_state(plan)}
    meter = dit_quality(cfg, info, inception, plan.records,
                        preview_sizes([], plan.buckets, step_px)[0], len(plan.class_names), step,
                        autocast_dtype(cfg.train.precision, device), logger, run_dir)
    steps = dit_steps(cfg, info, model, train_model, ema, opt, vae, plan, run, val, logger,
                      run_dir, extra, meter)
    samples_per_step = cfg.train.grad_accum * cfg.batch_size * info.world_size
    try:
        train_loop(cfg, info, run_dir, step, batches, steps, model, opt, ema, logger,
                   samples_per_step, train_model if info.world_size > 1 else None)
    finally:  # also when the loop raised: stop the prefetch thread, free the shards
        batches.close()
        reader.close()
        logger.close()
    return run_dir


def cache_latents(cfg: Config, plan: DataPlan, vae: AutoencoderKL, info: DistInfo,
                  fingerprint: str) -> tuple[LatentReader, str]:
    """Build or update the latent cache of the plan's training images and open it for reading;
    returns the reader and the VAE fingerprint. Images that fail to encode are reported and
    leave the plan (and its schedule)."""
    main = info.is_main
    build = dict(flip=cfg.data.flip, batch_size=max(cfg.batch_size, MIN_CACHE_ENCODE_BATCH),
                 num_workers=cfg.data.num_workers, dist_info=info,
                 max_pixels=cfg.data.max_image_pixels, progress=main, fingerprint=fingerprint)
    cache_dir = resolve_path(cfg.dit.cache_dir) if cfg.dit.cache_dir else None
    summary = ensure_cache(plan.records, plan.placements, plan.buckets, vae, cache_dir, **build)
    if main:
        print(summary.format(), flush=True)
    locations = summary.locations  # of every record's entries
    if summary.unusable:  # reported above; train on the rest
        keep = np.setdiff1d(np.arange(len(plan.records)), summary.unusable)
        plan.records = plan.records.take(keep)
        if plan.captions is not None:
            plan.captions = plan.captions.take(keep)
        plan.placements = plan.placements.take(keep)
        locations = locations.take(keep)
        plan.schedule = BatchSchedule(plan.placements.bucket, cfg.batch_size,
                                      info.world_size, cfg.seed)
        if main:  # their buckets stay as they were cached, so some may now be too small
            warn_unused(plan.schedule)
    return (LatentReader(summary.cache_dir, locations, vae.config.latent_affine()),
            summary.fingerprint)


def validation_latents(cfg: Config, plan: DataPlan, vae: AutoencoderKL, info: DistInfo,
                       fingerprint: str, cond_of: Callable[[list[int]], Any] | None
                       ) -> list[tuple[torch.Tensor, Any]]:
    """The held-out images' normalised posterior means, cached like the training latents, in
    chunks of one bucket each: [(x0 (n_k, C, h, w), their condition (`cond_of` of their
    validation rows; None without))] with n_k <= VAL_CHUNK."""
    if not len(plan.eval_records):
        return []
    n = min(cfg.dit.val_images, len(plan.eval_records))
    cache_dir = resolve_path(cfg.dit.cache_dir) if cfg.dit.cache_dir else None
    val = ensure_cache(plan.eval_records[:n], plan.eval_placements[:n], plan.buckets, vae,
                       cache_dir, flip=False, batch_size=max(cfg.batch_size,
                                                             MIN_CACHE_ENCODE_BATCH),
                       num_workers=cfg.data.num_workers, max_pixels=cfg.data.max_image_pixels,
                       progress=info.is_main, fingerprint=fingerprint)
    print(val.format(), flush=True)
    unusable = set(val.unusable)  # reported by that summary; validate on the rest
    usable = [i for i in range(n) if i not in unusable]
    # raw moments: their means are normalised by the VAE below
    val_reader = LatentReader(val.cache_dir, val.locations.take(usable))
    groups = defaultdict(list)  # bucket -> positions in the reader, i.e. in `usable`
    for pos, i in enumerate(usable):
        groups[plan.eval_placements[i].bucket].append(pos)
    chunks = []
    for members in groups.values():
        for j in range(0, len(members), VAL_CHUNK):
            chunk = members[j:j + VAL_CHUNK]
            mean, _ = val_reader.moments(chunk)  # the posterior mean: a fixed target
            rows = [usable[p] for p in chunk]
            chunks.append((vae.normalize(mean),  # (len(chunk), C, h, w)
                           None if cond_of is None else cond_of(rows)))
    val_reader.close()
    return chunks


def validation_loss(flow: RectifiedFlow, model: DiT, val: list[tuple[torch.Tensor, Any]],
                    bins: int, seed: int) -> torch.Tensor:
    """The mean loss (bins,) of the validation chunks `val` (`validation_latents`) per timestep
    bin, each chunk weighted by its size."""
    device = next(model.parameters()).device
    per_bin, count = torch.zeros(bins), 0  # (bins,): sample-weighted loss sums
    for x0, cond in val:  # (n_k, C, h, w), n_k conditions or None
        losses = flow.validation_losses(model, x0.to(device),
                                        None if cond is None else cond.to(device), bins,
                                        seed=seed)  # (bins,)
        per_bin += losses.float().cpu() * len(x0)
        count += len(x0)
    return per_bin / count


def dit_steps(cfg: Config, info: DistInfo, model: DiT, train_model: torch.nn.Module, ema: EMA,
              opt: torch.optim.Optimizer, vae: AutoencoderKL, plan: DataPlan, run: RunCondition,
              val: list[tuple[torch.Tensor, Any]], logger: RunLogger, run_dir: Path,
              extra: dict, meter: SampleQuality | None) -> StageSteps:
    """The DiT stage's part of each step (`training/loop.py`): the flow loss of a micro-batch,
    the EMA update, the loss per bucket for the log, validation loss per timestep bin, EMA
    sample grids, FID/KID of EMA samples (`meter`), and what a checkpoint holds."""
    d, device, main = cfg.dit, info.device, info.is_main
    amp = autocast_dtype(cfg.train.precision, device)
    part = (info.rank, info.world_size)  # this rank's slice of every step's random draws
    flow = RectifiedFlow(model.condition if run.conditional else None, model.config.patch_size,
                         d.base_tokens, d.logit_mean, d.logit_std, run.dropout,
                         d.direction_loss)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)  # eager: previews, validation
    f = vae.downsample_factor
    grid_sizes = preview_sizes(d.sample_sizes, plan.buckets, f * model.config.patch_size)
    bucket_losses: dict[str, list[torch.Tensor]] = defaultdict(list)

    def loss(data: tuple) -> torch.Tensor:
        x0, cond, noise_gen = data
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            per_sample = flow.loss(train_model, x0, cond, flow_generator(noise_gen, device),
                                   part)  # (B,)
            value = per_sample.mean()
        if main:  # read at log time (no sync), which only the main process does
            bucket_losses[f"{x0.shape[-1] * f}x{x0.shape[-2] * f}"].append(value.detach())
        return value

    def update(finite: bool) -> None:  # the loop updates the EMA
        pass

    def scalars() -> dict[str, float]:
        values = {f"loss_train_by_bucket/{k}": torch.stack(v).mean().item()
                  for k, v in bucket_losses.items()}
        bucket_losses.clear()
        return values

    def payload() -> tuple[dict, dict, dict]:
        return ({"model": model.state_dict(), "ema": ema.state_dict()},
                {"optimizer": opt.state_dict()}, {**extra, "ema_updates": ema.num_updates})

    def validate(step: int) -> None:
        if not val:
            return
        ema.copy_to(ema_model)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            per_bin = validation_loss(flow, ema_model, val, d.val_bins, cfg.seed)
        # the loss at each bin's midpoint t (0: the clean latent, 1: pure noise)
        values = {f"loss_val_at_t/{(i + 0.5) / d.val_bins:.3f}": float(v)
                  for i, v in enumerate(per_bin)}
        values["loss/val"] = float(per_bin.mean())
        logger.scalars(values, step)
        tqdm.write(f"step {step}: validation loss {values['loss/val']:.4f}")

    def preview(step: int, stop_requested: Callable[[], bool]) -> None:
        ema.copy_to(ema_model)
        samples_dir = run_dir / "samples"
        samples_dir.mkdir(exist_ok=True)
        cond = run.preview(d.num_samples) if run.preview is not None else None
        if getattr(cond, "texts", None) is not None:  # which prompt each grid cell shows
            (samples_dir / "prompts.txt").write_text("\n".join(cond.texts) + "\n")
            logger.text("samples/prompts", "  \n".join(  # markdown: one line per grid cell
                f"{i + 1}. {text}" for i, text in enumerate(cond.texts)), step)
        for k, (w, h) in enumerate(grid_sizes):
            if stop_requested():  # a stop request must not wait for the remaining grids
                return
            images = generate(ema_model, vae, h, w, num_samples=d.num_samples, cond=cond,
                              cfg_scale=d.cfg_scale, steps=d.sample_steps, sampler=d.sampler,
                              seed=cfg.seed + k, base_tokens=d.base_tokens, autocast_dtype=amp)
            grid = image_grid(images)  # (3, H', W') in [-1, 1]
            logger.image(f"samples/{w}x{h}", (grid + 1) / 2, step)
            tensor_to_pil(grid).save(samples_dir / f"step_{step:07d}_{w}x{h}.png")

    def quality(step: int, stop_requested: Callable[[], bool]) -> None:
        ema.copy_to(ema_model)
        meter.measure(ema_model, vae, step, stop_requested)

    return StageSteps(loss, update, scalars, payload, validate, preview,
                      lambda samples: [plan.records.path(i) for i in samples],
                      quality if meter is not None else None)
