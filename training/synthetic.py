"""The built-in synthetic data set: pictures drawn from a few named parameters.

Each picture is one of four pattern families (discs, stripes, checkers, clouds) in two colours
of a small named palette, a background and a foreground, on a smooth shading with slight noise.
`draw_params(seed, index)` picks its parameters (a `SyntheticParams`), `render(params, rng)`
paints it and `caption(params)` describes it in plain English ("three yellow discs on a dark
blue background", "horizontal red and white stripes"). `make_synthetic` writes a folder of
them, with the parameters and caption of every file in `metadata.jsonl` (a standard captioned
image folder), so that checkers (`scripts/synthetic_check.py`) and text conditioning read the
truth instead of guessing it. `truth_from_caption` reads a caption back, and `heldout_prompts`
gives captions of colour pairs never seen in training, to measure prompt following.

Version 2 (this one) against version 1 (training/data.py before it):
- Colours come from `PALETTE`, nine colours with plain names, instead of uniform RGB. A
  picture's dominant colours now have a right answer and a caption can name them; guessing
  one right by chance is 1 in 9. A picture's two colours differ clearly (`CLOSE_PAIRS`, the
  three pairs under 50 apart in CIELAB, are never drawn).
- A picture has exactly two colours (smooth mixes between them at soft edges) instead of a
  random base with a tint or several disc colours, and a shading of at most ±12 % brightness
  instead of a gradient of up to ±120 levels, which could turn one named colour into another.
- Pattern sizes scale with the picture (its square root of area), so they are the same at
  every size a picture is resized to. At the quickstart's 128-px buckets a disc's radius is
  11-16 px (five discs) to 15-22 px (one disc), a stripe period 23-36 px, a checker cell
  17-24 px, so every stripe, cell and disc is at least 11 px across. Version 1 had stripe
  periods down to 5 px there and disc radii down to 6 px, which neither the shipped VAE nor a
  small DiT keeps.
  Stripes and checkers are sharp two-colour square waves instead of a sine over a tint;
  clouds are soft-edged blobs of one colour on the other, the only family without sharp
  edges, instead of multicoloured noise.
- Discs never overlap and lie inside the picture, so their count is a fact a caption can state;
  stripes run horizontally, vertically or diagonally (either diagonal: a mirror image, as the
  training's random flip makes, keeps every caption true).
- Some colour pairs never appear in a family's training pictures (`HELDOUT_PAIRS`): every colour
  and every pair still appear, in other families, so a text-conditioned model can be asked for
  combinations it has never seen (`draw_params(..., heldout=True)` draws only those).
- A family's files alternate PNG and JPEG (version 1 alternated by index, which made every
  stripes and clouds picture a JPEG and every disc and checker picture a PNG).
Unchanged: the families and their class sub-folders, the file names, the sizes (drawn exactly
as in version 1, so every picture keeps its size and bucket), prefixes (`synthetic:8` is the
first 8 pictures of `synthetic:32`) and the way a folder is built.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

SYNTHETIC_VERSION = 2
FAMILIES = ("discs", "stripes", "checkers", "clouds")  # class sub-folder names
PALETTE: dict[str, tuple[int, int, int]] = {  # sRGB; at least 43 apart in CIELAB (ΔE 1976)
    "black": (25, 25, 30),
    "white": (240, 240, 235),
    "red": (205, 35, 35),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 50),
    "green": (40, 150, 60),
    "light blue": (110, 185, 240),
    "dark blue": (30, 50, 140),
    "pink": (240, 135, 185),
}
ORIENTATIONS = ("horizontal", "vertical", "diagonal")  # stripes
MAX_DISCS = 5
PARAMS_FILE = "metadata.jsonl"  # one JSON object a file, at the root of a `make_synthetic` folder
OLD_PARAMS_FILE = "params.jsonl"  # its name in folders built before captioned training


def _pairs(*pairs: tuple[str, str]) -> frozenset[frozenset[str]]:
    return frozenset(frozenset(p) for p in pairs)


# Pairs too alike (under 50 apart in CIELAB) for a pattern to show well at 128 px after a VAE:
# no picture uses them.
CLOSE_PAIRS = _pairs(("orange", "yellow"), ("red", "orange"), ("white", "light blue"))
# Unordered colour pairs that a family's training pictures never use. Each family's four pairs
# take eight different colours, and no pair is held out of two families, so a held-out pair is
# still seen in training, in the three other families.
HELDOUT_PAIRS: dict[str, frozenset[frozenset[str]]] = {
    "discs": _pairs(("yellow", "dark blue"), ("red", "green"), ("white", "pink"),
                    ("black", "orange")),
    "stripes": _pairs(("red", "light blue"), ("orange", "green"), ("black", "yellow"),
                      ("white", "dark blue")),
    "checkers": _pairs(("red", "yellow"), ("green", "pink"), ("black", "light blue"),
                       ("orange", "dark blue")),
    "clouds": _pairs(("red", "dark blue"), ("yellow", "light blue"), ("white", "green"),
                     ("black", "pink")),
}
_NUMBERS = ("one", "two", "three", "four", "five")


@dataclass(frozen=True)
class SyntheticParams:
    """Everything a synthetic picture shows; the rest (positions, phases, shading, noise) is
    drawn by `render` from its generator.

    For stripes and checkers, which show as much of one colour as of the other, `background`
    is just the colour named first; for discs and clouds it covers most of the picture.
    """

    family: str  # one of FAMILIES
    background: str  # a PALETTE name
    foreground: str  # another PALETTE name
    width: int  # pixels
    height: int
    feature: float  # pattern size in pixels: disc radius, stripe period (one stripe of each
    #                 colour), checker cell, spacing of the clouds' noise grid
    count: int = 0  # discs: how many (1..MAX_DISCS); 0 for the other families
    orientation: str = ""  # stripes: one of ORIENTATIONS; "" for the other families

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        for role in ("background", "foreground"):
            if getattr(self, role) not in PALETTE:
                problems.append(f"{role} {getattr(self, role)!r} is not a palette colour "
                                f"({', '.join(PALETTE)})")
        if self.background == self.foreground:
            problems.append(f"background and foreground are both {self.background!r}")
        if self.width < 1 or self.height < 1:
            problems.append(f"size {self.width}x{self.height} is not positive")
        if self.family == "discs" and not 1 <= self.count <= MAX_DISCS:
            problems.append(f"discs need a count of 1..{MAX_DISCS}, not {self.count}")
        if self.family != "discs" and self.count:
            problems.append(f"count {self.count} is for discs only")
        if self.family == "stripes" and self.orientation not in ORIENTATIONS:
            problems.append(f"stripes need an orientation ({', '.join(ORIENTATIONS)}), not "
                            f"{self.orientation!r}")
        if self.family != "stripes" and self.orientation:
            problems.append(f"orientation {self.orientation!r} is for stripes only")
        if not self.feature > 0:
            problems.append(f"feature size {self.feature} is not positive")
        if problems:
            raise ValueError("synthetic parameters: " + "; ".join(problems))

    def to_json(self) -> dict:
        """The parameters as a JSON-ready dict (the field names as keys)."""
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> SyntheticParams:
        """Parameters from a dict holding every field; other keys (file_name, caption) are
        ignored. Raises ValueError for a missing field or a bad value."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in record]
        if missing:
            raise ValueError(f"synthetic parameters: missing {', '.join(missing)}")
        return cls(**{n: record[n] for n in names})


