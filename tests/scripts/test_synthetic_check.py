"""scripts/synthetic_check.py: family and colours from pixels, on held-out synthetic pictures at
full size, at 128 px and through the shipped VAE, on hand-drawn pictures, and its command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from PIL.PngImagePlugin import PngInfo

from scripts import synthetic_check as sc
from scripts.synthetic_check import Prediction, Truth, accuracy, check, summarize, to_bucket
from training.synthetic import (CLOSE_PAIRS, FAMILIES, OLD_PARAMS_FILE, PALETTE, PARAMS_FILE,
                                SyntheticParams, caption, file_name, heldout_prompts,
                                make_synthetic, picture, read_params)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def held_out() -> list:
    """96 held-out pictures (params, full-size pixels), drawn as `--validate` draws them."""
    return [picture(sc.VALIDATION_SEED, i, heldout=(i // 4) % 2 == 1) for i in range(96)]


def test_synthetic_check_is_right_on_held_out_pictures_at_128_px(held_out: list) -> None:
    params = [p for p, _ in held_out]
    result = accuracy([to_bucket(pixels, 128) for _, pixels in held_out], params)
    assert result["images"] == 96 and result["family"] >= 0.98
    assert min(result["per_family"].values()) >= 0.95
    assert result["colour"] >= 0.95 and result["orientation"] >= 0.95
    assert sum(sum(row.values()) for row in result["confusion"].values()) == 96


def test_synthetic_check_is_right_on_full_size_pictures(held_out: list) -> None:
    result = accuracy([pixels for _, pixels in held_out[:24]], [p for p, _ in held_out[:24]])
    assert result["family"] >= 0.98 and result["colour"] >= 0.95


def test_synthetic_check_is_right_through_the_shipped_vae(held_out: list) -> None:
    # centre squares of 128 px, one batch for the VAE (`--validate --vae` uses the buckets)
    small = [np.asarray(ImageOps.fit(Image.fromarray(pixels), (128, 128), Image.BICUBIC))
             for _, pixels in held_out[:16]]
    rebuilt = sc.reconstruct(small, str(REPO_ROOT / "vae"))
    assert [r.shape for r in rebuilt] == [(128, 128, 3)] * 16
    assert not all(np.array_equal(r, s) for r, s in zip(rebuilt, small))
    result = accuracy(rebuilt, [p for p, _ in held_out[:16]])
    assert result["family"] >= 0.98 and result["colour"] >= 0.9


def test_synthetic_check_palette_is_well_separated() -> None:
    lab = sc.srgb_to_lab(np.array(list(PALETTE.values())))  # (P, 3)
    names = list(PALETTE)
    for i, j in combinations(range(len(names)), 2):
        apart = float(np.linalg.norm(lab[i] - lab[j]))
        assert apart > 43
        assert (apart < 50) == (frozenset((names[i], names[j])) in CLOSE_PAIRS)
        # each palette colour is named as itself, whatever it is paired with
        assert sc.name_colours(lab[i], lab[j]) == (names[i], names[j])


def test_synthetic_check_is_deterministic_and_takes_arrays_or_images(held_out: list) -> None:
    pixels = held_out[1][1]
    first = check(pixels)
    assert check(pixels) == first == check(Image.fromarray(pixels))
    assert abs(sum(first.scores.values()) - 1) < 1e-3
    assert max(first.scores, key=first.scores.get) == first.family
    with pytest.raises(ValueError, match="a 4x30 picture is too small to check"):
        check(np.zeros((30, 4, 3), np.uint8))


def test_synthetic_check_names_hand_drawn_pictures() -> None:
    discs = Image.new("RGB", (200, 140), (255, 255, 255))
    draw = ImageDraw.Draw(discs)
    for x, y in ((40, 40), (120, 60), (80, 110)):
        draw.ellipse((x - 16, y - 16, x + 16, y + 16), fill=(220, 20, 20))
    yy, xx = np.mgrid[0:120, 0:160]
    stripes = np.where(((xx // 12) % 2 == 0)[..., None], [0, 140, 0], [0, 0, 0])
    checkers = np.where((((xx // 16) + (yy // 16)) % 2 == 0)[..., None], [255, 220, 0],
                        [0, 0, 128])
    blobs = Image.new("L", (180, 120), 0)
    ImageDraw.Draw(blobs).ellipse((20, 10, 90, 70), fill=255)
    ImageDraw.Draw(blobs).ellipse((100, 50, 170, 115), fill=255)
    clouds = Image.composite(Image.new("RGB", blobs.size, (255, 255, 255)),
                             Image.new("RGB", blobs.size, (135, 206, 250)),
                             blobs.filter(ImageFilter.GaussianBlur(10)))
    got = [check(discs), check(stripes.astype(np.uint8)), check(checkers.astype(np.uint8)),
           check(clouds)]
    assert [(p.family, p.background, p.foreground) for p in got[::3]] == [
        ("discs", "white", "red"), ("clouds", "light blue", "white")]
    assert (got[1].family, got[1].orientation, {got[1].background, got[1].foreground}) == (
        "stripes", "vertical", {"green", "black"})
    assert (got[2].family, {got[2].background, got[2].foreground}) == (
        "checkers", {"yellow", "dark blue"})


def test_synthetic_check_colours_of_stripes_and_checkers_count_in_either_order() -> None:
    def said(family: str, bg: str, fg: str) -> Prediction:
        return Prediction(family, bg, fg, {f: float(f == family) for f in FAMILIES})

    truths = [Truth("stripes", "red", "white", "vertical"), Truth("checkers", "red", "white"),
              Truth("discs", "red", "white"), Truth("clouds", "red", "white"),
              Truth("discs")]
    predictions = [said("stripes", "white", "red"), said("checkers", "white", "black"),
                   said("discs", "white", "red"), said("discs", "red", "pink"),
                   said("clouds", "red", "white")]
    result = summarize(predictions, truths)
    assert result["family"] == 0.6 and result["per_family"]["discs"] == 0.5
    assert result["confusion"]["clouds"] == {"discs": 1, "stripes": 0, "checkers": 0,
                                             "clouds": 0}
    # stripes: both right, swapped; checkers: white right, swapped; discs: none (the order
    # counts); clouds: the background
    assert result["background"] == 0.5 and result["foreground"] == 0.5
    assert result["both_colours"] == 0.25 and result["colour"] == 0.5
    assert result["orientation"] == 0.0  # the prediction named none


def test_synthetic_check_cli_judges_a_synthetic_folder(tmp_path: Path, capsys) -> None:
    root = make_synthetic(tmp_path / "set", 8, seed=11)
    assert sc.main([str(root), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 8 and result["accuracy"]["family"] == 1.0
    assert {f["expected"]["family"] for f in result["files"]} == set(FAMILIES)
    assert sc.main([str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("family: 100.0 % of 8 (discs 100.0 %")
    assert out[3].split() == list(FAMILIES) and json.loads(out[-1])["images"] == 8


def test_synthetic_check_cli_judges_samples_by_class_folder_or_listing(tmp_path: Path,
                                                                       capsys) -> None:
    source = make_synthetic(tmp_path / "set", 4, seed=12)
    truth = read_params(source)
    samples = tmp_path / "samples"
    for name in truth:  # samples in class folders, named after the families
        (samples / name).parent.mkdir(parents=True)
        shutil.copy(source / name, samples / name)
    Image.new("RGB", (64, 64), (20, 20, 20)).save(samples / "loose.png")  # no class: predicted
    assert sc.main([str(samples), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 5 and result["accuracy"]["images"] == 4
    assert result["accuracy"]["family"] == 1.0 and result["accuracy"]["colour"] is None
    assert [f["expected"] for f in result["files"] if f["file"].endswith("loose.png")] == [None]
    # a listing names the expected family, and optionally the colours, of each file
    clouds, discs = file_name(3, "clouds"), file_name(0, "discs")
    wrong = [c for c in PALETTE if c not in (truth[discs].background, truth[discs].foreground)]
    listing = [{"file_name": "one.png", "family": "clouds"},
               {"file_name": "two.png", "family": "discs", "background": wrong[0],
                "foreground": wrong[1]}]
    (samples / PARAMS_FILE).write_text("".join(json.dumps(r) + "\n" for r in listing))
    shutil.copy(source / clouds, samples / "one.png")
    shutil.copy(source / discs, samples / "two.png")
    assert sc.main([str(samples)]) == 0
    out = capsys.readouterr().out
    assert "family: 100.0 % of 2" in out and "both 0.0 %" in out
    # a listing may give a synthetic caption instead, and keep its name of before captions
    listing[1] = {"file_name": "two.png", "text": caption(truth[discs])}
    (samples / PARAMS_FILE).unlink()
    (samples / OLD_PARAMS_FILE).write_text("".join(json.dumps(r) + "\n" for r in listing))
    assert sc.main([str(samples), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 2 and result["accuracy"]["both_colours"] == 1.0


def test_synthetic_check_cli_judges_samples_by_their_prompt_chunk(tmp_path: Path,
                                                                  capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    prompts = heldout_prompts(3)  # discs, stripes, checkers: unseen family and colour pairs

    def sample(name: str, index: int, **chunks: str) -> None:
        info = PngInfo()
        for key, value in chunks.items():
            info.add_text(key, value)
        Image.fromarray(picture(1, index, heldout=True)[1]).save(out / name, pnginfo=info)

    stripes = prompts[1][1]
    others = [c for c in PALETTE if c not in (stripes.background, stripes.foreground)]
    wrong = caption(SyntheticParams("stripes", others[0], others[1], 9, 9, 1.0,
                                    orientation=stripes.orientation))
    sample("0000.png", 0, prompt=prompts[0][0], seed="0")  # the prompt it was drawn for
    sample("0001.png", 1, prompt=wrong)  # the family and orientation asked for, not the colours
    sample("0002.png", 2, prompt="a cat on a mat", **{"class": "checkers"})  # class only
    sample("0003.png", 2)  # nothing recorded: predicted only
    assert sc.main([str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = {Path(f["file"]).name: f["expected"] for f in result["files"]}
    first = prompts[0][1]
    assert expected == {
        "0000.png": {"family": "discs", "background": first.background,
                     "foreground": first.foreground},
        "0001.png": {"family": "stripes", "background": others[0], "foreground": others[1],
                     "orientation": stripes.orientation},
        "0002.png": {"family": "checkers"}, "0003.png": None}
    summary = result["accuracy"]
    assert summary["images"] == 3 and summary["family"] == 1.0
    assert summary["orientation"] == 1.0  # stripes' orientation, from the prompt
    assert summary["background"] == summary["foreground"] == 0.5  # each colour
    assert summary["both_colours"] == 0.5 and summary["colour"] == 0.5
    # a file named on the command line is judged by its prompt too
    assert sc.main([str(out / "0000.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("family: 100.0 % of 1") and "both 100.0 %" in lines[1]


def test_synthetic_check_cli_refuses_bad_input(tmp_path: Path, capsys, error_line) -> None:
    assert sc.main([str(tmp_path / "missing")]) == 2
    assert "missing: no such file or folder" in error_line()
    (tmp_path / "empty").mkdir()
    assert sc.main([str(tmp_path / "empty")]) == 2
    assert "empty: no image files" in error_line()
    (tmp_path / "empty" / PARAMS_FILE).write_text('{"file_name": "a.png", "family": "dots"}\n')
    assert sc.main([str(tmp_path / "empty")]) == 2
    assert f"{PARAMS_FILE}:1: family 'dots' is not one of discs" in error_line()
    (tmp_path / "empty" / PARAMS_FILE).write_text('{"file_name": "a.png", "family": "discs"}\n')
    assert sc.main([str(tmp_path / "empty")]) == 2
    assert "lists a.png, which is not in" in error_line()
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    assert sc.main([str(tmp_path / "bad.png")]) == 2
    assert "bad.png: cannot decode as an image" in error_line()
    assert sc.main(["--validate", "--vae", str(tmp_path / "novae")]) == 2
    assert "novae: VAE not found" in error_line()
    with pytest.raises(SystemExit):
        sc.main([])
    capsys.readouterr()


def test_synthetic_check_cli_validates_and_runs_as_a_script(tmp_path: Path, capsys) -> None:
    assert sc.main(["--validate", "--count", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 8 and result["full"]["family"] == 1.0
    assert result["128"]["family"] == 1.0 and "128_through_vae" not in result
    params, pixels = picture(5, 2)
    Image.fromarray(pixels).save(tmp_path / "one.png")
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "synthetic_check.py"),
                          str(tmp_path / "one.png")], capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    assert out.splitlines()[0] == (f"{tmp_path / 'one.png'}: checkers, "
                                   f"{check(pixels).background} and "
                                   f"{check(pixels).foreground}")
    assert {check(pixels).background, check(pixels).foreground} == {params.background,
                                                                    params.foreground}
