"""The training loop both stages share, and its parts: learning rate, guarded steps, stop signals.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch

from training.config import ConfigError, TrainConfig, TrainingAborted, TrainingStopped
from training.distributed import barrier


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
