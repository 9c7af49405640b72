"""Image folders: scan, robust loading, and the synthetic placeholder set.

`scan_folder` walks a folder once, reads every image's header and checks that it decodes, and
returns one `ImageRecord` per usable file plus a `SkippedFile` (path and reason) for every bad
one and every folder it cannot list. Results are cached by (path, size, mtime, ctime, inode),
so rescanning an unchanged folder only stats the files. `load_image` turns any supported file
into an RGB uint8 image with correct colours.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from training.config import REPO_ROOT, is_synthetic

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
SCAN_CACHE_VERSION = 3  # bump when `_probe` changes what it records
SYNTHETIC_VERSION = 1
SYNTHETIC_CLASSES = ("discs", "stripes", "checkers", "clouds")
_ORIENTATION_TAG = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees


class ImageLoadError(ValueError):
    """An image file that cannot be turned into pixels; the message names the file."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image. `width` and `height` are after EXIF orientation."""

    path: str  # absolute path
    rel: str  # path relative to the dataset root, POSIX separators
    width: int
    height: int
    label: int  # class index, or -1 when the data set is unlabelled
    sha256: str  # content hash of the file's bytes


@dataclass(frozen=True)
class SkippedFile:
    """A file that was not used, and why (one line)."""

    path: str
    reason: str


@dataclass
class ScanResult:
    """Everything a scan found under `root`."""

    root: str
    records: list[ImageRecord]
    skipped: list[SkippedFile]
    class_names: list[str]  # empty when the data set is unlabelled

    def summary(self) -> str:
        """One paragraph: usable count and skipped count by reason."""
        lines = [f"{self.root}: {len(self.records)} usable image(s), {len(self.skipped)} skipped"]
        kinds = Counter(s.reason.split(":")[0] for s in self.skipped)
        lines += [f"  skipped, {kind}: {n}" for kind, n in sorted(kinds.items())]
        if self.class_names:
            lines.append(f"  {len(self.class_names)} classes: {', '.join(self.class_names[:10])}"
                         + (" ..." if len(self.class_names) > 10 else ""))
            used = {r.label for r in self.records}
            empty = [name for i, name in enumerate(self.class_names) if i not in used]
            if empty:  # a label the model never trains on, yet previews and sampling offer it
                lines.append(f"  warning: {len(empty)} class(es) without a usable image: "
                             f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
        return printable("\n".join(lines))

    def write_skip_list(self, path: str | os.PathLike[str]) -> None:
        """Write every skipped file with its reason as a JSON list."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(s) for s in self.skipped], indent=1) + "\n")


def printable(text: str) -> str:
    """`text` safe to print on a UTF-8 stream: what UTF-8 cannot encode becomes an escape.

    File names that are not valid UTF-8 reach Python with stand-in characters (\\udcNN for the
    byte NN) that printing refuses; they are shown as those escapes instead.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def default_cache_dir() -> Path:
    """Folder for the scan cache, synthetic data and latents: $LDM_CACHE_DIR or `.cache/`."""
    return Path(os.environ.get("LDM_CACHE_DIR") or REPO_ROOT / ".cache")


# ----------------------------------------------------------------------------------------------
# Opening and converting images


def _open(data: bytes | str | os.PathLike[str]) -> Image.Image:
    """Open without Pillow's own bomb check: callers apply the configured pixel limit instead."""
    Image.MAX_IMAGE_PIXELS = None  # our limit is `max_image_pixels`, checked on the header
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Palette images with transparency ..."
        return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8) still to be applied to `img`; 1 when there is none."""
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not make the image unusable
        return 1
    return orientation if orientation in range(1, 9) else 1  # `exif_transpose` ignores others


def _turn_pending(img: Image.Image) -> bool:
    """Whether the EXIF orientation still to be applied to `img` turns it by 90 or 270 degrees.

    Pillow's TIFF reader applies the orientation itself: it reports the turned size from the
    start, and turns the pixels and drops the tag on `load()`. The other readers leave both to
    `exif_transpose`. So after `load()`, whatever the format, the header's size swapped when
    this holds is the size `to_rgb` returns.
    """
    return _orientation(img) in _SWAPPED_ORIENTATIONS


def _oriented_box(box: tuple[float, float, float, float], size: tuple[int, int],
                  orientation: int) -> tuple[float, float, float, float]:
    """`box` (l, t, r, b) of an image of `size` (w, h), moved to where `exif_transpose` puts it.

    Orientations 5-8 transpose the image (swap x and y), then these and 2-4 mirror it.
    """
    left, top, right, bottom = box
    width, height = size
    if orientation in _SWAPPED_ORIENTATIONS:
        left, top, right, bottom, width, height = top, left, bottom, right, height, width
    if orientation in (2, 3, 6, 7):  # mirrored left to right
        left, right = width - right, width - left
    if orientation in (3, 4, 7, 8):  # mirrored top to bottom
        top, bottom = height - bottom, height - top
    return left, top, right, bottom


def _same_aspect(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether two (width, height) sizes have one aspect ratio, to within rounding to pixels."""
    (w, h), (ow, oh) = size, other
    return abs(w * oh - h * ow) <= w + h + ow + oh


