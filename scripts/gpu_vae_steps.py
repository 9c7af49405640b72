"""How many VAE steps fit in a time budget on this machine: trains the config's VAE stage for a
few hundred steps and prints max_steps for `train.py --max-steps`.

    python scripts/gpu_vae_steps.py --config configs/vae_f8c16_gpu.json --dataset DIR \
        --eval-dataset DIR --seconds 150

The timed run is the real stage (`training/vae_stage.py`) with the config's data, loader
workers, precision and logging and the run's validation folder, in a temporary run folder, so
each step costs what a training step costs: encode, decode, losses, backward, gradient clipping
with its norm, the finiteness check, Adam, the EMA update, the discriminator's step where the
config uses one, the logging syncs, and the wait for the loader where it is slower than the
step. The first steps are left out: they include the warm-up and may be served from the batches
the loader's workers queued meanwhile (num_workers × `PREFETCH`). The time per step is then
taken over at least twice that many steps, from the wall times of the TensorBoard events the
stage logs. A config whose discriminator starts before its `train.max_steps` is timed with the
discriminator on from the first step, so its estimate errs short and the learning-rate schedule
still completes.

Pass the real run's `--eval-dataset`. On an H200 the stage of configs/vae_f8c16_gpu.json
stepped at 0.063 s without one and at 0.092 s with one, although both runs evaluated only at
their end (why is not established yet); a timing run without it planned 1.39 times the steps
that fitted in the real run.

The stage prints as it trains; the last line printed is one JSON object. Bad input is one
`error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import (Config, ConfigError, TrainingAborted,  # noqa: E402
                             TrainingStopped, apply_overrides, load_config)
from training.data import resolve_dataset
from training.vae_stage import train_vae  # noqa: E402

PREFETCH = 4  # batches each loader worker keeps ready (`training/plan.py: pixel_loader`)
WARM_STEPS, TIMED_STEPS = 10, 20  # at least this many steps are left out, then timed


def timing_plan(cfg: Config) -> tuple[int, int]:
    """(left out, timed): the steps of the timing run, each a whole number of logging windows.

    At least num_workers × `PREFETCH` steps are left out and twice that many timed, so the time
    per step is that of the loader's sustained rate, not of draining its queue.
    """
    queue = cfg.data.num_workers * PREFETCH
    window = cfg.train.log_every
    warm = window * math.ceil(max(queue, WARM_STEPS) / window)
    timed = window * math.ceil(max(2 * queue, TIMED_STEPS) / window)
    return warm, timed


def time_stage(cfg: Config, run_dir: Path) -> dict:
    """Train `cfg`'s VAE stage in `run_dir` for `timing_plan` steps; the seconds per step over
    the timed ones and the share of them spent waiting for data."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    warm, timed = timing_plan(cfg)
    steps = warm + timed
    # checkpoint and evaluate only at the end (after the last timed step); export little
    overrides = {"run_dir": str(run_dir), "train.max_steps": steps, "train.ckpt_every": 0,
                 "train.eval_every": steps, "train.sample_every": steps, "vae.scale_images": 1}
    v = cfg.vae
    if v.disc_start - v.disc_warmup < cfg.train.max_steps:  # the config trains a discriminator
        overrides["vae.disc_start"] = 0
    train_vae(apply_overrides(cfg, overrides))
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {e.step: e.wall_time for e in events.Scalars("loss/train")}  # when each was logged
    waits = [e.value for e in events.Scalars("speed/data_wait_fraction") if e.step > warm]
    return {"step_s": (logged[steps] - logged[warm]) / timed,
            "data_wait_fraction": sum(waits) / len(waits), "steps_timed": timed}


def main(argv: Sequence[str] | None = None) -> int:
    """Time the VAE stage, print the step budget; 2 on bad input, 1 if training fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--eval-dataset", default="",
                        help="the real run's validation folder (train.py --eval-dataset)")
    parser.add_argument("--seconds", type=float, required=True, help="training time budget")
    parser.add_argument("--fraction", type=float, default=0.85,
                        help="share of the budget for steps (the rest: start-up, eval, export)")
    args = parser.parse_args(argv)
    try:
        if not (math.isfinite(args.seconds) and args.seconds > 0):
            raise ValueError(f"--seconds {args.seconds}: must be a positive, finite number")
        if not 0 < args.fraction <= 1:
            raise ValueError(f"--fraction {args.fraction}: must lie in (0, 1]")
        cfg = apply_overrides(load_config(args.config), {  # None: the config's own
            "data.dataset": args.dataset, "data.eval_dataset": args.eval_dataset or None})
        if cfg.stage != "vae":
            raise ConfigError(f"{args.config}: a {cfg.stage} config; this script times the VAE "
                              "stage")
        resolve_dataset(cfg.data.dataset)
        if cfg.data.eval_dataset:
            resolve_dataset(cfg.data.eval_dataset)
        with tempfile.TemporaryDirectory(prefix="gpu_vae_steps-") as tmp:
            timing = time_stage(cfg, Path(tmp) / "run")
    except (FileNotFoundError, ValueError, TrainingAborted) as exc:  # ConfigError: ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # its run folder, named in its message, is gone
        print(f"error: signal {exc.signum} stopped the timing run", file=sys.stderr)
        return 128 + exc.signum
    except Exception:
        # Uncaught, it would keep the stage's frames, and with them its DataLoader, alive until
        # after Python's exit-time wait for child processes: the workers ignore SIGTERM
        # (`training/runtime.py: ignore_stop_signals`), so that wait never ends. Handled here, the
        # frames go, and the loader shuts its workers down.
        traceback.print_exc()
        return 1
    steps = max(100, int(args.seconds * args.fraction / timing["step_s"]) // 100 * 100)
    print(json.dumps({"step_s": round(timing["step_s"], 4),
                      "data_wait_fraction": round(timing["data_wait_fraction"], 3),
                      "steps_timed": timing["steps_timed"], "batch": cfg.batch_size,
                      "max_steps": steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
