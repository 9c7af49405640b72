"""Inference pipelines: VAE reconstruction, sampling and image-to-image with a DiT.

Sampling draws each sample's noise from its own seeded CPU generator, integrates the rectified
flow on the training schedule's shift for the image's token count (`inference/samplers.py`, with
classifier-free guidance in one batched pass), and decodes once per batch. Image-to-image
encodes the input to its normalised posterior mean, noises it to the time of `strength` and
integrates back from there. Images above `TILE_ABOVE_PIXELS` go through the VAE in tiles.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from models.dit import DiT
from models.vae import AutoencoderKL
from inference.metrics import psnr, ssim
from inference.samplers import (SAMPLERS, guided, shifted_timesteps, time_shift,
                                token_shift)

# Images up to this many pixels go through the VAE whole; larger ones in overlapping tiles of the
# VAE's `sample_size`, which bounds memory but costs quality (each tile normalises on its own:
# with the shipped VAE's 512 px tiles, 0.1 to 0.4 dB PSNR lost on 640x360 to 1280x720
# photographs, where 256 px tiles lose 0.4 to 0.9 dB).
TILE_ABOVE_PIXELS = 1024 * 1024


def needs_tiling(height: int, width: int) -> bool:
    """Whether an image of height x width pixels is encoded and decoded in tiles."""
    return height * width > TILE_ABOVE_PIXELS


@dataclass
class Reconstruction:
    """A reconstructed image and how close it is to its (cropped) input."""

    image: Image.Image  # the reconstruction, RGB
    original: Image.Image  # the input, centre-cropped to a multiple of the downsampling factor
    psnr: float
    ssim: float
    latent_shape: tuple[int, ...]  # (1, C, h, w)
    tiled: bool


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float in [-1, 1]."""
    arr = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8
    return arr.unsqueeze(0).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) on the CPU: the pixels that PNGs
    and ADM sample batches hold (values outside [-1, 1] are clamped)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> RGB image."""
    return Image.fromarray(to_uint8(x.reshape(-1, *x.shape[-3:])[:1])[0])


def crop_to_multiple(img: Image.Image, factor: int) -> Image.Image:
    """Centre-crop so that both sides are multiples of `factor`."""
    w, h = img.size
    cw, ch = w // factor * factor, h // factor * factor
    if cw == 0 or ch == 0:
        raise ValueError(f"image of {w}x{h} is smaller than the downsampling factor {factor}")
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, img: Image.Image, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, progress: bool = False) -> Reconstruction:
    """Encode an image to its posterior mean and decode it at its own size.

    Images above `TILE_ABOVE_PIXELS` go through tiled encode and decode, so memory stays
    bounded; `progress` shows a bar over the tiles then (a large photograph takes minutes on a
    CPU).
    """
    original = crop_to_multiple(img, vae.downsample_factor)
    x = pil_to_tensor(original).to(device=device, dtype=dtype)  # (1, 3, H, W)
    tiled = needs_tiling(*x.shape[-2:])
    posterior = vae.encode_tiled(x, progress) if tiled else vae.encode(x)
    z = posterior.mode()  # (1, C, H/f, W/f)
    rec = (vae.decode_tiled(z, progress) if tiled else vae.decode(z)).float().clamp(-1, 1)
    ref = x.float()
    return Reconstruction(tensor_to_pil(rec), original, float(psnr(rec, ref)[0]),
                          float(ssim(rec, ref)[0]), tuple(z.shape), tiled)


# --- sampling and image-to-image ------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """'384x256' -> (384, 256) as (width, height); ValueError when it is not WIDTHxHEIGHT."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT (e.g. 384x256)") from None
    return width, height


def snap_size(width: int, height: int, step: int) -> tuple[int, int]:
    """The nearest size whose sides are multiples of `step` (VAE factor × patch size).

    Raises ValueError for a side that is not positive or is smaller than one step.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"size {width}x{height}: sides must be positive")
    if width < step or height < step:
        raise ValueError(f"size {width}x{height} is smaller than one grid step: sides must be "
                         f"at least {step} pixels (VAE factor × patch size)")
    return (width + step // 2) // step * step, (height + step // 2) // step * step


def grid_step(model: DiT, vae: AutoencoderKL) -> int:
    """Pixels per token side: image sides must be multiples of this."""
    return vae.downsample_factor * model.config.patch_size


def initial_noise(count: int, shape: tuple[int, int, int], seed: int, first: int = 0
                  ) -> torch.Tensor:
    """Noise (count, C, h, w) on the CPU; sample i is drawn from a generator seeded with
    seed + first + i, so a sample does not depend on how many are drawn with it."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(first, first + count)])


