"""Resuming a run: which checkpoint, whether its schedule still holds, where the data goes on.

A checkpoint records its config, its step and its place in the batch schedule (epoch, index),
with a fingerprint of the training images. `find_resume` finds the checkpoint to continue and
refuses one whose batch schedule differs (`SCHEDULE_KEYS` and the global batch);
`resume_position` gives the next batch, or the start of the next epoch when the images changed;
`prepare_run_dir` makes the run folder without ever overwriting another run's checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bucketing import BatchSchedule
from training.checkpoint import CHECKPOINTS, STATE_FILE, read_state, resolve_resume, set_aside_newer
from training.config import (Config, ConfigError, absolute_config, from_dict, get_dotted,
                             portable_config, resolve_path, save_config, to_dict)
from training.distributed import DistInfo, all_gather_objects, main_first, on_every_rank
from training.plan import DataPlan


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


def state_for_json(cfg: Config, step: int, epoch: int, index: int, world_size: int,
                   extra: dict) -> dict:
    """The JSON part of a checkpoint."""
    return {"step": step, "epoch": epoch, "index": index, "world_size": world_size,
            "config": to_dict(portable_config(cfg)), **extra}
