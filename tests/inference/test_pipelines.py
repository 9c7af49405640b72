"""Sampling, image-to-image and the DiT loader, on the tiny run of tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bucketing import make_buckets
from inference.pipelines import (decode_latents, encode_image, generate, grid_step, img2img,
                                 initial_noise, parse_size, pil_to_tensor, prepare_image,
                                 reconstruct, sampling_timesteps, save_images,
                                 snap_size, tensor_to_pil)
from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import load_vae, vae_fingerprint
from training.synthetic import FAMILIES
from training.export import load_generator

CLASSES = sorted(FAMILIES)  # class names are the sorted sub-folder names


def _image(path: Path, w: int, h: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)
    return path


def test_pipelines_loader_reads_run_newest_ema_checkpoint(tiny_run: Path, loaded) -> None:
    model, vae, info = loaded
    assert info.step == 2 and info.class_names == CLASSES and info.base_tokens == 64
    assert info.resolution == 32  # the run's data.resolution, from its state.json
    assert info.source.name == "step_0000002"
    assert info.vae_fingerprint == vae_fingerprint(load_vae(info.vae))  # recorded in training
    assert model.config.num_classes == 4 and not model.training
    assert grid_step(model, vae) == 4  # VAE factor 2 × patch 2
    _, _, first = load_generator(tiny_run, step=1)
    assert first.step == 1 and first.source.name == "step_0000001"
    with pytest.raises(FileNotFoundError, match=r"complete steps: \[1, 2\]"):
        load_generator(tiny_run, step=7)


def test_pipelines_generate_is_deterministic_by_seed(loaded) -> None:
    model, vae, info = loaded
    args = dict(num_samples=2, cond=torch.tensor([0, 3]), cfg_scale=3.0, steps=3,
                base_tokens=info.base_tokens)
    a = generate(model, vae, 32, 48, seed=5, **args)
    b = generate(model, vae, 32, 48, seed=5, **args)
    c = generate(model, vae, 32, 48, seed=6, **args)
    assert a.shape == (2, 3, 32, 48)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    # sample i's noise is seeded with seed + i, whatever the batch it is drawn in
    assert torch.equal(initial_noise(3, (4, 8, 8), 5)[1:], initial_noise(2, (4, 8, 8), 5, 1))
    one_by_one = generate(model, vae, 32, 48, seed=5, batch_size=1, **args)
    assert torch.allclose(a, one_by_one, atol=1e-5)


def test_pipelines_every_grid_size_samples_at_that_size(loaded) -> None:
    model, vae, info = loaded
    step = grid_step(model, vae)
    buckets = make_buckets(resolution=32, step=step)
    assert len(buckets) > 10
    for width, height in buckets:
        images = generate(model, vae, height, width, num_samples=1, cond=torch.tensor([1]),
                          steps=1, base_tokens=info.base_tokens)
        assert images.shape == (1, 3, height, width), (width, height)
        assert torch.isfinite(images).all()
    with pytest.raises(ValueError, match="multiple of 4"):
        generate(model, vae, 30, 32, num_samples=1, steps=1)


def test_pipelines_size_parsing_and_snapping() -> None:
    assert parse_size("384x256") == (384, 256) and parse_size("64X48") == (64, 48)
    for bad in ("384", "axb", "3x4x5", ""):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_size(bad)
    assert snap_size(390, 250, 16) == (384, 256)
    assert snap_size(24, 16, 16) == (32, 16)  # halves round up
    assert snap_size(16, 16, 16) == (16, 16)
    with pytest.raises(ValueError, match="positive"):
        snap_size(0, 32, 16)
    with pytest.raises(ValueError, match="at least 16 pixels"):
        snap_size(15, 400, 16)


def test_pipelines_prepare_image_crops_as_training_does() -> None:
    from bucketing import place
    from training.images import crop_to_bucket

    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (97, 151, 3), np.uint8))
    placement = place(151, 97, 64, 48, 0)
    expected = crop_to_bucket(source, placement.resized, placement.crop)  # (48, 64, 3)
    assert np.array_equal(np.asarray(prepare_image(source, 16, (64, 48))), expected)


def test_pipelines_img2img_strength_near_zero_returns_reconstruction(loaded,
                                                                     tmp_path: Path) -> None:
    model, vae, info = loaded
    source = Image.open(_image(tmp_path / "in.png", 45, 30))
    image = prepare_image(source, grid_step(model, vae))
    assert image.size == (44, 32)  # nearest grid size, cover + centre crop
    recon = decode_latents(vae, encode_image(vae, image))  # (1, 3, 32, 44)
    args = dict(num_samples=1, cond=torch.tensor([2]), steps=10, base_tokens=info.base_tokens)
    assert torch.equal(img2img(model, vae, image, 0.0, **args), recon)  # no step at all
    near = img2img(model, vae, image, 0.01, **args)
    far = img2img(model, vae, image, 1.0, **args)
    assert near.shape == far.shape == (1, 3, 32, 44)
    near_err = (near - recon).abs().mean().item()
    far_err = (far - recon).abs().mean().item()
    # off by about t0 · |noise − v|: small even for this barely trained model
    assert near_err < 0.03 and near_err < far_err / 8, (near_err, far_err)
    assert prepare_image(source, 4, (64, 16)).size == (64, 16)


def test_pipelines_img2img_schedule_starts_at_strength() -> None:
    full = sampling_timesteps(10, 2.0)
    assert full[0] == 1 and full[-1] == 0 and len(full) == 11
    part = sampling_timesteps(10, 2.0, 0.5)
    assert part[0].item() == pytest.approx(2 * 0.5 / (1 + 0.5))  # shifted strength
    assert len(part) == 6 and torch.all(part[1:] == full[6:])  # the grid points below it
    assert sampling_timesteps(10, 2.0, 0.0).tolist() == [0.0]
    with pytest.raises(ValueError, match="strength"):
        sampling_timesteps(10, 1.0, 1.5)


@torch.no_grad()
def test_pipelines_tiles_only_images_above_the_pixel_threshold() -> None:
    torch.manual_seed(0)  # f = 8, tiles of 256 px as the shipped VAE's
    vae = AutoencoderKL(VAEConfig(block_out_channels=(4, 4, 4, 4), norm_num_groups=2,
                                  layers_per_block=1, sample_size=256,
                                  mid_block_add_attention=False, force_upcast=False)).eval()
    rng = np.random.default_rng(0)
    mid = Image.fromarray(rng.integers(0, 256, (256, 384, 3), np.uint8))
    result = reconstruct(vae, mid)
    whole = vae.decode(vae.encode(pil_to_tensor(mid)).mode()).clamp(-1, 1)  # (1, 3, 256, 384)
    assert not result.tiled
    assert np.array_equal(np.asarray(result.image), np.asarray(tensor_to_pil(whole)))
    z = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(decode_latents(vae, z), vae.decode(vae.denormalize(z)).clamp(-1, 1))
    large = Image.fromarray(rng.integers(0, 256, (1024, 1056, 3), np.uint8))  # above 1024²
    result = reconstruct(vae, large)
    assert result.tiled and result.image.size == (1056, 1024)


def test_pipelines_numbering_continues_after_existing_grids(tmp_path: Path) -> None:
    images = torch.zeros(2, 3, 8, 8)
    params = [{"seed": 0, "index": i} for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    _image(out / "grid_0000.png", 10, 10)  # a grid whose images were deleted
    kept = (out / "grid_0000.png").read_bytes()
    paths = save_images(images, out, params)
    assert [p.name for p in paths] == ["0001.png", "0002.png", "grid_0001.png"]
    assert (out / "grid_0000.png").read_bytes() == kept


def test_pipelines_labels_outside_the_classes_are_refused(loaded) -> None:
    from inference.pipelines import sample_latents
    from models.registry import build_dit

    model, _, _ = loaded  # 4 classes; index 4 would be the null (unconditional) class
    for labels in ([4], [5], [-1]):
        with pytest.raises(ValueError, match=r"labels must lie in 0\.\.3"):
            sample_latents(model, (8, 8), num_samples=1, cond=torch.tensor(labels), steps=1)
    unconditional = build_dit("dit-t/2", 4, 0).eval()
    with pytest.raises(ValueError, match="trained without classes"):
        sample_latents(unconditional, (8, 8), num_samples=1, cond=torch.tensor([0]), steps=1)
    assert sample_latents(unconditional, (8, 8), num_samples=1, steps=1).shape == (1, 4, 8, 8)


def test_pipelines_save_images_refuses_nonfinite_samples(tmp_path: Path) -> None:
    images = torch.zeros(3, 3, 8, 8)
    images[1, 0, 2, 2] = float("nan")
    images[2] = float("inf")
    with pytest.raises(ValueError, match=r"sample\(s\) \[1, 2\] came out NaN or infinite"):
        save_images(images, tmp_path / "out", [{"index": i} for i in range(3)])
    assert not (tmp_path / "out").exists()  # not even the good one: nothing black, nothing half


def test_pipelines_loader_gives_the_ema_weights(tiny_run: Path, loaded) -> None:
    from training.checkpoint import latest_checkpoint, load_checkpoint

    tensors = load_checkpoint(latest_checkpoint(tiny_run)).tensors
    model = loaded[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors["ema"][key]), key
    assert any(not torch.equal(tensors["ema"][k], tensors["model"][k]) for k in tensors["ema"])


def test_pipelines_sampler_label_and_guidance_each_change_the_image(loaded) -> None:
    import copy

    model, vae, info = loaded
    # the 2-step tiny run's conditioning has barely moved (adaLN-Zero): move every weight
    model = copy.deepcopy(model)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    args = dict(steps=3, seed=5, base_tokens=info.base_tokens)
    base = generate(model, vae, 32, 32, num_samples=1, cond=torch.tensor([0]), cfg_scale=4.0,
                    **args)
    for changed in (dict(cond=torch.tensor([0]), cfg_scale=4.0, sampler="heun"),
                    dict(cond=torch.tensor([3]), cfg_scale=4.0),
                    dict(cond=torch.tensor([0]), cfg_scale=1.0)):
        assert not torch.allclose(base, generate(model, vae, 32, 32, num_samples=1, **changed,
                                                 **args),
                                  atol=1e-3), changed
