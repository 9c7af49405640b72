"""The synthetic set: parameters, captions, rendering and the folders make_synthetic writes."""

from __future__ import annotations

import json
import math
import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import training.synthetic as synthetic
from training.synthetic import (FAMILIES, HELDOUT_PAIRS, MAX_DISCS, OLD_PARAMS_FILE,
                                ORIENTATIONS, PALETTE, PARAMS_FILE, SyntheticParams, caption,
                                draw_params, heldout_prompts, make_synthetic, picture,
                                read_params, truth_from_caption)


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix in (".png", ".jpg"))


def test_synthetic_draw_params_is_deterministic_balanced_and_varied() -> None:
    draws = [draw_params(0, i) for i in range(200)]
    assert draws == [draw_params(0, i) for i in range(200)]
    assert draws != [draw_params(1, i) for i in range(200)]
    assert [p.family for p in draws[:8]] == list(FAMILIES) * 2  # balanced in every prefix
    aspects = [p.width / p.height for p in draws]
    areas = [p.width * p.height for p in draws]
    assert 1 / 3.05 < min(aspects) < 0.5 and 2 < max(aspects) < 3.05
    assert 299**2 < min(areas) and max(areas) < 401**2
    assert {p.background for p in draws} == set(PALETTE) == {p.foreground for p in draws}
    discs = [p for p in draws if p.family == "discs"]
    assert {p.count for p in discs} == set(range(1, MAX_DISCS + 1))
    assert {p.orientation for p in draws if p.family == "stripes"} == set(ORIENTATIONS)
    sizes = {"discs": (0.085, 0.175), "stripes": (0.18, 0.28), "checkers": (0.13, 0.19),
             "clouds": (0.3, 0.4)}
    for p in draws:  # pattern sizes scale with the picture
        low, high = sizes[p.family]
        assert low - 1e-3 < p.feature / math.sqrt(p.width * p.height) < high + 1e-3


def test_synthetic_sizes_are_those_of_version_1() -> None:
    # version 1 drew the aspect ratio and then the area, first, from default_rng([seed, i])
    for i in range(12):
        rng = np.random.default_rng([3, i])
        aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
        area = rng.uniform(300, 400) ** 2
        size = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        assert (draw_params(3, i).width, draw_params(3, i).height) == size


def test_synthetic_heldout_pairs_are_seen_elsewhere_and_never_drawn_for_training() -> None:
    held = [pair for family in FAMILIES for pair in HELDOUT_PAIRS[family]]
    assert len(held) == len(set(held)) == 16  # no pair is held out of two families
    for family in FAMILIES:
        assert len(set().union(*HELDOUT_PAIRS[family])) == 8  # eight different colours
    for pair in held:
        assert pair <= set(PALETTE)
    for i in range(160):
        train, test = draw_params(0, i), draw_params(0, i, heldout=True)
        assert frozenset((train.background, train.foreground)) not in HELDOUT_PAIRS[train.family]
        assert frozenset((test.background, test.foreground)) in HELDOUT_PAIRS[test.family]


def test_synthetic_caption_names_family_colours_count_and_orientation() -> None:
    def params(family: str, bg: str, fg: str, **kw) -> SyntheticParams:
        return SyntheticParams(family, bg, fg, 300, 300, feature=30.0, **kw)

    assert caption(params("discs", "dark blue", "yellow", count=3)) == \
        "three yellow discs on a dark blue background"
    assert caption(params("discs", "orange", "white", count=1)) == \
        "a white disc on an orange background"
    assert caption(params("stripes", "red", "white", orientation="horizontal")) == \
        "horizontal red and white stripes"
    assert caption(params("checkers", "black", "orange")) == "black and orange checkers"
    assert caption(params("clouds", "light blue", "white")) == \
        "white clouds on a light blue background"
    for i in range(40):
        p = draw_params(4, i)
        text = caption(p)
        assert text == caption(draw_params(4, i))  # from the parameters alone
        assert p.background in text and p.foreground in text
        assert ("disc" if p.family == "discs" else p.family) in text
        if p.family == "stripes":
            assert text.startswith(p.orientation)
        if p.family == "discs" and p.count > 1:
            assert text.startswith(("two", "three", "four", "five")[p.count - 2])


