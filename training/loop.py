"""The training loop both stages share: one function, `train_loop`, and its parts.

A stage (`training/dit_stage.py`, `training/vae_stage.py`) sets up its model and data, then hands
the loop an iterator of micro-batches and its `StageSteps`: plain functions over its own state
that compute a micro-batch's loss, act after each optimizer step (a discriminator's own step),
add values to the log, and validate, preview and describe a checkpoint. The loop owns what both
stages share: the learning rate, gradient accumulation, averaging gradients over ranks, clipping,
the non-finite guard, the EMA of the weights (`EMA`, kept here as part of every step), the
logging window, the checkpoint cadence, stop signals and cleanup.

One step, as `train_loop` runs it:

    lr ← schedule(step)
    for each of train.grad_accum micro-batches: loss ← stage.loss(batch); backward(loss / accum)
    average gradients over ranks (DDP does it during backward where the stage uses it)
    loss, stop ← agree over ranks; norm ← clip gradients
    if loss and norm are finite: optimizer.step(); ema.update(model)   (else skipped, counted)
    stage.update(finite); zero gradients; step ← step + 1
    log every train.log_every steps; then checkpoint, validate, measure quality and preview
    when due
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from training.checkpoint import save_checkpoint
from training.config import Config, ConfigError, TrainConfig, TrainingAborted, TrainingStopped
from training.distributed import DistInfo, all_reduce_mean, barrier
from training.logging import RunLogger
from training.resume import state_for_json


@dataclass
class Batch:
    """One micro-batch as the loop sees it: the stage's own `data`, the `samples` it was made
    of (indices, whose files `StageSteps.files` names when its step goes non-finite) and the
    schedule's state once it is consumed (`position` = (epoch, index of the next batch), saved
    in checkpoints)."""

    data: Any
    samples: list[int]
    position: tuple[int, int]


@dataclass
class StageSteps:
    """A stage's part of training, as plain functions that `train_loop` calls.

    loss(data) -> the scalar loss of one micro-batch (the loop backpropagates it);
    update(finite) after each optimizer step and the EMA's (`finite`: whether they applied);
    scalars() -> values to log at a log step (called on every rank: it may all-reduce);
    payload() -> (tensor groups, torch state dicts, JSON extras) of a checkpoint;
    validate(step) and preview(step, stop_requested) on the main process, every
    train.eval_every and train.sample_every steps and at the end (`stop_requested()` tells a
    preview drawing several grids that a stop signal came, so that it returns at once);
    quality(step, stop_requested), when the stage has it, on every rank every
    train.fid_every steps (the ranks share its work; it returns early on a stop request).
    """

    loss: Callable[[Any], torch.Tensor]
    update: Callable[[bool], None]
    scalars: Callable[[], dict[str, float]]
    payload: Callable[[], tuple[dict, dict, dict]]
    validate: Callable[[int], None]
    preview: Callable[[int, Callable[[], bool]], None]
    files: Callable[[list[int]], list[str]]  # the files of samples, to name a non-finite step
    quality: Callable[[int, Callable[[], bool]], None] | None = None


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
           files: Callable[[], list[str]]) -> bool:
        """Whether optimizer step `step` may apply: True when `loss` and `grad_norm` are finite.
        Otherwise counts it, prints it with the batch's `files()`, and returns False, or raises
        `TrainingAborted` once `limit` steps in a row were non-finite."""
        if bool(torch.isfinite(loss).item() and torch.isfinite(grad_norm).item()):
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        print(f"step {step}: non-finite loss {loss.item()} or gradient norm {grad_norm.item()};"
              f" optimizer step skipped; batch: {files()}", flush=True)
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
        values = {"speed/samples_per_s": samples_per_step * (step - self.step) / elapsed,
                  "speed/data_wait_fraction": self.waited / elapsed}
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


def agree(loss: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
    """One step as every rank must see it: the loss averaged over ranks, and whether any rank
    was asked to stop. One small all-reduce; the inputs themselves in a single process.

    The non-finite guard then skips a step on every rank or on none (a rank that alone skipped
    would train other weights from then on), and a signal that reached one rank stops all of
    them after the same step, which rank 0 saves (the others would wait for it forever).
    """
    if not dist.is_initialized():
        return loss, stop
    both = all_reduce_mean(torch.stack([loss.detach().float().reshape(()),
                                        torch.tensor(float(stop), device=loss.device)]))  # (2,)
    return both[0], bool(both[1] > 0)  # the mean is non-finite if any rank's loss is


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce gradients to their mean over ranks (no-op in a single process)."""
    if dist.is_initialized():
        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def evaluate_due(stage: StageSteps, t: TrainConfig, step: int, main: bool, stop: StopSignal,
                 bar: tqdm) -> None:
    """After `step` (and its checkpoint): validation, quality metrics and previews, those that
    are due. Validation and previews run on the main process and not after a stop request;
    quality runs on every rank whatever this rank has seen (the ranks share its work, and a
    stop request may have reached some of them only): it returns early itself."""
    final = step == t.max_steps
    if main and not stop.received and (step % t.eval_every == 0 or final):
        bar.set_description_str("validating")
        stage.validate(step)
    if stage.quality and t.fid_every and step % t.fid_every == 0:
        bar.set_description_str("measuring FID")
        stage.quality(step, lambda: stop.received is not None)
    if main and not stop.received and (step % t.sample_every == 0 or final):
        bar.set_description_str("drawing sample grids")
        stage.preview(step, lambda: stop.received is not None)
    bar.set_description_str("")


