import pytest
import torch
from torch import nn

from training.checkpoint import load_checkpoint, save_checkpoint
from training.ema import EMA, unwrap_model

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


def test_ema_warmup_decay_values():
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


def test_ema_converges_to_a_constant_model():
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


def test_ema_state_dict_saves_and_loads_into_a_fresh_model(tmp_path):
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


def test_ema_works_through_ddp_and_compile_wrappers():
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
