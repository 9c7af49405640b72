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


def test_inference_image_larger_than_the_tile_is_decoded_whole(tiny_vae: Path,
                                                                tmp_path: Path) -> None:
    img = _image(tmp_path / "big.png", 80, 40)  # above the VAE's 32 px tile, far below 1024²
    out = _run("--vae", str(tiny_vae), "--image", str(img), "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    assert rep["tiled"] is False and rep["size"] == [80, 40]
    assert (tmp_path / "big_recon.png").exists()


def test_inference_single_vae_file_takes_its_config_else_warns(tiny_vae: Path,
                                                              tmp_path: Path) -> None:
    from inference.pipelines import reconstruct
    from models.vae import load_vae

    img = _image(tmp_path / "in.png", 16, 16)
    weights = tiny_vae / "diffusion_pytorch_model.safetensors"  # config.json beside it
    out = _run("--vae", str(weights), "--image", str(img), "--json", "--device", "cpu")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    expected = reconstruct(load_vae(tiny_vae), Image.open(img)).psnr
    assert json.loads(out.stdout.strip().splitlines()[-1])["psnr"] == round(expected, 3)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(weights.read_bytes())
    out = _run("--vae", str(lone), "--image", str(img), "--out", str(tmp_path / "b.png"))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: {lone}: no AutoencoderKL")
    assert "norm_num_groups 8" in lines[0]


def test_inference_reconstruction_out_as_folder(tiny_vae: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "in.png", 16, 16)
    (tmp_path / "existing").mkdir()
    for out_arg in (str(tmp_path / "existing"), str(tmp_path / "new") + "/"):
        out = _run("--config", str(tiny_vae / "config.json"), "--image", str(img), "--out",
                   out_arg, "--device", "cpu")
        assert out.returncode == 0, out.stderr
        assert Image.open(Path(out_arg) / "in_recon.png").size == (16, 16)


def test_inference_reconstruction_never_overwrites(tiny_vae: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "in.png", 16, 16)
    original = img.read_bytes()
    (tmp_path / "in_recon.png").write_bytes(b"an earlier result")
    for out_arg, reason in ((None, "in_recon.png: exists; refusing to overwrite"),
                            (str(img), "in.png: the input image; refusing to overwrite"),
                            (str(tmp_path / "noext"), "noext: not an image file name")):
        args = ["--out", out_arg] if out_arg else []
        out = _run("--config", str(tiny_vae / "config.json"), "--image", str(img), *args)
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], out.stderr
    assert img.read_bytes() == original
    assert (tmp_path / "in_recon.png").read_bytes() == b"an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "in_recon.png", "vae"]


def test_inference_image_too_small_error_names_it(tiny_vae: Path, tiny_run: Path,
                                                  tmp_path: Path) -> None:
    img = _image(tmp_path / "dot.png", 1, 1)
    for args in (["--config", str(tiny_vae / "config.json")],
                 ["--checkpoint", str(tiny_run), "--out", str(tmp_path / "o")]):
        out = _run(*args, "--image", str(img), "--device", "cpu")
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1, out.stderr
        assert lines[0].startswith(f"error: {img}: ") and "1x1" in lines[0]


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


def test_inference_default_size_is_the_training_resolution(tiny_run: Path,
                                                           tmp_path: Path) -> None:
    from train import main as train_main

    export = tmp_path / "export"
    assert train_main(["--export", str(tiny_run), "--out", str(export)]) == 0
    meta = json.loads((export / "config.json").read_text())
    args = ["--checkpoint", str(export), "--num-samples", "1", "--steps", "1", "--device", "cpu",
            "--json"]
    for resolution, size in ((24, [24, 24]), (None, [32, 32])):  # None: sqrt(base_tokens) · 4
        (export / "config.json").write_text(json.dumps({**meta, "resolution": resolution}))
        out = _run(*args, "--out", str(tmp_path / f"out_{resolution}"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])["size"] == size


def test_inference_out_that_is_a_file_is_refused_before_loading(tmp_path: Path) -> None:
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    for out_dir, reason in ((taken, "is a file, not a folder"),
                            (taken / "sub", f"cannot be made, {taken} is a file")):
        out = _run("--checkpoint", str(tmp_path / "no_such_run"), "--out", str(out_dir))
        assert out.returncode == 1
        assert out.stderr.strip() == f"error: {out_dir}: {reason}"  # not the missing run
    assert taken.read_text() == "not a folder"


def test_inference_strength_without_image_is_one_line_error(tiny_run: Path,
                                                            tmp_path: Path) -> None:
    out = _run("--checkpoint", str(tiny_run), "--strength", "0.5", "--out",
               str(tmp_path / "o"), "--device", "cpu")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --strength is for image-to-image; give --image too"
    assert not (tmp_path / "o").exists()


def test_inference_bad_device_or_cfg_scale_is_one_line_error(tiny_run: Path, tiny_vae: Path,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture
                                                              ) -> None:
    import importlib.util  # in process: inference.py, not the inference/ package

    spec = importlib.util.spec_from_file_location("inference_cli", REPO_ROOT / "inference.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    image = _image(tmp_path / "in.png", 32, 32)
    for args, code, message in (
            (["--checkpoint", str(tiny_run), "--device", "foo"], 1,
             "error: --device foo: not a device (auto, cpu, cuda or cuda:N)"),
            (["--config", str(tiny_vae / "config.json"), "--image", str(image), "--device",
              "foo"], 1, "error: --device foo: not a device (auto, cpu, cuda or cuda:N)"),
            (["--checkpoint", str(tiny_run), "--cfg-scale", "nan", "--device", "cpu"], 2,
             "error: --cfg-scale nan: not a finite number")):
        assert cli.main([*args, "--out", str(tmp_path / "o")]) == code
        assert capsys.readouterr().err.strip() == message
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


def test_inference_img2img_notes_an_off_grid_size(tiny_run: Path, tmp_path: Path) -> None:
    img = _image(tmp_path / "in.png", 64, 64)
    out = _run("--checkpoint", str(tiny_run), "--image", str(img), "--size", "45x30",
               "--num-samples", "1", "--steps", "2", "--out", str(tmp_path / "out"),
               "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    assert "note: size 45x30 is off the grid" in out.stderr and "using 44x32" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["size"] == [44, 32]
