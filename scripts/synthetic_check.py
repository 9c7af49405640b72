"""A checker for the synthetic set: pattern family and dominant colours from pixels alone.

    python scripts/synthetic_check.py FOLDER_OR_FILES... [--json]
    python scripts/synthetic_check.py --validate [--count 400] [--vae vae] [--json]

`check(image)` names the family (discs, stripes, checkers, clouds) and the background and
foreground colours (names of `training.synthetic.PALETTE`) of an RGB picture of any size: a
full-size file of `make_synthetic`, a picture resized to a 128-px bucket, a VAE reconstruction
or a sample of a model trained on the set. It is plain signal processing, deterministic and
without weights. The picture is resized to a square root of area of 128 px (the scale the
quickstart trains at; the set's pattern sizes are fixed there) and its colours are split in two
along their main axis in CIELAB (Otsu's threshold): the larger part is the background. The
median colours of the two parts' cores, away from the edges where a VAE bleeds one colour into
the other, get the two different palette names nearest to them (CIE94 colour difference).
Each pixel's foreground share (0 at the background colour, 1 at the foreground colour) then
gives three measures, a 3-px border left out: how steep its edges are (clouds are the only
family with soft ones), and how the directions of its edges concentrate, on one axis (stripes,
whose orientation it names too) or on two at right angles (checkers); discs are sharp and
have no preferred direction. `accuracy(images, truths)` scores it against the truth.

On the command line a folder is judged against its `metadata.jsonl` (as `make_synthetic` writes
it, `params.jsonl` in folders built earlier; for samples, write one JSON object a line with
`file_name`, relative to the folder, and `family`, optionally `background`, `foreground` and
`orientation`, or a synthetic `caption` or `text`), or failing that each file against the
`prompt` (a synthetic caption: family, colours, orientation) or `class` (a family) recorded in
its PNG text chunks, as the inference CLI writes them, or else against class sub-folders named
after the families; files named on the command line are judged by their PNG text chunks too,
and images without a truth only get predictions, one line each. Colours of stripes and
checkers, which cover equal shares, count as right in either order. It prints accuracy per
family and overall, colour accuracy (background, foreground, both) and the confusion matrix,
then one JSON line of them (`--json`: only the JSON, with every file's prediction too).
`--validate` draws held-out pictures (seed `VALIDATION_SEED`, training and held-out colour
pairs in turn) and measures the checker at full size, resized to 128-px buckets as training
sees them and, with `--vae`, on those reconstructed through that VAE. Bad input is one
`error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.synthetic import (  # noqa: E402
    FAMILIES, OLD_PARAMS_FILE, PALETTE, PARAMS_FILE, picture, truth_from_caption)

WORK_SCALE = 128  # pictures are judged at this square root of area, in pixels
VALIDATION_SEED = 2_000_003  # held out: the data sets and the README's VAE recipes use 0, 1, 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
UNORDERED = ("stripes", "checkers")  # families whose two colours cover equal shares
# Decision thresholds on `features`, midway between the families' ranges measured on the
# reconstructions of 400 development pictures (seed 7) through the shipped VAE:
SOFT_SLOPE = 0.09  # edge_slope: clouds 0.044-0.071, the sharp families 0.105 and up
ONE_AXIS = 0.65  # one_axis: stripes 0.95 and up, checkers and discs 0.18 at most
TWO_AXES = 0.4  # two_axes: checkers 0.54 and up, discs 0.16 at most


@dataclass(frozen=True)
class Prediction:
    """What `check` sees in a picture."""

    family: str  # one of FAMILIES
    background: str  # a PALETTE name: the colour of the larger share
    foreground: str  # another PALETTE name
    scores: dict[str, float]  # per family, summing to 1; `family` has the highest
    orientation: str = ""  # stripes: horizontal, vertical or diagonal; "" for other families
    features: dict[str, float] = field(default_factory=dict)  # the measures behind the scores


@dataclass(frozen=True)
class Truth:
    """What a picture should show; None where unknown. A `SyntheticParams` serves too."""

    family: str
    background: str | None = None
    foreground: str | None = None
    orientation: str | None = None  # stripes


# ----------------------------------------------------------------------------------------------
# Colour


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..255, shape (..., 3) -> (..., 3) float32."""
    c = np.asarray(rgb, np.float32) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722],
                       [0.0193, 0.1192, 0.9505]], np.float32)
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883], np.float32)
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1).astype(np.float32)