def test_synthetic_truth_from_caption_inverts_every_caption() -> None:
    forms = set()
    for seed in range(3):
        for i in range(240):
            for heldout in (False, True):
                p = draw_params(seed, i, heldout)
                truth = truth_from_caption(caption(p))
                assert truth == (p.family, p.background, p.foreground, p.count, p.orientation)
                again = SyntheticParams(*truth[:3], 10, 10, 1.0, *truth[3:])
                assert caption(again) == caption(p)  # the caption back, exactly
                forms.add((p.family, p.count, p.orientation))
    assert forms == ({("discs", n, "") for n in range(1, MAX_DISCS + 1)}
                     | {("stripes", 0, o) for o in ORIENTATIONS}
                     | {("checkers", 0, ""), ("clouds", 0, "")})
    assert truth_from_caption("  A White disc on an  ORANGE background ") == (
        "discs", "orange", "white", 1, "")
    for text in ("", "a cat", "red and red checkers", "purple clouds on a white background",
                 "three yellow discs on a dark blue background, please", "one red disc on a "
                 "white background", "diagonal red and white checkers"):
        assert truth_from_caption(text) is None, text


def test_synthetic_heldout_prompts_are_balanced_and_never_trained() -> None:
    prompts = heldout_prompts(40)
    assert prompts == heldout_prompts(40, seed=1) != heldout_prompts(40, seed=2)
    assert [p.family for _, p in prompts] == list(FAMILIES) * 10
    trained = {(p.family, frozenset((p.background, p.foreground)))
               for seed in (0, 1) for p in (draw_params(seed, i) for i in range(400))}
    for text, params in prompts:
        combination = (params.family, frozenset((params.background, params.foreground)))
        assert combination not in trained and combination[1] in HELDOUT_PAIRS[params.family]
        assert text == caption(params) and truth_from_caption(text)[:3] == (
            params.family, params.background, params.foreground)
    assert len({text for text, _ in prompts}) > 20  # varied


def test_synthetic_params_refuse_what_a_picture_cannot_show() -> None:
    with pytest.raises(ValueError, match="family 'squares' is not one of discs"):
        SyntheticParams("squares", "red", "white", 300, 300, feature=30.0)
    with pytest.raises(ValueError, match="foreground 'teal' is not a palette colour"):
        SyntheticParams("clouds", "red", "teal", 300, 300, feature=30.0)
    with pytest.raises(ValueError, match="background and foreground are both 'red'"):
        SyntheticParams("clouds", "red", "red", 300, 300, feature=30.0)
    with pytest.raises(ValueError, match="discs need a count of 1..5, not 0"):
        SyntheticParams("discs", "red", "white", 300, 300, feature=30.0)
    with pytest.raises(ValueError, match="stripes need an orientation"):
        SyntheticParams("stripes", "red", "white", 300, 300, feature=30.0)
    with pytest.raises(ValueError, match="orientation 'vertical' is for stripes only"):
        SyntheticParams("checkers", "red", "white", 300, 300, orientation="vertical",
                        feature=30.0)
    with pytest.raises(ValueError, match="missing count, orientation"):
        SyntheticParams.from_json({"family": "clouds", "background": "red",
                                   "foreground": "white", "width": 3, "height": 3,
                                   "feature": 1.0})


def test_synthetic_render_paints_the_two_palette_colours() -> None:
    for i in range(4):
        params, pixels = picture(0, i)
        assert pixels.shape == (params.height, params.width, 3) and pixels.dtype == np.uint8
        assert np.array_equal(pixels, picture(0, i)[1])
        colours = np.array([PALETTE[params.background], PALETTE[params.foreground]], float)
        # every pixel lies near the segment between the two colours, up to tint and shading
        dist = np.linalg.norm(pixels[:, :, None].astype(float) - colours, axis=-1)  # (H, W, 2)
        nearest = dist.argmin(-1)
        share = nearest.mean()  # of the foreground
        assert np.median(dist.min(-1)) < 25
        if params.family == "discs":
            assert 0.01 < share < 0.3
        elif params.family in ("stripes", "checkers"):
            assert 0.4 < share < 0.6
        else:
            assert 0.2 < share < 0.5


