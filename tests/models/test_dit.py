import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.dit import MLP, DiT, DiTConfig
from models.registry import MODEL_NAMES, build_dit, dit_config


def perturbed(model: DiT, std: float = 0.05) -> DiT:
    """Move every weight off its init so zero-initialised paths carry signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


@pytest.fixture
def tiny() -> DiT:
    torch.manual_seed(0)
    return build_dit("dit-t/2", in_channels=4, num_classes=10)


@pytest.mark.parametrize("hw", [(8, 12), (12, 4), (6, 16), (2, 2)])
def test_dit_output_shape_matches_input(tiny, hw):
    x = torch.randn(2, 4, *hw)
    v = tiny(x, torch.rand(2), torch.tensor([1, 10]))
    assert v.shape == x.shape


def test_dit_rejects_size_not_multiple_of_patch(tiny):
    with pytest.raises(ValueError, match="multiple of patch 2"):
        tiny(torch.randn(1, 4, 8, 7), torch.rand(1), None)


def test_dit_fresh_model_outputs_zero(tiny):
    v = tiny(torch.randn(3, 4, 8, 6), torch.rand(3), torch.tensor([0, 5, 10]))
    assert torch.equal(v, torch.zeros_like(v))


def test_dit_output_depends_on_t_and_y(tiny):
    model = perturbed(tiny)
    x = torch.randn(1, 4, 8, 8)
    t, y = torch.tensor([0.3]), torch.tensor([2])
    v = model(x, t, y)
    assert v.abs().max() > 1e-3
    assert not torch.allclose(model(x, torch.tensor([0.7]), y), v)
    assert not torch.allclose(model(x, t, torch.tensor([3])), v)
    assert not torch.allclose(model(x, t, None), v)  # None is the null class


def test_dit_unconditional_accepts_no_labels():
    torch.manual_seed(0)
    model = perturbed(build_dit("dit-t/2", in_channels=4, num_classes=0))
    assert model.y_embed.num_embeddings == 1
    x = torch.randn(2, 4, 4, 8)
    v = model(x, torch.rand(2), None)
    assert v.shape == x.shape
    scalar_t = model(x, torch.tensor(0.5), None)  # a 0-d t applies to the whole batch
    torch.testing.assert_close(scalar_t, model(x, torch.full((2,), 0.5), None))


def test_dit_bf16_autocast_and_inference_mode_cache():
    torch.manual_seed(0)
    model = perturbed(build_dit("dit-t/2", in_channels=4, num_classes=3))
    x, t, y = torch.randn(2, 4, 6, 8), torch.rand(2), torch.tensor([0, 3])
    with torch.inference_mode():
        model(x, t, y)  # fills the rotary cache while in inference mode
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = model(x, t, y)
    assert v.dtype == torch.bfloat16 and torch.isfinite(v).all()
    model(x, t, y).square().mean().backward()  # cached tables are usable in autograd
    torch.testing.assert_close(v.float(), model(x, t, y), rtol=0.1, atol=0.05)


def test_dit_config_round_trips_through_json():
    config = dit_config("dit-s/2", in_channels=16, num_classes=7)
    again = DiTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown keys \\['learn_sigma'\\]"):
        DiTConfig.from_dict({**config.to_dict(), "learn_sigma": True})
    with pytest.raises(ValueError, match="divisible by 4"):
        DiTConfig(hidden_size=60, depth=1, num_heads=6)


def test_dit_registry_builds_every_name():
    for name in MODEL_NAMES:
        with torch.device("meta"):  # no memory, no init cost
            model = build_dit(name, in_channels=4, num_classes=1000)
        assert isinstance(model, DiT)
        assert name.endswith(f"/{model.config.patch_size}")
    tiny = build_dit("dit-t/2", in_channels=4, num_classes=0)
    assert sum(p.numel() for p in tiny.parameters()) < 200_000
    with pytest.raises(ValueError, match="dit-s/2"):
        build_dit("dit-q/2")


def test_dit_s2_matches_published_size_and_flops():
    with torch.device("meta"):
        model = build_dit("dit-s/2", in_channels=4, num_classes=1000)
    params = sum(p.numel() for p in model.parameters())
    assert 32.5e6 < params < 33.5e6  # DiT paper: 33.0M (its output also has sigma channels)
    flops = model.flops_per_sample(32, 32)
    assert 11.9e9 < flops < 12.3e9  # DiT paper: 6.06 G multiply-adds


def test_dit_flop_count_matches_torch_flop_counter(tiny):
    model = perturbed(tiny)
    x = torch.randn(3, 4, 8, 12)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.rand(3), torch.tensor([0, 1, 10]))
    assert counter.get_total_flops() == 3 * model.flops_per_sample(8, 12)


def test_dit_gradient_checkpointing_gives_same_gradients(tiny):
    model = perturbed(tiny)
    x, t, y = torch.randn(2, 4, 6, 8), torch.rand(2), torch.tensor([4, 10])

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for plain, recomputed in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(recomputed, plain)


def test_dit_compile_blocks_matches_eager(tiny):
    import copy

    eager = perturbed(tiny)
    compiled = copy.deepcopy(eager)
    compiled.compile_blocks()
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints unchanged
    for hw in [(6, 8), (6, 8), (4, 10)]:  # a repeated size, then another bucket
        x, t, y = torch.randn(2, 4, *hw), torch.rand(2), torch.tensor([4, 10])
        outputs, grads = [], []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(x, t, y)
            out.square().mean().backward()
            outputs.append(out.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)
        for g_compiled, g_eager in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(g_compiled, g_eager, rtol=1e-3, atol=1e-5)


def test_dit_bf16_autocast_gradients_follow_fp32():
    torch.manual_seed(0)
    model = perturbed(build_dit("dit-t/2", in_channels=4, num_classes=3), std=0.1)
    x, t, y = torch.randn(4, 4, 8, 6), torch.rand(4), torch.tensor([0, 1, 2, 3])

    def grads(autocast: bool) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, t, y).float().square().mean()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full, half = grads(False), grads(True)
    assert half.dtype == torch.float32  # fp32 weights get fp32 gradients
    assert (half - full).norm() / full.norm() < 0.05


def _reference_mlp(mlp, x):
    """The same MLP as plain autograd ops: linear, exact GELU, linear."""
    return mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))


def test_dit_mlp_gradients_match_the_composition():
    torch.manual_seed(0)
    mlp = MLP(8, 32).double()
    x = torch.randn(2, 5, 8, dtype=torch.double, requires_grad=True)
    params = (x, mlp.fc1.weight, mlp.fc2.weight, mlp.fc2.bias)
    assert torch.autograd.gradcheck(lambda v: mlp(v), (x,))
    g = torch.randn(2, 5, 8, dtype=torch.double)
    ours = torch.autograd.grad(mlp(x), params, g)
    expected = torch.autograd.grad(_reference_mlp(mlp, x), params, g)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_dit_mlp_under_bf16_autocast_matches_autocast_linears():
    torch.manual_seed(0)
    mlp = MLP(16, 64)
    x = torch.randn(3, 7, 16, requires_grad=True)
    g = torch.randn(3, 7, 16)
    params = (x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    results = []
    for fn in (mlp, lambda v: _reference_mlp(mlp, v)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        assert y.dtype == torch.bfloat16
        grads = torch.autograd.grad(y, params, g.bfloat16())
        assert [t.dtype for t in grads] == [torch.float32] * 5  # fp32 weights get fp32 grads
        results.append((y, *grads))
    for ours, expected in zip(*results):
        torch.testing.assert_close(ours, expected, rtol=2e-2, atol=2e-2)


def test_dit_mlp_saves_no_gelu_output_for_backward():
    mlp = MLP(16, 64)
    x = torch.randn(5, 16, requires_grad=True)  # 5 rows: no parameter has that shape

    def saved_activations(fn) -> list[tuple[int, ...]]:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            fn(x)
        return sorted(shape for shape in shapes if shape[0] == 5)

    # both keep fc1's input and h = fc1(x); only autograd's composition also keeps gelu(h)
    assert saved_activations(mlp) == [(5, 16), (5, 64)]
    assert saved_activations(lambda v: _reference_mlp(mlp, v)) == [(5, 16), (5, 64), (5, 64)]


def test_dit_loads_weights_saved_before_the_mlp_names(tiny, tmp_path):
    # Checkpoints written before `MLP` existed call its layers mlp.0 and mlp.2 (nn.Sequential).
    from safetensors.torch import load_file, save_file

    model = perturbed(tiny).eval()
    old = {k.replace(".mlp.fc1.", ".mlp.0.").replace(".mlp.fc2.", ".mlp.2."): v.contiguous()
           for k, v in model.state_dict().items()}
    assert any(".mlp.0." in k for k in old) and not any(".mlp.fc" in k for k in old)
    save_file(old, tmp_path / "old.safetensors")
    torch.manual_seed(1)
    loaded = build_dit("dit-t/2", in_channels=4, num_classes=10).eval()
    loaded.load_state_dict(load_file(tmp_path / "old.safetensors"))  # strict
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_dit_unpatchify_puts_each_patch_entry_at_its_pixel() -> None:
    # Pins the token layout saved checkpoints depend on: a token's output holds its p x p patch
    # as (row in patch, column in patch, channel), as in the original DiT.
    model = build_dit("dit-t/2", in_channels=4, num_classes=0)  # final.linear starts at zero
    p, channels = model.config.patch_size, 4
    with torch.no_grad():
        model.final.linear.bias.copy_(torch.arange(p * p * channels, dtype=torch.float32))
    out = model(torch.randn(1, channels, 4, 6), torch.rand(1))
    for row in range(p):
        for col in range(p):
            for ch in range(channels):  # the same in every patch, e.g. the one at (2, 4)
                assert out[0, ch, 2 + row, 4 + col] == (row * p + col) * channels + ch
