"""The inference.py command line: sampling, image-to-image, reconstruction and their errors;
and train.py --export of a DiT run, whose export inference.py loads."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from models.vae import AutoencoderKL, VAEConfig
from models.vae_weights import save_vae

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


@pytest.fixture(scope="module")
def cli():
    """inference.py loaded in process (the inference/ package shadows its module name)."""
    spec = importlib.util.spec_from_file_location("inference_cli", REPO_ROOT / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image(path: Path, w: int, h: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)
    return path


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: a snapshot to show that nothing was written."""
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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


def test_inference_tile_size_sets_the_tiles_of_a_large_image(cli, tmp_path: Path,
                                                              capsys) -> None:
    from inference.pipelines import TILE_ABOVE_PIXELS

    torch.manual_seed(0)  # no attention: a megapixel in one tile stays quick on a CPU
    vae = save_vae(AutoencoderKL(VAEConfig(
        block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4, sample_size=32,
        force_upcast=False, mid_block_add_attention=False)), tmp_path / "vae")
    side = math.isqrt(TILE_ABOVE_PIXELS) + 16  # just above the size that is tiled
    img = _image(tmp_path / "big.png", side, side)
    reports = {}
    for tile in ("256", side):  # many tiles, then one tile holding the whole image
        out = tmp_path / f"tiles_{tile}.png"
        assert cli.main(["--vae", str(vae), "--image", str(img), "--out", str(out),
                         "--tile-size", str(tile), "--json", "--device", "cpu"]) == 0
        reports[tile] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert reports[tile]["tiled"] is True and reports[tile]["size"] == [side, side]
    # one tile over the whole image is the plain pass: tiling changes the pixels
    assert reports["256"]["psnr"] != reports[side]["psnr"]
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "tiles_256.png")),
                              np.asarray(Image.open(tmp_path / f"tiles_{side}.png")))
    # the VAE's config, and so its fingerprint, stay as they were
    assert json.loads((vae / "config.json").read_text())["sample_size"] == 32


def test_inference_single_vae_file_takes_its_config_else_warns(tiny_vae: Path,
                                                              tmp_path: Path) -> None:
    from inference.pipelines import reconstruct
    from models.vae_weights import load_vae

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
        assert out.returncode == 2
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
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert lines[0].startswith(f"error: {img}: ") and "1x1" in lines[0]


