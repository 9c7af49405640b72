"""Samplers for rectified flow: integrate dx/dt = v from t = 1 (noise) to t = 0 (data).

Every sampler has one signature, `sample_*(model, x, timesteps, extra_args, callback, disable)`,
so they swap freely (the k-diffusion convention). `model(x, t, **extra_args)` returns the
velocity; wrap a DiT with `guided` to add classifier-free guidance in one batched pass.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

Velocity = Callable[..., torch.Tensor]


def guided(model: Velocity, cfg_scale: float, null_class: int) -> Velocity:
    """Classifier-free guidance: v = v_uncond + s · (v_cond − v_uncond), both from one forward.

    With `cfg_scale == 1` (or no labels) this is the conditional model alone, at no extra cost.
    """

    def velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None or cfg_scale == 1.0:
            return model(x, t, y)
        null = torch.full_like(y, null_class)
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C, H, W)
        v_cond, v_uncond = v.chunk(2)
        return torch.lerp(v_uncond, v_cond, cfg_scale)  # v_u + s (v_c − v_u)

    return velocity


@torch.no_grad()
def sample_euler(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor,
                 extra_args: dict | None = None, callback: Callable | None = None,
                 disable: bool = True) -> torch.Tensor:
    """First-order steps x ← x + (t_next − t) · v(x, t) along `timesteps` (decreasing)."""
    extra_args = extra_args or {}
    ts = timesteps.tolist()
    for i in tqdm(range(len(ts) - 1), disable=disable, desc="euler"):
        t = torch.full((x.shape[0],), ts[i], device=x.device, dtype=torch.float32)
        v = model(x, t, **extra_args)
        x = x + (ts[i + 1] - ts[i]) * v.to(x.dtype)
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x})
    return x


@torch.no_grad()
def sample_heun(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor,
                extra_args: dict | None = None, callback: Callable | None = None,
                disable: bool = True) -> torch.Tensor:
    """Second-order (Heun) steps: average the velocity at both ends; Euler for the last step
    into t = 0, where the second evaluation would be wasted."""
    extra_args = extra_args or {}
    ts = timesteps.tolist()
    for i in tqdm(range(len(ts) - 1), disable=disable, desc="heun"):
        dt = ts[i + 1] - ts[i]
        t = torch.full((x.shape[0],), ts[i], device=x.device, dtype=torch.float32)
        v = model(x, t, **extra_args).to(x.dtype)
        x_next = x + dt * v
        if ts[i + 1] > 0:
            t_next = torch.full_like(t, ts[i + 1])
            v_next = model(x_next, t_next, **extra_args).to(x.dtype)
            x_next = x + dt * 0.5 * (v + v_next)
        x = x_next
        if callback is not None:
            callback({"i": i, "t": ts[i], "x": x})
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}
