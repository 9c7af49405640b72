"""Image quality metrics on tensors in [-1, 1]: PSNR and SSIM (Gaussian window)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1)  # on the [0, 1] scale
    return -10 * torch.log10(mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [-1, 1], averaged over channels and pixels.

    Wang et al. 2004 with an 11×11 Gaussian window (σ 1.5), K1 = 0.01, K2 = 0.03, computed on
    the [0, 1] scale over the valid region (no padding).
    """
    a = (a.float() + 1) / 2
    b = (b.float() + 1) / 2
    channels = a.shape[1]
    g = _gaussian_window(min(window, a.shape[-1], a.shape[-2]), sigma, a.device)
    kx = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)  # (C, 1, 1, k): separable blur
    ky = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)  # (C, 1, k, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, kx, groups=channels), ky, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1)
                                                      * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