def test_inference_missing_weights_is_one_line_error(tiny_vae: Path, tmp_path: Path) -> None:
    (tiny_vae / "diffusion_pytorch_model.safetensors").unlink()
    out = _run("--config", str(tiny_vae / "config.json"), "--image",
               str(_image(tmp_path / "a.png", 16, 16)))
    assert out.returncode == 2
    assert str(tiny_vae) in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_inference_unknown_layout_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "weights.safetensors"
    save_file({"something.else": torch.zeros(2)}, bad)
    out = _run("--vae", str(bad), "--image", str(_image(tmp_path / "a.png", 16, 16)))
    assert out.returncode == 2
    assert "weights.safetensors" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_inference_unreadable_image_is_one_line_error(tiny_vae: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    out = _run("--config", str(tiny_vae / "config.json"), "--image", str(bad))
    assert out.returncode == 2
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


def test_inference_default_size_is_the_training_resolution(tiny_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from train import main as train_main

    export = tmp_path / "export"
    assert train_main(["--export", str(tiny_run), "--out", str(export)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"exported {export}"]
    meta = json.loads((export / "config.json").read_text())
    args = ["--checkpoint", str(export), "--num-samples", "1", "--steps", "1", "--device", "cpu",
            "--json"]
    for resolution, size in ((24, [24, 24]), (None, [32, 32])):  # None: sqrt(base_tokens) · 4
        (export / "config.json").write_text(json.dumps({**meta, "resolution": resolution}))
        out = _run(*args, "--out", str(tmp_path / f"out_{resolution}"))
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1])["size"] == size


def test_inference_warns_of_a_size_far_from_the_training_sizes(tiny_run: Path,
                                                                tmp_path: Path) -> None:
    # the tiny run trained at 32 px: 96x96 is 9x its area, 64x16 an aspect of 4:1 (still fine)
    args = ["--checkpoint", str(tiny_run), "--num-samples", "1", "--steps", "1", "--device",
            "cpu", "--no-progress"]
    far = _run(*args, "--size", "96x96", "--out", str(tmp_path / "far"))
    assert far.returncode == 0, far.stderr
    assert "warning: 96x96 is far from the sizes this model was trained at" in far.stderr
    assert "9.0x the area" in far.stderr
    near = _run(*args, "--size", "64x16", "--out", str(tmp_path / "near"))
    assert near.returncode == 0 and "warning" not in near.stderr, near.stderr


def test_inference_strength_without_image_is_one_line_error(tiny_run: Path,
                                                            tmp_path: Path) -> None:
    out = _run("--checkpoint", str(tiny_run), "--strength", "0.5", "--out",
               str(tmp_path / "o"), "--device", "cpu")
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --strength is for image-to-image; give --image too"
    assert not (tmp_path / "o").exists()


def _fill(args: list[str], **paths: Path) -> list[str]:
    """`args` with {run}, {config}, {img}, {taken}, {tmp} replaced by those paths."""
    return [arg.format(**paths) for arg in args]


@pytest.fixture
def places(tiny_run: Path, tiny_vae: Path, tmp_path: Path) -> dict[str, Path]:
    """The paths the tables below name: a DiT run, a VAE config, an image with its
    reconstruction already beside it, a file that is not a folder, and tmp_path."""
    img = _image(tmp_path / "in.png", 32, 32)
    (tmp_path / "in_recon.png").write_bytes(b"an earlier result")
    (tmp_path / "taken.txt").write_text("not a folder")
    (tmp_path / "done.npz").write_bytes(b"an earlier batch")
    return {"run": tiny_run, "config": tiny_vae / "config.json", "img": img,
            "taken": tmp_path / "taken.txt", "done": tmp_path / "done.npz", "tmp": tmp_path}


# Each has a bad input and a bad output (in_recon.png exists, or --out is a file): the input is
# named, not the output.
INPUT_BEFORE_OUTPUT = [
    (["--config", "{tmp}/nope.json", "--image", "{img}"],
     "{tmp}/nope.json: the VAE config given by --config was not found"),
    (["--vae", "{tmp}/nope", "--image", "{img}"],
     "{tmp}/nope: the VAE given by --vae was not found"),
    (["--config", "{config}", "--image", "{tmp}/gone.png", "--out", "{img}"],
     "{tmp}/gone.png: file not found"),
    (["--config", "{config}", "--image", "{tmp}", "--out", "{img}"],
     "{tmp}: is a folder, not an image file"),
    (["--checkpoint", "{tmp}/no_run", "--out", "{taken}"],
     "{tmp}/no_run: no such checkpoint, checkpoints folder or run folder"),
    (["--checkpoint", "{run}", "--step", "9", "--out", "{taken}"],
     "{run}/checkpoints/step_0000009: no complete checkpoint of step 9 (complete steps: [1, 2])"),
    (["--checkpoint", "{run}", "--vae", "{tmp}/nope", "--out", "{taken}"],
     "{tmp}/nope: the VAE given by --vae was not found"),
    (["--checkpoint", "{run}", "--image", "{tmp}/gone.png", "--out", "{taken}"],
     "{tmp}/gone.png: file not found"),
]


@pytest.mark.parametrize("args, message", INPUT_BEFORE_OUTPUT,
                         ids=[" ".join(a) for a, _ in INPUT_BEFORE_OUTPUT])
def test_inference_inputs_are_checked_before_the_output(cli, places: dict[str, Path],
                                                        error_line, args: list[str],
                                                        message: str) -> None:
    before = _files(places["tmp"])
    assert cli.main([*_fill(args, **places), "--device", "cpu"]) == 2
    assert error_line() == "error: " + message.format(**places)
    assert _files(places["tmp"]) == before


SAMPLE = ["--checkpoint", "{run}", "--out", "{tmp}/o", "--device", "cpu"]
RECONSTRUCT = ["--config", "{config}", "--image", "{img}", "--out", "{tmp}/o.png", "--device",
               "cpu"]
NPZ = ["--checkpoint", "{run}", "--npz", "{tmp}/s.npz", "--device", "cpu"]
# Bad input of every kind, each refused in one line with exit status 2 before anything is
# written (a flag given twice: the last one counts).
BAD_INPUT = [
    (SAMPLE + ["--device", "foo"], "--device foo: not a device (auto, cpu, cuda or cuda:N)"),
    (RECONSTRUCT + ["--device", "foo"], "--device foo: not a device (auto, cpu, cuda or cuda:N)"),
    (SAMPLE + ["--device", "cuda:99"], "--device cuda:99: this machine has "),
    (SAMPLE + ["--cfg-scale", "nan"], "--cfg-scale nan: not a finite number"),
    (SAMPLE + ["--steps", "0"], "--steps 0: must be at least 1"),
    (SAMPLE + ["--num-samples", "0"], "--num-samples 0: must be at least 1"),
    (SAMPLE + ["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (SAMPLE + ["--image", "{img}", "--strength", "1.5"], "--strength 1.5: must lie in [0, 1]"),
    (SAMPLE + ["--size", "wide"], "size 'wide' is not WIDTHxHEIGHT (e.g. 384x256)"),
    (SAMPLE + ["--size", "0x64"], "size 0x64: sides must be positive"),
    (SAMPLE + ["--size", "2x64"], "size 2x64 is smaller than one grid step: sides must be at "
                                  "least 4 pixels (VAE factor × patch size)"),
    (SAMPLE + ["--class-label", "nope"], "unknown class 'nope'; give a name or an index: "),
    (SAMPLE + ["--tile-size", "33"],
     "--tile-size 33: must be a positive multiple of the VAE's downsampling factor 2"),
    (RECONSTRUCT + ["--tile-size", "0"],
     "--tile-size 0: must be a positive multiple of the VAE's downsampling factor 2"),
    (SAMPLE + ["--out", "{taken}"], "{taken}: is a file, not a folder"),
    (SAMPLE + ["--out", "{taken}/sub"], "{taken}/sub: cannot be made, {taken} is a file"),
    (SAMPLE + ["--config", "{config}"],
     "--config is for reconstruction; with --checkpoint use --vae to override the VAE"),
    (["--checkpoint", "{run}"], "give --out DIR for the sampled images (or --npz FILE for an "
                                "ADM sample batch)"),
    (NPZ + ["--image", "{img}"],
     "--npz writes generated samples; image-to-image (--image) writes PNGs to --out"),
    (NPZ + ["--out", "{tmp}/o"], "--npz and --out both name the output; give one of them"),
    (SAMPLE + ["--chunk-size", "2"], "--chunk-size is for --npz"),
    (NPZ + ["--chunk-size", "0"], "--chunk-size 0: must be at least 1"),
    (NPZ[:2] + ["--npz", "{done}", "--device", "cpu"],
     "{done}: exists; refusing to overwrite it (choose another --npz)"),
    (NPZ[:2] + ["--npz", "{taken}", "--device", "cpu"],
     "{taken}: an ADM sample batch is an .npz file; give a name ending in .npz"),
    (NPZ[:2] + ["--npz", "{taken}/s.npz", "--device", "cpu"],
     "{taken}/s.npz: cannot be made, {taken} is a file"),
    (NPZ + ["--class-label", "nope"], "unknown class 'nope'; give a name or an index: "),
    (RECONSTRUCT + ["--vae", "{config}"],
     "--config and --vae both name the VAE to reconstruct through; give one of them"),
    (["--image", "{img}"],
     "give --checkpoint RUN to sample, or --image with --config/--vae to reconstruct"),
    (RECONSTRUCT[:4],
     "{tmp}/in_recon.png: exists; refusing to overwrite it (choose another --out)"),
]


def _row_id(args: list[str]) -> str:
    for base, name in ((SAMPLE, "sample"), (RECONSTRUCT, "reconstruct"), (NPZ, "npz")):
        if args[:len(base)] == base:
            return " ".join([name, *args[len(base):]])
    return " ".join(args)


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[_row_id(a) for a, _ in BAD_INPUT])
def test_inference_bad_input_is_one_line_error_with_status_2(cli, places: dict[str, Path],
                                                             error_line, args: list[str],
                                                             message: str) -> None:
    before = _files(places["tmp"])
    assert cli.main(_fill(args, **places)) == 2
    assert error_line().startswith("error: " + message.format(**places))
    assert _files(places["tmp"]) == before


RECONSTRUCTION_IGNORES = [
    (["--steps", "28"], "--steps"),  # its sampling default, still given
    (["--cfg-scale", "4"], "--cfg-scale"),
    (["--class", "1"], "--class-label"),  # an abbreviation, named in full
    (["--seed", "0"], "--seed"),
    (["--num-samples", "1"], "--num-samples"),
    (["--batch-size", "1"], "--batch-size"),
    (["--size", "32x32"], "--size"),
    (["--sampler", "euler"], "--sampler"),
    (["--strength", "0.5"], "--strength"),
    (["--step", "1"], "--step"),
    (["--no-progress"], "--no-progress"),
    (["--npz", "s.npz"], "--npz"),
    (["--steps", "3", "--cfg-scale", "2", "--class", "1"], "--class-label, --cfg-scale, --steps"),
]


@pytest.mark.parametrize("flags, named", RECONSTRUCTION_IGNORES,
                         ids=[" ".join(f) for f, _ in RECONSTRUCTION_IGNORES])
def test_inference_reconstruction_refuses_sampling_flags(cli, tiny_vae: Path, tmp_path: Path,
                                                         error_line, flags: list[str],
                                                         named: str) -> None:
    img = _image(tmp_path / "in.png", 16, 16)
    for source in (["--config", str(tiny_vae / "config.json")], ["--vae", str(tiny_vae)]):
        assert cli.main([*source, "--image", str(img), *flags, "--device", "cpu"]) == 2
        assert error_line() == ("error: reconstruction takes only --config or --vae, --image, "
                                "--out, --device, --dtype, --tile-size and --json; "
                                f"{named} would be ignored")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "vae"]


DOCUMENTED = [  # README.md, the docstring of inference.py and scripts/gpu_check.sh
    "--checkpoint runs/NAME --num-samples 4 --size 384x256 --class-label discs --cfg-scale 4 "
    "--steps 28 --sampler euler --seed 0 --out out/",
    "--checkpoint runs/NAME --image in.png --strength 0.6 --out out/",
    "--config vae/config.json --image in.png",
    "--vae path/to/vae.safetensors --image in.png",
    "--checkpoint runs/dit_gpu --num-samples 4 --size 384x256 --class-label 1 --device cuda "
    "--dtype bf16 --out samples --no-progress --json",
    "--config vae/config.json --image in.png --out recon/ --device cpu --dtype bf16 --json",
    "--vae vae --image in.png --out in2.jpg --device auto --dtype fp32",
    "--checkpoint runs/NAME --step 2 --vae vae --image in.png --strength 0.3 --num-samples 2 "
    "--batch-size 1 --size 64x64 --class-label 0 --cfg-scale 1 --steps 4 --sampler heun "
    "--seed 3 --out out/ --device cpu --dtype fp16 --no-progress --json",
    "--checkpoint runs/NAME --num-samples 50000 --npz samples.npz",
    "--checkpoint runs/NAME --num-samples 50000 --npz samples.npz --size 256x256 --cfg-scale 1.5 "
    "--steps 50 --batch-size 64 --sampler heun --seed 0 --chunk-size 500",
]


@pytest.mark.parametrize("line", DOCUMENTED)
def test_inference_documented_commands_pass_the_flag_checks(cli, line: str) -> None:
    parser = cli.build_parser()
    assert cli.usage_error(parser, parser.parse_args(line.split())) is None
    text = " ".join(parser.format_help().split())  # the defaults sampling fills in are shown
    assert "default: 28)" in text and "default: euler)" in text and "None" not in text


def test_inference_failure_after_accepting_the_input_exits_1(cli, tiny_run: Path,
                                                             tmp_path: Path, error_line) -> None:
    from safetensors.torch import load_file

    from train import main as train_main

    export = tmp_path / "export"
    assert train_main(["--export", str(tiny_run), "--out", str(export)]) == 0
    weights = load_file(export / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()},
              export / "model.safetensors")  # a valid file and model: NaN samples
    assert cli.main(["--checkpoint", str(export), "--num-samples", "1", "--steps", "1",
                     "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")]) == 1
    assert "came out NaN or infinite, nothing written" in error_line()
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


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


