"""Inference from the command line: sample, image-to-image, or reconstruct through a VAE.

Sample from a DiT run (newest complete checkpoint, EMA weights), a checkpoint or an export:

    UV_CACHE_DIR=.uv-cache uv run python inference.py --checkpoint runs/NAME --num-samples 4 \
        --size 384x256 --class-label 3 --cfg-scale 4 --steps 28 --seed 0 --out DIR

An ADM sample batch for FID-50K (arr_0 uint8 N x H x W x 3, arr_1 class labels), in chunks
that a rerun resumes, on one process or every rank of a torchrun group:

    UV_CACHE_DIR=.uv-cache uv run torchrun --nproc_per_node 8 inference.py \
        --checkpoint runs/NAME --num-samples 50000 --npz samples.npz

Image-to-image (output at the input's size, snapped to the grid):

    UV_CACHE_DIR=.uv-cache uv run python inference.py --checkpoint checkpoints/NAME \
        --image in.png --strength 0.6 --out DIR

Reconstruct an image through a VAE (weights found next to its config; a single weights file
takes the diffusers config.json beside it, else its config is inferred with a warning):

    UV_CACHE_DIR=.uv-cache uv run python inference.py --config vae/config.json --image in.png
    UV_CACHE_DIR=.uv-cache uv run python inference.py --vae path/to/vae.safetensors --image in.png

Each sample i is drawn from noise seeded with seed + i; its PNG carries the parameters that
made it as text chunks, and grid_NNNN.png shows them all; numbering continues after the
images and grids already in --out, so nothing there is overwritten. A reconstruction never
replaces an existing file.

Checks run in this order: the flags (a flag the chosen mode would ignore is refused), the input
paths (and the image is decoded), --out, then the model and VAE are loaded; what only they can
tell (weights that do not fit, an unknown class, an image below the grid) is refused then.
Exit status: 0 done; 2 bad input, refused before anything is written; 1 a failure while
sampling, reconstructing or writing.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from dotenv import load_dotenv

REPO_ROOT = Path(__file__).resolve().parent
DTYPES = ("fp32", "bf16", "fp16")
BAD_INPUT = 2  # refused before anything is written, as argparse does for its own errors
FAILED = 1  # the input was accepted, then sampling, reconstructing or writing failed

# The sampling flags default to None in the parser, so that one given to reconstruction, which
# would ignore it, can be told from one left out (even when given its default value); sampling
# fills in these values.
SAMPLING_DEFAULTS = {"num_samples": 4, "cfg_scale": 4.0, "steps": 28, "sampler": "euler",
                     "seed": 0}
IMG2IMG_STRENGTH = 0.6
NPZ_BATCH_SIZE, NPZ_CHUNK_SIZE = 50, 250  # inference/npz.py's defaults; import-free here
RECONSTRUCTION_FLAGS = ("--config", "--vae", "--image", "--out", "--device", "--dtype",
                        "--tile-size", "--json")


def build_parser() -> argparse.ArgumentParser:
    """Every flag; --checkpoint selects sampling, else reconstruction. Flags that only sampling
    uses default to None (False for switches), so `usage_error` can tell which were given."""
    from inference.samplers import SAMPLERS

    parser = argparse.ArgumentParser(
        description="Sample from a DiT (--checkpoint), re-imagine an image (--checkpoint "
                    "--image), or reconstruct an image through a VAE (--config/--vae --image).",
        epilog="Exit status: 0 done; 2 bad input, refused before anything is written; 1 a "
               "failure while sampling, reconstructing or writing.")
    inputs = parser.add_argument_group("inputs and output")
    inputs.add_argument("--checkpoint", metavar="PATH",
                        help="DiT run folder (newest complete checkpoint), checkpoint folder or "
                             "export folder; selects sampling")
    inputs.add_argument("--step", type=int, metavar="N",
                        help="with a run folder: load this step's checkpoint")
    inputs.add_argument("--config", metavar="JSON",
                        help="reconstruction: a VAE config.json; weights from the same folder")
    inputs.add_argument("--vae", metavar="PATH",
                        help="a VAE folder, config.json, or single .safetensors/.ckpt file (with "
                             "the diffusers config.json beside it, if there is one); "
                             "reconstruction: instead of --config; sampling: overrides the VAE "
                             "recorded with the checkpoint")
    inputs.add_argument("--image", metavar="PATH",
                        help="input image: reconstruction, or image-to-image with --checkpoint")
    inputs.add_argument("--out", metavar="PATH",
                        help="sampling: output folder (required); reconstruction: output image "
                             "file (.png, .jpg, ...) or folder (ending in /, or existing) for "
                             "*_recon.png (default: next to the input); never overwritten")
    inputs.add_argument("--npz", metavar="FILE",
                        help="sampling: write an ADM sample batch FILE.npz instead of PNGs "
                             "(arr_0 images, arr_1 labels; under torchrun the ranks share the "
                             "work); resumes from FILE.npz.parts/ after an interruption")
    sampling = parser.add_argument_group(
        "sampling and image-to-image (--checkpoint); refused in reconstruction")
    sampling.add_argument("--num-samples", type=int, metavar="N",
                          help=f"images to sample (default: {SAMPLING_DEFAULTS['num_samples']})")
    sampling.add_argument("--batch-size", type=int, metavar="N",
                          help="images per forward pass, on each rank (default: all at once; "
                               f"with --npz {NPZ_BATCH_SIZE})")
    sampling.add_argument("--chunk-size", type=int, metavar="N",
                          help="--npz only: samples per resumable chunk, the unit of work dealt "
                               f"to the ranks (default: {NPZ_CHUNK_SIZE})")
    sampling.add_argument("--size", metavar="WxH",
                          help="WIDTHxHEIGHT, snapped to multiples of VAE factor × patch "
                               "(default: the training resolution, square; image-to-image: the "
                               "input's size)")
    sampling.add_argument("--class-label", metavar="NAME_OR_INDEX",
                          help="class name or index (default: cycle through the classes)")
    sampling.add_argument("--prompt", metavar="TEXT", help="text-conditioned model: the prompt")
    sampling.add_argument("--prompts-file", metavar="FILE",
                          help="text-conditioned model: one prompt a line, sample i takes line "
                               "i mod lines")
    sampling.add_argument("--negative-prompt", metavar="TEXT",
                          help="what guidance steers away from (default: the empty caption)")
    sampling.add_argument("--text-encoder", metavar="FOLDER",
                          help="the frozen text encoder, if it moved (default: the recorded one)")
    sampling.add_argument("--cfg-scale", type=float, metavar="S",
                          help="classifier-free guidance scale (1: conditional model alone; "
                               f"default: {SAMPLING_DEFAULTS['cfg_scale']})")
    sampling.add_argument("--steps", type=int, metavar="N",
                          help="integration steps from noise to image (image-to-image: about "
                               f"strength × steps; default: {SAMPLING_DEFAULTS['steps']})")
    sampling.add_argument("--sampler", choices=list(SAMPLERS),
                          help="heun evaluates the model twice per step (default: "
                               f"{SAMPLING_DEFAULTS['sampler']})")
    sampling.add_argument("--seed", type=int, metavar="N",
                          help="sample i uses noise seed + i (default: "
                               f"{SAMPLING_DEFAULTS['seed']})")
    sampling.add_argument("--strength", type=float, metavar="S",
                          help="image-to-image only: 0 keeps the input, 1 ignores it (default: "
                               f"{IMG2IMG_STRENGTH})")
    sampling.add_argument("--no-progress", action="store_true", help="no progress bar")
    every = parser.add_argument_group("every mode")
    every.add_argument("--device", default="auto",
                       help="auto, cpu, cuda or cuda:N (default: auto, a GPU if there is one)")
    every.add_argument("--dtype", default="fp32", choices=DTYPES,
                       help="DiT autocast dtype; the VAE too unless its config forces fp32 "
                            "(default: fp32)")
    every.add_argument("--tile-size", type=int, metavar="PX",
                       help="side of the VAE's tiles for images above 1024x1024 pixels, a "
                            "multiple of its downsampling factor; larger tiles lose less at the "
                            "seams and take more memory (default: the VAE config's sample_size, "
                            "which is part of the VAE's fingerprint: set it here, not there)")
    every.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def usage_error(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """Why this combination of flags is refused (one line), or None if it is fine: the chosen
    mode needs its inputs, and a flag it would ignore is refused. A flag counts as given when
    its value differs from the parser's default (None, or False for a switch)."""
    given = [f"--{dest.replace('_', '-')}" for dest, value in vars(args).items()
             if value != parser.get_default(dest)]
    if args.checkpoint is not None:
        if args.config is not None:
            return "--config is for reconstruction; with --checkpoint use --vae to override " \
                   "the VAE"
        if args.strength is not None and args.image is None:
            return "--strength is for image-to-image; give --image too"
        if args.npz is not None and args.image is not None:
            return "--npz writes generated samples; image-to-image (--image) writes PNGs to --out"
        if args.npz is not None and args.out is not None:
            return "--npz and --out both name the output; give one of them"
        if args.chunk_size is not None and args.npz is None:
            return "--chunk-size is for --npz"
        if args.out is None and args.npz is None:
            return "give --out DIR for the sampled images (or --npz FILE for an ADM sample batch)"
        return None
    if args.image is None or (args.config is None and args.vae is None):
        return "give --checkpoint RUN to sample, or --image with --config/--vae to reconstruct"
    if args.config is not None and args.vae is not None:
        return "--config and --vae both name the VAE to reconstruct through; give one of them"
    ignored = [flag for flag in given if flag not in RECONSTRUCTION_FLAGS]
    if ignored:
        return ("reconstruction takes only --config or --vae, --image, --out, --device, --dtype, "
                f"--tile-size and --json; {', '.join(ignored)} would be ignored")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    load_dotenv(REPO_ROOT / ".env")
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line each
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = usage_error(parser, args)
    if problem is not None:
        return _refuse(problem)
    if args.checkpoint is None:
        return reconstruct(args)
    return sample_npz(args) if args.npz is not None else sample(args)


