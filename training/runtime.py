"""How a training process uses its machine: seeds, precision, threads, host memory, signals."""

from __future__ import annotations

import os
import ctypes
import ctypes.util
import random
import signal
from pathlib import Path

import numpy as np
import torch

from training.config import ConfigError


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


def choose_threads(setting: int, workers: int, local_ranks: int = 1) -> tuple[int, int]:
    """(threads for torch, CPUs this process may use) for `train.threads` = `setting`.

    0 picks the CPUs of this process's affinity mask, shared out over the `local_ranks`
    processes on this machine, less its `workers` data worker processes, and at least 1.
    torch's own default is every core of the machine: with a data worker, another rank or
    another job on the same cores, its threads then wait on one another at every parallel
    region (the quickstart ran 5x slower sharing 2 cores with one busy process).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    if setting > 0:
        return setting, cpus
    return max(1, cpus // max(1, local_ranks) - workers), cpus


def set_threads(setting: int, workers: int, main: bool) -> int:
    """Set torch's CPU threads as `choose_threads` says and print the choice once (on the
    `main` process); returns the count. `workers`: data worker processes that will run beside
    torch's threads (the VAE stage's pixel loader, the DiT stage's latent cache build)."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads, cpus = choose_threads(setting, workers, local_ranks)
    torch.set_num_threads(threads)
    if main:
        why = ("train.threads" if setting > 0 else
               f"{cpus} CPU(s) this process may use"
               + (f" over {local_ranks} local ranks" if local_ranks > 1 else "")
               + (f", less {workers} data worker(s)" if workers else ""))
        print(f"using {threads} CPU thread(s) ({why}; --threads N to choose)", flush=True)
    return threads
