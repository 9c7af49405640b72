"""Train a KL-VAE or a diffusion transformer: parse flags, resolve the config, hand over.

    UV_CACHE_DIR=.uv-cache uv run python train.py --dataset synthetic --dry-run
    UV_CACHE_DIR=.uv-cache uv run python train.py --config configs/default.json --dataset DIR

Flags override the JSON config (`configs/`); the resolved config is saved in the run folder.
`--resume` without `--config` continues the checkpoint's own run with the config saved in it,
changing only what this command's flags say. Paths given on the command line (and in
LDM_DATASET, LDM_RUNS_DIR, LDM_INCEPTION) are relative to the current folder, like any
command's; paths inside a config file are relative to the repository, so a config means the
same from anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from dotenv import load_dotenv

from training.config import (REPO_ROOT, Config, ConfigError, TrainingAborted, TrainingStopped,
                             from_cwd, get_dotted, load_config, resolve_run_config)

DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.json"

# flag -> (dotted config key, type, help). Defaults come from the config file.
FLAGS: dict[str, tuple[str, type, str]] = {
    "--stage": ("stage", str, "training stage: vae or dit"),
    "--dataset": ("data.dataset", str, "image folder, or synthetic[:N] (env LDM_DATASET)"),
    "--run-dir": ("run_dir", str, "output folder of this run (env LDM_RUNS_DIR sets the parent)"),
    "--resolution": ("data.resolution", int, "bucket area is at most resolution²"),
    "--step": ("data.step", int, "bucket sides are multiples of this"),
    "--batch-size": ("batch_size", int, "batch per process"),
    "--seed": ("seed", int, "seed of the schedule, model init and noise"),
    "--num-workers": ("data.num_workers", int, "data worker processes"),
    "--threads": ("train.threads", int, "CPU threads of torch (0: the CPUs this process may "
                                        "use, less its data workers)"),
    "--model": ("dit.model", str, "DiT size from models/registry.py"),
    "--vae": ("dit.vae", str, "VAE (folder, config.json or file) whose latents the DiT learns"),
    "--sampler": ("dit.sampler", str, "sampler of the preview grids"),
    "--lr": ("train.lr", float, "peak learning rate"),
    "--max-steps": ("train.max_steps", int, "optimizer steps to train for"),
    "--precision": ("train.precision", str, "auto (bf16 where supported), bf16 or fp32"),
    "--device": ("train.device", str, "auto, cpu or cuda"),
    "--ckpt-every": ("train.ckpt_every", int, "steps between checkpoints"),
    "--keep-last": ("train.keep_last", int, "complete checkpoints to keep"),
    "--eval-every": ("train.eval_every", int, "steps between validation passes"),
    "--sample-every": ("train.sample_every", int, "steps between image grids"),
    "--log-every": ("train.log_every", int, "steps between TensorBoard scalars"),
    "--eval-dataset": ("data.eval_dataset", str, "folder of validation images"),
    "--holdout": ("data.holdout", int, "images held out of training for validation"),
    "--inception": ("train.inception", str, "FID Inception weights for the quality metrics "
                                            "(env LDM_INCEPTION)"),
    "--text-encoder": ("text.encoder", str, "text encoder of a --captions run: builtin, or a "
                                            "local Hugging Face folder (CLIP text, T5 encoder "
                                            "or a decoder LM)"),
    "--fid-every": ("train.fid_every", int, "steps between the DiT's FID/KID (0: quality "
                                            "metrics off)"),
}
PATH_FLAGS = ("--dataset", "--eval-dataset", "--run-dir", "--vae", "--inception",
              "--text-encoder")
# --X / --no-X -> (dotted config key, help): a resumed run keeps its saved value unless given
SWITCHES: dict[str, tuple[str, str]] = {
    "--classes": ("data.use_classes", "label = first-level sub-folder name"),
    "--captions": ("data.captions", "text-to-image from captions: NAME.txt beside each image "
                                    "or metadata.jsonl at the data set's root"),
    "--allow-upscale": ("data.allow_upscale", "upscale images smaller than their bucket "
                                              "instead of skipping them"),
    "--keep-duplicates": ("data.keep_duplicates", "train on every copy of a picture instead "
                                                  "of once per content"),
    "--compile": ("train.compile", "torch.compile each DiT block"),
}


def build_parser(defaults: Config) -> argparse.ArgumentParser:
    """Every flag, with the value it takes when not given (from the default config)."""
    from inference.samplers import SAMPLERS
    from models.registry import MODEL_NAMES

    parser = argparse.ArgumentParser(
        description="Train a KL-VAE (--stage vae) or a diffusion transformer (--stage dit).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="JSON config in configs/ (default: "
                             f"{DEFAULT_CONFIG.relative_to(REPO_ROOT)}, or with --resume the "
                             "checkpoint's own)")
    choices = {"--model": MODEL_NAMES, "--sampler": list(SAMPLERS)}
    for flag, (key, tp, text) in FLAGS.items():
        parser.add_argument(flag, type=tp, default=None, choices=choices.get(flag),
                            help=f"{text} (config {key}; "
                                 f"default: {get_dotted(defaults, key)})")
    for flag, (key, text) in SWITCHES.items():
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=f"{text} (config {key}; default: {get_dotted(defaults, key)})")
    parser.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                        help="continue from a checkpoint: a run folder, a checkpoint folder, or "
                             "nothing for the newest complete one of --run-dir; without "
                             "--config, with the config saved in it and in its own run folder "
                             "unless --run-dir names an empty one (default: off)")
    parser.add_argument("--export", metavar="RUN", default=None,
                        help="export inference weights from a run folder or checkpoint and exit; "
                             "with --vae, a DiT export records that VAE instead of the run's "
                             "(default: off)")
    parser.add_argument("--out", default=None,
                        help="where --export writes (default: RUN/vae for a VAE run, "
                             "checkpoints/RUN_NAME for a DiT run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="scan the data, build buckets and the batch plan, print and exit "
                             "(default: off)")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The run's config and the checkpoint to resume (None for a new run): the config file
    named by --config (configs/default.json if none), or with --resume and no --config the
    checkpoint's own, with the flags on top (`training.config.resolve_run_config`)."""
    overrides = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in
                 FLAGS.items()}
    for flag in PATH_FLAGS:
        key = FLAGS[flag][0]
        if overrides[key] not in (None, "builtin"):  # "builtin" names no folder
            overrides[key] = from_cwd(overrides[key])
    for flag, (key, _) in SWITCHES.items():
        overrides[key] = getattr(args, flag[2:].replace("-", "_"))
    config_file = from_cwd(args.config) if args.config else DEFAULT_CONFIG
    cfg, resume = resolve_run_config(config_file, overrides, args.resume,
                                     explicit_config=args.config is not None)
    if cfg.stage == "vae":  # DiT-only flags would be silently ignored
        given = [flag for flag, value in (("--model", args.model), ("--vae", args.vae),
                                          ("--compile", args.compile),
                                          ("--sampler", args.sampler)) if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: DiT-stage flags, not used by --stage vae")
    return cfg, resume


def dry_run(cfg: Config) -> None:
    """Print what training would see on one process: the buckets and their crop loss, then the
    data plan training builds (validation images held out) and its first epoch's batches.
    Refuses what training would refuse about the data."""
    import torch

    from bucketing import format_report, report
    from training.plan import bucket_dataset
    from training.distributed import DistInfo
    from training.plan import plan_data

    scan, buckets, placements = bucket_dataset(cfg.data, cfg.batch_size, progress=True)
    print("all images, the held-out validation ones included:")
    print(format_report(report(scan, buckets, placements)))
    plan = plan_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))  # prints the scan summary
    epoch = plan.schedule.epoch_plan(0)
    shapes = Counter(plan.buckets[int(plan.placements.bucket[b[0]])] for b in epoch)
    copies = plan.duplicates
    folded = (f"; {copies.copies} exact duplicate(s) of {copies.contents} picture(s) "
              f"{'kept' if copies.kept else 'folded'}" if copies.copies else "")
    print(f"training on {len(plan.records)} image(s), validating on {len(plan.eval_records)}"
          f"{folded}")
    print(f"epoch 0: {len(epoch)} batches of {cfg.batch_size}; "
          f"{plan.schedule.unused_samples()} image(s) in buckets smaller than one batch")
    for (w, h), n in sorted(shapes.items()):
        print(f"  {w}x{h}: {n} batch(es)")


