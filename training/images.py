"""Image files as pixels: open any supported file, orient, convert to sRGB, resize and crop.

`load_image` turns any supported file into an RGB uint8 image with correct colours (first frame,
EXIF orientation applied, 16-bit and float greyscale scaled, ICC profiles converted, transparency
composited on white), decoding large JPEGs at reduced scale when they are resized down anyway.
`crop_to_bucket` resizes to cover a bucket and crops it; `random_crop_box` picks a random crop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

_ORIENTATION_TAG = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees
# No image format stores a side of 2**31 pixels or more: a header that says so is damaged (a
# BMP's signed width of -127 reads as 4294967169), not a decompression bomb.
_MAX_SIDE = 2**31 - 1


class ImageLoadError(ValueError):
    """An image file that cannot be turned into pixels; the message names the file."""


def printable(text: str) -> str:
    """`text` safe to print on a UTF-8 stream: what UTF-8 cannot encode becomes an escape.

    File names that are not valid UTF-8 reach Python with stand-in characters (\\udcNN for the
    byte NN) that printing refuses; they are shown as those escapes instead.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def open_image(data: bytes | str | os.PathLike[str]) -> Image.Image:
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


def turn_pending(img: Image.Image) -> bool:
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
        with open_image(path) as img:
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


_capture_file: tuple[int, int] | None = None  # (process id, file descriptor) of `_fd2_captured`


@contextlib.contextmanager
def _fd2_captured() -> Iterator[list[str]]:
    """Catch what C libraries write to file descriptor 2 inside the block: libtiff prints its
    warnings and errors there ("WEBP compression support is not configured") without naming the
    file. The list yielded holds the lines once the block is left.

    Python's own `sys.stderr` is flushed first, so that its pending text is not caught.
    """
    global _capture_file
    if _capture_file is None or _capture_file[0] != os.getpid():  # one file per process
        with tempfile.TemporaryFile() as file:  # already unlinked: gone with the process
            _capture_file = (os.getpid(), os.dup(file.fileno()))
    fd = _capture_file[1]
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        size = os.lseek(fd, 0, os.SEEK_CUR)
        if size:
            data = os.pread(fd, size, 0)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            # Pillow hands libtiff an in-memory file under this made-up name
            found = (line.strip().removeprefix("tempfile.tif: ")
                     for line in data.decode("utf-8", "replace").splitlines())
            lines += dict.fromkeys(line for line in found if line)  # once each, in order


def probe_file(path: str, max_pixels: int) -> dict:
    """Hash a file and check that it is a decodable image. Runs in worker processes.

    Returns "sha256" (32 bytes, when readable), and either "error" (one line) or "width",
    "height" (after EXIF orientation) and "verified" (False when it is too large to decode, so
    only its header was read). What the decoders printed on file descriptor 2 is in "messages":
    folded into the error, or for the caller to print with the file's name.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {"error": f"unreadable: {exc.strerror or exc}"}
    if not data:
        return {"error": "empty file: zero bytes"}
    info: dict = {"sha256": hashlib.sha256(data).digest()}
    with _fd2_captured() as printed, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. Pillow's "Corrupt EXIF data"
        info.update(_decode(data, max_pixels))
    if printed and "error" in info:
        info["error"] += f" (the decoder said: {'; '.join(printed)})"
    elif printed:
        info["messages"] = printed
    return info


def _decode(data: bytes, max_pixels: int) -> dict:
    """`probe_file`'s check of a file's bytes: "error", or "width", "height" and "verified"."""
    try:
        img = open_image(data)
    except Exception:
        kind = _signature(data)
        if kind:
            return {"error": f"unsupported: a {kind} file that Pillow cannot read "
                             "(unusual encoding or damaged header)"}
        return {"error": "not an image: content is not a known image format"}
    try:
        with img:
            w, h = img.size
            if not (0 < w <= _MAX_SIDE and 0 < h <= _MAX_SIDE):
                return {"error": f"corrupt: the header's size {w}x{h} is impossible (a side of "
                                 "0, or of 2**31 pixels or more: a damaged or forged header)"}
            if w * h > max_pixels:  # too large to decode safely; only the area counts then
                return {"width": w, "height": h, "verified": False}
            if img.format == "JPEG":  # a reduced-scale decode still reads every byte
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            img.load()
            w, h = (h, w) if turn_pending(img) else (w, h)
    except Exception as exc:
        text = str(exc)
        kind = "truncated" if "truncat" in text.lower() else "corrupt"
        return {"error": f"{kind}: {text}"}
    return {"width": w, "height": h, "verified": True}


def _signature(data: bytes) -> str | None:
    """The image format named by a file's first bytes, if any."""
    signatures = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP",
                  b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"II+\x00": "BigTIFF",
                  b"MM\x00+": "BigTIFF"}
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    return "WebP" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None


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


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [-1, 1]."""
    return pixels.float().div_(127.5).sub_(1.0)
