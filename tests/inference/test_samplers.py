"""Samplers and classifier-free guidance on toy velocity fields with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from inference.samplers import (SAMPLERS, guided, sample_euler, sample_heun, shifted_timesteps,
                                time_shift)
from models.conditioning import ClassCondition


class ByClass(torch.nn.Module):
    """v = x · (1 + y) + t: outputs differ by class; counts calls and batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.batches.append(x.shape[0])
        y = torch.full((x.shape[0],), 9) if y is None else y
        return x * (1 + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1)


NINE = ClassCondition(9)  # labels 0..8, the null class 9


def test_samplers_cfg_scale_one_is_the_conditional_prediction() -> None:
    model = ByClass()
    x, t, y = torch.randn(3, 2, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    v_cond = model(x, t, y)
    model.batches.clear()
    assert torch.equal(guided(model, 1.0, NINE)(x, t, y), v_cond)
    assert model.batches == [3]  # no unconditional pass at all


def test_samplers_cfg_is_one_batched_pass_of_both_predictions() -> None:
    model = ByClass()
    x, t, y = torch.randn(3, 2, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    v_cond, v_uncond = model(x, t, y), model(x, t, torch.full_like(y, 9))
    assert not torch.allclose(v_cond, v_uncond)
    model.batches.clear()
    v = guided(model, 4.0, NINE)(x, t, y)
    assert model.batches == [6]  # conditional and unconditional halves in one forward
    torch.testing.assert_close(v, v_uncond + 4.0 * (v_cond - v_uncond))
    assert torch.equal(guided(model, 4.0, NINE)(x, t, None), model(x, t, None))  # no labels


def _linear(rate: float):
    return lambda x, t, y=None: rate * x  # dx/dt = a x: x(0) = x(1) · exp(−a)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_samplers_converge_on_a_linear_field(name: str) -> None:
    x1, rate = torch.randn(2, 3, 4, 4, dtype=torch.float64), 1.5
    exact = x1 * math.exp(-rate)
    errors = [(SAMPLERS[name](_linear(rate), x1, shifted_timesteps(n, 2.0).double())
               - exact).abs().max().item() for n in (4, 16, 64, 256)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 40 and errors[-1] < 1e-2, errors  # at least first order


def test_samplers_heun_differs_from_euler_and_is_more_accurate() -> None:
    x1, rate = torch.randn(2, 3, 4, 4, dtype=torch.float64), 1.5
    exact = x1 * math.exp(-rate)
    ts = shifted_timesteps(8).double()
    euler = sample_euler(_linear(rate), x1, ts)
    heun = sample_heun(_linear(rate), x1, ts)
    assert not torch.allclose(euler, heun, atol=1e-3)
    assert (heun - exact).abs().max() < (euler - exact).abs().max() / 2


def test_samplers_leave_input_alone_and_report_every_step() -> None:
    x1 = torch.randn(1, 2, 2, 2)
    before = x1.clone()
    for sampler in (sample_euler, sample_heun):
        seen: list[dict] = []
        ts = shifted_timesteps(5)
        out = sampler(_linear(1.0), x1, ts, callback=seen.append)
        assert torch.equal(x1, before) and not torch.equal(out, x1)
        assert [d["i"] for d in seen] == list(range(5))
        assert [d["t"] for d in seen] == ts[1:].tolist()  # the time each step reached
        assert torch.equal(seen[-1]["x"], out)
        assert all(not torch.equal(a["x"], b["x"]) for a, b in zip(seen, seen[1:]))


def test_samplers_callback_states_follow_the_exact_flow() -> None:
    # v = x / t has the exact solution x(t) = t · x(1): both samplers follow it exactly, and
    # each reported state must be the state at its reported time (kept, not overwritten).
    x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for sampler in (sample_euler, sample_heun):
        seen: list[tuple[float, torch.Tensor]] = []
        sampler(lambda x, t: x / t.view(-1, 1, 1, 1), x1, shifted_timesteps(6).double(),
                callback=lambda d: seen.append((d["t"], d["x"])))
        for t, x in seen:
            torch.testing.assert_close(x, t * x1, rtol=0, atol=1e-12)


def test_samplers_schedule_runs_from_one_to_zero():
    ts = shifted_timesteps(10, shift=3.0)
    assert ts.shape == (11,) and ts[0] == 1 and ts[-1] == 0
    assert (ts.diff() < 0).all()
    torch.testing.assert_close(ts, time_shift(torch.linspace(1, 0, 11), 3.0))