def _srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """`img` as 8-bit RGB; its colours converted from the ICC profile `icc` to sRGB if given."""
    if img.mode not in ("RGB", "CMYK"):
        img = img.convert("RGB")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        except Exception:  # unusable profile, e.g. a greyscale one: plain conversion
            pass
    return img.convert("RGB") if img.mode == "CMYK" else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image (first frame, orientation applied) to 8-bit RGB.

    16-bit and 32-bit integer greyscale are scaled from 0..65535; float images are taken as
    0..1 when they lie in that range; RGB and CMYK colour profiles are converted to sRGB; then
    transparency (an alpha channel or a transparent colour) is composited on white.
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)  # (H, W), 0..65535
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    icc = img.info.get("icc_profile")
    if "transparency" in img.info or mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        return Image.composite(_srgb(rgba.convert("RGB"), icc), white, rgba.getchannel("A"))
    return _srgb(img, icc)  # 1, L, P, RGB, CMYK, YCbCr, LAB, HSV, RGBX ...


def load_image(path: str | os.PathLike[str], max_pixels: int = 100_000_000,
               min_size: tuple[int, int] | None = None) -> Image.Image:
    """Load an image file as RGB uint8 (first frame, EXIF orientation applied).

    `min_size` (width, height after orientation), when given, is the size the caller resizes
    the image to. It lets JPEGs decode at a reduced scale that is still at least that large
    (Pillow's draft mode), which is much faster for big photographs that are resized down
    anyway; such an image comes back resized to exactly `min_size`, from the same area of the
    photograph that a full decode would be resized from. Other images come back at full size.
    An image whose aspect ratio differs from `min_size` (say, a file replaced since it was
    scanned) is refused rather than stretched. Raises `ImageLoadError` naming the file.
    """
    source = None  # the area of a reduced-scale decode that stands for the whole file
    try:
        with _open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageLoadError(f"{path}: decompression bomb: {w}x{h} pixels exceeds the "
                                     f"limit of {max_pixels}")
            if min_size is not None and img.format == "JPEG":
                # A decode at 1/s scale rounds each side up to whole pixels (617 at 1/8: 78,
                # which stand for 624), so its last column and row reach past the file's edge.
                # `draft` returns the area that stands for the file; the EXIF turn, still to
                # come, can move the excess to the left or top.
                orientation = _orientation(img)
                turned = orientation in _SWAPPED_ORIENTATIONS
                drafted = img.draft("RGB", min_size[::-1] if turned else min_size)
                if drafted is not None and img.size != (w, h):
                    source = _oriented_box(drafted[1], img.size, orientation)
            img.load()
            rgb = to_rgb(img)
    except ImageLoadError:
        raise
    except Exception as exc:  # Pillow raises many types for bad files
        raise ImageLoadError(f"{path}: cannot decode: {exc}") from None
    if min_size is not None and not _same_aspect(rgb.size, min_size):
        raise ImageLoadError(f"{path}: wrong shape: decodes to {rgb.size[0]}x{rgb.size[1]}, not "
                             f"the aspect ratio of {min_size[0]}x{min_size[1]}; rescan the folder")
    return rgb if source is None else _resize(rgb, min_size, source)


# ----------------------------------------------------------------------------------------------
# Scanning


