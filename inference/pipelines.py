"""Inference pipelines: VAE reconstruction (sampling and image-to-image arrive with the DiT)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.vae import AutoencoderKL
from training.metrics import psnr, ssim


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


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [-1, 1] -> RGB image."""
    x = x.reshape(-1, *x.shape[-3:])[0].float().clamp(-1, 1)
    arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


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
                dtype: torch.dtype = torch.float32) -> Reconstruction:
    """Encode an image to its posterior mean and decode it at its own size.

    Images larger than the VAE's tile (`sample_size`) on either side go through tiled encode
    and decode, so memory stays bounded.
    """
    original = crop_to_multiple(img, vae.downsample_factor)
    x = pil_to_tensor(original).to(device=device, dtype=dtype)  # (1, 3, H, W)
    tiled = max(x.shape[-2:]) > vae.config.sample_size
    posterior = vae.encode_tiled(x) if tiled else vae.encode(x)
    z = posterior.mode()  # (1, C, H/f, W/f)
    rec = (vae.decode_tiled(z) if tiled else vae.decode(z)).float().clamp(-1, 1)
    ref = x.float()
    return Reconstruction(tensor_to_pil(rec), original, float(psnr(rec, ref)[0]),
                          float(ssim(rec, ref)[0]), tuple(z.shape), tiled)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, h, w) -> images (B, 3, h·f, w·f) in [-1, 1]; tiled when the
    image is larger than the VAE's tile, so memory stays bounded."""
    raw = vae.denormalize(z.float())
    tiled = max(raw.shape[-2:]) * vae.downsample_factor > vae.config.sample_size
    return (vae.decode_tiled(raw) if tiled else vae.decode(raw)).float().clamp(-1, 1)


@torch.no_grad()
def generate(model, vae: AutoencoderKL, height: int, width: int, num_samples: int = 4,
             labels: list[int] | None = None, cfg_scale: float = 4.0, steps: int = 28,
             sampler: str = "euler", seed: int = 0, base_tokens: int = 256,
             autocast_dtype: torch.dtype | None = None, progress: bool = False,
             init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """Sample `num_samples` images of height × width pixels: (B, 3, H, W) in [-1, 1].

    The noise comes from a CPU generator seeded with `seed`, so the same call gives the same
    pixels on the same machine. `labels` (one per sample) switch on classifier-free guidance
    at `cfg_scale`. With `init` (normalised latents (B, C, h, w)) and `strength` < 1, the
    integration starts from `init` noised to the schedule's time `strength` (image-to-image).
    """
    from inference.samplers import SAMPLERS, guided
    from training.flow import shifted_timesteps, time_shift

    device = next(model.parameters()).device
    f, p = vae.downsample_factor, model.config.patch_size
    h, w = height // f, width // f
    if h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"{width}x{height} is not a multiple of {f * p} pixels")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, model.config.in_channels, h, w, generator=gen).to(device)
    shift = ((h // p) * (w // p) / base_tokens) ** 0.5
    ts = shifted_timesteps(steps, shift)  # (steps + 1,) from 1 to 0
    if init is not None:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must lie in (0, 1], got {strength}")
        t0 = float(time_shift(torch.tensor(strength), shift))
        ts = torch.cat([torch.tensor([t0]), ts[ts < t0]])
        x = (1 - t0) * init.to(device) + t0 * x
    y = None
    if labels is not None and model.config.num_classes > 0:
        y = torch.tensor(labels, device=device, dtype=torch.long)
    velocity = guided(model, cfg_scale, model.config.num_classes)
    context = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else torch.autocast(device.type, enabled=False))
    with context:
        z = SAMPLERS[sampler](velocity, x, ts, {"y": y}, disable=not progress)
    return decode_latents(vae, z)