def _stream(seed: int, index: int, purpose: int | None) -> np.random.Generator:
    """The random stream of one picture for one purpose: None for drawing its training
    parameters (version 1's stream, whose first draws fix the size, so every picture keeps its
    version-1 size and bucket), 1 for drawing held-out parameters, 2 and 3 for rendering a
    training or held-out draw."""
    return np.random.default_rng([seed, index] if purpose is None else [seed, index, purpose])


def _colour_pairs(family: str, heldout: bool) -> list[tuple[str, str]]:
    """The ordered (background, foreground) pairs of a family's training or held-out set."""
    held = HELDOUT_PAIRS[family]
    return [(bg, fg) for bg in PALETTE for fg in PALETTE
            if bg != fg and frozenset((bg, fg)) not in CLOSE_PAIRS
            and (frozenset((bg, fg)) in held) == heldout]


def draw_params(seed: int, index: int, heldout: bool = False) -> SyntheticParams:
    """The parameters of picture `index` of the set drawn with `seed`.

    The family cycles through FAMILIES with the index, so classes stay balanced in every
    prefix. Aspect ratios (width / height) spread log-uniformly over 1:3..3:1 and areas over
    300²..400² pixels; training draws have the sizes of version 1. Colour pairs are drawn
    uniformly, in either order, from those of the family that are neither `CLOSE_PAIRS` nor
    `HELDOUT_PAIRS`; `heldout` draws from the family's `HELDOUT_PAIRS` only (with a stream of
    its own).
    """
    if index < 0:
        raise ValueError(f"picture index {index}: must be >= 0")
    family = FAMILIES[index % len(FAMILIES)]
    rng = _stream(seed, index, 1 if heldout else None)
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
    area = rng.uniform(300, 400) ** 2
    width, height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    pairs = _colour_pairs(family, heldout)
    background, foreground = pairs[int(rng.integers(len(pairs)))]
    scale = math.sqrt(width * height)
    count, orientation = 0, ""
    if family == "discs":
        count = int(rng.integers(1, MAX_DISCS + 1))
        # radius: the fewer the discs, the larger (1.4 times for one disc, 1.0 for five)
        feature = scale * rng.uniform(0.085, 0.125) * (1.5 - 0.1 * count)
    elif family == "stripes":
        orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
        feature = scale * rng.uniform(0.18, 0.28)  # period: one stripe of each colour
    elif family == "checkers":
        feature = scale * rng.uniform(0.13, 0.19)  # cell side
    else:
        feature = scale * rng.uniform(0.3, 0.4)  # spacing of the noise grid
    return SyntheticParams(family, background, foreground, width, height, round(feature, 2),
                           count, orientation)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(params: SyntheticParams) -> str:
    """A plain English description of the picture: its family, colours and count or
    orientation, fixed by the parameters alone.

    discs: "a red disc on a white background", "three yellow discs on a dark blue background";
    stripes: "horizontal red and white stripes"; checkers: "black and orange checkers";
    clouds: "white clouds on a light blue background".
    """
    bg, fg = params.background, params.foreground
    if params.family == "discs":
        if params.count == 1:
            return f"{_article(fg)} {fg} disc on {_article(bg)} {bg} background"
        return f"{_NUMBERS[params.count - 1]} {fg} discs on {_article(bg)} {bg} background"
    if params.family == "stripes":
        return f"{params.orientation} {bg} and {fg} stripes"
    if params.family == "checkers":
        return f"{bg} and {fg} checkers"
    return f"{fg} clouds on {_article(bg)} {bg} background"