def export(source: str, out: str | None, vae: str | None = None) -> Path:
    """Export a run or checkpoint with its stage's exporter (the stage is read from the
    checkpoint's state.json), which prints one line; `vae` replaces the VAE a DiT run
    recorded."""
    from training.checkpoint import STATE_FILE, resolve_resume

    folder = resolve_resume(Path(from_cwd(source)))
    try:
        stage = json.loads((folder / STATE_FILE).read_text())["config"]["stage"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{folder / STATE_FILE}: cannot read the run's stage ({exc})") from None
    if stage == "dit":
        from training.export import export_dit

        return export_dit(folder, out and from_cwd(out), vae and from_cwd(vae))
    if vae is not None:
        raise ConfigError(f"{folder}: a VAE run exports its own weights; --vae is for a DiT run")
    from training.vae_stage import export_checkpoint

    return export_checkpoint(folder, out and from_cwd(out))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the command line), then export, dry-run or train as it says.

    Returns the status for `sys.exit`: 2 for a refused config or bad input (a one-line message
    on stderr), 128 + the signal number when a signal stopped training after it saved, else
    0 on success. Bad flags exit via argparse.
    """
    load_dotenv(REPO_ROOT / ".env")
    parser = build_parser(load_config(DEFAULT_CONFIG))  # --help shows the defaults that apply
    args = parser.parse_args(argv)
    if args.out is not None and not args.export:
        parser.error("--out is where --export writes; give --export RUN too")
    if args.export:
        given = [flag for flag in (*FLAGS, *SWITCHES, "--config", "--resume")
                 if flag != "--vae" and getattr(args, flag[2:].replace("-", "_")) is not None]
        given += ["--dry-run"] if args.dry_run else []
        if given:
            parser.error(f"--export takes only --out and --vae; {', '.join(given)} would be "
                         "ignored")
    try:
        if args.export:
            export(args.export, args.out, args.vae)
            return 0
        cfg, resume = resolve_config(args)
        if args.dry_run:
            dry_run(cfg)
            return 0
        if cfg.stage == "vae":
            from training.vae_stage import train_vae

            run_dir = train_vae(cfg, resume)
        else:
            from training.dit_stage import train_dit

            run_dir = train_dit(cfg, resume)
        if int(os.environ.get("RANK", "0")) == 0:  # once, not once per torchrun process
            print(f"run folder: {run_dir}")
        return 0
    except TrainingStopped as exc:  # saved and stopped early: not done, so not a success
        if int(os.environ.get("RANK", "0")) == 0:
            print(exc, file=sys.stderr)
        return 128 + exc.signum  # the shell's status for a process ended by that signal
    except (ConfigError, FileNotFoundError, ValueError, TrainingAborted) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