def test_synthetic_discs_lie_apart_inside_the_picture() -> None:
    for i in range(0, 80, 4):
        params = draw_params(2, i)
        centres, radii = synthetic._disc_centres(params, np.random.default_rng(i))
        assert len(centres) == params.count
        assert (centres - radii[:, None] >= 0).all()
        assert (centres + radii[:, None] <= [params.width, params.height]).all()
        for a, b in combinations(range(params.count), 2):
            assert math.dist(centres[a], centres[b]) > radii[a] + radii[b]


def test_synthetic_folder_records_the_truth_of_every_file(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "set", 10, seed=3)
    assert (root / "DONE").exists() and not list(tmp_path.glob("set.tmp*"))
    assert PARAMS_FILE == "metadata.jsonl" and not (root / OLD_PARAMS_FILE).exists()
    lines = [json.loads(line) for line in (root / PARAMS_FILE).read_text().splitlines()]
    assert [line["file_name"] for line in lines] == [
        f"{FAMILIES[i % 4]}/{i:05d}.{'png' if (i // 4) % 2 == 0 else 'jpg'}" for i in range(10)]
    assert sorted(line["file_name"] for line in lines) == _files(root)
    recorded = read_params(root)
    for i, line in enumerate(lines):
        params = draw_params(3, i)
        assert recorded[line["file_name"]] == params
        assert line["caption"] == caption(params) and line["family"] == params.family
        with Image.open(root / line["file_name"]) as img:
            assert img.size == (params.width, params.height)
            assert img.format == ("PNG" if line["file_name"].endswith(".png") else "JPEG")
        if i == 0:  # PNG: the very pixels of `picture`
            assert np.array_equal(np.asarray(Image.open(root / line["file_name"])),
                                  picture(3, 0)[1])


def test_synthetic_folder_is_deterministic_and_prefixes_agree(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a", 6)
    b = make_synthetic(tmp_path / "b", 9)
    assert set(_files(a)) < set(_files(b))
    for name in _files(a):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    head = (b / PARAMS_FILE).read_text().splitlines()[:6]
    assert (a / PARAMS_FILE).read_text().splitlines() == head
    held = make_synthetic(tmp_path / "held", 4, heldout=True)
    assert all(frozenset((p.background, p.foreground)) in HELDOUT_PAIRS[p.family]
               for p in read_params(held).values())


def test_synthetic_folder_is_built_aside_and_never_half_done(tmp_path: Path,
                                                              monkeypatch) -> None:
    real = synthetic.render
    calls = []

    def failing(params: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
        calls.append(params)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the build is interrupted on its third picture
        return real(params, rng)

    monkeypatch.setattr(synthetic, "render", failing)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic(tmp_path / "set", 5)
    assert not (tmp_path / "set").exists()  # nothing that looks like a data set
    assert (tmp_path / f"set.tmp{os.getpid()}").exists()
    monkeypatch.setattr(synthetic, "render", real)
    root = make_synthetic(tmp_path / "set", 5)  # starts over, from the leftover too
    assert len(_files(root)) == 5 and not list(tmp_path.glob("set.tmp*"))
    # a finished folder is returned as it is
    (root / "mine.txt").write_text("keep")
    assert make_synthetic(root, 50) == root and len(_files(root)) == 5
    assert (root / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="needs a positive image count, not 0"):
        make_synthetic(tmp_path / "none", 0)


def test_synthetic_folder_built_before_captions_gets_its_metadata_renamed(tmp_path: Path
                                                                           ) -> None:
    root = make_synthetic(tmp_path / "set", 3, seed=5)
    listing = (root / PARAMS_FILE).read_text()
    recorded = read_params(root)
    os.replace(root / PARAMS_FILE, root / OLD_PARAMS_FILE)  # as an earlier version left it
    assert read_params(root) == recorded  # read from the old name too
    assert make_synthetic(root, 3, seed=5) == root
    assert not (root / OLD_PARAMS_FILE).exists()
    assert (root / PARAMS_FILE).read_text() == listing and read_params(root) == recorded
    (root / PARAMS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl: not found; expected the"):
        read_params(root)