class CaptionTruth(NamedTuple):
    """What a synthetic caption says: everything of `SyntheticParams` but the size, the
    feature size and what `render` draws."""

    family: str
    background: str
    foreground: str
    count: int = 0  # discs
    orientation: str = ""  # stripes


@functools.cache
def _caption_patterns() -> tuple[tuple[str, re.Pattern], ...]:
    """(family, pattern) of each form `caption` writes; groups name the facts."""
    colour = "|".join(re.escape(c) for c in PALETTE)
    bg, fg = f"(?P<bg>{colour})", f"(?P<fg>{colour})"
    count = "|".join(_NUMBERS[1:])
    forms = (("discs", f"an? {fg} disc on an? {bg} background"),
             ("discs", f"(?P<count>{count}) {fg} discs on an? {bg} background"),
             ("stripes", f"(?P<orientation>{'|'.join(ORIENTATIONS)}) {bg} and {fg} stripes"),
             ("checkers", f"{bg} and {fg} checkers"),
             ("clouds", f"{fg} clouds on an? {bg} background"))
    return tuple((family, re.compile(form)) for family, form in forms)


def truth_from_caption(text: str) -> CaptionTruth | None:
    """The family, colours, count and orientation that `text`, a caption as `caption` writes
    it, names; None for text that is not such a caption. Case and runs of spaces do not
    matter; `caption` of parameters with these facts gives `text` back."""
    words = " ".join(text.lower().split())
    for family, pattern in _caption_patterns():
        match = pattern.fullmatch(words)
        if match is None:
            continue
        facts = match.groupdict()
        if facts["bg"] == facts["fg"]:
            return None
        count = _NUMBERS.index(facts["count"]) + 1 if facts.get("count") else int(
            family == "discs")
        return CaptionTruth(family, facts["bg"], facts["fg"], count,
                            facts.get("orientation") or "")
    return None


