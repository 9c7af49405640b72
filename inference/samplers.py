"""Samplers for rectified flow: integrate dx/dt = v from t = 1 (noise) to t = 0 (data).

Every sampler has one signature, `sample_*(model, x, timesteps, extra_args, callback, disable)`,
so they swap freely (the k-diffusion convention). `model(x, t, **extra_args)` returns the
velocity; wrap a DiT with `guided` to add classifier-free guidance in one batched pass. The
sampling schedule (`shifted_timesteps`) is the training schedule's shift (`time_shift`).
`callback`, if given, receives {"i": step, "t": time reached, "x": state at that time} after
every step; each state is a new tensor, so callbacks may keep them (a trajectory, previews).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from models.conditioning import ClassCondition

Velocity = Callable[..., torch.Tensor]


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Map t in [0, 1] to s t / (1 + (s - 1) t): monotone, fixes 0 and 1, identity for s = 1."""
    return shift * t / (1 + (shift - 1) * t)


def token_shift(height: int, width: int, patch_size: int, base_tokens: int) -> float:
    """Shift s = sqrt(tokens / base_tokens) for a latent of height x width (SD3)."""
    tokens = (height // patch_size) * (width // patch_size)
    return math.sqrt(tokens / base_tokens)


def shifted_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Sampling schedule (steps + 1,) from t = 1 down to t = 0, shifted like training."""
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def guided(model: Velocity, cfg_scale: float, condition: ClassCondition) -> Velocity:
    """Classifier-free guidance: v = v_uncond + s · (v_cond − v_uncond), both from one forward
    over the doubled batch (the conditions first, then as many null ones: `condition` is their
    kind, `models/conditioning.py`).

    With `cfg_scale == 1` (or no condition) this is the conditional model alone, at no extra
    cost. The combination is done in fp32, so a bf16 model output is not amplified in bf16.
    """

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if cond is None or cfg_scale == 1.0:
            return model(x, t, cond)
        v = model(torch.cat([x, x]), torch.cat([t, t]), condition.with_null(cond))  # (2B, ...)
        v_cond, v_uncond = v.float().chunk(2)  # each (B, C, H, W)
        return torch.lerp(v_uncond, v_cond, cfg_scale)  # v_u + s (v_c − v_u)

    return velocity


@torch.no_grad()
def sample_euler(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor,
                 extra_args: dict | None = None, callback: Callable | None = None,
                 disable: bool = True) -> torch.Tensor:
    """First-order steps x ← x + (t_next − t) · v(x, t) along `timesteps` (decreasing).

    `x` is not modified: every step makes a new state.
    """
    extra_args = extra_args or {}
    ts = timesteps.tolist()
    t = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)  # (B,), refilled per step
    for i in tqdm(range(len(ts) - 1), disable=disable, desc="euler"):
        v = model(x, t.fill_(ts[i]), **extra_args)
        x = torch.add(x, v, alpha=ts[i + 1] - ts[i])  # in x's dtype (fp32 under autocast)
        if callback is not None:
            callback({"i": i, "t": ts[i + 1], "x": x})
    return x


@torch.no_grad()
def sample_heun(model: Velocity, x: torch.Tensor, timesteps: torch.Tensor,
                extra_args: dict | None = None, callback: Callable | None = None,
                disable: bool = True) -> torch.Tensor:
    """Second-order (Heun) steps: average the velocity at both ends; Euler for the last step
    into t = 0, where the second evaluation would be wasted. `x` is not modified: every step
    makes a new state."""
    extra_args = extra_args or {}
    ts = timesteps.tolist()
    t = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)  # (B,), refilled per step
    for i in tqdm(range(len(ts) - 1), disable=disable, desc="heun"):
        dt = ts[i + 1] - ts[i]
        v = model(x, t.fill_(ts[i]), **extra_args).to(x.dtype)
        if ts[i + 1] > 0:
            v_next = model(torch.add(x, v, alpha=dt), t.fill_(ts[i + 1]), **extra_args)
            v = (v + v_next.to(x.dtype)) * 0.5
        x = torch.add(x, v, alpha=dt)
        if callback is not None:
            callback({"i": i, "t": ts[i + 1], "x": x})
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun}
