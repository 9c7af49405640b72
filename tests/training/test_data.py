"""Scanning and loading real image files of every supported kind, good and bad."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import (ImageLoadError, load_image, make_synthetic, resolve_dataset,
                           scan_folder)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


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


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """A folder with one file of each kind; names say what each one is."""
    root = tmp_path / "images"
    (root / "sub" / "deeper").mkdir(parents=True)
    _photo(300, 200).save(root / "good.JPG", quality=90)
    _photo(200, 300, 1).save(root / "sub" / "good.png")
    _photo(260, 260, 2).save(root / "sub" / "deeper" / "good.webp")
    _photo(256, 256, 3).save(root / "good.bmp")
    _photo(256, 280, 4).save(root / "good.tiff")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    data = io.BytesIO()
    _photo(400, 300, 5).save(data, "JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    data = io.BytesIO()
    _photo(400, 300, 6).save(data, "PNG")
    (root / "truncated.png").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    (root / "garbled.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    (root / ".hidden.jpg").write_bytes(b"")  # hidden files are ignored
    os.symlink(root / "sub", root / "sub" / "deeper" / "loop")  # a symlink loop
    return root


def test_data_scan_skips_each_bad_file_with_reason(mixed_folder: Path, cache_dir: Path) -> None:
    scan = scan_folder(mixed_folder, num_workers=1)
    good = sorted(r.rel for r in scan.records)
    assert good == ["good.JPG", "good.bmp", "good.tiff", "sub/deeper/good.webp", "sub/good.png"]
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert set(reasons) == {"empty.jpg", "text.png", "truncated.jpg", "truncated.png",
                            "garbled.png"}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["garbled.png"].startswith("unsupported: a PNG file")
    assert reasons["text.png"].startswith("not an image")
    assert reasons["truncated.jpg"].startswith(("truncated", "corrupt"))
    assert reasons["truncated.png"].startswith(("truncated", "corrupt"))
    assert all(Path(s.path).is_absolute() for s in scan.skipped)
    assert "5 skipped" in scan.summary()
    jpg = next(r for r in scan.records if r.rel == "good.JPG")
    assert (jpg.width, jpg.height, jpg.label) == (300, 200, -1)
    assert len(jpg.sha256) == 64


def test_data_scan_writes_skip_list(mixed_folder: Path, tmp_path: Path) -> None:
    scan = scan_folder(mixed_folder, num_workers=1)
    scan.write_skip_list(tmp_path / "run" / "skipped.json")
    import json
    listed = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert {Path(e["path"]).name for e in listed} == {"empty.jpg", "text.png", "truncated.jpg",
                                                      "truncated.png", "garbled.png"}


def test_data_scan_is_deterministic_and_cached(mixed_folder: Path) -> None:
    first = scan_folder(mixed_folder, num_workers=1)
    again = scan_folder(mixed_folder, num_workers=1)
    assert first.records == again.records and first.skipped == again.skipped
    # Editing a file (new size and mtime) is noticed on the next scan.
    _photo(320, 240, 9).save(mixed_folder / "good.JPG", "JPEG")
    edited = next(r for r in scan_folder(mixed_folder, num_workers=1).records
                  if r.rel == "good.JPG")
    assert (edited.width, edited.height) == (320, 240)
    assert edited.sha256 != next(r for r in first.records if r.rel == "good.JPG").sha256


def test_data_scan_parallel_matches_serial(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(40):
        _photo(40 + i, 50, i).save(root / f"{i:02d}.png")
    serial = scan_folder(root, num_workers=1, cache_dir=tmp_path / "c1")
    parallel = scan_folder(root, num_workers=2, cache_dir=tmp_path / "c2")
    assert serial.records == parallel.records


def test_data_scan_limits_pixels(tmp_path: Path) -> None:
    root = tmp_path / "bomb"
    root.mkdir()
    _photo(300, 300).save(root / "big.png")
    scan = scan_folder(root, max_pixels=50_000, num_workers=1)
    assert not scan.records
    assert scan.skipped[0].reason.startswith("decompression bomb")
    assert "big.png" in scan.skipped[0].path
    # Raising the limit makes the same file usable (and it gets verified then).
    assert len(scan_folder(root, max_pixels=100_000, num_workers=1).records) == 1


def test_data_scan_follows_symlinked_folders(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _photo(64, 64).save(outside / "a.png")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "linked")
    assert [r.rel for r in scan_folder(root, num_workers=1).records] == ["linked/a.png"]


def test_data_scan_labels_from_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "classes"
    for name in ("zebra", "ant"):
        (root / name / "nested").mkdir(parents=True)
        _photo(64, 64).save(root / name / "nested" / "x.png")
    _photo(64, 64).save(root / "loose.png")
    scan = scan_folder(root, use_classes=True, num_workers=1)
    assert scan.class_names == ["ant", "zebra"]
    assert {r.rel: r.label for r in scan.records} == {"ant/nested/x.png": 0,
                                                       "zebra/nested/x.png": 1}
    assert scan.skipped[0].reason.startswith("no class")


def test_data_exif_orientation_swaps_size_and_pixels(tmp_path: Path) -> None:
    img = _photo(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rec = scan_folder(tmp_path, num_workers=1).records[0]
    assert (rec.width, rec.height) == (80, 120)
    assert load_image(tmp_path / "rotated.jpg").size == (80, 120)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "RGB48", "GIF"])
def test_data_load_converts_modes_with_correct_colours(tmp_path: Path, mode: str) -> None:
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
    else:  # animated GIF: the first frame is used
        path = path.with_suffix(".gif")
        frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
        expected = (0, 255, 0)
    img = load_image(path)
    assert img.mode == "RGB"
    pixel = np.asarray(img)[4, 4].astype(int)
    assert np.abs(pixel - np.array(expected)).max() <= 3, (mode, pixel, expected)


def test_data_load_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        load_image(bad)


def test_data_load_draft_decodes_at_reduced_scale(tmp_path: Path) -> None:
    _photo(1600, 1200).save(tmp_path / "big.jpg", quality=90)
    small = load_image(tmp_path / "big.jpg", min_size=(300, 200))
    assert small.size[0] >= 300 and small.size[1] >= 200 and small.size[0] < 1600


def test_data_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a", 12)
    b = make_synthetic(tmp_path / "b", 12)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.suffix in (".png", ".jpg"))
    assert len(files) == 12
    assert {f.parts[0] for f in files} == {"discs", "stripes", "checkers", "clouds"}
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    scan = scan_folder(a, use_classes=True, num_workers=1)
    aspects = [r.width / r.height for r in scan.records]
    assert min(aspects) < 0.8 and max(aspects) > 1.25  # portrait and landscape


def test_data_resolve_dataset(tmp_path: Path, cache_dir: Path) -> None:
    path = resolve_dataset("synthetic:8")
    assert path.is_relative_to(cache_dir) and (path / "DONE").exists()
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_dataset(str(tmp_path / "missing"))
