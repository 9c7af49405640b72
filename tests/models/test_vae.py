"""Tests for models/vae.py against diffusers AutoencoderKL: small random models, CPU, no network.

Config, modules, posterior, normalisation and tiling; the weight formats (load_vae, save_vae,
vae_fingerprint) are tested in test_vae_weights.py, which builds on this file's configs and
model builders.
"""

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from models.vae import AutoencoderKL, DiagonalGaussian, Upsample, VAEConfig
from models.vae_weights import load_vae, save_vae

# Widths are multiples of 32 so that the GroupNorm count inferred for single files (32) is right.
SD_LIKE = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=32)
FLUX_LIKE = VAEConfig(
    latent_channels=16,
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
# Playground v2.5's published per-channel latent statistics and scale, on the small SD layout.
PLAYGROUND_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_STD = [8.4927, 5.9022, 6.5498, 5.2299]
PLAYGROUND_LIKE = dataclasses.replace(
    SD_LIKE, scaling_factor=0.5, latents_mean=PLAYGROUND_MEAN, latents_std=PLAYGROUND_STD
)


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Give every GroupNorm a non-trivial affine transform (init is weight 1, bias 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))


def _diffusers_kwargs(config: VAEConfig) -> dict:
    return {k: v for k, v in config.to_diffusers_dict().items() if not k.startswith("_")}


def _diffusers_vae(config: VAEConfig, seed: int = 0) -> DiffusersAutoencoderKL:
    torch.manual_seed(seed)
    model = DiffusersAutoencoderKL(**_diffusers_kwargs(config)).eval()
    _perturb_norms(model, seed)
    return model


def _our_vae(config: VAEConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    model = AutoencoderKL(config).eval()
    _perturb_norms(model, seed)
    return model


def _images(config: VAEConfig, seed: int = 1, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.in_channels, 32, 32, generator=gen)  # (B, 3, 32, 32)


@torch.no_grad()
def test_vae_tiled_equals_untiled_for_one_tile():
    model = _our_vae(SD_LIKE)  # f = 2, tile: 32 px, 16 latent pixels
    x = _images(SD_LIKE, batch=1)  # (1, 3, 32, 32)
    assert torch.equal(model.encode_tiled(x).mean, model.encode(x).mean)
    z = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.decode_tiled(z), model.decode(z))


@torch.no_grad()
def test_vae_tiled_close_to_untiled_on_large_non_square_input():
    # Tiles see only part of the image (GroupNorm statistics, attention), so tiling is not exact;
    # the bar is diffusers' own tiling of the same weights at the same tile size.
    peer = _diffusers_vae(SD_LIKE)
    peer.enable_tiling()
    model = AutoencoderKL(SD_LIKE).eval()
    model.load_state_dict(peer.state_dict())  # f = 2: tiles of 32 px / 16 latent pixels
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(4))  # 2 x 3 tiles

    def error(out, ref):
        return ((out - ref).abs().mean() / ref.std()).item()

    full, tiled = model.encode(x).mean, model.encode_tiled(x).mean  # (1, 4, 24, 40)
    assert tiled.shape == full.shape and tiled.isfinite().all()
    assert error(tiled, full) < min(0.3, error(peer.encode(x).latent_dist.mean, full))
    full_img, tiled_img = model.decode(full), model.decode_tiled(full)  # (1, 3, 48, 80)
    assert tiled_img.shape == full_img.shape and tiled_img.isfinite().all()
    assert error(tiled_img, full_img) < min(0.5, error(peer.decode(full).sample, full_img))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode_tiled(x[..., :47, :])


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_vae_force_upcast_computes_in_fp32_under_autocast(dtype):
    model = _our_vae(SD_LIKE)
    assert model.config.force_upcast
    x = _images(SD_LIKE).to(dtype)
    reference = model.encode(x.float())
    with torch.autocast("cpu", dtype=dtype):
        posterior = model.encode(x)
        image = model.decode(posterior.mean)
    assert posterior.mean.dtype == dtype and image.dtype == dtype
    assert posterior.mean.isfinite().all() and image.isfinite().all()
    assert torch.equal(posterior.mean, reference.mean.to(dtype))  # computed in fp32
    assert torch.equal(image, model.decode(posterior.mean.float()).to(dtype))


def test_vae_dtype_follows_force_upcast():
    config = dataclasses.replace(SD_LIKE)  # changed below: a copy, so SD_LIKE stays as it is
    model = _our_vae(config).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="force_upcast"):
        model.encode(_images(SD_LIKE))
    model.config.force_upcast = False
    with torch.no_grad():
        assert model.encode(_images(SD_LIKE)).mean.dtype == torch.float32  # caller's dtype


def test_vae_config_accepts_diffusers_keys_and_rejects_unknown():
    data = {**SD_LIKE.to_diffusers_dict(), "_diffusers_version": "0.30.0", "latents_mean": None}
    assert VAEConfig.from_dict(data) == SD_LIKE
    with pytest.raises(ValueError, match="unknown VAE config keys.*'colour'"):
        VAEConfig.from_dict({**data, "colour": "blue"}, source="cfg.json")
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_dict({**data, "act_fn": "gelu"})


def test_vae_normalize_denormalize_round_trip_with_shift():
    model = _our_vae(FLUX_LIKE)
    latent = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(5))
    normalized = model.normalize(latent)
    torch.testing.assert_close(normalized, (latent - 0.1159) * 0.3611)
    torch.testing.assert_close(model.denormalize(normalized), latent)
    assert model.downsample_factor == 2


