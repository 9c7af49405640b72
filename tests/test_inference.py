"""The inference.py command line: VAE reconstruction and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models.vae import AutoencoderKL, VAEConfig, save_vae

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "inference.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True)


@pytest.fixture
def tiny_vae(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), norm_num_groups=4,
                                  latent_channels=4, sample_size=32, force_upcast=False))
    return save_vae(vae, tmp_path / "vae")


def _image(path: Path, w: int, h: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)
    return path


def test_inference_reconstructs_at_own_size(tiny_vae: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "in.png", 45, 30)
    out = _run("--config", str(tiny_vae / "config.json"), "--image", str(img), "--out",
               str(tmp_path / "out.png"), "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["size"] == [44, 30]  # cropped to multiples of the factor 2
    assert rep["latent_shape"] == [1, 4, 15, 22]
    assert np.isfinite(rep["psnr"]) and -1 <= rep["ssim"] <= 1
    assert Image.open(tmp_path / "out.png").size == (44, 30)


def test_inference_large_image_is_tiled(tiny_vae: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "big.png", 80, 40)
    out = _run("--vae", str(tiny_vae), "--image", str(img), "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["tiled"] is True and rep["size"] == [80, 40]
    assert (tmp_path / "big_recon.png").exists()


def test_inference_missing_weights_is_one_line_error(tiny_vae: Path, tmp_path: Path) -> None:
    (tiny_vae / "diffusion_pytorch_model.safetensors").unlink()
    out = _run("--config", str(tiny_vae / "config.json"), "--image",
               str(_image(tmp_path / "a.png", 16, 16)))
    assert out.returncode != 0
    assert str(tiny_vae) in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_inference_unknown_layout_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "weights.safetensors"
    save_file({"something.else": torch.zeros(2)}, bad)
    out = _run("--vae", str(bad), "--image", str(_image(tmp_path / "a.png", 16, 16)))
    assert out.returncode != 0
    assert "weights.safetensors" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_inference_unreadable_image_is_one_line_error(tiny_vae: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    out = _run("--config", str(tiny_vae / "config.json"), "--image", str(bad))
    assert out.returncode != 0
    assert "broken.png" in out.stderr and len(out.stderr.strip().splitlines()) == 1