def _probe(path: str, max_pixels: int) -> dict:
    """Hash a file and check that it is a decodable image. Runs in worker processes."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {"error": f"unreadable: {exc.strerror or exc}"}
    if not data:
        return {"error": "empty file: zero bytes"}
    info: dict = {"sha256": hashlib.sha256(data).hexdigest()}
    try:
        img = _open(data)
    except Exception:
        kind = _signature(data)
        if kind:
            return {**info, "error": f"unsupported: a {kind} file that Pillow cannot read "
                                     "(unusual encoding or damaged header)"}
        return {**info, "error": "not an image: content is not a known image format"}
    try:
        with img:
            w, h = img.size
            if w * h > max_pixels:  # too large to decode safely; only the area counts then
                return {**info, "width": w, "height": h, "verified": False}
            if img.format == "JPEG":  # a reduced-scale decode still reads every byte
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
            info["width"], info["height"] = (h, w) if _turn_pending(img) else (w, h)
    except Exception as exc:
        text = str(exc)
        kind = "truncated" if "truncat" in text.lower() else "corrupt"
        return {**info, "error": f"{kind}: {text}"}
    info["verified"] = True
    return info


def _signature(data: bytes) -> str | None:
    """The image format named by a file's first bytes, if any."""
    signatures = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP",
                  b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    return "WebP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None