@torch.no_grad()
def test_vae_posterior_matches_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(6)) * 20
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.min() >= -30 and ours.logvar.max() <= 20
    torch.testing.assert_close(ours.std, theirs.std)
    torch.testing.assert_close(ours.kl(), theirs.kl())
    assert torch.equal(ours.mode(), ours.mean)
    first = ours.sample(torch.Generator().manual_seed(7))
    assert torch.equal(ours.sample(torch.Generator().manual_seed(7)), first)


def test_vae_forward_reconstructs_through_posterior():
    model = _our_vae(SD_LIKE)
    recon, posterior = model(_images(SD_LIKE), generator=torch.Generator().manual_seed(8))
    assert recon.shape == (2, 3, 32, 32) and posterior.mean.shape == (2, 4, 16, 16)


def test_vae_cpu_upsample_equals_nearest_then_conv_with_gradients():
    torch.manual_seed(9)
    upsample = Upsample(8)
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    fast = upsample(x)  # the CPU path: one folded 2x2 conv, phases interleaved
    plain = upsample.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(plain)
    fast_grads = torch.autograd.grad(fast, [x, upsample.conv.weight], grad_out)
    plain_grads = torch.autograd.grad(plain, [x, upsample.conv.weight], grad_out)
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast_grad, plain_grad, atol=1e-4, rtol=0)


def test_vae_posterior_sample_is_mean_plus_std_times_noise() -> None:
    from models.vae import DiagonalGaussian

    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(6)) * 2
    posterior = DiagonalGaussian(moments)  # mean, logvar = the two halves of the channels
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(7)),
                               moments[:, :4] + (0.5 * moments[:, 4:].clamp(-30, 20)).exp()
                               * noise)


@torch.no_grad()
def test_vae_normalize_per_channel_matches_diffusers_formula():
    ltx = pytest.importorskip("diffusers.pipelines.ltx.pipeline_ltx_latent_upsample")
    peer = ltx.LTXLatentUpsamplePipeline  # its static (de)normalisers: the formula SDXL uses
    model = _our_vae(PLAYGROUND_LIKE)
    latent = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(10)) * 6 + 1
    mean, std = torch.tensor(PLAYGROUND_MEAN), torch.tensor(PLAYGROUND_STD)

    normalized = model.normalize(latent)  # (2, 4, 6, 5)
    # diffusers' video helpers take (B, C, F, H, W): one frame.
    expected = peer._normalize_latents(latent.unsqueeze(2), mean, std, 0.5).squeeze(2)
    torch.testing.assert_close(normalized, expected)
    for c in range(4):  # spelled out per channel, too
        torch.testing.assert_close(
            normalized[:, c], (latent[:, c] - PLAYGROUND_MEAN[c]) * 0.5 / PLAYGROUND_STD[c]
        )
    expected = peer._denormalize_latents(normalized.unsqueeze(2), mean, std, 0.5).squeeze(2)
    torch.testing.assert_close(model.denormalize(normalized), expected)
    torch.testing.assert_close(model.denormalize(normalized), latent)
    assert normalized.std() < latent.std() / 2  # the statistics really were applied

    half = model.normalize(latent.bfloat16())  # dtype kept, computed in fp32, rounded once
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, model.normalize(latent.bfloat16().float()).bfloat16())
    assert model.denormalize(half).dtype == torch.bfloat16
    assert model.normalize(latent[0]).shape == (4, 6, 5)  # unbatched (C, h, w) broadcasts too
    with pytest.raises(ValueError, match=r"latent \(2, 16, 6, 5\): expected \(..., 4, h, w\)"):
        model.normalize(torch.zeros(2, 16, 6, 5))


def test_vae_normalize_without_latent_stats_is_unchanged():
    model = _our_vae(SD_LIKE)
    latent = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(11))
    assert torch.equal(model.normalize(latent), latent * 0.18215)
    assert torch.equal(model.denormalize(latent), latent / 0.18215)
    assert "latents_mean" not in SD_LIKE.to_dict()  # serialised as before the fields existed
    assert "latents_std" not in SD_LIKE.to_diffusers_dict()


def test_vae_config_refuses_bad_latent_stats(tmp_path):
    good = PLAYGROUND_LIKE.to_diffusers_dict()
    bad = {
        "latents_mean": {**good, "latents_mean": PLAYGROUND_MEAN[:3]},  # 3 for 4 channels
        "latents_std": {**good, "latents_std": [*PLAYGROUND_STD[:3], 0.0]},
        "latents_std is not": {**good, "latents_std": None},  # mean alone
        "latents_mean is not": {**good, "latents_mean": None},  # std alone
        "shift_factor": {**good, "shift_factor": 0.1},  # the two normalisations do not mix
        "finite numbers": {**good, "latents_mean": ["-1.6", 1.9, -1.4, 2.5]},
    }
    for i, (key, data) in enumerate(bad.items()):
        path = tmp_path / f"bad{i}" / "config.json"
        path.parent.mkdir()
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + key):
            load_vae(path.parent)
    with pytest.raises(ValueError, match=r"latents_mean must hold one value per latent channel "
                                         r"\(16\), got 4"):
        dataclasses.replace(FLUX_LIKE, shift_factor=None, latents_mean=PLAYGROUND_MEAN,
                            latents_std=PLAYGROUND_STD)
    assert VAEConfig.from_dict({**good, "shift_factor": 0.0}).shift_factor == 0.0  # a no-op
    save_vae(_our_vae(PLAYGROUND_LIKE), tmp_path / "vae")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "vae")) + ".*shift_factor"):
        load_vae(tmp_path / "vae", shift_factor=0.1)