def sampling_timesteps(steps: int, shift: float, strength: float = 1.0) -> torch.Tensor:
    """Times (n + 1,) from the start time down to 0 on the shifted schedule.

    `strength` < 1 starts at the shifted time of `strength` instead of 1, keeping the grid
    points below it (about strength × steps steps); strength 0 gives just [0.0] (no step).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    ts = shifted_timesteps(steps, shift)  # (steps + 1,) from 1 to 0
    if strength == 1.0:
        return ts
    t0 = float(time_shift(torch.tensor(strength, dtype=torch.float64), shift))
    return torch.cat([torch.tensor([t0]), ts[ts < t0 - 1e-6]])  # no near-zero first step


def _slice(cond: Any, rows: range) -> Any:
    """Rows `rows` of a batched condition (None stays None)."""
    return None if cond is None else cond[rows.start:rows.stop]


@torch.inference_mode()
def sample_latents(model: DiT, latent_size: tuple[int, int], *, num_samples: int = 4,
                   cond: Any = None, cfg_scale: float = 4.0, steps: int = 28,
                   sampler: str = "euler", seed: int = 0, base_tokens: int = 256,
                   autocast_dtype: torch.dtype | None = None, init: torch.Tensor | None = None,
                   strength: float = 1.0, first: int = 0,
                   callback: Callable | None = None) -> torch.Tensor:
    """Normalised latents (num_samples, C, h, w) for `latent_size` (h, w), integrated from
    t = 1 (or, with `init`, from `init` noised to the time of `strength`) to 0.

    `cond` is one condition per sample (`model.condition`'s kind, e.g. class labels (B,)),
    which switches on classifier-free guidance at `cfg_scale`; None samples unconditionally.
    Sample i's noise is seeded with seed + first + i. `callback` is called after every step.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = next(model.parameters()).device
    (h, w), p = latent_size, model.config.patch_size
    if h % p or w % p or h <= 0 or w <= 0:
        raise ValueError(f"latent size {h}x{w} is not a positive multiple of the patch {p}")
    x = initial_noise(num_samples, (model.config.in_channels, h, w), seed, first).to(device)
    shift = token_shift(h, w, p, base_tokens)
    ts = sampling_timesteps(steps, shift, strength if init is not None else 1.0)
    if init is not None:  # image-to-image: the data point noised to the start time
        x = torch.lerp(init.to(device, torch.float32), x, ts[0].item())  # (1 − t0)·x0 + t0·ε
    if cond is not None:
        if len(cond) != num_samples:
            raise ValueError(f"{len(cond)} conditions for {num_samples} samples")
        model.condition.check(cond)
        cond = cond.to(device)
    velocity = guided(model, cfg_scale, model.condition)
    context = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else torch.autocast(device.type, enabled=False))
    with context:
        return SAMPLERS[sampler](velocity, x, ts, {"cond": cond}, callback=callback)