def train_loop(cfg: Config, info: DistInfo, run_dir: Path, step: int, batches: Iterator[Batch],
               stage: StageSteps, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA,
               logger: RunLogger, samples_per_step: int,
               ddp: torch.nn.parallel.DistributedDataParallel | None = None) -> int:
    """Train from `step` to `train.max_steps` (see the module docstring); returns the last step.

    `optimizer` steps `model`'s parameters with the learning rate of the schedule, and `ema`
    follows them; `ddp`, when the stage wraps `model` in DistributedDataParallel, averages their
    gradients during backward (else the loop does after it). `samples_per_step` counts one
    optimizer step's samples over all ranks. A stop signal saves a checkpoint after the current
    step and raises `TrainingStopped`; too many non-finite steps in a row raise
    `TrainingAborted`.
    """
    t, main = cfg.train, info.is_main
    params = list(model.parameters())
    stop, guard, rate = StopSignal(), NonFiniteGuard(t.max_nonfinite), StepRate(step)
    bar = tqdm(total=t.max_steps, initial=step, disable=not main, dynamic_ncols=True)
    position = (0, 0)  # the schedule's state after the last batch trained on
    try:
        while step < t.max_steps:
            for group in optimizer.param_groups:
                group["lr"] = t.lr * lr_factor(step, t.warmup_steps, t.max_steps, t.lr_schedule)
            total, samples = torch.zeros((), device=info.device), []
            for micro in range(t.grad_accum):
                with rate.waiting():
                    batch = next(batches)
                samples += batch.samples
                position, last = batch.position, micro == t.grad_accum - 1
                with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                    loss = stage.loss(batch.data)
                    (loss / t.grad_accum).backward()
                total += loss.detach() / t.grad_accum
            if ddp is None:
                average_gradients(params)
            total, stopping = agree(total, stop.received is not None)  # the same on every rank
            grad_norm = clip_and_check(params, t.grad_clip)
            # numbered as it is logged
            finite = guard.ok(step + 1, total, grad_norm, lambda: stage.files(samples))
            if finite:
                optimizer.step()
                ema.update(model)
            stage.update(finite)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % t.log_every == 0 or step == 1:
                values = stage.scalars()  # on every rank: it may all-reduce
                if main:
                    logger.scalars({"loss/train": total.item(),
                                    "optim/lr": optimizer.param_groups[0]["lr"],
                                    "optim/grad_norm": grad_norm.item(),
                                    **rate.scalars(step, samples_per_step), **values}, step)
                    bar.set_postfix(loss=f"{total.item():.4f}")
            # Save first: a failure in validation or previews then loses no training. A stop
            # request skips them (it is acted on at the next step): the scheduler's grace period
            # after SIGTERM is short, and they can take longer than a step.
            with rate.pause():
                if checkpoint_due(step, t, stopping) and main:
                    bar.set_description_str("saving a checkpoint")  # the bar says what waits
                    tensors, torch_state, extra = stage.payload()
                    save_checkpoint(run_dir, step, tensors, torch_state,
                                    state_for_json(cfg, step, *position, info.world_size, extra),
                                    keep_last=t.keep_last)
                    logger.flush()  # the events logged up to the checkpoint reach disk with it
                if stopping:
                    break
                evaluate_due(stage, t, step, main, stop, bar)
    finally:
        stop.restore()
        bar.close()
    if step < t.max_steps:  # stopped early by a signal (at the last step it is done anyway)
        stopped(stop, step, run_dir)
    return step


