"""The autoencoder's loss: its terms, their balance, the GAN ramp and the adaptive weight."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.discriminator import PatchDiscriminator, generator_hinge_loss
from models.vae import AutoencoderKL, VAEConfig
from training.config import VAEStageConfig
from training.vae_loss import adaptive_weight, autoencoder_loss, gan_ramp


def test_vae_loss_gan_ramp_starts_at_disc_start_and_reaches_one() -> None:
    assert [gan_ramp(s, 5, 4) for s in range(3, 10)] == [0, 0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert gan_ramp(5, 5, 0) == 1.0  # no ramp: full weight at once


def test_vae_loss_terms_and_their_balance() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                  latent_channels=4, layers_per_block=1,
                                  mid_block_add_attention=False))
    disc = PatchDiscriminator(ndf=4, n_layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = vae.encode(x)
    rec = vae.decode(posterior.sample(torch.Generator().manual_seed(1)))
    v = VAEStageConfig(rec_loss="l1", kl_weight=1e-3, disc_weight=0.5)
    last = vae.decoder.conv_out.weight
    before = autoencoder_loss(x, rec, posterior, v, 0.0, disc, None, last)
    rec_l1 = (rec - x).abs().mean()
    kl = posterior.kl().mean()  # summed over latent elements, mean over the batch
    torch.testing.assert_close(before.rec, rec_l1)
    torch.testing.assert_close(before.kl, kl)
    # LDM's balance: the KL against a reconstruction summed over pixels (ours: a per-pixel mean)
    torch.testing.assert_close(before.total, rec_l1 + 1e-3 * kl / (3 * 32 * 32))
    assert before.gan == 0 and before.gan_weight == 0 and before.perceptual == 0
    during = autoencoder_loss(x, rec, posterior, v, 0.5, disc, None, last)
    g = generator_hinge_loss(disc(rec))
    weight = 0.5 * adaptive_weight(rec_l1, g, last)
    torch.testing.assert_close(during.gan, g)
    torch.testing.assert_close(during.gan_weight, weight)
    torch.testing.assert_close(during.total, before.total + 0.5 * weight * g)
    assert all(p.requires_grad for p in disc.parameters())  # left trainable for its own step


def test_vae_loss_adaptive_weight_is_the_gradient_norm_ratio() -> None:
    last = torch.ones(3, requires_grad=True)
    nll, gan = (2 * last).sum(), (0.5 * last).sum()  # gradients 2 and 0.5 per element
    assert abs(adaptive_weight(nll, gan, last).item() - 4.0) < 1e-3


ADAPTIVE_TWO_RANKS = """
import json, sys
from pathlib import Path
import torch
from training.distributed import setup, teardown
from training.vae_loss import adaptive_weight

info = setup("cpu")
last = torch.ones(2, requires_grad=True)
# rank 0's share has gradients (3, 0) and (1, 0), rank 1's (1, 0) and (1, 2): the global batch's
# mean gradients are (2, 0) and (1, 1), a ratio of 2 / sqrt(2), where the ranks alone see 3 and 1/2
nll_grad, g_grad = ([3.0, 0.0], [1.0, 0.0]) if info.rank == 0 else ([1.0, 0.0], [1.0, 2.0])
nll, gan = (torch.tensor(nll_grad) * last).sum(), (torch.tensor(g_grad) * last).sum()
weight = adaptive_weight(nll, gan, last).item()
Path(sys.argv[1], f"rank{info.rank}.json").write_text(json.dumps(weight))
teardown()
"""


def test_vae_loss_adaptive_weight_is_that_of_the_global_batch_under_torchrun(
        tmp_path: Path) -> None:
    from tests.training.test_distributed import _two_ranks

    _two_ranks(ADAPTIVE_TWO_RANKS, tmp_path, 29543)
    for rank in (0, 1):
        weight = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert abs(weight - 2 / 2 ** 0.5) < 1e-3, (rank, weight)
