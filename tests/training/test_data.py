"""Scanning and loading real image files of every supported kind, good and bad."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from bucketing import PlacementTable, make_buckets, nearest_buckets
from training.data import (ImageLoadError, PixelDataset, crop_to_bucket, load_image,
                           make_synthetic, resolve_dataset, scan_folder)


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


@contextlib.contextmanager
def _permissions_apply() -> Iterator[None]:
    """Make permission bits bind this thread even when it runs as root, as they do for users.

    Root reads any folder through two capabilities (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH);
    they are left out of the effective set meanwhile, and stay permitted, so they come back.
    """
    if os.geteuid() != 0:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    caps = (ctypes.c_uint32 * 6)()  # (effective, permitted, inheritable) for caps 0-31, 32-63
    if libc.capget(header, caps) != 0:
        pytest.skip("cannot read this thread's capabilities")
    saved = list(caps)
    caps[0] &= ~0b110  # CAP_DAC_OVERRIDE = 1, CAP_DAC_READ_SEARCH = 2
    if libc.capset(header, caps) != 0:
        pytest.skip("cannot drop the capabilities that let root read any folder")
    try:
        yield
    finally:
        caps[:] = saved
        libc.capset(header, caps)


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


def test_data_scan_reuses_its_cache_for_unchanged_files(mixed_folder: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import training.data as data

    first = scan_folder(mixed_folder, num_workers=1)
    probed: list[str] = []
    real_probe = data._probe

    def probe(path: str, *args) -> dict:
        probed.append(path)
        return real_probe(path, *args)

    monkeypatch.setattr(data, "_probe", probe)
    assert scan_folder(mixed_folder, num_workers=1).records == first.records
    assert probed == []  # nothing re-read: every file's stamp matched
    _photo(320, 240, 9).save(mixed_folder / "good.JPG", "JPEG")
    scan_folder(mixed_folder, num_workers=1)
    assert [Path(p).name for p in probed] == ["good.JPG"]  # only the edited one


def test_data_random_crop_box_scales_between_cover_and_native(tmp_path: Path) -> None:
    from training.data import random_crop_box

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


def test_data_scan_warns_of_classes_without_a_usable_image(tmp_path: Path) -> None:
    root = tmp_path / "classes"
    for name in ("ant", "bee", "cat"):
        (root / name).mkdir(parents=True)
    _photo(64, 64).save(root / "ant" / "x.png")
    (root / "bee" / "broken.png").write_bytes(b"not an image")
    _photo(64, 64).save(root / "cat" / "y.png")
    scan = scan_folder(root, use_classes=True, num_workers=1)
    assert scan.class_names == ["ant", "bee", "cat"]  # labels stay put
    assert "warning: 1 class(es) without a usable image: bee" in scan.summary()
    # as bucketing skips small images
    scan.records = scan.records.take(np.flatnonzero(scan.records.label != 2))
    assert "without a usable image: bee, cat" in scan.summary()


def test_data_scan_reports_unreadable_folder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "locked").mkdir(parents=True)
    _photo(64, 64).save(root / "open.png")
    _photo(64, 64, 1).save(root / "locked" / "hidden.png")
    (root / "locked").chmod(0)
    try:
        with _permissions_apply():
            scan = scan_folder(root, num_workers=1)
    finally:
        (root / "locked").chmod(0o755)
    assert [r.rel for r in scan.records] == ["open.png"]
    assert [(Path(s.path).name, s.reason.split(":")[0]) for s in scan.skipped] == [
        ("locked", "unreadable folder")]
    assert "skipped, unreadable folder: 1" in scan.summary()


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tiff"])
def test_data_exif_orientation_swaps_size_and_pixels(tmp_path: Path, suffix: str) -> None:
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


def test_data_load_refuses_image_of_another_shape(tmp_path: Path) -> None:
    _photo(60, 120).save(tmp_path / "portrait.png")
    with pytest.raises(ImageLoadError, match="portrait.png: wrong shape"):
        load_image(tmp_path / "portrait.png", min_size=(240, 120))
    assert load_image(tmp_path / "portrait.png", min_size=(121, 241)).size == (60, 120)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "RGB48", "GIF",
                                  "RGB-key", "L-key"])
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
def test_data_load_converts_colour_profiles_of_every_mode(tmp_path: Path, mode: str) -> None:
    img = Image.new("RGB", (8, 8), (128, 128, 128))
    img = img.quantize() if mode == "P" else img.convert(mode)
    img.save(tmp_path / "linear.png", icc_profile=_icc_profile(gamma=1.0))
    # Linear 128/255 is sRGB 188; an opaque alpha channel or a palette must not change that.
    pixel = np.asarray(load_image(tmp_path / "linear.png"))[4, 4].astype(int)
    assert np.abs(pixel - 188).max() <= 2, pixel


def test_data_load_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        load_image(bad)


def test_data_load_draft_decodes_at_reduced_scale(tmp_path: Path) -> None:
    _photo(1600, 1200).save(tmp_path / "big.jpg", quality=90)
    assert load_image(tmp_path / "big.jpg", min_size=(300, 225)).size == (300, 225)
    # Less than twice the size asked for: decoded in full, exactly as without `min_size`.
    near = load_image(tmp_path / "big.jpg", min_size=(900, 675))
    assert near.size == (1600, 1200)
    assert np.array_equal(np.asarray(near), np.asarray(load_image(tmp_path / "big.jpg")))


def test_data_load_draft_crops_what_a_full_decode_crops(tmp_path: Path) -> None:
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


def _dataset(root: Path, names: list[bytes]) -> PixelDataset:
    """PNGs of one 64x64 bucket named `names` (bytes: any file name), grey levels 0, 50, ..."""
    for i, name in enumerate(names):
        Image.new("RGB", (64, 64), (50 * i,) * 3).save(os.fsencode(root) + b"/" + name)
    records = scan_folder(root, num_workers=1).records
    buckets = make_buckets(64)
    placements = PlacementTable(records, nearest_buckets(records.width, records.height, buckets),
                                buckets)
    assert len({p.bucket for p in placements}) == 1
    return PixelDataset(records, placements, buckets)


def test_data_pixel_dataset_tries_each_other_image_once(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    dataset = _dataset(tmp_path, [b"a.png", b"b.png", b"c.png"])
    os.remove(tmp_path / "a.png")
    os.remove(tmp_path / "b.png")
    for seed in range(4):  # whichever order the seed picks, c.png stands in for a.png
        out = dataset[(0, seed, 3, 7)]
        assert int(out["pixels"][0, 0, 0]) == 100 and out["index"] == 0
        assert (out["epoch"], out["batch_index"]) == (3, 7)
    assert "a.png" in capsys.readouterr().out
    os.remove(tmp_path / "c.png")
    with pytest.raises(ImageLoadError, match="none of the 3 image.*a.png.*(b.png.*c|c.png.*b)"):
        dataset[(0, 0)]


def test_data_non_utf8_file_names_print(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = _dataset(tmp_path, [b"caf\xe9.png", b"ok.png"])
    (tmp_path / os.fsdecode(b"caf\xe9.png")).write_bytes(b"damaged after the scan")
    assert int(dataset[(0, 0)]["pixels"][0, 0, 0]) == 50
    assert "caf\\udce9.png" in capsys.readouterr().out
    root = tmp_path / os.fsdecode(b"photos_\xe9")  # a class folder inside a folder so named
    (root / os.fsdecode(b"caf\xe9")).mkdir(parents=True)
    _photo(64, 64).save(root / os.fsdecode(b"caf\xe9") / "x.png")
    print(scan_folder(root, use_classes=True, num_workers=1).summary())
    assert "classes: caf\\udce9" in capsys.readouterr().out


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
    with pytest.raises(FileNotFoundError, match="missing: dataset folder not found"):
        resolve_dataset(str(tmp_path / "missing"))
    (tmp_path / "one.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="one.png: a file, not a dataset folder"):
        resolve_dataset(str(tmp_path / "one.png"))
    for spec in ("synthetic:abc", "synthetic:0"):
        with pytest.raises(ValueError, match=f"{spec}: expected synthetic:N with N a positive"):
            resolve_dataset(spec)


# ----------------------------------------------------------------------------------------------
# Headers that lie, decoders that talk


def _with_tag(path: Path, tag: int, value: int) -> bytes:
    """The bytes of the little-endian TIFF `path` with the SHORT `tag` of its first IFD set to
    `value`."""
    data = bytearray(path.read_bytes())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == tag:
            struct.pack_into("<H", data, entry + 8, value)
    return bytes(data)


def test_data_scan_tells_damaged_headers_from_bombs_and_names_decoder_messages(
        tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    root = tmp_path / "images"
    root.mkdir()
    _photo(30, 20).save(root / "big.tif", big_tiff=True)  # a whole BigTIFF reads
    (root / "header.tif").write_bytes(b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 4096))
    (root / "motorola.tif").write_bytes(b"MM\x00+\x00\x08\x00\x00" + struct.pack(">Q", 4096))
    _photo(30, 20).save(root / "ok.bmp")
    forged = bytearray((root / "ok.bmp").read_bytes())
    struct.pack_into("<I", forged, 18, 0xFFFFFF81)  # the width field: -127 as a signed int
    (root / "forged.bmp").write_bytes(forged)
    _photo(30, 20).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    (root / "webp.tif").write_bytes(_with_tag(tmp_path / "lzw.tif", 259, 50001))  # WEBP codec
    capfd.readouterr()
    scan = scan_folder(root, num_workers=1, cache_dir=tmp_path / "c")
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert sorted(r.rel for r in scan.records) == ["big.tif", "ok.bmp"]
    assert reasons["header.tif"].startswith("unsupported: a BigTIFF file")
    assert reasons["motorola.tif"].startswith("unsupported: a BigTIFF file")
    assert reasons["forged.bmp"].startswith("corrupt: the header's size 4294967169x20 is "
                                            "impossible")
    # libtiff's own words become part of the reason, and nothing reaches stderr unnamed
    assert reasons["webp.tif"].startswith("corrupt: ")
    assert "WEBP compression support is not configured" in reasons["webp.tif"]
    assert "tempfile.tif" not in capfd.readouterr().err


def test_data_scan_prints_decoder_messages_with_the_files_name(
        tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.data as data

    # A decoder that writes to file descriptor 2 from below Python, as libtiff does, and still
    # decodes the file.
    real = data._decode

    def talkative(raw: bytes, max_pixels: int) -> dict:
        os.write(2, b"TIFFReadDirectory: Warning, unknown field with tag 65000\n")
        return real(raw, max_pixels)

    monkeypatch.setattr(data, "_decode", talkative)
    _photo(40, 30).save(tmp_path / "a.png")
    capfd.readouterr()
    scan = scan_folder(tmp_path, num_workers=1, cache_dir=tmp_path / "c")
    assert [r.rel for r in scan.records] == ["a.png"]
    err = capfd.readouterr().err
    assert f"warning: {tmp_path / 'a.png'}: TIFFReadDirectory: Warning, unknown field" in err
    assert err.count("unknown field") == 1


# ----------------------------------------------------------------------------------------------
# The scan cache, the table of images, exact duplicates


def test_data_scan_cache_writes_only_what_changed(tmp_path: Path) -> None:
    import sqlite3

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.png", "sub/b.png", "c.png")):
        _photo(40 + i, 30, i).save(root / name)
    (root / "bad.jpg").write_text("not an image")
    cache = tmp_path / "c"
    first = scan_folder(root, num_workers=1, cache_dir=cache)
    assert first.read == 4 and "4 new or changed file(s) read" in first.summary()
    (db,) = (cache / "scan").glob("*.sqlite")

    def rows() -> dict[bytes, tuple]:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return {rel: rest for rel, *rest in conn.execute(
                "SELECT rel, width, height, verified, error, length(sha256) FROM files")}

    listed = rows()  # one row a file, keyed by path: its size, whether it decoded, its hash
    assert listed.pop(b"bad.jpg")[3].startswith("not an image")
    assert listed == {b"a.png": [40, 30, 1, None, 32], b"c.png": [42, 30, 1, None, 32],
                      b"sub/b.png": [41, 30, 1, None, 32]}
    again = scan_folder(root, num_workers=1, cache_dir=cache)
    assert again.read == 0 and again.records == first.records and again.skipped == first.skipped
    _photo(50, 30, 9).save(root / "c.png")  # edited
    (root / "sub" / "b.png").unlink()  # gone
    _photo(60, 30, 8).save(root / "d.png")  # new
    third = scan_folder(root, num_workers=1, cache_dir=cache)
    assert third.read == 2 and [r.rel for r in third.records] == ["a.png", "c.png", "d.png"]
    assert sorted(rows()) == [b"a.png", b"bad.jpg", b"c.png", b"d.png"]
    assert rows()[b"c.png"][0] == 50
    # a damaged cache is only a cache: read everything again and write it afresh
    db.write_bytes(b"this is not a database" * 100)
    fourth = scan_folder(root, num_workers=1, cache_dir=cache)
    assert fourth.read == 4 and fourth.records == third.records
    assert scan_folder(root, num_workers=1, cache_dir=cache).read == 0


def test_data_image_table_reads_like_a_list_of_records(tmp_path: Path) -> None:
    from training.data import ImageRecord, ImageTable

    names = ["b/z.png", "a.png", os.fsdecode(b"caf\xe9.png"), "b/y.png"]
    for i, name in enumerate(names):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _photo(30 + i, 20, i).save(tmp_path / name)
    table = scan_folder(tmp_path, num_workers=1).records
    records = list(table)
    assert all(isinstance(r, ImageRecord) for r in records) and len(table) == 4
    assert [r.rel for r in records] == sorted(names, key=os.fsencode)  # by path bytes
    assert [(r.width, r.path) for r in records] == [
        (table.size(i)[0], table.path(i)) for i in range(4)]
    assert table[-1] == records[-1] and table[1:3] == records[1:3]
    assert list(table.width) == [r.width for r in records]
    assert [bytes(d).hex() for d in table.sha256] == [r.sha256 for r in records]
    part = table.take([3, 0])
    assert list(part) == [records[3], records[0]] and list(part.take([1])) == [records[0]]
    with pytest.raises(IndexError):
        table[4]
    assert ImageTable.from_records(table.root, records) == table
    lines = b"".join(table.rel_lines([b"|", b"#\n"], np.array([1, 0, 1, 0]), chunk=3))
    assert lines == b"".join(os.fsencode(r.rel) + (b"#\n", b"|")[i % 2]
                             for i, r in enumerate(records))
    assert list(table.relabel([]).label) == [-1] * 4


def _copies_folder(root: Path) -> Path:
    """Two pictures with copies of each kind (byte-identical, symlink, hard link) in two
    class folders, and one picture alone."""
    (root / "ant").mkdir(parents=True)
    (root / "bee").mkdir()
    _photo(48, 40, 0).save(root / "bee" / "one.png")
    _photo(40, 48, 1).save(root / "ant" / "two.png")
    _photo(44, 44, 2).save(root / "bee" / "three.png")
    (root / "bee" / "one_copy.png").write_bytes((root / "bee" / "one.png").read_bytes())
    os.link(root / "bee" / "one.png", root / "ant" / "one_link.png")
    os.symlink(root / "ant" / "two.png", root / "bee" / "two_symlink.png")
    return root


def test_data_fold_duplicates_keeps_each_picture_once_by_its_first_path(tmp_path: Path) -> None:
    from training.data import fold_duplicates

    root = _copies_folder(tmp_path / "img")
    scan = scan_folder(root, use_classes=True, num_workers=1)
    assert len(scan.records) == 6
    copies, originals = scan.records.duplicates()
    rel = [r.rel for r in scan.records]
    assert [(rel[c], rel[o]) for c, o in zip(copies, originals)] == [
        ("bee/one.png", "ant/one_link.png"), ("bee/one_copy.png", "ant/one_link.png"),
        ("bee/two_symlink.png", "ant/two.png")]
    fold_duplicates(scan)
    assert [(r.rel, r.label) for r in scan.records] == [  # ant = 0, bee = 1
        ("ant/one_link.png", 0), ("ant/two.png", 0), ("bee/three.png", 1)]
    assert (scan.duplicates.copies, scan.duplicates.contents) == (3, 2)
    assert scan.duplicates.mixed_classes == 2
    text = scan.summary()
    assert "exact duplicates: 3 cop(ies) of 2 picture(s) folded" in text
    assert "2 of those picture(s) lie in more than one class folder" in text
    kept = scan_folder(root, use_classes=True, num_workers=1)
    fold_duplicates(kept, keep=True)
    assert len(kept.records) == 6 and kept.duplicates.kept
    assert "kept (data.keep_duplicates)" in kept.summary()
    # another copy, later by path, changes nothing that was kept
    (root / "bee" / "zz_copy.png").write_bytes((root / "ant" / "two.png").read_bytes())
    again = scan_folder(root, use_classes=True, num_workers=1)
    fold_duplicates(again)
    assert again.records == scan.records and again.duplicates.copies == 4


_SPLIT_SCAN = """
import json, sys
from pathlib import Path
import training.data as data
from training.distributed import setup, teardown

