"""Build, update, verify or prune the latent cache of an image folder, and print a summary.

    UV_CACHE_DIR=.uv-cache uv run python cache.py --dataset DIR --vae vae/ --resolution 256 --json
    UV_CACHE_DIR=.uv-cache uv run python cache.py --verify --cache-dir DIR

The cache holds the VAE posterior (mean, log-variance) of every training crop, encoded once and
reused by every run that asks for the same image, bucket, crop, flip and VAE (`train.py` builds
or updates it the same way before training). The folder is meant to be shared: entries of other
datasets, resolutions, VAEs and of `--flip` runs live side by side. A rerun encodes only what is
missing; it trusts a shard whose stamp is unchanged and reads a few sampled rows against their
checksums, and `--verify` reads every shard in full. `--prune` deletes every entry the invocation
does not use, whoever paid for it; `--prune --dry-run` builds as usual, then lists what a prune
would delete (entries and bytes per VAE and latent size) and deletes nothing. Under `torchrun`
every rank encodes a disjoint share. The library behind it is `training/latent_cache/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from training.latent_cache.build import ensure_cache
from training.latent_cache.maintenance import prune_cache, verify_cache
from training.latent_cache.store import default_latent_dir, iter_hex_keys, warn


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its default (read after .env is loaded)."""
    from training.config import REPO_ROOT, load_config

    defaults = load_config(REPO_ROOT / "configs" / "default.json")  # what training uses
    d = defaults.data
    parser = argparse.ArgumentParser(
        description="Build or update the latent cache of an image folder and print a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default=os.environ.get("LDM_DATASET", d.dataset),
                        help="image folder, or synthetic[:N] (env LDM_DATASET)")
    parser.add_argument("--vae", default=str(REPO_ROOT / "vae"),
                        help="VAE folder (config.json + safetensors) or single weights file")
    parser.add_argument("--resolution", type=int, default=d.resolution,
                        help="bucket area is at most resolution²")
    parser.add_argument("--step", type=int, default=d.step, help="bucket sides are multiples")
    parser.add_argument("--min-area-ratio", type=float, default=d.min_area_ratio,
                        help="bucket area is at least this × resolution²")
    parser.add_argument("--max-aspect", type=float, default=d.max_aspect,
                        help="buckets range from 1:max-aspect to max-aspect:1")
    parser.add_argument("--allow-upscale", action="store_true",
                        help="keep images smaller than every bucket by upscaling them")
    parser.add_argument("--classes", action="store_true", help="label = first sub-folder")
    parser.add_argument("--global-batch", type=int, default=defaults.batch_size,
                        help="training's batch size × ranks: smaller buckets are merged into "
                             "their neighbours exactly as training does (0: no merging)")
    parser.add_argument("--holdout", type=int, default=d.holdout,
                        help="training's data.holdout: the images it keeps for validation do "
                             "not count towards a bucket's size when merging (0 when training "
                             "validates on --eval-dataset)")
    parser.add_argument("--cache-dir", default=str(default_latent_dir()),
                        help="latent cache folder (env LDM_CACHE_DIR sets its parent)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=d.flip,
                        help="cache the mirrored crops too, as training with data.flip does")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder call")
    parser.add_argument("--num-workers", type=int, default=d.num_workers,
                        help="decoding worker processes")
    parser.add_argument("--shard-size", type=int, default=0,
                        help="entries per shard file (0: about 64 MiB per shard)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--prune", action="store_true",
                        help="after building, delete every cached entry this invocation "
                             "does not use. The cache folder may be shared by other runs: "
                             "entries of other datasets, resolutions, VAEs and the mirrored "
                             "crops of --flip runs are deleted too; --dry-run shows what would "
                             "go")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --prune: only report what it would delete (entries and "
                             "bytes per VAE and latent size) and delete nothing; the cache is "
                             "still built or updated for this invocation first")
    parser.add_argument("--verify", action="store_true",
                        help="check the cache folder instead of building: read every shard "
                             "in full (size, sha256, header, every entry's row, every row's "
                             "checksum), print each problem on one line naming the shard file, "
                             "and exit 1 if there are any. It repairs: damaged shards are "
                             "dropped from the index, so the next build re-encodes their "
                             "entries, and their files are deleted if no other process is "
                             "using the cache (else by the next build or prune that has it to "
                             "itself). Runs beside builds and training; needs only --cache-dir")
    parser.add_argument("--json", action="store_true",
                        help="end with one JSON object. files: image files the scan found = "
                             "cached + skipped, each skipped one listed in skipped_files (path, "
                             "reason, stage: scan or encode); images: usable images; total, "
                             "reused, encoded, repaired, skipped count entries (one per image, "
                             "entries_per_image = 2 with --flip). With --verify: the problems")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before any scan or VAE load (ValueError or FileNotFoundError naming the
    flag or path)."""
    from bucketing import make_buckets
    from training.data import resolve_dataset

    if args.dry_run and not args.prune:
        raise ValueError("--dry-run previews a prune; add --prune (nothing is deleted "
                         "with --dry-run)")
    for flag, value, least in (("--batch-size", args.batch_size, 1),
                               ("--global-batch", args.global_batch, 0),
                               ("--holdout", args.holdout, 0),
                               ("--shard-size", args.shard_size, 0),
                               ("--num-workers", args.num_workers, 0)):
        if value < least:
            raise ValueError(f"{flag} {value}: must be {'positive' if least else '0 or more'}")
    if args.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: expected auto, cpu or cuda")
    make_buckets(args.resolution, args.step, args.min_area_ratio, args.max_aspect)
    cache_dir = Path(args.cache_dir)
    existing = next(p for p in (cache_dir, *cache_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--cache-dir {cache_dir}: not a folder ({existing} is a file)")
    if not Path(args.vae).exists():
        raise FileNotFoundError(f"{args.vae}: VAE not found; expected a folder with "
                                "config.json and weights, or a weights file")
    resolve_dataset(args.dataset)  # last: synthetic data is generated here


def _verify_main(args: argparse.Namespace) -> int:
    """`cache.py --verify`: problems on stdout, one a line; 0 when there are none, 1 when there
    are, 2 when the folder is no cache."""
    if args.prune or args.dry_run:
        print("error: --verify checks the cache and builds nothing; run --prune on its own",
              file=sys.stderr)
        return 2
    try:
        problems = verify_cache(args.cache_dir, repair=True, progress=not args.json)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    warn(f"{args.cache_dir}: {len(problems)} problem(s)"
         + ("; damaged shards dropped, the next build re-encodes their entries" if problems
            else ""))
    if args.json:
        print(json.dumps({"cache_dir": str(args.cache_dir), "problems": problems}))
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python cache.py`."""
    from dotenv import load_dotenv

    from training.plan import bucket_dataset
    from models.vae_weights import load_vae
    from training.config import REPO_ROOT, DataConfig
    from training.distributed import barrier, setup, teardown

    load_dotenv(REPO_ROOT / ".env")
    args = build_parser().parse_args(argv)
    if args.verify:
        return _verify_main(args)
    try:
        _check_args(args)
        info = setup(None if args.device == "auto" else args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = DataConfig(dataset=args.dataset, resolution=args.resolution, step=args.step,
                         min_area_ratio=args.min_area_ratio, max_aspect=args.max_aspect,
                         use_classes=args.classes, allow_upscale=args.allow_upscale,
                         merge_small_buckets=args.global_batch > 0, holdout=args.holdout,
                         num_workers=args.num_workers)
        try:
            # the ranks split the files to read; all end with the same scan
            scan, buckets, placements = bucket_dataset(cfg, args.global_batch or None,
                                                       dist=info)
            for s in scan.skipped if info.is_main else []:
                warn(f"skipped {s.path}: {s.reason}")
            if not scan.records:
                listed = f" ({len(scan.skipped)} skipped, listed above)" if scan.skipped else ""
                raise ValueError(f"{scan.root}: no usable image to cache{listed}")
            vae = load_vae(args.vae, device=info.device)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            summary = ensure_cache(scan.records, placements, buckets, vae, args.cache_dir,
                                   flip=args.flip, batch_size=args.batch_size,
                                   num_workers=args.num_workers, dist_info=info,
                                   shard_size=args.shard_size, max_pixels=cfg.max_image_pixels)
            pruned = None
            barrier()  # every rank has released its share lock before rank 0 takes it whole
            if args.prune and info.is_main:
                pruned = prune_cache(args.cache_dir, iter_hex_keys(summary.keys),
                                     dry_run=args.dry_run)
        except (RuntimeError, OSError, ValueError) as exc:  # a busy cache, a full disk...
            print(f"error: {exc}", file=sys.stderr)
            return 1
        barrier()
        if info.is_main:
            print(summary.format())
            if args.json:
                out = summary.to_json(scan.skipped)
                if pruned is not None:
                    out["pruned"] = pruned
                print(json.dumps(out))
        return 0
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(main())
