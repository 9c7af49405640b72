"""The shared training loop and its parts: learning rate, step rate, the EMA of the weights."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from training.checkpoint import load_checkpoint, save_checkpoint
from training.loop import EMA, unwrap_model

from tests.training.test_distributed import _two_ranks

REPO = Path(__file__).resolve().parents[2]


def test_loop_lr_factor_warms_up_then_follows_the_schedule() -> None:
    import math

    from training.loop import lr_factor

    assert [lr_factor(s, 4, 100, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(0, 0, 100, "constant") == 1.0  # no warmup: the full rate from step 0
    assert lr_factor(4, 4, 104, "cosine") == 1.0  # cosine starts at the peak after warmup
    assert math.isclose(lr_factor(54, 4, 104, "cosine"), 0.55)  # halfway: (1 + 0.1) / 2
    assert math.isclose(lr_factor(104, 4, 104, "cosine"), 0.1)  # ends at 10 %
    assert math.isclose(lr_factor(500, 4, 104, "cosine"), 0.1)  # and stays there


def test_loop_step_rate_leaves_paused_time_out_and_restarts_each_window(monkeypatch) -> None:
    from training import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    rate = loop.StepRate(step=10)

    def advance(seconds: float) -> None:
        now[0] += seconds

    advance(1)
    with rate.waiting():  # 2 s waiting for a batch
        advance(2)
    with rate.pause():  # 5 s of checkpoint and validation, left out
        advance(5)
    advance(4)
    # 4 steps of 8 samples in 12 s of which 5 paused: 32 samples in 7 s, 2 of them waiting
    assert rate.scalars(14, 8) == {"speed/samples_per_s": 32 / 7,
                                   "speed/data_wait_fraction": 2 / 7}
    for _ in range(3):  # a `break` out of the pause (a stop request) still counts it
        with rate.pause():
            advance(10)
            break
    advance(2)
    assert rate.scalars(15, 8) == {"speed/samples_per_s": 4.0, "speed/data_wait_fraction": 0.0}


# torch.testing and torch.optim import torch._dynamo (seconds on a busy CPU): plain asserts here.


class Tied(nn.Module):
    """A tiny model with a tied weight, a norm with buffers and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(idx)))


class Wrapper(nn.Module):
    """Holds the model as `.module`, like DistributedDataParallel."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_loop_ema_warmup_decay_values():
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    ema = EMA(model, decay=0.3)
    expected, shadow = [], torch.zeros(2, 3, dtype=torch.float64)
    for n in range(6):
        decay = min(0.3, (1 + n) / (10 + n))
        assert ema.current_decay == pytest.approx(decay)
        expected.append(decay)
        with torch.no_grad():
            model.weight.fill_(n + 1.0)
        shadow = decay * shadow + (1 - decay) * (n + 1.0)
        ema.update(model)
        assert ema.num_updates == n + 1
        assert torch.allclose(ema.state_dict()["weight"], shadow.float(), rtol=1e-6, atol=1e-6)
    assert expected[:3] == pytest.approx([0.1, 2 / 11, 0.25])
    assert expected[-1] == 0.3  # capped by decay


def test_loop_ema_converges_to_a_constant_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).bfloat16()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    for _ in range(300):
        ema.update(model)
    for key, value in model.state_dict().items():
        assert ema.state_dict()[key].dtype == torch.float32
        assert torch.allclose(ema.state_dict()[key], value.float(), rtol=0, atol=1e-6)


def test_loop_ema_state_dict_saves_and_loads_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    ema = EMA(model, decay=0.99)
    idx = torch.randint(0, 5, (8,))
    for _ in range(3):
        with torch.no_grad():
            model(idx)  # updates the norm's running statistics
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
    sd = ema.state_dict()
    assert set(sd) == set(model.state_dict())  # tied keys included, non-persistent buffer not
    assert torch.equal(sd["norm.running_mean"], model.norm.running_mean)
    assert sd["norm.num_batches_tracked"] == 3

    path = save_checkpoint(tmp_path, 3, {"ema": sd}, {}, {"ema_updates": ema.num_updates})
    loaded = load_checkpoint(path)
    fresh = Tied()
    fresh.load_state_dict(loaded.tensors["ema"])
    for key, value in sd.items():
        assert torch.equal(fresh.state_dict()[key], value)

    resumed = EMA(Tied(), decay=0.99)
    resumed.load_state_dict(loaded.tensors["ema"], loaded.state["ema_updates"])
    assert resumed.num_updates == 3
    ema.update(model)
    resumed.update(model)
    for key, value in ema.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value)
    with pytest.raises(KeyError, match="missing"):
        resumed.load_state_dict({"embed.weight": sd["embed.weight"]}, 0)


def test_loop_ema_works_through_ddp_and_compile_wrappers():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    wrapped = Wrapper(model)
    compiled_like = nn.Module()
    compiled_like._orig_mod = wrapped  # what torch.compile's OptimizedModule holds
    assert unwrap_model(compiled_like) is model
    not_a_wrapper = nn.Sequential()
    not_a_wrapper.module = nn.Linear(1, 1)
    not_a_wrapper.other = nn.Linear(1, 1)
    assert unwrap_model(not_a_wrapper) is not_a_wrapper

    ema = EMA(wrapped, decay=0.5)
    assert set(ema.state_dict()) == {"weight", "bias"}  # no "module." prefix
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(compiled_like)
    expected = model.weight - 0.1  # first update: decay 0.1, 90% of the way to the new weight
    assert torch.allclose(ema.state_dict()["weight"], expected, rtol=0, atol=1e-6)

    target = Wrapper(nn.Linear(3, 3))
    ema.copy_to(target)
    assert torch.equal(target.module.weight, ema.state_dict()["weight"])
    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Linear(3, 3, bias=False))


AGREE = """
import json, math, sys
from pathlib import Path

import torch
from training.distributed import setup, teardown
from training.loop import agree

info = setup("cpu")
views = []
for losses, stops in (((1.0, 3.0), (False, False)), ((1.0, math.inf), (False, True))):
    loss, stop = agree(torch.tensor(losses[info.rank]), stops[info.rank])
    views.append([float(loss), stop])
Path(sys.argv[1], f"rank{info.rank}.json").write_text(json.dumps(views))
teardown()
"""


def test_loop_agree_spreads_a_nonfinite_loss_and_a_stop(tmp_path: Path) -> None:
    _two_ranks(AGREE, tmp_path, 29531)
    for rank in (0, 1):  # every rank sees the same: the mean, and rank 1's inf and stop
        views = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert views == [[2.0, False], [float("inf"), True]]