NPZ_ARGS = ["--num-samples", "6", "--chunk-size", "2", "--batch-size", "2", "--size", "24x24",
            "--steps", "2", "--device", "cpu", "--no-progress", "--json"]


def test_inference_npz_two_ranks_write_what_one_process_writes(cli, tiny_run: Path,
                                                               tmp_path: Path, capsys) -> None:
    import os

    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    assert cli.main(["--checkpoint", str(tiny_run), "--npz", str(one), *NPZ_ARGS]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: report[k] for k in ("path", "count", "size", "resumed", "ranks", "labels")} == {
        "path": str(one), "count": 6, "size": [24, 24], "resumed": 0, "ranks": 1,
        "labels": "balanced"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29541", "inference.py", "--checkpoint",
                          str(tiny_run), "--npz", str(two), *NPZ_ARGS],
                         cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["ranks"] == 2  # rank 0 alone reports
    a, b = _npz(one), _npz(two)
    assert sorted(a) == sorted(b) == ["arr_0", "arr_1"]
    assert a["arr_0"].tobytes() == b["arr_0"].tobytes() and a["arr_0"].shape == (6, 24, 24, 3)
    assert a["arr_1"].tobytes() == b["arr_1"].tobytes() and a["arr_1"].dtype == np.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "two.npz"]


