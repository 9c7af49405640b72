"""Inference from the command line.

Reconstruct an image through a VAE (weights found next to its config):

    UV_CACHE_DIR=.uv-cache uv run python inference.py --config vae/config.json --image in.png
    UV_CACHE_DIR=.uv-cache uv run python inference.py --vae path/to/vae.safetensors --image in.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from dotenv import load_dotenv

REPO_ROOT = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Reconstruct images through a VAE.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="a VAE config.json; its weights are loaded from the same folder")
    parser.add_argument("--vae", default=None,
                        help="a VAE folder, config.json, or single .safetensors/.ckpt file")
    parser.add_argument("--image", required=True, help="input image")
    parser.add_argument("--out", default=None,
                        help="output PNG (default: next to the input, named *_recon.png)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    load_dotenv(REPO_ROOT / ".env")
    args = build_parser().parse_args(argv)
    import torch

    from inference.pipelines import reconstruct
    from models.vae import load_vae
    from training.data import ImageLoadError, load_image

    source = args.vae or args.config
    if source is None:
        print("error: give --config vae/config.json or --vae PATH", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        vae = load_vae(source, device=device)
        if dtype != torch.float32 and not vae.config.force_upcast:
            vae = vae.to(dtype)
        image = load_image(args.image)
        result = reconstruct(vae, image, device, dtype if not vae.config.force_upcast
                             else torch.float32)
    except (FileNotFoundError, ValueError, ImageLoadError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(args.image).with_name(
        Path(args.image).stem + "_recon.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
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
