"""The autoencoder's training loss (LDM's recipe), one step's worth.

    loss = rec + perceptual_weight · LPIPS + kl_weight · KL / pixels
           + ramp · disc_weight · adaptive_weight · GAN

- rec: per-pixel L1 (or L2) between reconstruction and input, both in [-1, 1];
- LPIPS: the perceptual distance, when both LPIPS files are configured;
- KL: of the posterior against N(0, I), summed over latent elements, mean over the batch. LDM sums
  the reconstruction over pixels; ours is a per-pixel mean, so the KL is divided by the pixel
  count to keep LDM's balance at `kl_weight`;
- GAN: the PatchGAN generator hinge term, from `disc_start` on, ramped in linearly over
  `disc_ramp` steps and weighted by the ratio of the gradient norms of rec + LPIPS and of GAN at
  the decoder's last layer (`adaptive_weight`), so neither term drowns the other.

The discriminator's own hinge loss is `models.discriminator.hinge_d_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.discriminator import generator_hinge_loss
from models.vae import DiagonalGaussian
from training.config import VAEStageConfig
from training.distributed import all_reduce_mean


@dataclass
class AutoencoderLoss:
    """One step's loss and its terms, each a scalar tensor."""

    total: torch.Tensor  # what backward runs on
    rec: torch.Tensor
    perceptual: torch.Tensor  # 0 without LPIPS
    kl: torch.Tensor  # summed over latent elements, mean over the batch (before its weight)
    gan: torch.Tensor  # the generator hinge term (0 before disc_start)
    gan_weight: torch.Tensor  # disc_weight × adaptive weight (0 before disc_start)


def gan_ramp(step: int, start: int, ramp: int) -> float:
    """The GAN term's ramp at `step`: 0 before `start`, then linear up to 1 over `ramp` steps."""
    return 0.0 if step < start else min(1.0, (step - start + 1) / max(1, ramp))


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """‖∇nll‖ / (‖∇g‖ + 1e-4) at the decoder's last layer, clamped to [0, 1e4], detached.

    Under torchrun the gradients are averaged over the ranks first (they are small), so every
    rank weighs the GAN term as one process would for the whole global batch.
    """
    nll_grad = all_reduce_mean(torch.autograd.grad(nll, last, retain_graph=True)[0])
    g_grad = all_reduce_mean(torch.autograd.grad(g_loss, last, retain_graph=True)[0])
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def autoencoder_loss(x: torch.Tensor, rec: torch.Tensor, posterior: DiagonalGaussian,
                     v: VAEStageConfig, ramp: float, disc: nn.Module,
                     lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
                     last_layer: torch.Tensor) -> AutoencoderLoss:
    """The loss of reconstructions `rec` of images `x`, each (B, 3, H, W) in [-1, 1], with the
    encoder's `posterior`, at GAN ramp `ramp` (`gan_ramp`); `last_layer` is the decoder's last
    weight, for `adaptive_weight`. The discriminator is not trained by this loss."""
    err = rec.float() - x  # (B, 3, H, W)
    rec_loss = err.abs().mean() if v.rec_loss == "l1" else err.pow(2).mean()
    p_loss = lpips(rec.float(), x).mean() if lpips is not None else rec_loss.new_zeros(())
    nll = rec_loss + v.perceptual_weight * p_loss
    kl = posterior.kl().mean()
    total = nll + v.kl_weight * kl / x[0].numel()
    g_loss = g_weight = rec_loss.new_zeros(())
    if ramp > 0:
        disc.requires_grad_(False)  # its gradients come from its own step only
        g_loss = generator_hinge_loss(disc(rec))
        disc.requires_grad_(True)
        g_weight = adaptive_weight(nll, g_loss, last_layer) * v.disc_weight
        total = total + ramp * g_weight * g_loss
    return AutoencoderLoss(total, rec_loss, p_loss, kl, g_loss, g_weight)