root = Path(sys.argv[1])
info = setup("cpu")
probed = []
real = data._probe
def probe(path, *args):
    probed.append(str(Path(path).relative_to(root)))
    return real(path, *args)
data._probe = probe
scans = [data.scan_folder(root / "img", use_classes=True, num_workers=1,
                          cache_dir=root / "cache", dist=info) for _ in range(2)]
out = {"probed": probed, "read": [s.read for s in scans],
       "records": [[r.rel, r.label, r.sha256, r.width] for r in scans[1].records],
       "skipped": [[s.path, s.reason] for s in scans[1].skipped]}
(root / f"rank{info.rank}.json").write_text(json.dumps(out))
teardown()
"""


def test_data_scan_splits_the_files_to_read_over_torchrun_ranks(tmp_path: Path) -> None:
    import json

    from tests.training.test_distributed import _two_ranks

    root = tmp_path / "img"
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            _photo(30 + i, 24, i).save(root / c / f"{i}.png")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff nonsense")
    _two_ranks(_SPLIT_SCAN, tmp_path, 29543)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    probed = [set(rank["probed"]) for rank in ranks]
    assert [len(rank["probed"]) for rank in ranks] == [7, 6]  # each its share, once
    assert not probed[0] & probed[1] and len(probed[0] | probed[1]) == 13
    assert [rank["read"] for rank in ranks] == [[13, 0], [13, 0]]  # the second scan: none
    one = scan_folder(root, use_classes=True, num_workers=1, cache_dir=tmp_path / "alone")
    for rank in ranks:  # every rank ends with what one process finds
        assert rank["records"] == [[r.rel, r.label, r.sha256, r.width] for r in one.records]
        assert rank["skipped"] == [[s.path, s.reason] for s in one.skipped]
    # the cache the ranks wrote holds every file: one process reads nothing again
    assert scan_folder(root, use_classes=True, num_workers=1, cache_dir=tmp_path / "cache"
                       ).read == 0