def _walk_images(root: Path) -> tuple[list[Path], list[SkippedFile]]:
    """Every image file under `root`, following symlinks without loops, in sorted order, and
    every folder that could not be listed.

    Hidden files and folders (names starting with '.') are ignored.
    """
    found: list[Path] = []
    unlisted: list[SkippedFile] = []
    seen_dirs: set[tuple[int, int]] = set()

    def report(exc: OSError) -> None:
        unlisted.append(SkippedFile(str(exc.filename), "unreadable folder: "
                                    f"{exc.strerror or exc}; its images are left out"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=report, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return found, unlisted


def _scan_cache_path(root: Path, cache_dir: Path) -> Path:
    key = hashlib.sha1(os.fsencode(root)).hexdigest()[:16]  # any name, UTF-8 or not
    return cache_dir / "scan" / f"{key}.json"


def scan_folder(root: str | os.PathLike[str], *, use_classes: bool = False,
                max_pixels: int = 100_000_000, num_workers: int = 2,
                cache_dir: str | os.PathLike[str] | None = None,
                progress: bool = False) -> ScanResult:
    """Scan `root` recursively for images; see the module docstring.

    With `use_classes`, the label is the index of the first-level sub-folder's name in the
    sorted list of such names; files directly under `root` are then skipped.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder not found")
    cache_path = _scan_cache_path(root, Path(cache_dir) if cache_dir else default_cache_dir())
    try:
        cached = json.loads(cache_path.read_text())
        if cached.get("version") != SCAN_CACHE_VERSION:
            cached = {}
    except (OSError, ValueError):
        cached = {}
    old = cached.get("files", {})

    paths, unlisted = _walk_images(root)
    entries: dict[str, dict] = {}
    todo: list[tuple[str, str]] = []  # (rel, stamp)
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            st = path.stat()
        except OSError as exc:  # e.g. a dangling symlink
            entries[rel] = {"error": f"unreadable: {exc.strerror or exc}"}
            continue
        # The change time too: a copy that keeps the modification time (cp -p, rsync -a, tar)
        # or an edit within the file system's timestamp resolution can leave size and mtime as
        # they were, but not ctime, which no program can set back.
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
        prev = old.get(rel)
        if prev and prev.get("stamp") == stamp and (
                prev.get("verified", True) or prev["width"] * prev["height"] > max_pixels):
            entries[rel] = prev
        else:
            todo.append((rel, stamp))

    if todo:
        files = [str(root / rel) for rel, _ in todo]
        if num_workers > 1 and len(todo) > 32:
            with ProcessPoolExecutor(num_workers) as pool:
                results = list(pool.map(_probe, files, [max_pixels] * len(files), chunksize=16))
        else:
            results = [_probe(f, max_pixels) for f in files]
        for (rel, stamp), info in zip(todo, results):
            entries[rel] = {**info, "stamp": stamp}
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": SCAN_CACHE_VERSION, "root": str(root),
                                   "files": entries}))
        os.replace(tmp, cache_path)

    class_names: list[str] = []
    if use_classes:
        class_names = sorted({rel.split("/")[0] for rel in entries if "/" in rel})
    class_index = {name: i for i, name in enumerate(class_names)}
    records: list[ImageRecord] = []
    skipped: list[SkippedFile] = []
    for rel in sorted(entries):
        info, path = entries[rel], str(root / rel)
        if "error" in info:
            skipped.append(SkippedFile(path, info["error"]))
        elif info["width"] * info["height"] > max_pixels:
            skipped.append(SkippedFile(path, f"decompression bomb: {info['width']}x"
                                             f"{info['height']} exceeds {max_pixels} pixels"))
        elif use_classes and "/" not in rel:
            skipped.append(SkippedFile(path, "no class: not inside a class sub-folder"))
        else:
            label = class_index[rel.split("/")[0]] if use_classes else -1
            records.append(ImageRecord(path, rel, info["width"], info["height"], label,
                                       info["sha256"]))
    skipped = sorted(skipped + unlisted, key=lambda s: s.path)
    return ScanResult(str(root), records, skipped, class_names)


# ----------------------------------------------------------------------------------------------
# Synthetic data


def _synthetic_image(index: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """One smooth, structured picture of class `kind`, shape (H, W, 3) uint8."""
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
    area = rng.uniform(300, 400) ** 2
    w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    tint = rng.uniform(0, 255, size=3)
    gradient = (xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1))[..., None]
    img = base + 60 * gradient  # (H, W, 3)
    if kind == "discs":
        for _ in range(rng.integers(3, 8)):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 80)
            mask = np.clip(r - np.hypot(xx - cx, yy - cy), 0, 1)[..., None]
            img = img * (1 - mask) + rng.uniform(0, 255, size=3) * mask
    elif kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(12, 48)
        wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
        img = img * 0.5 + tint * (0.5 + 0.5 * wave[..., None]) * 0.5
    elif kind == "checkers":
        cell = rng.uniform(16, 56)
        board = ((xx // cell + yy // cell) % 2)[..., None]
        img = img * (1 - board) + tint * board
    else:  # clouds: smooth noise, bilinearly upsampled from a coarse grid
        coarse = rng.uniform(0, 255, size=(max(2, h // 40), max(2, w // 40), 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
    noise = rng.normal(0, 3, size=img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def make_synthetic(root: str | os.PathLike[str], count: int, seed: int = 0) -> Path:
    """Write `count` deterministic PNG/JPEG files of varied shapes in class sub-folders.

    Aspect ratios spread log-uniformly over 1:3..3:1 and areas over 300²..400² pixels; classes
    (discs, stripes, checkers, clouds) look distinct. The folder is built in a temporary
    sibling and renamed into place, so an interrupted build is never mistaken for a finished one.
    """
    root = Path(root)
    if (root / "DONE").exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    for i in range(count):
        kind = SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]
        rng = np.random.default_rng([seed, i])
        pixels = _synthetic_image(i, kind, rng)
        folder = tmp / kind
        folder.mkdir(parents=True, exist_ok=True)
        if i % 2:
            Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=95)
        else:
            Image.fromarray(pixels).save(folder / f"{i:05d}.png", compress_level=1)
    (tmp / "DONE").write_text(f"{count} images, seed {seed}\n")
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        if not (root / "DONE").exists():
            raise
    return root


def resolve_dataset(spec: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Turn a `--dataset` value into a folder: a path, or `synthetic` / `synthetic:N`."""
    if not spec:
        raise ValueError("no dataset given: name an image folder or synthetic[:N]")
    if is_synthetic(spec):
        try:
            count = int(spec.split(":", 1)[1]) if ":" in spec else 256
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{spec}: expected synthetic:N with N a positive image count")
        base = Path(cache_dir) if cache_dir else default_cache_dir()
        return make_synthetic(base / "synthetic" / f"v{SYNTHETIC_VERSION}_n{count}", count)
    path = Path(spec).expanduser()
    if path.is_file():
        raise FileNotFoundError(f"{spec}: a file, not a dataset folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: dataset folder not found")
    return path


# ----------------------------------------------------------------------------------------------
# Pixel batches for training


def _resize(img: Image.Image, size: tuple[int, int],
            box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """`box` (l, t, r, b; all of `img` by default) of `img` resampled to `size` (w, h)."""
    # Pillow's reducing_gap resamples large downscales in two cheap stages, nearly losslessly
    return img.resize(size, Image.BICUBIC, box=box, reducing_gap=3.0)


def crop_to_bucket(img: Image.Image, resized: tuple[int, int],
                   crop: tuple[int, int, int, int], flip: bool = False) -> np.ndarray:
    """Resize `img` to `resized` (w, h), cut `crop` (l, t, r, b), optionally mirror: (H, W, 3)."""
    if img.size != resized:
        img = _resize(img, resized)
    out = np.array(img.crop(crop))  # a writable copy, (H, W, 3)
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def random_crop_box(width: int, height: int, bucket: tuple[int, int], rng: np.random.Generator
                    ) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """A random bucket-sized crop at a random scale between 'cover' and native resolution.

    Returns (resized size, crop box). Images smaller than the bucket are upscaled to cover it.
    """
    bw, bh = bucket
    cover = max(bw / width, bh / height)
    scale = cover if cover >= 1 else math.exp(rng.uniform(math.log(cover), 0.0))
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    left, top = int(rng.integers(0, rw - bw + 1)), int(rng.integers(0, rh - bh + 1))
    return (rw, rh), (left, top, left + bw, top + bh)


class PixelDataset:
    """Bucket-cropped RGB images as uint8 tensors, addressed by (sample index, augment seed).

    Used through a DataLoader whose batch sampler yields lists of such pairs (see
    `ScheduleSampler`), so every random choice (flip, random crop) is fixed by the schedule
    and a resumed run sees exactly the same pixels. A file that fails to load is reported and
    replaced by another image of the same bucket (tried in an order fixed by the augment seed),
    so a batch never changes shape; `ImageLoadError` when no image of the bucket loads.
    """

    def __init__(self, records: list[ImageRecord], placements: list, buckets: list,
                 flip: bool = False, random_crop: bool = False,
                 max_pixels: int = 100_000_000) -> None:
        self.records, self.placements, self.buckets = records, placements, buckets
        self.flip, self.random_crop, self.max_pixels = flip, random_crop, max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def _pixels(self, index: int, seed: int) -> np.ndarray:
        rec, place = self.records[index], self.placements[index]
        rng = np.random.default_rng(seed)
        flip = self.flip and bool(rng.integers(2))
        if self.random_crop:
            resized, box = random_crop_box(rec.width, rec.height,
                                           tuple(self.buckets[place.bucket]), rng)
        else:
            resized, box = place.resized, place.crop
        img = load_image(rec.path, self.max_pixels, min_size=resized)
        return crop_to_bucket(img, resized, box, flip)

    def _replacement(self, index: int, seed: int, error: ImageLoadError
                     ) -> tuple[int, np.ndarray]:
        """(index, pixels) of the first other image of `index`'s bucket that loads, trying
        them in an order fixed by `seed`; `ImageLoadError` naming the files when none does."""
        bucket = self.placements[index].bucket
        others = [i for i, p in enumerate(self.placements) if p.bucket == bucket and i != index]
        errors = [str(error)]
        for other in np.random.default_rng(seed).permutation(others).tolist():
            try:
                pixels = self._pixels(other, seed)
            except ImageLoadError as exc:
                errors.append(str(exc))
                continue
            print(printable(f"warning: {'; '.join(errors)}; using {self.records[other].path} "
                            "instead, an image of the same bucket"), flush=True)
            return other, pixels
        w, h = self.buckets[bucket]
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise ImageLoadError(f"none of the {len(errors)} image(s) of bucket {w}x{h} loads: {shown}")

    def __getitem__(self, item: tuple[int, ...]) -> dict:
        index, seed, *position = item  # position: (epoch, batch index) from ScheduleSampler
        try:
            source, pixels = index, self._pixels(index, seed)
        except ImageLoadError as exc:
            source, pixels = self._replacement(index, seed, exc)
        out = {"pixels": torch.from_numpy(pixels).permute(2, 0, 1),  # (3, H, W) uint8
               "label": self.records[source].label, "index": index}
        if position:
            out["epoch"], out["batch_index"] = position
        return out


class ScheduleSampler:
    """Batch sampler over a `BatchSchedule` for one rank, starting at (epoch, index).

    Yields lists of (sample index, augment seed, epoch, batch index); after a batch from
    (epoch, i) is consumed, the schedule state to save is (epoch, i + 1).
    """

    def __init__(self, schedule, rank: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self.schedule, self.rank, self.seed = schedule, rank, seed
        self.start = (epoch, index)

    def __iter__(self):
        for epoch, index, batch in self.schedule.iterate(self.rank, *self.start):
            yield [(int(i), int(np.random.SeedSequence([self.seed, epoch, int(i)])
                                 .generate_state(1)[0]), epoch, index) for i in batch]


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)
