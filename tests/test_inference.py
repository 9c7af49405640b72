"""The inference.py command line: sampling, image-to-image, reconstruction and their errors;
and train.py --export of a DiT run, whose export inference.py loads."""

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


def test_inference_generate_writes_pngs_and_grid_with_parameters(tiny_run: Path,
                                                                 tmp_path: Path) -> None:
    out = _run("--checkpoint", str(tiny_run), "--num-samples", "3", "--size", "45x30",
               "--steps", "2", "--seed", "7", "--class-label", "discs", "--sampler", "heun",
               "--out", str(tmp_path / "out"), "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    assert "45x30 is off the grid" in out.stderr and "using 44x32" in out.stderr
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["size"] == [44, 32] and rep["step"] == 2 and rep["classes"] == ["discs"] * 3
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "grid_0000.png"]
    for i in range(3):
        img = Image.open(tmp_path / "out" / f"{i:04d}.png")
        assert img.size == (44, 32)
        assert {k: img.text[k] for k in ("size", "seed", "index", "class", "cfg_scale", "steps",
                                          "sampler", "step")} == {
            "size": "44x32", "seed": "7", "index": str(i), "class": "discs", "cfg_scale": "4.0",
            "steps": "2", "sampler": "heun", "step": "2"}
        assert img.text["checkpoint"].endswith("step_0000002")
    grid = Image.open(tmp_path / "out" / "grid_0000.png")
    assert grid.size == (2 * 46 + 2, 2 * 34 + 2)  # 2 x 2 cells of 44x32, 2 px apart
    assert grid.text["class"] == "discs" and "index" not in grid.text


def test_inference_second_run_keeps_the_first_runs_images(tiny_run: Path,
                                                           tmp_path: Path) -> None:
    args = ["--checkpoint", str(tiny_run), "--num-samples", "2", "--size", "32x32", "--steps",
            "2", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert _run(*args, "--seed", "1").returncode == 0
    first = (tmp_path / "out" / "0000.png").read_bytes()
    out = _run(*args, "--seed", "2", "--json")
    assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["0000.png", "0001.png", "0002.png", "0003.png", "grid_0000.png",
                     "grid_0002.png"]
    assert (tmp_path / "out" / "0000.png").read_bytes() == first
    assert Image.open(tmp_path / "out" / "0002.png").text["seed"] == "2"
    assert json.loads(out.stdout.strip().splitlines()[-1])["files"][-1].endswith(
        "grid_0002.png")


def test_inference_strength_without_image_is_one_line_error(tiny_run: Path,
                                                            tmp_path: Path) -> None:
    out = _run("--checkpoint", str(tiny_run), "--strength", "0.5", "--out",
               str(tmp_path / "o"), "--device", "cpu")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --strength is for image-to-image; give --image too"
    assert not (tmp_path / "o").exists()


def test_inference_impossible_size_is_one_line_error(tiny_run: Path, tmp_path: Path) -> None:
    out = _run("--checkpoint", str(tiny_run), "--size", "2x64", "--out", str(tmp_path / "o"),
               "--device", "cpu")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "2x64" in lines[0], out.stderr
    assert not (tmp_path / "o").exists()


def test_inference_img2img_from_export_at_input_size(tiny_run: Path, tmp_path: Path) -> None:
    from train import main as train_main

    assert train_main(["--export", str(tiny_run), "--out", str(tmp_path / "export")]) == 0
    img = _image(tmp_path / "in.png", 45, 30)
    out = _run("--checkpoint", str(tmp_path / "export"), "--image", str(img), "--strength",
               "0.5", "--num-samples", "2", "--steps", "4", "--out", str(tmp_path / "out"),
               "--device", "cpu")
    assert out.returncode == 0, out.stderr
    for name in ("0000.png", "0001.png", "grid_0000.png"):
        assert (tmp_path / "out" / name).exists()
    first = Image.open(tmp_path / "out" / "0000.png")
    assert first.size == (44, 32)  # the input's size snapped to the grid of 4
    assert first.text["strength"] == "0.5" and first.text["image"] == str(img)
    assert first.text["class"] == "checkers"  # no label: the classes in turn
    assert Image.open(tmp_path / "out" / "0001.png").text["class"] == "clouds"
