"""Decoding image files: orientation, colour modes and profiles, reduced-scale JPEGs, crops."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bucketing import PlacementTable, make_buckets, nearest_buckets
from training.data import PixelDataset
from training.images import ImageLoadError, crop_to_bucket, load_image
from training.scan import scan_folder


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _smooth_photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth random colours, features about 40 pixels across: a photograph's kind of detail."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((w, h), Image.BICUBIC)


def _png16_rgb(path: Path, arr: np.ndarray) -> None:
    """Write a 48-bit (16 bits per channel) RGB PNG by hand; Pillow cannot write one."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _icc_profile(gamma: float) -> bytes:
    """A minimal ICC v2 RGB display profile: sRGB's primaries (D50) with a pure gamma curve."""
    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + struct.pack(">3i", *(round(v * 65536) for v in (x, y, z)))

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    tags = [(b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
            (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
            (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset = 128 + 4 + 12 * len(tags)  # header, tag count, tag table
    table, body = b"", b""
    for signature, data in tags:
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I4sI", offset + len(body), b"", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(24) + xyz(0.9642, 1.0, 0.8249)[8:]).ljust(128, b"\0")
    return header + struct.pack(">I", len(tags)) + table + body


def test_images_random_crop_box_scales_between_cover_and_native(tmp_path: Path) -> None:
    from training.images import random_crop_box

    rng = np.random.default_rng(0)
    scales = []
    for _ in range(200):
        (rw, rh), (left, top, right, bottom) = random_crop_box(400, 300, (128, 96), rng)
        assert (right - left, bottom - top) == (128, 96)  # always the bucket
        assert 0 <= left and right <= rw and 0 <= top and bottom <= rh  # inside the image
        assert 128 <= rw <= 400 and 96 <= rh <= 300  # never above native, never below cover
        scales.append(rw / 400)
    assert min(scales) < 0.4 and max(scales) > 0.9  # spread from cover (0.32) to native (1)
    # smaller than the bucket: upscaled just to cover it
    (rw, rh), box = random_crop_box(64, 64, (128, 96), rng)
    assert (rw, rh) == (128, 128) and box[2] - box[0] == 128 and box[3] - box[1] == 96


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tiff"])
def test_images_exif_orientation_swaps_size_and_pixels(tmp_path: Path, suffix: str) -> None:
    pixels = np.zeros((80, 120, 3), np.uint8)
    pixels[:16, :16] = (255, 0, 0)  # red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: the corner shows top right
    Image.fromarray(pixels).save(tmp_path / f"rotated{suffix}", exif=exif, quality=95)
    rec = scan_folder(tmp_path, num_workers=1).records[0]
    img = load_image(rec.path)
    assert (rec.width, rec.height) == img.size == (80, 120)
    shown = np.asarray(img).astype(int)
    assert shown[8, 72, 0] > 200 and shown[8, 8, 0] < 50


def test_images_load_refuses_image_of_another_shape(tmp_path: Path) -> None:
    _photo(60, 120).save(tmp_path / "portrait.png")
    with pytest.raises(ImageLoadError, match="portrait.png: wrong shape"):
        load_image(tmp_path / "portrait.png", min_size=(240, 120))
    assert load_image(tmp_path / "portrait.png", min_size=(121, 241)).size == (60, 120)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "RGB48", "GIF",
                                  "RGB-key", "L-key"])
def test_images_load_converts_modes_with_correct_colours(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "L":
        Image.new("L", (8, 8), 100).save(path)
        expected = (100, 100, 100)
    elif mode == "LA":
        Image.new("LA", (8, 8), (0, 0)).save(path)  # fully transparent black -> white
        expected = (255, 255, 255)
    elif mode == "P":
        img = Image.new("P", (8, 8), 1)
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        img.save(path, transparency=1)  # index 1 (blue) is transparent -> white
        expected = (255, 255, 255)
    elif mode == "RGBA":
        Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(path)  # half red over white
        expected = (255, 127, 127)
    elif mode == "CMYK":
        path = path.with_suffix(".jpg")
        Image.new("RGB", (16, 16), (200, 40, 30)).convert("CMYK").save(path, quality=100)
        expected = (200, 40, 30)
    elif mode == "1":
        Image.new("1", (8, 8), 1).save(path)
        expected = (255, 255, 255)
    elif mode == "I;16":
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
        expected = (156, 156, 156)  # 40000 / 257
    elif mode == "RGB48":
        _png16_rgb(path, np.tile(np.array([65535, 32896, 0], np.uint16), (8, 8, 1)))
        expected = (255, 128, 0)
    elif mode == "RGB-key":
        Image.new("RGB", (8, 8), (0, 0, 0)).save(path, transparency=(0, 0, 0))  # black is clear
        expected = (255, 255, 255)
    elif mode == "L-key":
        Image.new("L", (8, 8), 0).save(path, transparency=0)
        expected = (255, 255, 255)
    else:  # animated GIF: the first frame is used
        path = path.with_suffix(".gif")
        frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
        expected = (0, 255, 0)
    img = load_image(path)
    assert img.mode == "RGB"
    pixel = np.asarray(img)[4, 4].astype(int)
    assert np.abs(pixel - np.array(expected)).max() <= 3, (mode, pixel, expected)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_images_load_converts_colour_profiles_of_every_mode(tmp_path: Path, mode: str) -> None:
    img = Image.new("RGB", (8, 8), (128, 128, 128))
    img = img.quantize() if mode == "P" else img.convert(mode)
    img.save(tmp_path / "linear.png", icc_profile=_icc_profile(gamma=1.0))
    # Linear 128/255 is sRGB 188; an opaque alpha channel or a palette must not change that.
    pixel = np.asarray(load_image(tmp_path / "linear.png"))[4, 4].astype(int)
    assert np.abs(pixel - 188).max() <= 2, pixel


def test_images_load_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        load_image(bad)


def test_images_load_draft_decodes_at_reduced_scale(tmp_path: Path) -> None:
    _photo(1600, 1200).save(tmp_path / "big.jpg", quality=90)
    assert load_image(tmp_path / "big.jpg", min_size=(300, 225)).size == (300, 225)
    # Less than twice the size asked for: decoded in full, exactly as without `min_size`.
    near = load_image(tmp_path / "big.jpg", min_size=(900, 675))
    assert near.size == (1600, 1200)
    assert np.array_equal(np.asarray(near), np.asarray(load_image(tmp_path / "big.jpg")))


def test_images_load_draft_crops_what_a_full_decode_crops(tmp_path: Path) -> None:
    # 617 = 8 * 77 + 1 and 521 = 8 * 65 + 1: decoded at 1/8 scale, each side is rounded up to
    # whole 8x8 blocks, by 7/8 of a decoded pixel; every EXIF orientation puts that excess on
    # another side. Ignoring it shifts the crop by nearly a pixel: a mean difference above 10.
    photo = _smooth_photo(617, 521)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo.save(tmp_path / f"orientation{orientation}.jpg", quality=95, exif=exif)
    records = scan_folder(tmp_path, num_workers=1).records
    buckets = make_buckets(64)
    placements = PlacementTable(records, nearest_buckets(records.width, records.height, buckets),
                                buckets)
    dataset = PixelDataset(records, placements, buckets)  # the path of training and the cache
    assert len(records) == 8
    for i, (rec, place) in enumerate(zip(records, placements)):
        assert min(rec.width // place.resized[0], rec.height // place.resized[1]) >= 8
        full = crop_to_bucket(load_image(rec.path), place.resized, place.crop)  # (H, W, 3)
        pixels = dataset[(i, 0)]["pixels"].permute(1, 2, 0).numpy()  # (H, W, 3)
        diff = np.abs(pixels.astype(float) - full).mean()
        assert diff < 2.0, f"{rec.rel}: mean difference {diff:.2f} from a full decode"
