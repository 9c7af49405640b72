from pathlib import Path

import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from training.lpips import LPIPS, TAP_CHANNELS, TAP_INDICES, _unit_normalize


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    """A torchvision-layout VGG16 .pth (random features + a stand-in classifier) and a lin .pth.

    `make_layers(cfgs["D"])` is exactly what `vgg16(weights=None).features` holds; the full model's
    120M-parameter classifier is replaced by small tensors under its key names, which the loader
    must ignore.
    """
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    vgg_state = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg_state["classifier.0.weight"] = torch.randn(4, 8)
    vgg_state["classifier.0.bias"] = torch.randn(4)
    lin_state = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS)
    }
    folder = tmp_path_factory.mktemp("lpips-weights")
    vgg_path, lin_path = folder / "vgg16-random.pth", folder / "vgg.pth"
    torch.save(vgg_state, vgg_path)
    torch.save(lin_state, lin_path)
    return vgg_path, lin_path, vgg_state, lin_state


@pytest.fixture(scope="module")
def lpips(weight_files) -> LPIPS:
    return LPIPS.from_files(weight_files[0], weight_files[1])


def images(seed: int, batch: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


def test_lpips_loads_weights_from_files_and_is_frozen(weight_files, lpips):
    _, _, vgg_state, lin_state = weight_files
    for k, v in lpips.features.state_dict().items():
        assert torch.equal(v, vgg_state[f"features.{k}"])
    for i, lin in enumerate(lpips.lins):
        assert torch.equal(lin.weight, lin_state[f"lin{i}.model.1.weight"])
    assert all(not p.requires_grad for p in lpips.parameters())
    assert not lpips.training
    lpips.train()
    assert not lpips.training


def test_lpips_taps_match_torchvision_features(weight_files, lpips):
    _, _, vgg_state, _ = weight_files
    reference = make_layers(cfgs["D"])
    reference.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items()
                               if k.startswith("features.")})
    x = images(1)
    h = (x - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor(
        [0.458, 0.448, 0.450]
    ).view(1, 3, 1, 1)
    expected = []
    with torch.no_grad():
        for i, layer in enumerate(reference):
            h = layer(h)
            if i in TAP_INDICES:
                expected.append(h)
        taps = lpips.feature_maps(x)
    assert [t.shape[1:] for t in taps] == [
        (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)
    ]
    for got, want in zip(taps, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_lpips_distance_is_zero_for_identical_positive_and_symmetric(lpips):
    x, y = images(2), images(3)
    with torch.no_grad():
        same = lpips(x, x.clone())
        d_xy, d_yx = lpips(x, y), lpips(y, x)
    assert same.shape == (2,) and torch.equal(same, torch.zeros(2))
    assert (d_xy > 0).all()
    torch.testing.assert_close(d_xy, d_yx)
    # a small perturbation is closer than an unrelated image
    with torch.no_grad():
        near = lpips(x, (x + 0.01 * torch.randn_like(x)).clamp(-1, 1))
    assert (near < d_xy).all()


def test_lpips_gradient_flows_to_input_only(lpips):
    x, y = images(4).requires_grad_(), images(5)
    lpips(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_lpips_unit_normalize_has_finite_gradient_at_zero_features():
    feat = torch.zeros(1, 4, 2, 2)
    feat[0, :, 0, 0] = torch.tensor([3.0, 0.0, 4.0, 0.0])
    feat.requires_grad_()
    out = _unit_normalize(feat)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.6, 0.0, 0.8, 0.0]))
    out.sum().backward()
    assert torch.isfinite(feat.grad).all()


def test_lpips_refuses_mismatched_or_tiny_inputs(lpips):
    with pytest.raises(ValueError, match="one shape"):
        lpips(images(0, size=32), images(0, size=16))
    with pytest.raises(ValueError, match="H, W >= 16"):
        lpips(images(0, size=8), images(1, size=8))


def test_lpips_missing_files_are_named(weight_files, tmp_path):
    vgg_path, lin_path, _, _ = weight_files
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPS.from_files(missing, lin_path)
    with pytest.raises(FileNotFoundError, match="lin-missing.pth"):
        LPIPS.from_files(vgg_path, tmp_path / "lin-missing.pth")


def test_lpips_wrong_keys_or_shapes_are_named(weight_files, tmp_path):
    vgg_path, lin_path, vgg_state, lin_state = weight_files
    # the lin file given as the VGG file: features keys are missing, listed by name
    with pytest.raises(ValueError, match=r"vgg\.pth.*missing.*features\.0\.weight"):
        LPIPS.from_files(lin_path, lin_path)
    # a bare `features` state dict (no "features." prefix) is refused, naming the file
    bare = tmp_path / "bare-features.pth"
    torch.save({k[len("features."):]: v for k, v in vgg_state.items() if "features." in k}, bare)
    with pytest.raises(ValueError, match="bare-features.pth.*features.0.weight"):
        LPIPS.from_files(bare, lin_path)
    # AlexNet-shaped lins: right keys, wrong widths
    alex = tmp_path / "alex.pth"
    widths = (64, 192, 384, 256, 256)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(widths)},
               alex)
    with pytest.raises(ValueError, match=r"alex\.pth.*lin1\.model\.1\.weight.*\(1, 128, 1, 1\)"):
        LPIPS.from_files(vgg_path, alex)
    # negative lin weights are not LPIPS weights
    negative = tmp_path / "negative.pth"
    torch.save({k: -v for k, v in lin_state.items()}, negative)
    with pytest.raises(ValueError, match=r"negative\.pth.*negative"):
        LPIPS.from_files(vgg_path, negative)
    # not a torch file at all
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        LPIPS.from_files(vgg_path, garbage)


def test_lpips_distance_is_the_weighted_mean_of_normalised_feature_differences(weight_files,
                                                                                 lpips):
    # d(x, y) = sum over taps of mean over positions of sum_c w_c (x̂_c - ŷ_c)^2, with x̂ the
    # features scaled to unit length over channels (Zhang et al. 2018), rebuilt from the lin
    # weights in the file rather than from the module's layers.
    _, _, _, lin_state = weight_files
    x, y = images(2), images(3)
    expected = torch.zeros(2)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(lpips.feature_maps(x), lpips.feature_maps(y))):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            weights = lin_state[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)
            expected += (weights * (a - b) ** 2).sum(1).mean(dim=(1, 2))
        torch.testing.assert_close(lpips(x, y), expected, rtol=1e-4, atol=1e-6)