def heldout_prompts(count: int, seed: int = 1) -> list[tuple[str, SyntheticParams]]:
    """`count` prompts for measuring prompt following: the captions (with the parameters) of
    `draw_params(seed, i, heldout=True)`, i = 0..count-1, pictures whose combination of family
    and colour pair no training picture shows. The families take turns, so every prefix is
    balanced."""
    if count < 0:
        raise ValueError(f"held-out prompts: count {count} must be >= 0")
    out = []
    for i in range(count):
        params = draw_params(seed, i, heldout=True)
        out.append((caption(params), params))
    return out


# ----------------------------------------------------------------------------------------------
# Rendering


def _band(u: np.ndarray, period: float) -> np.ndarray:
    """Coverage (0..1, antialiased over one pixel) of a square wave along coordinate `u` in
    pixels: 1 on the first half of each period, 0 on the second."""
    t = u / period
    inside = period * (np.abs(np.mod(t - 0.25, 1.0) - 0.5) - 0.25)  # signed distance to an edge
    return np.clip(inside + 0.5, 0.0, 1.0)


def _disc_centres(params: SyntheticParams, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Centres (K, 2) and radii (K,) of `params.count` discs that lie inside the picture (away
    from its border, which a crop to a bucket may cut) and keep apart from each other."""
    w, h = params.width, params.height
    radii = params.feature * rng.uniform(0.85, 1.15, size=params.count)
    while True:  # shrink until they fit; a few tries suffice at the sizes draw_params picks
        centres: list[tuple[float, float]] = []
        for r in radii:
            lo, hi = (0.04 * w + r, 0.04 * h + r), (0.96 * w - r, 0.96 * h - r)
            if lo[0] > hi[0] or lo[1] > hi[1]:
                break
            for _ in range(200):
                c = (rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1]))
                if all(math.dist(c, o) > 1.3 * (r + radii[j]) for j, o in enumerate(centres)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii):
            return np.array(centres), radii
        radii = radii * 0.9


def _coverage(params: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32: how much of each pixel shows the foreground colour."""
    w, h = params.width, params.height
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres, (H, W) each
    if params.family == "discs":
        centres, radii = _disc_centres(params, rng)
        cover = np.zeros((h, w), np.float32)
        for (cx, cy), r in zip(centres, radii):
            cover = np.maximum(cover, np.clip(r - np.hypot(xx - cx, yy - cy) + 0.5, 0, 1))
        return cover
    if params.family == "stripes":
        normal = {"horizontal": 90.0, "vertical": 0.0,
                  "diagonal": float(rng.choice([45.0, 135.0]))}[params.orientation]
        angle = math.radians(normal + rng.uniform(-4, 4))
        u = xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, params.feature)
        return _band(u, params.feature)
    if params.family == "checkers":
        period = 2 * params.feature
        across = _band(xx + rng.uniform(0, period), period)
        down = _band(yy + rng.uniform(0, period), period)
        return across * (1 - down) + (1 - across) * down  # exclusive or
    # clouds: blobs where smooth noise is high, edges blurred by 6 % of the picture's scale
    step = params.feature
    grid = rng.normal(size=(math.ceil(h / step) + 2, math.ceil(w / step) + 2)).astype(np.float32)
    noise = np.asarray(Image.fromarray(grid).resize(
        (round(grid.shape[1] * step), round(grid.shape[0] * step)), Image.BICUBIC))[:h, :w]
    blobs = noise > np.quantile(noise, 1 - rng.uniform(0.3, 0.45))  # foreground share
    soft = Image.fromarray(blobs.astype(np.uint8) * 255).filter(
        ImageFilter.GaussianBlur(0.06 * math.sqrt(w * h)))
    return np.asarray(soft, np.float32) / 255


