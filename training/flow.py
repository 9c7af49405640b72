"""Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0.

Training draws t from a logit-normal and shifts it towards noise for larger latents,
t' = s t / (1 + (s - 1) t) with s = sqrt(tokens / base_tokens) (SD3). Sampling
(`inference/samplers.py`) integrates dx/dt = v from t = 1 to 0 on the same shifted schedule.

The loss is the MSE between the predicted and the true velocity, plus, with `direction` > 0,
that weight times 1 - their cosine (LightningDiT's velocity-direction term; the quickstart uses
1, docs/training.md). The condition (`cond`, see `models/conditioning.py`) is dropped to its
null for a share of the samples, so that classifier-free guidance works at sampling. Under
torchrun each rank passes `part` = (rank, world size) to `loss`: t, the noise and the condition
dropout are drawn for the whole global batch and each rank keeps its own slice, so a run does
not depend on how its batch is split across processes. The world size × more draws are
negligible next to the model's forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from models.conditioning import ClassCondition, TextCondition

# model(x_t (B, C, H, W), t (B,), cond or None) -> v (B, C, H, W)
VelocityModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class RectifiedFlow:
    """The training objective and its helpers; holds settings only, no state."""

    condition: ClassCondition | TextCondition | None = None  # the kind (its null); None: none
    patch_size: int = 2  # the DiT's patch size, for counting tokens
    base_tokens: int = 256  # token count with no shift (a 32x32 latent at patch 2)
    logit_mean: float = 0.0  # t = sigmoid(N(logit_mean, logit_std^2)) before the shift
    logit_std: float = 1.0
    dropout: float = 0.1  # probability of replacing a sample's condition by the null one
    direction: float = 0.0  # weight of the velocity-direction term 1 - cos(v, target)

    def shift_for(self, height: int, width: int) -> float:
        """Shift s = sqrt(tokens / base_tokens) for a latent of height x width (SD3): the
        sampling schedule's `inference.samplers.token_shift` for this model's patch size."""
        tokens = (height // self.patch_size) * (width // self.patch_size)
        return math.sqrt(tokens / self.base_tokens)

    def sample_t(
        self,
        n: int,
        shift: float,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n training timesteps (n,): logit-normal, then shifted."""
        z = torch.randn(n, device=device, generator=generator)
        t = torch.sigmoid(self.logit_mean + self.logit_std * z)
        return shift * t / (1 + (shift - 1) * t)  # `inference.samplers.time_shift`

    def drop_condition(
        self,
        cond: Any,
        batch: int,
        device: torch.device,
        generator: torch.Generator | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> Any:
        """Replace the condition of each of `batch` samples by the null one with probability
        `dropout`; the draws are those of slice `part` = (rank, world size) of the global
        batch."""
        (rank, world), B = part, batch
        u = torch.rand(world * B, device=device, generator=generator)  # (world·B,)
        return self.condition.drop(cond, u[rank * B:(rank + 1) * B] < self.dropout)  # (B,) mask

    def loss(
        self,
        model: VelocityModel,
        x0: torch.Tensor,
        cond: Any = None,
        generator: torch.Generator | None = None,
        part: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:
        """Per-sample training loss (B,) for clean latents x0 (B, C, H, W); `.mean()` to train.

        Draws t and noise, and drops conditions for classifier-free guidance, for the global
        batch of world size × B samples; x0 and `cond` (None: the null condition) are slice
        `part` = (rank, world size) of it.
        """
        (rank, world), B = part, x0.shape[0]
        rows = slice(rank * B, (rank + 1) * B)  # this rank's rows of the global batch
        shift = self.shift_for(*x0.shape[-2:])
        t = self.sample_t(world * B, shift, x0.device, generator)[rows]  # (B,)
        noise = torch.randn((world * B, *x0.shape[1:]), device=x0.device, dtype=x0.dtype,
                            generator=generator)[rows]  # (B, C, H, W)
        if cond is not None:
            cond = self.drop_condition(cond, B, x0.device, generator, part)
        return self._velocity_loss(model, x0, noise, t, cond, self.direction)

    @staticmethod
    def _velocity_loss(
        model: VelocityModel,
        x0: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        direction: float = 0.0,
    ) -> torch.Tensor:
        """Per-sample MSE (B,) between the model's velocity at x_t and noise - x0; `direction`
        > 0 adds that weight times 1 - the cosine between the two (LightningDiT's
        velocity-direction term)."""
        t_ = t.to(x0.dtype).view(-1, 1, 1, 1)
        x_t = (1 - t_) * x0 + t_ * noise  # (B, C, H, W)
        v = model(x_t, t, cond)
        v, target = v.float(), (noise - x0).float()
        loss = (v - target).square().mean(dim=(1, 2, 3))  # (B,)
        if direction:
            cos = torch.nn.functional.cosine_similarity(v.flatten(1), target.flatten(1), dim=1)
            loss = loss + direction * (1 - cos)  # (B,)
        return loss

    @torch.no_grad()
    def validation_losses(
        self,
        model: VelocityModel,
        x0: torch.Tensor,
        cond: Any = None,
        bins: int = 8,
        seed: int = 0,
    ) -> torch.Tensor:
        """Mean loss (bins,) at the midpoints of `bins` equal t-bins, with seeded noise.

        No shift and no condition dropout, so numbers compare across runs and latent sizes. The
        noise depends only on (seed, x0's shape), drawn on the CPU for any device.
        """
        generator = torch.Generator().manual_seed(seed)
        losses = []
        for i in range(bins):
            noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
            t = torch.full((x0.shape[0],), (i + 0.5) / bins, device=x0.device)
            losses.append(self._velocity_loss(model, x0, noise, t, cond).mean())
        return torch.stack(losses)