def test_inference_npz_killed_run_resumes_and_refuses_other_parameters(
        cli, tiny_run: Path, tmp_path: Path, capsys, error_line) -> None:
    import os
    import time

    out, parts = tmp_path / "s.npz", tmp_path / "s.npz.parts"
    args = ["--checkpoint", str(tiny_run), "--npz", str(out), *NPZ_ARGS, "--num-samples", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "inference.py", *args], cwd=REPO_ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120  # a guard against a hung run, not a timing check
    while not (parts / "000000.npz").exists() and run.poll() is None:
        assert time.monotonic() < deadline, "the run wrote no chunk"
        time.sleep(0.01)
    run.kill()  # interrupted after its first chunk (of 16)
    assert run.wait() != 0 and not out.exists()
    kept = sorted(p.name for p in parts.glob("0*.npz"))
    assert kept and len(kept) < 16
    before = _files(tmp_path)
    for flags, diff in ((["--seed", "1"], "seed 0 there, 1 here"),
                        (["--cfg-scale", "2"], "cfg_scale 4.0 there, 2.0 here"),
                        (["--class-label", "1"], "labels 'balanced' there, 1 here"),
                        (["--step", "1"], "step 2 there, 1 here"),
                        (["--chunk-size", "4"], "chunk_size 2 there, 4 here")):
        assert cli.main([*args, *flags]) == 2
        line = error_line()
        assert line.startswith(f"error: {parts}: holds chunks sampled with other parameters (")
        assert diff in line, line
    assert _files(tmp_path) == before
    blocker = parts / "000015.npz"  # the last chunk cannot be written: the rerun fails there
    blocker.mkdir()
    assert cli.main(args) == 1 and "000015.npz" in error_line()
    blocker.rmdir()
    assert cli.main([*args, "--batch-size", "3"]) == 0  # not a recorded parameter
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed"] == 30
    assert not parts.exists()
    whole = tmp_path / "whole.npz"
    assert cli.main([*args[:2], "--npz", str(whole), *args[4:]]) == 0
    a, b = _npz(out), _npz(whole)
    assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
    assert np.bincount(a["arr_1"]).tolist() == [8] * 4 and a["arr_1"].tolist() == b[
        "arr_1"].tolist()
