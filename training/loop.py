"""The training loop both stages share: one function, `train_loop`, and its parts.

A stage (`training/dit_stage.py`, `training/vae_stage.py`) sets up its model and data, then hands
the loop an iterator of micro-batches and its `StageSteps`: plain functions over its own state
that compute a micro-batch's loss, act after each optimizer step (EMA, a discriminator), add
values to the log, and validate, preview and describe a checkpoint. The loop owns what both
stages share: the learning rate, gradient accumulation, averaging gradients over ranks, clipping,
the non-finite guard, the logging window, the checkpoint cadence, stop signals and cleanup.

One step, as `train_loop` runs it:

    lr ← schedule(step)
    for each of train.grad_accum micro-batches: loss ← stage.loss(batch); backward(loss / accum)
    average gradients over ranks (DDP does it during backward where the stage uses it)
    loss, stop ← agree over ranks; norm ← clip gradients
    if loss and norm are finite: optimizer.step()      (else skipped, and counted)
    stage.update(finite); zero gradients; step ← step + 1
    log every train.log_every steps; then checkpoint, validate and preview when due
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
from tqdm import tqdm

from training.checkpoint import save_checkpoint
from training.config import Config, ConfigError, TrainConfig, TrainingAborted, TrainingStopped
from training.distributed import DistInfo, agree, barrier
from training.logging import RunLogger
from training.resume import state_for_json


@dataclass
class Batch:
    """One micro-batch as the loop sees it: the stage's own `data`, the `files` it was made of
    (named when its step goes non-finite) and the schedule's state once it is consumed
    (`position` = (epoch, index of the next batch), saved in checkpoints)."""

    data: Any
    files: list[str]
    position: tuple[int, int]


@dataclass
class StageSteps:
    """A stage's part of training, as plain functions that `train_loop` calls.

    loss(data) -> the scalar loss of one micro-batch (the loop backpropagates it);
    update(finite) after each optimizer step (`finite`: whether it was applied);
    scalars() -> values to log at a log step (called on every rank: it may all-reduce);
    payload() -> (tensor groups, torch state dicts, JSON extras) of a checkpoint;
    validate(step) and preview(step, stop_requested) on the main process, every
    train.eval_every and train.sample_every steps and at the end (`stop_requested()` tells a
    preview drawing several grids that a stop signal came, so that it returns at once).
    """

    loss: Callable[[Any], torch.Tensor]
    update: Callable[[bool], None]
    scalars: Callable[[], dict[str, float]]
    payload: Callable[[], tuple[dict, dict, dict]]
    validate: Callable[[int], None]
    preview: Callable[[int, Callable[[], bool]], None]


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


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce gradients to their mean over ranks (no-op in a single process)."""
    if dist.is_initialized():
        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def train_loop(cfg: Config, info: DistInfo, run_dir: Path, step: int, batches: Iterator[Batch],
               stage: StageSteps, optimizer: torch.optim.Optimizer,
               params: list[torch.nn.Parameter], logger: RunLogger, samples_per_step: int,
               ddp: torch.nn.parallel.DistributedDataParallel | None = None) -> int:
    """Train from `step` to `train.max_steps` (see the module docstring); returns the last step.

    `optimizer` steps `params` with the learning rate of the schedule; `ddp`, when the stage
    wraps its model in DistributedDataParallel, averages their gradients during backward (else
    the loop does after it). `samples_per_step` counts one optimizer step's samples over all
    ranks. A stop signal saves a checkpoint after the current step and raises
    `TrainingStopped`; too many non-finite steps in a row raise `TrainingAborted`.
    """
    t, main = cfg.train, info.is_main
    stop, guard, rate = StopSignal(), NonFiniteGuard(t.max_nonfinite), StepRate(step)
    bar = tqdm(total=t.max_steps, initial=step, disable=not main, dynamic_ncols=True)
    position = (0, 0)  # the schedule's state after the last batch trained on
    try:
        while step < t.max_steps:
            for group in optimizer.param_groups:
                group["lr"] = t.lr * lr_factor(step, t.warmup_steps, t.max_steps, t.lr_schedule)
            total, files = torch.zeros((), device=info.device), []
            for micro in range(t.grad_accum):
                with rate.waiting():
                    batch = next(batches)
                files += batch.files
                position = batch.position
                last = micro == t.grad_accum - 1
                with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                    loss = stage.loss(batch.data)
                    (loss / t.grad_accum).backward()
                total += loss.detach() / t.grad_accum
            if ddp is None:
                average_gradients(params)
            total, stopping = agree(total, stop.received is not None)  # the same on every rank
            grad_norm = clip_and_check(params, t.grad_clip)
            finite = guard.ok(step + 1, total, grad_norm, files)  # numbered as it is logged
            if finite:
                optimizer.step()
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
                final = step == t.max_steps
                if main and not stop.received and (step % t.eval_every == 0 or final):
                    bar.set_description_str("validating")
                    stage.validate(step)
                if main and not stop.received and (step % t.sample_every == 0 or final):
                    bar.set_description_str("drawing sample grids")
                    stage.preview(step, lambda: stop.received is not None)
                bar.set_description_str("")
    finally:
        stop.restore()
        bar.close()
    if step < t.max_steps:  # stopped early by a signal (at the last step it is done anyway)
        stopped(stop, step, run_dir)
    return step