# ----------------------------------------------------------------------------------------------
# EMA of the weights, updated by the loop after every applied optimizer step. After update n
# (counting from 0) the shadow weights are
#
#     shadow <- decay_n * shadow + (1 - decay_n) * param,   decay_n = min(decay, (1 + n) / (10 + n))
#
# so early updates follow the model closely (decay 0.1, 0.18, 0.25, ...) and later ones approach
# `decay`. Floating parameters are averaged; buffers and any other state-dict entries are copied.


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel (`.module`) and
    torch.compile (`._orig_mod`) wrappers, however nested."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        # DDP and DataParallel hold the model as their only child, named "module"; a model that
        # merely has a sub-module called "module" among others is not a wrapper.
        if list(model._modules) == ["module"] and isinstance(model.module, nn.Module):
            model = model.module
            continue
        return model


class EMA:
    """fp32 shadow copies of a model's floating parameters, updated with foreach kernels.

    Create it after the model is on its device; the shadow lives on the same device. Wrapped
    models (DDP, torch.compile) are unwrapped, so keys never carry `module.` or `_orig_mod.`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = decay
        self.num_updates = 0
        m = unwrap_model(model)
        params = list(m.parameters())  # unique tensors, in a fixed order
        self._num_params = len(params)
        self._index = [i for i, p in enumerate(params) if p.is_floating_point()]
        self._shadow = [params[i].detach().float().clone() for i in self._index]
        shadow_of = {id(params[i]): s for i, s in zip(self._index, self._shadow)}
        # state-dict keys -> shadow tensors; tied parameters share one shadow under each key
        self._state: dict[str, torch.Tensor] = {}
        self._copied: list[str] = []  # buffers (and non-floating parameters): copied as they are
        for key, value in m.state_dict(keep_vars=True).items():
            if id(value) in shadow_of:
                self._state[key] = shadow_of[id(value)]
            else:
                self._state[key] = value.detach().clone()
                self._copied.append(key)

    @property
    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards `model`'s current weights (call after each optimizer step)."""
        m = unwrap_model(model)
        params = list(m.parameters())
        if len(params) != self._num_params:
            raise ValueError(
                f"EMA.update: the model has {len(params)} parameters, the EMA tracks "
                f"{self._num_params}; pass the model the EMA was created from"
            )
        current = [params[i].detach() for i in self._index]
        current = [p if p.dtype == torch.float32 else p.float() for p in current]
        if current:
            torch._foreach_lerp_(self._shadow, current, 1.0 - self.current_decay)
        if self._copied:
            sd = m.state_dict(keep_vars=True)
            for key in self._copied:
                self._state[key].copy_(sd[key].detach())
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow tensors keyed like the model's state_dict (live references, like nn.Module's).

        Loads straight into a fresh model with `model.load_state_dict`; tied parameters appear
        under every key, sharing one tensor.
        """
        return dict(self._state)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor], num_updates: int) -> None:
        """Copy saved shadow tensors in (keys and shapes must match) and set `num_updates`."""
        missing = sorted(self._state.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - self._state.keys())
        if missing or unexpected:
            raise KeyError(
                f"EMA state dict does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for key, target in self._state.items():
            source = state_dict[key]
            if source.shape != target.shape:
                raise ValueError(
                    f"EMA state dict: '{key}' has shape {tuple(source.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(source)
        self.num_updates = int(num_updates)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (e.g. a separate copy used for sampling)."""
        unwrap_model(model).load_state_dict(self._state)
