"""Inference from the command line: sample, image-to-image, or reconstruct through a VAE.

Sample from a DiT run (newest complete checkpoint, EMA weights), a checkpoint or an export:

    UV_CACHE_DIR=.uv-cache uv run python inference.py --checkpoint runs/NAME --num-samples 4 \
        --size 384x256 --class-label 3 --cfg-scale 4 --steps 28 --seed 0 --out DIR

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
replaces an existing file. --out is checked before any model is loaded.
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


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its default; --checkpoint selects sampling, else reconstruction."""
    parser = argparse.ArgumentParser(
        description="Sample from a DiT (--checkpoint), re-imagine an image (--checkpoint "
                    "--image), or reconstruct an image through a VAE (--config/--vae --image).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help="DiT run folder (newest complete checkpoint), checkpoint folder or "
                             "export folder; selects sampling")
    parser.add_argument("--step", type=int, default=None,
                        help="with a run folder: load this step's checkpoint")
    parser.add_argument("--config", default=None,
                        help="reconstruction: a VAE config.json; weights from the same folder")
    parser.add_argument("--vae", default=None,
                        help="a VAE folder, config.json, or single .safetensors/.ckpt file (with "
                             "the diffusers config.json beside it, if there is one; sampling: "
                             "overrides the VAE recorded with the checkpoint)")
    parser.add_argument("--image", default=None,
                        help="input image: reconstruction, or image-to-image with --checkpoint")
    parser.add_argument("--out", default=None,
                        help="sampling: output folder (required); reconstruction: output image "
                             "file (.png, .jpg, ...) or folder (ending in /, or existing) for "
                             "*_recon.png (default: next to the input); never overwritten")
    parser.add_argument("--num-samples", type=int, default=4, help="images to sample")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per forward pass (default: all at once)")
    parser.add_argument("--size", default=None,
                        help="WIDTHxHEIGHT, snapped to multiples of VAE factor × patch (default: "
                             "the training resolution, square; image-to-image: the input's "
                             "size)")
    parser.add_argument("--class-label", default=None,
                        help="class name or index (default: cycle through the classes)")
    parser.add_argument("--cfg-scale", type=float, default=4.0,
                        help="classifier-free guidance scale (1: conditional model alone)")
    parser.add_argument("--steps", type=int, default=28,
                        help="integration steps from noise to image (image-to-image: about "
                             "strength × steps)")
    parser.add_argument("--sampler", default="euler", choices=["euler", "heun"],
                        help="heun evaluates the model twice per step")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses noise seed + i")
    parser.add_argument("--strength", type=float, default=None,
                        help="image-to-image only: 0 keeps the input, 1 ignores it (default 0.6)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES,
                        help="DiT autocast dtype; the VAE too unless its config forces fp32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    load_dotenv(REPO_ROOT / ".env")
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"  # one line each
    args = build_parser().parse_args(argv)
    if args.checkpoint is not None:
        return sample(args)
    if args.image is None:
        print("error: give --checkpoint RUN to sample, or --image with --config/--vae to "
              "reconstruct", file=sys.stderr)
        return 2
    return reconstruct(args)


def _device_and_dtype(args: argparse.Namespace):
    """(torch.device, dtype) of --device and --dtype; ValueError for a device torch does not
    know."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a device (auto, cpu, cuda or cuda:N)"
                         ) from None
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16,
                    "fp16": torch.float16}[args.dtype]


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


def sample(args: argparse.Namespace) -> int:
    """Generate (or, with --image, image-to-image) into --out; one-line errors, exit 1 or 2."""
    if args.out is None:
        print("error: give --out DIR for the sampled images", file=sys.stderr)
        return 2
    if args.config is not None:
        print("error: --config is for reconstruction; with --checkpoint use --vae to override "
              "the VAE", file=sys.stderr)
        return 2
    if args.strength is not None and args.image is None:
        print("error: --strength is for image-to-image; give --image too", file=sys.stderr)
        return 2
    if args.image is not None and args.strength is None:
        args.strength = 0.6
    if args.num_samples < 1 or (args.batch_size is not None and args.batch_size < 1):
        print("error: --num-samples and --batch-size must be at least 1", file=sys.stderr)
        return 2
    if not math.isfinite(args.cfg_scale):
        print(f"error: --cfg-scale {args.cfg_scale}: not a finite number", file=sys.stderr)
        return 2
    import torch

    from inference.pipelines import (generate, grid_step, img2img, parse_size, prepare_image,
                                     resolve_labels, save_images, snap_size)
    from training.data import ImageLoadError, load_image
    from training.export import load_generator

    started = time.perf_counter()
    try:
        device, dtype = _device_and_dtype(args)
        _check_folder(Path(args.out))
        requested = parse_size(args.size) if args.size is not None else None
        source = load_image(args.image) if args.image is not None else None
        model, vae, info = load_generator(args.checkpoint, args.step, device, args.vae,
                                          vae_dtype=dtype)
        step = grid_step(model, vae)
        labels = resolve_labels(args.class_label, info.class_names, args.num_samples)
        common = dict(num_samples=args.num_samples, labels=labels, cfg_scale=args.cfg_scale,
                      steps=args.steps, sampler=args.sampler, seed=args.seed,
                      base_tokens=info.base_tokens,
                      autocast_dtype=None if dtype == torch.float32 else dtype,
                      progress=not args.no_progress, batch_size=args.batch_size)
        if requested is not None:
            width, height = snap_size(*requested, step)
            if requested != (width, height):
                print(f"note: size {requested[0]}x{requested[1]} is off the grid (sides are "
                      f"multiples of {step}); using {width}x{height}", file=sys.stderr)
        elif source is not None:
            with _naming(args.image):
                width, height = snap_size(*source.size, step)
        else:  # square at the training resolution (older exports: sqrt(base_tokens) tokens)
            side = info.resolution or round(info.base_tokens ** 0.5) * step
            width, height = snap_size(side, side, step)
        if source is not None:
            image = prepare_image(source, step, (width, height))
            images = img2img(model, vae, image, args.strength, **common)
        else:
            images = generate(model, vae, height, width, **common)
        params = []
        for i in range(args.num_samples):
            meta = {"checkpoint": str(info.source), "step": info.step,
                    "size": f"{width}x{height}", "seed": args.seed, "index": i,
                    "noise_seed": args.seed + i}
            if labels is not None:
                meta.update({"class": info.class_names[labels[i]], "class_index": labels[i],
                             "cfg_scale": args.cfg_scale})
            meta.update({"steps": args.steps, "sampler": args.sampler, "dtype": args.dtype})
            if args.image is not None:
                meta.update({"image": str(args.image), "strength": args.strength})
            params.append(meta)
        paths = save_images(images, args.out, params)
    except (OSError, ValueError, ImageLoadError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {"out": str(args.out), "files": [str(p) for p in paths],
               "size": [width, height], "checkpoint": str(info.source), "step": info.step,
               "vae": str(info.vae), "classes": [info.class_names[i] for i in labels or []],
               "seconds": round(time.perf_counter() - started, 3)}
    if args.json:
        print(json.dumps(summary))
    else:
        what = "image-to-image" if args.image is not None else "samples"
        print(f"wrote {args.num_samples} {what} of {width}x{height} to {paths[0]} .. "
              f"{paths[-2].name} and {paths[-1].name} "
              f"(step {info.step}, {args.sampler} {args.steps} steps, seed {args.seed})")
    return 0


def reconstruct(args: argparse.Namespace) -> int:
    """Reconstruct --image through the VAE of --config or --vae; prints PSNR/SSIM."""
    import torch

    from inference.pipelines import reconstruct as reconstruct_image
    from models.vae import load_vae
    from training.data import ImageLoadError, load_image

    source = args.vae or args.config
    if source is None:
        print("error: give --config vae/config.json or --vae PATH", file=sys.stderr)
        return 2
    try:
        device, dtype = _device_and_dtype(args)
        out, image_format = _recon_target(args.image, args.out)
        vae = load_vae(source, device=device)
        if dtype != torch.float32 and not vae.config.force_upcast:
            vae = vae.to(dtype)
        image = load_image(args.image)
        with _naming(args.image):
            result = reconstruct_image(vae, image, device, dtype if not vae.config.force_upcast
                                       else torch.float32)
        encoded = io.BytesIO()
        result.image.save(encoded, format=image_format)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "xb") as file:  # "x": never replaces a file, even one made meanwhile
            file.write(encoded.getvalue())
    except (OSError, ValueError, ImageLoadError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
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
