import pytest
import torch
from torch import nn

from models.discriminator import (PatchDiscriminator, generator_hinge_loss, hinge_d_loss,
                                  share_batch_statistics)


def test_discriminator_default_layout_matches_patchgan_recipe():
    torch.manual_seed(0)
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 64), (64, 128), (128, 256), (256, 512), (512, 1)
    ]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [128, 256, 512]
    relus = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 4 and all(r.negative_slope == 0.2 for r in relus)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_discriminator_output_shape_for_non_square_input(in_channels):
    torch.manual_seed(0)
    d = PatchDiscriminator(in_channels=in_channels, ndf=8)
    logits = d(torch.randn(2, in_channels, 64, 96))
    # 64 -> 32 -> 16 -> 8 -> 7 -> 6 and 96 -> 48 -> 24 -> 12 -> 11 -> 10
    assert logits.shape == (2, 1, 6, 10)
    assert torch.isfinite(logits).all()


def test_discriminator_n_layers_and_width_are_configurable():
    torch.manual_seed(0)
    d = PatchDiscriminator(in_channels=3, ndf=4, n_layers=5)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    # widths double and cap at 8 * ndf
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 32, 32, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 2, 1, 1]
    assert d.min_input_size() == 96
    assert d(torch.randn(1, 3, 96, 128)).shape == (1, 1, 1, 2)


def test_discriminator_refuses_too_small_or_wrong_channel_input():
    d = PatchDiscriminator(ndf=4)
    assert d(torch.randn(1, 3, 24, 24)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="needs H, W >= 24"):
        d(torch.randn(1, 3, 23, 64))
    with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
        d(torch.randn(1, 1, 64, 64))


def test_discriminator_init_statistics():
    torch.manual_seed(0)
    d = PatchDiscriminator()
    conv_w = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert abs(conv_w.mean().item()) < 1e-3
    assert conv_w.std().item() == pytest.approx(0.02, rel=0.01)
    for m in d.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    bn_w = torch.cat([m.weight for m in d.modules() if isinstance(m, nn.BatchNorm2d)])
    bn_b = torch.cat([m.bias for m in d.modules() if isinstance(m, nn.BatchNorm2d)])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=3e-3)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(bn_b, torch.zeros_like(bn_b))


def test_discriminator_hinge_losses_on_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0, 3.0])  # relu(1 + fake) = [0, 1, 2, 4] -> mean 7/4
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 7 / 4)))
    torch.testing.assert_close(generator_hinge_loss(fake), torch.tensor(-0.5))
    # a discriminator past the margins on both sides has zero loss
    assert hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.0)) == 0


def test_discriminator_losses_backpropagate_to_parameters():
    torch.manual_seed(0)
    d = PatchDiscriminator(ndf=4)
    real, fake = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    hinge_d_loss(d(real), d(fake)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


def test_discriminator_shares_batch_statistics_across_gpu_ranks_only():
    torch.manual_seed(0)
    d = PatchDiscriminator(ndf=4)
    d(torch.randn(2, 3, 32, 32))  # move the running statistics off their initial values
    before = {k: v.clone() for k, v in d.state_dict().items()}

    def norms(m):
        return [type(x) for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]

    synced = share_batch_statistics(d, torch.device("cuda"), world_size=2)
    assert norms(synced) == [nn.SyncBatchNorm] * 3
    after = synced.state_dict()
    assert list(after) == list(before)  # checkpoints load either way
    assert all(torch.equal(after[k], before[k]) for k in before)
    for device, world in (("cuda", 1), ("cpu", 2)):  # one rank; gloo has no SyncBatchNorm
        same = share_batch_statistics(PatchDiscriminator(ndf=4), torch.device(device), world)
        assert norms(same) == [nn.BatchNorm2d] * 3