_NAMES = tuple(PALETTE)


@functools.cache
def _palette_lab() -> np.ndarray:
    """(P, 3): the CIELAB colours of the palette, in `_NAMES` order."""
    return srgb_to_lab(np.array([PALETTE[n] for n in _NAMES]))


def colour_distance(lab: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """CIE94 colour difference (graphic arts weights) of CIELAB colours `lab` (..., 3) from
    `reference` (..., 3): differences of chroma and hue count less at high chroma, so a
    washed-out dark blue stays nearer dark blue than black."""
    lightness = lab[..., 0] - reference[..., 0]
    c_ref = np.hypot(reference[..., 1], reference[..., 2])
    chroma = np.hypot(lab[..., 1], lab[..., 2]) - c_ref
    ab = (lab[..., 1] - reference[..., 1]) ** 2 + (lab[..., 2] - reference[..., 2]) ** 2
    hue_sq = np.maximum(ab - chroma ** 2, 0)
    return np.sqrt(lightness ** 2 + (chroma / (1 + 0.045 * c_ref)) ** 2
                   + hue_sq / (1 + 0.015 * c_ref) ** 2)


def name_colours(background: np.ndarray, foreground: np.ndarray) -> tuple[str, str]:
    """The two different palette names nearest (`colour_distance`, summed) to the CIELAB
    colours `background` and `foreground` (3,) each."""
    palette = _palette_lab()
    cost = (colour_distance(np.asarray(background, np.float32)[None], palette)[:, None]
            + colour_distance(np.asarray(foreground, np.float32)[None], palette)[None, :])
    np.fill_diagonal(cost, np.inf)  # (P, P): background name by foreground name
    bg, fg = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return _NAMES[bg], _NAMES[fg]


# ----------------------------------------------------------------------------------------------
# The checker


def _working(image: np.ndarray | Image.Image) -> np.ndarray:
    """The picture as (h, w, 3) float32 sRGB at a square root of area of WORK_SCALE."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < 8:
        raise ValueError(f"a {w}x{h} picture is too small to check (need 8 px a side)")
    s = WORK_SCALE / math.sqrt(w * h)
    size = (max(8, round(w * s)), max(8, round(h * s)))
    return np.asarray(img.resize(size, Image.BICUBIC, reducing_gap=3.0), np.float32)


def _otsu(values: np.ndarray) -> float:
    """The threshold splitting `values` (N,) in two with the largest between-class variance."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return hi
    counts, edges = np.histogram(values, bins=256, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(counts)  # pixels at or below each bin
    total = weight[-1]
    mass = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_lo = mass / weight
        mean_hi = (mass[-1] - mass) / (total - weight)
        between = weight * (total - weight) * (mean_lo - mean_hi) ** 2
    return float(edges[1:][int(np.nanargmax(between[:-1]))])


def _share(lab: np.ndarray) -> np.ndarray:
    """(h, w) float32: the foreground share of each pixel along the main colour axis of
    `lab` (h, w, 3), 0 at the median of the larger part, 1 at that of the smaller (clipped)."""
    x = lab.reshape(-1, 3) - lab.reshape(-1, 3).mean(0)  # (N, 3)
    _, vectors = np.linalg.eigh(x.T @ x)
    p = x @ vectors[:, -1]  # (N,): position along the axis of largest variance
    high = p > _otsu(p)
    if high.sum() > p.size / 2:  # the foreground is the smaller share
        p, high = -p, ~high
    if not high.any() or high.all():
        return np.zeros(lab.shape[:2], np.float32)
    bg, fg = np.median(p[~high]), np.median(p[high])
    return np.clip((p - bg) / max(fg - bg, 1e-6), 0, 1).reshape(lab.shape[:2])


def _blur(m: np.ndarray, sigma: float) -> np.ndarray:
    """`m` (h, w) blurred by a Gaussian of `sigma` pixels, edges extended."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    out = np.pad(m, radius, mode="edge")  # (h + 2r, w + 2r)
    h, w = m.shape
    out = sum(t * out[k:k + h, :] for k, t in enumerate(taps))  # (h, w + 2r)
    return sum(t * out[:, k:k + w] for k, t in enumerate(taps))  # (h, w)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-max(-60.0, min(60.0, x))))


def features(image: np.ndarray | Image.Image) -> tuple[dict[str, float], np.ndarray,
                                                       np.ndarray]:
    """The measures `check` decides on, with the picture's CIELAB (h, w, 3) and foreground
    share (h, w) at the working scale. foreground_share: the mean share; edge_slope: the
    median steepness of the share (per pixel) on the edges; one_axis and two_axes: how the
    directions across the edges gather on one axis, or on two at right angles (0: spread
    evenly, 1: all on them); axis_angle: the direction across the edges of that one axis, in
    degrees (0: vertical stripes, ±90: horizontal ones)."""
    lab = srgb_to_lab(_working(image))  # (h, w, 3)
    m = _share(lab)  # (h, w)
    # edges within 3 px of the border are left out: VAEs draw lines there
    inner = m[3:-3, 3:-3] if min(m.shape) > 16 else m  # (h', w')
    gx = (inner[1:-1, 2:] - inner[1:-1, :-2]) / 2  # (h'-2, w'-2): central differences
    gy = (inner[2:, 1:-1] - inner[:-2, 1:-1]) / 2
    g = np.hypot(gx, gy)
    middle = (inner[1:-1, 1:-1] > 0.2) & (inner[1:-1, 1:-1] < 0.8)  # pixels on an edge
    steep = float(np.median(g[middle])) if middle.sum() >= 8 else 0.0
    # directions of the edges, from the share blurred over a few pixels: a pixel grid's
    # staircase, a VAE's blocks and noise in flat areas no longer count
    b = _blur(inner, 1.5)
    bx = (b[1:-1, 2:] - b[1:-1, :-2]) / 2  # (h'-2, w'-2)
    by = (b[2:, 1:-1] - b[:-2, 1:-1]) / 2
    weight = bx ** 2 + by ** 2
    angle = np.arctan2(by, bx)
    total = max(float(weight.sum()), 1e-12)
    axis2 = complex(np.sum(weight * np.exp(2j * angle))) / total  # one preferred axis
    axis4 = complex(np.sum(weight * np.exp(4j * angle))) / total  # two, at right angles
    return ({"foreground_share": float(m.mean()), "edge_slope": steep,
             "one_axis": abs(axis2), "two_axes": abs(axis4),
             "axis_angle": math.degrees(np.angle(axis2)) / 2}, lab, m)


def _core_colour(lab: np.ndarray, share: np.ndarray) -> np.ndarray:
    """The median CIELAB colour (3,) of the pixels where `share` (h, w) is highest: above 0.9
    (away from the edges, where a VAE bleeds one colour into the other), or above 0.75, or
    anywhere when too few pixels are."""
    for level in (0.9, 0.75):
        pick = share > level
        if pick.sum() >= 16:
            return np.median(lab[pick], axis=0)
    return np.median(lab.reshape(-1, 3), axis=0)


def check(image: np.ndarray | Image.Image) -> Prediction:
    """The family and the background and foreground colours of an RGB picture (H, W, 3)
    uint8 or a PIL image, any size with sides of 8 px or more."""
    feats, lab, m = features(image)
    background, foreground = name_colours(_core_colour(lab, 1 - m), _core_colour(lab, m))
    soft = _sigmoid((math.log(SOFT_SLOPE) - math.log(max(feats["edge_slope"], 1e-6))) / 0.1)
    one = _sigmoid((feats["one_axis"] - ONE_AXIS) / 0.05)
    two = _sigmoid((feats["two_axes"] - TWO_AXES) / 0.05)
    sharp = 1 - soft
    scores = {"clouds": soft, "stripes": sharp * one, "checkers": sharp * (1 - one) * two,
              "discs": sharp * (1 - one) * (1 - two)}
    family = max(FAMILIES, key=lambda f: scores[f])
    orientation = ""
    if family == "stripes":
        normal = feats["axis_angle"] % 180  # the direction across the stripes
        orientation = ("vertical" if min(normal, 180 - normal) < 22.5
                       else "horizontal" if abs(normal - 90) < 22.5 else "diagonal")
    return Prediction(family, background, foreground, {f: round(scores[f], 4) for f in FAMILIES},
                      orientation, {k: round(v, 4) for k, v in feats.items()})


# ----------------------------------------------------------------------------------------------
# Accuracy


def _colours_right(prediction: Prediction, truth: Truth | object) -> tuple[bool | None, ...]:
    """Whether the background and the foreground are right (None where the truth does not
    say); for stripes and checkers in whichever order matches more."""
    want = (getattr(truth, "background", None), getattr(truth, "foreground", None))
    got = (prediction.background, prediction.foreground)
    straight = [None if w is None else w == g for w, g in zip(want, got)]
    if getattr(truth, "family", None) in UNORDERED:
        crossed = [None if w is None else w == g for w, g in zip(want, got[::-1])]
        if sum(map(bool, crossed)) > sum(map(bool, straight)):
            return tuple(crossed)
    return tuple(straight)


def _rate(hits: Sequence[bool]) -> float | None:
    return round(sum(hits) / len(hits), 4) if hits else None


def summarize(predictions: Sequence[Prediction], truths: Sequence[Truth | object]) -> dict:
    """Accuracy of `predictions` against `truths` (`Truth`s or `SyntheticParams`, row for row).

    Returns images, family (share right), per_family (true family -> share right), confusion
    (true family -> predicted family -> count), background and foreground (shares right, over
    pictures whose truth names them), colour (the mean of those two), both_colours, and
    orientation (stripes whose truth names one).
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
    family, per = [], {f: [] for f in FAMILIES}
    confusion = {f: {g: 0 for g in FAMILIES} for f in FAMILIES}
    background, foreground, both, orientation = [], [], [], []
    for pred, truth in zip(predictions, truths):
        right = pred.family == truth.family
        family.append(right)
        per[truth.family].append(right)
        confusion[truth.family][pred.family] += 1
        bg, fg = _colours_right(pred, truth)
        if bg is not None:
            background.append(bg)
        if fg is not None:
            foreground.append(fg)
        if bg is not None and fg is not None:
            both.append(bg and fg)
        if truth.family == "stripes" and getattr(truth, "orientation", None):
            orientation.append(pred.orientation == truth.orientation)
    slots = background + foreground
    return {"images": len(family), "family": _rate(family),
            "per_family": {f: _rate(hits) for f, hits in per.items()},
            "confusion": confusion, "background": _rate(background),
            "foreground": _rate(foreground), "colour": _rate(slots),
            "both_colours": _rate(both), "orientation": _rate(orientation)}


def accuracy(images: Iterable[np.ndarray | Image.Image], truths: Sequence[Truth | object]
             ) -> dict:
    """`summarize` of `check` on each of `images` against `truths` (row for row): family,
    colour and orientation accuracy, per family and overall, and the confusion matrix."""
    return summarize([check(image) for image in images], truths)


# ----------------------------------------------------------------------------------------------
# Files


def load_rgb(path: str | Path) -> Image.Image:
    """An image file as RGB (EXIF orientation applied); ValueError naming the file when it
    cannot be decoded."""
    try:
        with Image.open(path) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot decode as an image: {exc}") from None


def caption_truth(text: object) -> Truth | None:
    """The truth a synthetic caption (a prompt) states: family, both colours and, for stripes,
    the orientation; None when `text` is not a caption as `training.synthetic.caption` writes
    it."""
    said = truth_from_caption(text) if isinstance(text, str) else None
    if said is None:
        return None
    return Truth(said.family, said.background, said.foreground, said.orientation or None)


def chunk_truth(path: Path) -> Truth | None:
    """The truth recorded in an image file's PNG text chunks, as the inference CLI writes them:
    `prompt` (a synthetic caption) or else `class` (a family name); None without either, or
    when the file cannot be read (decoding it reports that)."""
    try:
        with Image.open(path) as img:
            chunks = dict(getattr(img, "text", None) or {})
    except (OSError, ValueError, SyntaxError):
        return None
    truth = caption_truth(chunks.get("prompt"))
    if truth is None and chunks.get("class") in FAMILIES:
        truth = Truth(chunks["class"])
    return truth


def read_truths(path: Path) -> dict[str, Truth]:
    """The expected families (and colours, orientations) of a folder's files from its
    `metadata.jsonl`: one JSON object a line with `file_name` (relative to the folder) and
    `family`, optionally `background`, `foreground` and `orientation`, or else a synthetic
    `caption` or `text`."""
    truths = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            name = record["file_name"]
            said = caption_truth(record.get("caption", record.get("text")))
            if "family" not in record and said is not None:
                truths[name] = said
                continue
            family = record["family"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{where}: expected a JSON object with file_name and family or "
                             "a synthetic caption") from None
        if family not in FAMILIES:
            raise ValueError(f"{where}: family {family!r} is not one of {', '.join(FAMILIES)}")
        colours = [record.get(k) for k in ("background", "foreground")]
        for colour in colours:
            if colour is not None and colour not in PALETTE:
                raise ValueError(f"{where}: colour {colour!r} is not a palette colour "
                                 f"({', '.join(PALETTE)})")
        truths[name] = Truth(family, *colours, record.get("orientation") or None)
    return truths


def collect(paths: Sequence[str]) -> list[tuple[Path, Truth | None]]:
    """The image files that `paths` name, each with its truth when known: a folder's
    `metadata.jsonl` (or `params.jsonl`), else each file's PNG text chunks (`chunk_truth`),
    else the class sub-folders named after families; files named directly have their PNG
    text chunks only."""
    out: list[tuple[Path, Truth | None]] = []
    for arg in paths:
        path = Path(arg)
        if path.is_file():
            out.append((path, chunk_truth(path)))
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{arg}: no such file or folder")
        listing = path / PARAMS_FILE
        if not listing.is_file():
            listing = path / OLD_PARAMS_FILE
        if listing.is_file():
            truths = read_truths(listing)
            for name, truth in truths.items():
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{listing}: lists {name}, which is not in {arg}")
                out.append((path / name, truth))
            continue
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and p.is_file())
        if not files:
            raise ValueError(f"{arg}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
        for file in files:
            top = file.relative_to(path).parts[0]
            truth = chunk_truth(file)
            if truth is None and top in FAMILIES and top != file.name:
                truth = Truth(top)
            out.append((file, truth))
    return out


# ----------------------------------------------------------------------------------------------
# Validation


def to_bucket(image: np.ndarray, resolution: int = 128, step: int = 16) -> np.ndarray:
    """`image` (H, W, 3) as training sees it: resized to cover the bucket of its aspect ratio
    at `resolution` (area near resolution², sides multiples of `step`), centre-cropped."""
    h, w = image.shape[:2]
    bw = max(step, round(resolution * math.sqrt(w / h) / step) * step)
    bh = max(step, round(resolution * math.sqrt(h / w) / step) * step)
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    left, top = (rw - bw) // 2, (rh - bh) // 2
    img = Image.fromarray(image).resize((rw, rh), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(img.crop((left, top, left + bw, top + bh)))


def reconstruct(images: Sequence[np.ndarray], vae_path: str, batch: int = 16
                ) -> list[np.ndarray]:
    """`images` (H, W, 3) uint8, sides multiples of the VAE's downsampling factor, through the
    VAE at `vae_path` (posterior mean), on CPU; pictures of one size go in batches."""
    import torch

    from models.vae_weights import load_vae

    vae = load_vae(vae_path).float().eval()
    out: list[np.ndarray | None] = [None] * len(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    with torch.inference_mode():
        for rows in by_size.values():
            for lo in range(0, len(rows), batch):
                part = rows[lo:lo + batch]
                x = torch.from_numpy(np.stack([images[i] for i in part]))  # (B, H, W, 3)
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
                y = vae.decode(vae.encode(x).mode()).clamp(-1, 1)  # (B, 3, H, W)
                y = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)
                for i, pixels in zip(part, y.numpy()):
                    out[i] = pixels
    return out


def validate(count: int = 400, seed: int = VALIDATION_SEED, vae: str | None = None,
             resolution: int = 128) -> dict:
    """The checker's accuracy on `count` held-out pictures (seed `seed`; in runs of four, one
    of each family, training and held-out colour pairs take turns): at full size, resized to
    `resolution`-px buckets and, with `vae`, those through the VAE."""
    if count < 1:
        raise ValueError(f"--count {count}: must be positive")
    if vae is not None and not Path(vae).exists():
        raise FileNotFoundError(f"{vae}: VAE not found; expected a VAE folder (config.json + "
                                "weights), its config.json or a single weights file")
    params, full = [], []
    for i in range(count):
        p, pixels = picture(seed, i, heldout=(i // len(FAMILIES)) % 2 == 1)
        params.append(p)
        full.append(pixels)
    small = [to_bucket(pixels, resolution) for pixels in full]
    result = {"count": count, "seed": seed, "resolution": resolution,
              "full": accuracy(full, params), str(resolution): accuracy(small, params)}
    if vae is not None:
        result["vae"] = vae
        result[f"{resolution}_through_vae"] = accuracy(reconstruct(small, vae), params)
    return result


# ----------------------------------------------------------------------------------------------
# Command line


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def describe(summary: dict) -> list[str]:
    """Lines for people: accuracy per family and overall, colours and the confusion matrix."""
    per = ", ".join(f"{f} {_percent(v)}" for f, v in summary["per_family"].items()
                    if v is not None)
    lines = [f"family: {_percent(summary['family'])} of {summary['images']} ({per})",
             f"colours: background {_percent(summary['background'])}, foreground "
             f"{_percent(summary['foreground'])}, both {_percent(summary['both_colours'])}; "
             f"orientation of stripes {_percent(summary['orientation'])}",
             "confusion (rows: true family, columns: predicted):",
             " " * 12 + "".join(f"{f:>10}" for f in FAMILIES)]
    lines += [f"  {f:<10}" + "".join(f"{summary['confusion'][f][g]:>10}" for g in FAMILIES)
              for f in FAMILIES if summary["per_family"][f] is not None]
    return lines


def _judge(paths: Sequence[str]) -> tuple[dict, list[str]]:
    """Check every file `paths` name: (JSON result, lines for people)."""
    rows = []
    for path, truth in collect(paths):
        pred = check(load_rgb(path))
        rows.append((path, truth, pred))
    known = [(truth, pred) for _, truth, pred in rows if truth is not None]
    summary = summarize([p for _, p in known], [t for t, _ in known]) if known else None
    files = [{"file": str(path), "family": pred.family, "background": pred.background,
              "foreground": pred.foreground, "orientation": pred.orientation,
              "scores": pred.scores,
              "expected": None if truth is None else {k: v for k, v in vars(truth).items()
                                                      if v is not None}}
             for path, truth, pred in rows]
    lines = []
    for path, truth, pred in rows:
        said = f"{pred.family}{f' ({pred.orientation})' if pred.orientation else ''}, " \
               f"{pred.background} and {pred.foreground}"
        if truth is None:
            lines.append(f"{path}: {said}")
        elif truth.family != pred.family:
            lines.append(f"{path}: {said}; expected {truth.family}")
    if summary is not None:
        lines += describe(summary)
    return {"images": len(rows), "accuracy": summary, "files": files}, lines


def main(argv: Sequence[str] | None = None) -> int:
    """Judge image files or folders, or validate the checker; 2 on bad input."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="image files, or folders of them")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--validate", action="store_true",
                        help="measure the checker on held-out synthetic pictures")
    parser.add_argument("--count", type=int, default=400, help="--validate: pictures")
    parser.add_argument("--seed", type=int, default=VALIDATION_SEED, help="--validate: seed")
    parser.add_argument("--resolution", type=int, default=128,
                        help="--validate: bucket resolution the pictures are resized to")
    parser.add_argument("--vae", help="--validate: also check reconstructions through this VAE")
    args = parser.parse_args(argv)
    if args.validate == bool(args.paths):
        parser.error("give image files or folders, or --validate")
    try:
        if args.validate:
            result = validate(args.count, args.seed, args.vae, args.resolution)
            lines = []
            for key, summary in result.items():
                if isinstance(summary, dict):
                    lines += [f"{key}:"] + [f"  {line}" for line in describe(summary)]
        else:
            result, lines = _judge(args.paths)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.json:  # for people: the lines, then the result without the file list
        print("\n".join(lines))
        result = {k: v for k, v in result.items() if k != "files"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