def generate(model: DiT, vae: AutoencoderKL, height: int, width: int, *, num_samples: int = 4,
             cond: Any = None, cfg_scale: float = 4.0, steps: int = 28, sampler: str = "euler",
             seed: int = 0, base_tokens: int = 256, autocast_dtype: torch.dtype | None = None,
             progress: bool = False, init: torch.Tensor | None = None, strength: float = 1.0,
             batch_size: int | None = None) -> torch.Tensor:
    """Sample `num_samples` images of height × width pixels: (B, 3, H, W) in [-1, 1].

    Sample i's noise comes from a CPU generator seeded with seed + i, so the same call gives
    the same pixels on the same machine, and a sample does not depend on its batch. `cond`
    (one condition per sample, see `sample_latents`) switches on classifier-free guidance at
    `cfg_scale`; None samples a conditional model unconditionally. With `init` (normalised
    latents (1 or B, C, h, w)) the integration starts from `init` noised to the schedule's time
    `strength` (image-to-image). Samples are drawn `batch_size` at a time (default: all at
    once), each batch decoded once, through tiles above `TILE_ABOVE_PIXELS`. `progress` shows
    one bar.
    """
    f, p = vae.downsample_factor, model.config.patch_size
    if height % (f * p) or width % (f * p) or height <= 0 or width <= 0:
        raise ValueError(f"{width}x{height} is not a multiple of {f * p} pixels "
                         "(VAE factor × patch size)")
    batch_size = batch_size or num_samples
    chunks = [range(i, min(i + batch_size, num_samples))
              for i in range(0, num_samples, batch_size)]
    shift = token_shift(height // f, width // f, p, base_tokens)
    ts_count = len(sampling_timesteps(steps, shift, strength if init is not None else 1.0)) - 1
    bar = tqdm(total=ts_count * len(chunks), desc=f"{sampler} {width}x{height}",
               disable=not progress, dynamic_ncols=True)
    images = []
    for chunk in chunks:
        part = init if init is None or init.shape[0] == 1 else init[chunk.start:chunk.stop]
        z = sample_latents(model, (height // f, width // f), num_samples=len(chunk),
                           cond=_slice(cond, chunk), cfg_scale=cfg_scale, steps=steps,
                           sampler=sampler, seed=seed, base_tokens=base_tokens,
                           autocast_dtype=autocast_dtype, init=part, strength=strength,
                           first=chunk.start, callback=lambda _: bar.update(1))
        images.append(decode_latents(vae, z))
    bar.close()
    return torch.cat(images)  # (B, 3, H, W)


@torch.inference_mode()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> images (B, 3, h·f, w·f) in [-1, 1]; tiled above
    `TILE_ABOVE_PIXELS`, so memory stays bounded."""
    raw = vae.denormalize(z.float())
    f = vae.downsample_factor
    tiled = needs_tiling(raw.shape[-2] * f, raw.shape[-1] * f)
    return (vae.decode_tiled(raw) if tiled else vae.decode(raw)).float().clamp(-1, 1)


def prepare_image(img: Image.Image, step: int, size: tuple[int, int] | None = None
                  ) -> Image.Image:
    """Resize `img` to cover `size` (default: its own size), snapped to the grid of `step`,
    and centre-crop it there, as training does with buckets (the same placement and resampling
    as `training.images.crop_to_bucket`)."""
    from bucketing import place

    target = snap_size(*(size or img.size), step)
    placement = place(*img.size, *target, 0)
    resized = img.convert("RGB").resize(placement.resized, Image.BICUBIC, reducing_gap=3.0)
    return resized.crop(placement.crop)


@torch.inference_mode()
def encode_image(vae: AutoencoderKL, img: Image.Image,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised posterior mean (1, C, H/f, W/f) of an image whose sides are multiples of
    the VAE factor; tiled above `TILE_ABOVE_PIXELS`."""
    x = pil_to_tensor(img).to(device)  # (1, 3, H, W)
    tiled = needs_tiling(*x.shape[-2:])
    posterior = vae.encode_tiled(x) if tiled else vae.encode(x)
    return vae.normalize(posterior.mode().float())


def img2img(model: DiT, vae: AutoencoderKL, img: Image.Image, strength: float = 0.6,
            **generate_args) -> torch.Tensor:
    """Re-imagine `img` (sides already on the grid, see `prepare_image`): encode it, noise it
    to the time of `strength` and integrate back. Returns (B, 3, H, W) in [-1, 1] at its size;
    `generate_args` are those of `generate` (num_samples, labels, cfg_scale, seed, ...)."""
    device = next(model.parameters()).device
    init = encode_image(vae, img, device)  # (1, C, h, w)
    return generate(model, vae, img.height, img.width, init=init, strength=strength,
                    **generate_args)


def png_info(params: dict) -> PngInfo:
    """PNG text chunks, one per parameter (values as text)."""
    info = PngInfo()
    for key, value in params.items():
        info.add_text(key, str(value))
    return info


def save_images(images: torch.Tensor, out_dir: str | os.PathLike,
                params: list[dict]) -> list[Path]:
    """Write images (B, 3, H, W) in [-1, 1] as out_dir/NNNN.png with their parameters
    `params[i]` as PNG text chunks, and their grid as grid_NNNN.png (NNNN: the grid's first
    image; it carries the parameters common to all). Numbering continues after the highest
    NNNN of the NNNN.png and grid_NNNN.png already in out_dir, so earlier results are never
    overwritten. Returns the paths, grid last."""
    finite = torch.isfinite(images).flatten(1).all(1)  # (B,)
    if not finite.all():  # they would be written as black images
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise ValueError(f"sample(s) {bad} came out NaN or infinite, nothing written (in bf16 "
                         "or fp16 try --dtype fp32)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbered = (re.fullmatch(r"(?:grid_)?(\d{4,})\.png", p.name) for p in out.iterdir())
    start = max((int(m[1]) for m in numbered if m), default=-1) + 1
    paths = []
    for i, (image, meta) in enumerate(zip(images, params)):
        paths.append(_write_new(out / f"{start + i:04d}.png", tensor_to_pil(image), meta))
    common = {k: v for k, v in params[0].items() if all(p.get(k) == v for p in params)}
    common.pop("index", None)
    grid = _write_new(out / f"grid_{start:04d}.png", tensor_to_pil(image_grid(images)), common)
    return paths + [grid]


def _write_new(path: Path, image: Image.Image, meta: dict) -> Path:
    """Write a PNG with `meta` as text chunks to a path that must not exist yet (another process
    writing into the same folder meanwhile is refused, not overwritten)."""
    try:
        with open(path, "xb") as file:
            image.save(file, format="PNG", pnginfo=png_info(meta))
    except FileExistsError:
        raise FileExistsError(f"{path}: appeared while writing (another process is writing "
                              "into this folder?); refusing to overwrite it") from None
    return path


def image_grid(images: torch.Tensor, padding: int = 2, cols: int | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] side by side in a grid on white (near-square unless
    `cols` is given): (3, rows·(H + padding) + padding, cols·(W + padding) + padding)."""
    count, channels, height, width = images.shape
    cols = cols or math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = images.new_ones(channels, rows * (height + padding) + padding,
                           cols * (width + padding) + padding)
    for i, image in enumerate(images):
        top = padding + i // cols * (height + padding)
        left = padding + i % cols * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    return grid
