import math

import torch

from inference.samplers import sample_euler, shifted_timesteps
from models.registry import build_dit
from inference.samplers import time_shift, token_shift
from models.conditioning import ClassCondition
from training.flow import RectifiedFlow


def test_flow_shift_is_identity_at_one_monotone_and_fixes_endpoints():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(time_shift(t, 1.0), t)
    for s in (0.5, 2.0, 4.0):
        shifted = time_shift(t, s)
        assert (shifted.diff() > 0).all()
        assert shifted[0] == 0 and shifted[-1] == 1
        assert ((shifted[1:-1] > t[1:-1]) == (s > 1)).all()  # s > 1 moves t towards noise
    flow = RectifiedFlow(patch_size=2, base_tokens=256)
    assert flow.shift_for(32, 32) == 1.0
    assert flow.shift_for(64, 64) == 2.0
    assert math.isclose(flow.shift_for(32, 64), math.sqrt(2))
    assert flow.shift_for(48, 40) == token_shift(48, 40, flow.patch_size, flow.base_tokens)


def test_flow_timesteps_are_logit_normal_and_seeded():
    flow = RectifiedFlow()
    t = flow.sample_t(20_000, 1.0, generator=torch.Generator().manual_seed(0))
    assert ((t > 0) & (t < 1)).all()
    logits = torch.logit(t.double())
    assert abs(logits.mean()) < 0.03 and abs(logits.std() - 1) < 0.03
    again = flow.sample_t(20_000, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    shifted = flow.sample_t(20_000, 2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, time_shift(t, 2.0))


def test_flow_condition_dropout_rate_is_about_ten_percent():
    flow = RectifiedFlow(condition=ClassCondition(10))
    y = torch.arange(100_000) % 10
    dropped = flow.drop_condition(y, len(y), y.device, torch.Generator().manual_seed(0))
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.1) < 0.005
    assert torch.equal(dropped[~is_null], y[~is_null])


def test_flow_validation_bins_are_deterministic_given_seed():
    torch.manual_seed(0)
    model = build_dit("dit-t/2", in_channels=4, num_classes=0)
    with torch.no_grad():
        model.final.linear.bias.normal_()
    flow = RectifiedFlow()
    x0 = torch.randn(2, 4, 8, 8)
    first = flow.validation_losses(model, x0, bins=8, seed=3)
    assert first.shape == (8,)
    assert torch.equal(first, flow.validation_losses(model, x0, bins=8, seed=3))
    assert not torch.equal(first, flow.validation_losses(model, x0, bins=8, seed=4))


def test_flow_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = build_dit("dit-t/2", in_channels=4, num_classes=5)
    flow = RectifiedFlow(condition=ClassCondition(5))
    # One colour per latent: learnable in a few steps. (A RoPE-only DiT knows no absolute
    # positions, so memorising arbitrary per-pixel latents from pure noise takes far longer.)
    x0 = torch.randn(4, 4, 1, 1).expand(4, 4, 8, 8).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    before = flow.validation_losses(model, x0, y).mean()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        per_sample = flow.loss(model, x0, y, generator)
        assert per_sample.shape == (4,) and torch.isfinite(per_sample).all()
        optimizer.zero_grad()
        per_sample.mean().backward()
        optimizer.step()
    after = flow.validation_losses(model, x0, y).mean()
    assert after < 0.5 * before


def test_flow_euler_on_the_shifted_schedule_with_oracle_velocity_recovers_the_data_point():
    # Data is one point x0: given x_t = (1 - t) x0 + t eps, the exact velocity is
    # v = eps - x0 = (x_t - x0) / t, and Euler steps along this straight line are exact.
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 6, 10)

    def oracle(x_t, t, y=None):
        return (x_t - x0) / t.view(-1, 1, 1, 1)

    for shift in (1.0, 3.0):
        sample = sample_euler(oracle, torch.randn(2, 4, 6, 10), shifted_timesteps(7, shift),
                              disable=True)
        torch.testing.assert_close(sample, x0, rtol=1e-5, atol=1e-5)


def test_flow_loss_is_zero_for_the_exact_velocity() -> None:
    # With x_t = (1 - t) x0 + t ε the target is ε - x0 = (x_t - x0) / t: a model that returns
    # exactly that must score 0 (a swapped target or interpolation would not).
    x0 = torch.randn(6, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def exact(x_t: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        return (x_t - x0) / t.view(-1, 1, 1, 1)

    loss = RectifiedFlow().loss(exact, x0, generator=torch.Generator().manual_seed(1))
    assert loss.shape == (6,) and loss.max() < 1e-12


def test_flow_loss_drops_conditions_and_shifts_t_for_the_latent_size() -> None:
    seen = {}

    def spy(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen["t"], seen["y"] = t, y
        return torch.zeros_like(x_t)

    flow = RectifiedFlow(condition=ClassCondition(10), patch_size=2,
                         base_tokens=256, dropout=0.1)
    count = 20_000
    x0 = torch.zeros(count, 1, 64, 64)  # 1024 tokens at patch 2: shift sqrt(1024 / 256) = 2
    flow.loss(spy, x0, torch.zeros(count, dtype=torch.long), torch.Generator().manual_seed(0))
    assert abs((seen["y"] == 10).float().mean().item() - 0.1) < 0.01  # the null class, 10 %
    # shifting by s adds log s to logit(t); logit(t) is N(0, 1) before the shift
    assert abs(torch.logit(seen["t"].double()).mean().item() - math.log(2.0)) < 0.03


def test_flow_loss_split_across_ranks_is_the_loss_of_the_whole_batch() -> None:
    # Rank r of 2 passes its half of the batch with part (r, 2): the halves draw the t, noise and
    # condition dropout that one process draws for the whole batch.
    def each_alone(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x_t * t.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)  # sees its t and label

    flow = RectifiedFlow(condition=ClassCondition(3), dropout=0.5)
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    whole = flow.loss(each_alone, x0, y, torch.Generator().manual_seed(5))  # (6,)
    halves = [flow.loss(each_alone, x0[3 * r:3 * r + 3], y[3 * r:3 * r + 3],
                        torch.Generator().manual_seed(5), part=(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_flow_direction_term_adds_one_minus_the_cosine() -> None:
    # LightningDiT's velocity-direction term: weight · (1 - cos(v, target)) per sample; a
    # velocity of the right direction and the wrong length pays the MSE only
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def doubled(x_t: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        return 2 * (x_t - x0) / t.view(-1, 1, 1, 1)  # twice the exact velocity

    def opposite(x_t: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        return -(x_t - x0) / t.view(-1, 1, 1, 1)

    for model, extra in ((doubled, 0.0), (opposite, 2.0)):
        plain = RectifiedFlow().loss(model, x0, generator=torch.Generator().manual_seed(1))
        both = RectifiedFlow(direction=0.5).loss(model, x0,
                                                 generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(both - plain, torch.full((3,), 0.5 * extra,
                                                            dtype=torch.float32))