def _refuse(problem: object) -> int:
    """Report bad input (a message or an exception) in one line; the exit status for it."""
    print(f"error: {problem}", file=sys.stderr)
    return BAD_INPUT


def _fail(exc: Exception) -> int:
    """Report a failure after the input was accepted in one line; the exit status for it."""
    print(f"error: {exc}", file=sys.stderr)
    return FAILED


def _device_and_dtype(args: argparse.Namespace):
    """(torch.device, dtype) of --device and --dtype; ValueError for a device that torch does
    not know or this machine does not have."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    try:
        device = torch.device(device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: not a device (auto, cpu, cuda or cuda:N)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"--device {args.device}: this machine has {count} CUDA device(s)")
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16,
                    "fp16": torch.float16}[args.dtype]


def _sampling_values(args: argparse.Namespace) -> tuple[int, int] | None:
    """Refuse sampling flags out of range (ValueError naming the flag); the --size asked for,
    as (width, height), or None."""
    from inference.pipelines import parse_size, snap_size

    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size),
                        ("--steps", args.steps), ("--chunk-size", args.chunk_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale {args.cfg_scale}: not a finite number")
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise ValueError(f"--strength {args.strength}: must lie in [0, 1]")
    if args.size is None:
        return None
    requested = parse_size(args.size)
    snap_size(*requested, 1)  # sides must be positive; the grid is known once a model is loaded
    return requested


def _set_tile_size(vae, tile_size: int | None) -> None:
    """Give `vae` the tile side of --tile-size (None: keep its config's); ValueError naming the
    flag for one it cannot take."""
    import dataclasses

    if tile_size is None:
        return
    factor = vae.downsample_factor
    if tile_size < factor or tile_size % factor:
        raise ValueError(f"--tile-size {tile_size}: must be a positive multiple of the VAE's "
                         f"downsampling factor {factor}")
    vae.config = dataclasses.replace(vae.config, sample_size=tile_size)  # read on each tiled call


def _check_vae(path: str, flag: str) -> None:
    """Refuse a VAE path given by `flag` that does not exist, before anything is loaded."""
    if not Path(path).exists():
        what = "VAE config" if flag == "--config" else "VAE"
        raise FileNotFoundError(f"{path}: the {what} given by {flag} was not found")


def _read_image(path: str):
    """The input image as RGB (`training.images.load_image`); "<path>: file not found" for a
    path that does not exist."""
    from training.images import load_image

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: file not found")
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not an image file")
    return load_image(path)


def _check_folder(folder: Path) -> None:
    """Refuse a folder that cannot be made: it, or its nearest existing parent, is a file."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{folder}: is a file, not a folder" if existing == folder
                                 else f"{folder}: cannot be made, {existing} is a file")