def render(params: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
    """The picture `params` describes, (H, W, 3) uint8; `rng` draws what they leave open
    (positions, phases, a slight tint of each colour, the shading and the noise)."""
    cover = _coverage(params, rng)[..., None]  # (H, W, 1)
    bg, fg = (np.asarray(PALETTE[name], np.float32) + rng.uniform(-10, 10, size=3)
              for name in (params.background, params.foreground))
    img = bg * (1 - cover) + fg * cover  # (H, W, 3)
    h, w = cover.shape[:2]
    ramp_x, ramp_y = rng.uniform(-0.12, 0.12, size=2)  # brightness change across the picture
    shade = (1 + ramp_x * (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
             + ramp_y * (np.arange(h, dtype=np.float32) / h - 0.5)[:, None])  # (H, W)
    img = img * shade[..., None] + rng.normal(0, 3, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def picture(seed: int, index: int, heldout: bool = False) -> tuple[SyntheticParams, np.ndarray]:
    """Picture `index` of the set drawn with `seed`: its parameters (`draw_params`) and pixels
    (H, W, 3) uint8, exactly as `make_synthetic` writes it."""
    params = draw_params(seed, index, heldout)
    return params, render(params, _stream(seed, index, 2 + int(heldout)))


# ----------------------------------------------------------------------------------------------
# Folders


def file_name(index: int, family: str) -> str:
    """Path of picture `index` inside a `make_synthetic` folder: its family's sub-folder, PNG
    and JPEG in turn within each family."""
    png = (index // len(FAMILIES)) % 2 == 0
    return f"{family}/{index:05d}.{'png' if png else 'jpg'}"


def make_synthetic(root: str | os.PathLike[str], count: int, seed: int = 0,
                   heldout: bool = False) -> Path:
    """Write pictures 0..count-1 of `draw_params(seed, i, heldout)` into `root`; return it.

    Files go into one sub-folder per family (`file_name`); `metadata.jsonl` at the root (the
    Hugging Face imagefolder convention) holds one line per file, in index order: `file_name`,
    every `SyntheticParams` field and the `caption`. Every file depends on (seed, index) alone,
    so smaller sets are prefixes of larger ones. The folder is built in a temporary sibling,
    finished with a DONE marker and renamed into place, so an interrupted build is never
    mistaken for a finished one; a folder with a DONE marker is returned as it is, but for its
    `params.jsonl` (the name in folders built before captioned training), renamed to
    `metadata.jsonl`.
    """
    root = Path(root)
    if (root / "DONE").exists():
        if not (root / PARAMS_FILE).exists() and (root / OLD_PARAMS_FILE).exists():
            try:
                os.replace(root / OLD_PARAMS_FILE, root / PARAMS_FILE)
            except FileNotFoundError:  # another process renamed it first
                if not (root / PARAMS_FILE).exists():
                    raise
        return root
    if count < 1:
        raise ValueError(f"{root}: a synthetic set needs a positive image count, not {count}")
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    if tmp.exists():  # left by an earlier process with our id, which cannot be running
        shutil.rmtree(tmp)
    lines = []
    for i in range(count):
        params, pixels = picture(seed, i, heldout)
        name = file_name(i, params.family)
        pixels = Image.fromarray(pixels)
        (tmp / params.family).mkdir(parents=True, exist_ok=True)
        if name.endswith(".png"):
            pixels.save(tmp / name, compress_level=1)
        else:
            pixels.save(tmp / name, quality=95)
        lines.append(json.dumps({"file_name": name, **params.to_json(),
                                 "caption": caption(params)}))
    (tmp / PARAMS_FILE).write_text("\n".join(lines) + "\n")
    split = "held-out colour pairs" if heldout else "training colour pairs"
    (tmp / "DONE").write_text(f"{count} images, seed {seed}, {split}, synthetic version "
                              f"{SYNTHETIC_VERSION}\n")
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "DONE").exists():
            raise
    return root


def read_params(root: str | os.PathLike[str]) -> dict[str, SyntheticParams]:
    """The parameters of every file of a `make_synthetic` folder, by file name (relative,
    POSIX separators), from its `metadata.jsonl` (or, in a folder built earlier, `params.jsonl`).
    Raises FileNotFoundError without either, ValueError naming the line of a bad record."""
    path = Path(root) / PARAMS_FILE
    if not path.is_file() and (Path(root) / OLD_PARAMS_FILE).is_file():
        path = Path(root) / OLD_PARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; expected the {PARAMS_FILE} that "
                                "make_synthetic writes")
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out[record["file_name"]] = SyntheticParams.from_json(record)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: expected a JSON object with file_name and the "
                             f"synthetic parameters: {exc}") from None
    return out