@contextmanager
def _naming(path: str) -> Iterator[None]:
    """Prefix the ValueErrors raised inside with `path`: the input image they are about."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _recon_target(image: str, out: str | None) -> tuple[Path, str]:
    """Where the reconstruction of `image` goes and its image format: --out as a file, or
    <stem>_recon.png in --out as a folder (or beside the image). Refuses, before any work, a
    path without a writable image extension and one that exists."""
    from PIL import Image

    name = Path(image).stem + "_recon.png"
    if out is None:
        path = Path(image).with_name(name)
    elif out.endswith("/") or Path(out).is_dir():
        path = Path(out) / name
    else:
        path = Path(out)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format not in Image.SAVE:
        raise ValueError(f"{path}: not an image file name (give --out a folder or a file "
                         "ending in .png, .jpg, ...)")
    if path.exists():
        what = "the input image" if path.resolve() == Path(image).resolve() else "exists"
        raise FileExistsError(f"{path}: {what}; refusing to overwrite it (choose another --out)")
    _check_folder(path.parent)
    return path, image_format


# A model samples well only near the sizes it trained on: its buckets have areas of about
# resolution² and aspects up to 4:1 (`data.max_aspect`). Beyond these factors, say so.
SIZE_WARN_AREA = 2.0
SIZE_WARN_ASPECT = 4.0


def _warn_if_untrained_size(width: int, height: int, resolution: int | None) -> None:
    """Print a warning when width × height lies far from the training sizes: an area more than
    SIZE_WARN_AREA times larger or smaller than resolution², or an aspect beyond
    SIZE_WARN_ASPECT:1 (samples there come out as texture, not pictures)."""
    if resolution is None:  # exports from before the resolution was recorded
        return
    area = width * height / resolution ** 2
    aspect = max(width / height, height / width)
    if not 1 / SIZE_WARN_AREA <= area <= SIZE_WARN_AREA or aspect > SIZE_WARN_ASPECT:
        print(f"warning: {width}x{height} is far from the sizes this model was trained at "
              f"(about {resolution}x{resolution} pixels in area, aspect up to "
              f"{SIZE_WARN_ASPECT:g}:1; this is {area:.1f}x the area, {aspect:.1f}:1); expect "
              "texture rather than pictures, or train at --resolution "
              f"{round((width * height) ** 0.5 / 16) * 16}", file=sys.stderr)


def _fill_sampling_defaults(args: argparse.Namespace) -> None:
    """Give the sampling flags left out their `SAMPLING_DEFAULTS`."""
    for key, value in SAMPLING_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _output_size(args: argparse.Namespace, requested: tuple[int, int] | None, source,
                 step: int, info) -> tuple[int, int]:
    """(width, height) of the samples: --size snapped to the grid of `step` (with a note when
    it moved), else the input image's size, else square at the training resolution (older
    exports: sqrt(base_tokens) tokens); warns of a size far from the training sizes."""
    from inference.pipelines import snap_size

    if requested is not None:
        width, height = snap_size(*requested, step)
        if requested != (width, height):
            print(f"note: size {requested[0]}x{requested[1]} is off the grid (sides are "
                  f"multiples of {step}); using {width}x{height}", file=sys.stderr)
    elif source is not None:
        with _naming(args.image):
            width, height = snap_size(*source.size, step)
    else:
        side = info.resolution or round(info.base_tokens ** 0.5) * step
        width, height = snap_size(side, side, step)
    _warn_if_untrained_size(width, height, info.resolution)
    return width, height


def sample(args: argparse.Namespace) -> int:
    """Generate (or, with --image, image-to-image) into --out. Bad input is refused before
    anything is written (exit 2); a failure while sampling or writing exits 1."""
    import torch

    from inference.conditions import described, sample_conditions
    from inference.pipelines import generate, grid_step, img2img, prepare_image, save_images
    from training.export import checkpoint_folder, is_export, load_generator

    _fill_sampling_defaults(args)
    if args.image is not None and args.strength is None:
        args.strength = IMG2IMG_STRENGTH
    started = time.perf_counter()
    try:  # the flags, the input files, --out, then the model; each refusal exits 2
        device, dtype = _device_and_dtype(args)
        requested = _sampling_values(args)
        if not is_export(Path(args.checkpoint)):
            checkpoint_folder(Path(args.checkpoint), args.step)  # a missing run or step
        if args.vae is not None:
            _check_vae(args.vae, "--vae")
        source = _read_image(args.image) if args.image is not None else None
        _check_folder(Path(args.out))
        model, vae, info = load_generator(args.checkpoint, args.step, device, args.vae,
                                          vae_dtype=dtype, text_encoder=args.text_encoder)
        _set_tile_size(vae, args.tile_size)
        step = grid_step(model, vae)
        cond = sample_conditions(info, args.num_samples, args.class_label, args.prompt,
                                 args.prompts_file, args.negative_prompt)
        width, height = _output_size(args, requested, source, step, info)
        image = prepare_image(source, step, (width, height)) if source is not None else None
    except (OSError, ValueError) as exc:  # ImageLoadError and ExportError are ValueErrors
        return _refuse(exc)
    except RuntimeError as exc:  # out of memory while loading, say
        return _fail(exc)
    common = dict(num_samples=args.num_samples, cond=cond, cfg_scale=args.cfg_scale,
                  steps=args.steps, sampler=args.sampler, seed=args.seed,
                  base_tokens=info.base_tokens,
                  autocast_dtype=None if dtype == torch.float32 else dtype,
                  progress=not args.no_progress, batch_size=args.batch_size)
    params = []
    for i in range(args.num_samples):
        meta = {"checkpoint": str(info.source), "step": info.step, "size": f"{width}x{height}",
                "seed": args.seed, "index": i, "noise_seed": args.seed + i}
        if cond is not None:
            meta.update({**info.condition.describe(cond, i), "cfg_scale": args.cfg_scale})
        meta.update({"steps": args.steps, "sampler": args.sampler, "dtype": args.dtype})
        if args.image is not None:
            meta.update({"image": str(args.image), "strength": args.strength})
        params.append(meta)
    try:
        if image is not None:
            images = img2img(model, vae, image, args.strength, **common)
        else:
            images = generate(model, vae, height, width, **common)
        paths = save_images(images, args.out, params)  # refuses NaN samples, writes nothing
    except (OSError, ValueError, RuntimeError) as exc:
        return _fail(exc)
    summary = {"out": str(args.out), "files": [str(p) for p in paths],
               "size": [width, height], "checkpoint": str(info.source), "step": info.step,
               "vae": str(info.vae), **described(cond, info),
               "seconds": round(time.perf_counter() - started, 3)}
    if args.json:
        print(json.dumps(summary))
    else:
        what = "image-to-image" if args.image is not None else "samples"
        print(f"wrote {args.num_samples} {what} of {width}x{height} to {paths[0]} .. "
              f"{paths[-2].name} and {paths[-1].name} "
              f"(step {info.step}, {args.sampler} {args.steps} steps, seed {args.seed})")
    return 0


def sample_npz(args: argparse.Namespace) -> int:
    """Sample --num-samples images into the ADM sample batch --npz (`inference/npz.py`), on
    this process or, under torchrun, every rank's share. Bad input, an existing output and a
    parts folder of other parameters are refused before any sampling (exit 2); a failure while
    sampling or writing exits 1, keeping the finished chunks for a rerun."""
    import torch

    from inference.npz import NpzJob, Sampling, check_output, prepare_parts, write_npz
    from inference.pipelines import grid_step
    from training.distributed import on_every_rank, setup, teardown
    from training.export import checkpoint_folder, is_export, load_generator

    _fill_sampling_defaults(args)
    try:
        _, dtype = _device_and_dtype(args)
        requested = _sampling_values(args)
        dist = setup(args.device)
    except (OSError, ValueError) as exc:
        return _refuse(exc)

    def load():  # on every rank: the input paths, the output, then the model
        if not is_export(Path(args.checkpoint)):
            checkpoint_folder(Path(args.checkpoint), args.step)
        if args.vae is not None:
            _check_vae(args.vae, "--vae")
        check_output(Path(args.npz))
        model, vae, info = load_generator(args.checkpoint, args.step, dist.device, args.vae,
                                          vae_dtype=dtype)
        _set_tile_size(vae, args.tile_size)
        if info.condition.kind == "text":
            raise ValueError(f"{info.source}: --npz writes class-labelled ADM batches; sample a "
                             "text-conditioned model with --prompts-file and --out")
        labels = info.condition.parse(args.class_label, args.num_samples)  # i mod classes
        width, height = _output_size(args, requested, None, grid_step(model, vae), info)
        rule = None if labels is None else (
            "balanced" if args.class_label is None else int(labels[0]))
        params = {"checkpoint": str(info.source.resolve()), "step": info.step,
                  "vae": str(Path(info.vae).resolve()), "size": f"{width}x{height}",
                  "labels": rule, "cfg_scale": args.cfg_scale, "steps": args.steps,
                  "sampler": args.sampler, "seed": args.seed, "dtype": args.dtype,
                  "tile_size": args.tile_size}
        job = NpzJob(Path(args.npz), args.num_samples, args.chunk_size or NPZ_CHUNK_SIZE, params)
        sampling = Sampling(height, width, labels, args.cfg_scale, args.steps, args.sampler,
                            args.seed, info.base_tokens,
                            None if dtype == torch.float32 else dtype,
                            args.batch_size or NPZ_BATCH_SIZE)
        return model, vae, job, sampling

    try:
        try:
            model, vae, job, sampling = on_every_rank(load)
            finished = prepare_parts(job, dist)
        except (OSError, ValueError) as exc:
            return _refuse(exc)
        except RuntimeError as exc:  # out of memory while loading, say
            return _fail(exc)
        try:
            result = write_npz(model, vae, job, sampling, finished, dist,
                               progress=not args.no_progress)
        except (OSError, ValueError, RuntimeError) as exc:
            return _fail(exc)
    finally:
        teardown()
    if not dist.is_main:
        return 0
    summary = {"path": str(result.path), "count": result.count, "size": list(result.size),
               "seconds": round(result.seconds, 3), "images_per_s": round(result.images_per_s, 3),
               "resumed": result.resumed, "ranks": dist.world_size,
               "labels": job.params["labels"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {result.count} samples of {result.size[0]}x{result.size[1]} to "
              f"{result.path} in {result.seconds:.1f} s ({result.images_per_s:.2f} images/s on "
              f"{dist.world_size} rank(s), {result.resumed} kept from an earlier run; labels: "
              f"{job.params['labels'] if job.params['labels'] is not None else 'none'})")
    return 0


def reconstruct(args: argparse.Namespace) -> int:
    """Reconstruct --image through the VAE of --config or --vae; prints PSNR/SSIM. Bad input is
    refused before anything is written (exit 2); a failure while reconstructing or writing
    exits 1."""
    import torch

    from inference.pipelines import crop_to_multiple
    from inference.pipelines import reconstruct as reconstruct_image
    from models.vae_weights import load_vae

    flag, source = ("--vae", args.vae) if args.vae is not None else ("--config", args.config)
    try:  # the flags, the input files, --out, then the VAE; each refusal exits 2
        device, dtype = _device_and_dtype(args)
        _check_vae(source, flag)
        image = _read_image(args.image)
        out, image_format = _recon_target(args.image, args.out)
        vae = load_vae(source, device=device)
        _set_tile_size(vae, args.tile_size)
        if vae.config.force_upcast:
            dtype = torch.float32
        vae = vae.to(dtype)
        with _naming(args.image):
            image = crop_to_multiple(image, vae.downsample_factor)
    except (OSError, ValueError) as exc:  # ImageLoadError is a ValueError
        return _refuse(exc)
    except RuntimeError as exc:  # out of memory while loading, say
        return _fail(exc)
    try:
        result = reconstruct_image(vae, image, device, dtype, progress=True)
        encoded = io.BytesIO()
        result.image.save(encoded, format=image_format)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "xb") as file:  # "x": never replaces a file, even one made meanwhile
            file.write(encoded.getvalue())
    except (OSError, ValueError, RuntimeError) as exc:
        return _fail(exc)
    summary = {"image": str(args.image), "out": str(out), "size": list(result.image.size),
               "latent_shape": list(result.latent_shape), "psnr": round(result.psnr, 3),
               "ssim": round(result.ssim, 4), "tiled": result.tiled}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {out} ({result.image.size[0]}x{result.image.size[1]}, latent "
              f"{tuple(result.latent_shape)}{', tiled' if result.tiled else ''}): "
              f"PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
