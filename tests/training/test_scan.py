"""Scanning folders: skip reasons, the scan cache, labels, symlinks, damaged headers, ranks."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import training.images as images_module
import training.scan as scan_module
from training.scan import scan_folder

from tests.training.test_images import _photo


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


def test_scan_skips_each_bad_file_with_reason(mixed_folder: Path, cache_dir: Path) -> None:
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


def test_scan_writes_skip_list(mixed_folder: Path, tmp_path: Path) -> None:
    scan = scan_folder(mixed_folder, num_workers=1)
    scan.write_skip_list(tmp_path / "run" / "skipped.json")
    import json
    listed = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert {Path(e["path"]).name for e in listed} == {"empty.jpg", "text.png", "truncated.jpg",
                                                      "truncated.png", "garbled.png"}


def test_scan_is_deterministic_and_cached(mixed_folder: Path) -> None:
    first = scan_folder(mixed_folder, num_workers=1)
    again = scan_folder(mixed_folder, num_workers=1)
    assert first.records == again.records and first.skipped == again.skipped
    # Editing a file (new size and mtime) is noticed on the next scan.
    _photo(320, 240, 9).save(mixed_folder / "good.JPG", "JPEG")
    edited = next(r for r in scan_folder(mixed_folder, num_workers=1).records
                  if r.rel == "good.JPG")
    assert (edited.width, edited.height) == (320, 240)
    assert edited.sha256 != next(r for r in first.records if r.rel == "good.JPG").sha256


def test_scan_reuses_its_cache_for_unchanged_files(mixed_folder: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first = scan_folder(mixed_folder, num_workers=1)
    probed: list[str] = []
    real_probe = scan_module.probe_file

    def probe(path: str, *args) -> dict:
        probed.append(path)
        return real_probe(path, *args)

    monkeypatch.setattr(scan_module, "probe_file", probe)
    assert scan_folder(mixed_folder, num_workers=1).records == first.records
    assert probed == []  # nothing re-read: every file's stamp matched
    _photo(320, 240, 9).save(mixed_folder / "good.JPG", "JPEG")
    scan_folder(mixed_folder, num_workers=1)
    assert [Path(p).name for p in probed] == ["good.JPG"]  # only the edited one


def test_scan_parallel_matches_serial(tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(40):
        _photo(40 + i, 50, i).save(root / f"{i:02d}.png")
    serial = scan_folder(root, num_workers=1, cache_dir=tmp_path / "c1")
    parallel = scan_folder(root, num_workers=2, cache_dir=tmp_path / "c2")
    assert serial.records == parallel.records


def test_scan_limits_pixels(tmp_path: Path) -> None:
    root = tmp_path / "bomb"
    root.mkdir()
    _photo(300, 300).save(root / "big.png")
    scan = scan_folder(root, max_pixels=50_000, num_workers=1)
    assert not scan.records
    assert scan.skipped[0].reason.startswith("decompression bomb")
    assert "big.png" in scan.skipped[0].path
    # Raising the limit makes the same file usable (and it gets verified then).
    assert len(scan_folder(root, max_pixels=100_000, num_workers=1).records) == 1


def test_scan_follows_symlinked_folders(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _photo(64, 64).save(outside / "a.png")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "linked")
    assert [r.rel for r in scan_folder(root, num_workers=1).records] == ["linked/a.png"]


def test_scan_labels_from_subfolders(tmp_path: Path) -> None:
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


def test_scan_warns_of_classes_without_a_usable_image(tmp_path: Path) -> None:
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


def test_scan_reports_unreadable_folder(tmp_path: Path) -> None:
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


def test_scan_tells_damaged_headers_from_bombs_and_names_decoder_messages(
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


def test_scan_prints_decoder_messages_with_the_files_name(
        tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # A decoder that writes to file descriptor 2 from below Python, as libtiff does, and still
    # decodes the file.
    real = images_module._decode

    def talkative(raw: bytes, max_pixels: int) -> dict:
        os.write(2, b"TIFFReadDirectory: Warning, unknown field with tag 65000\n")
        return real(raw, max_pixels)

    monkeypatch.setattr(images_module, "_decode", talkative)
    _photo(40, 30).save(tmp_path / "a.png")
    capfd.readouterr()
    scan = scan_folder(tmp_path, num_workers=1, cache_dir=tmp_path / "c")
    assert [r.rel for r in scan.records] == ["a.png"]
    err = capfd.readouterr().err
    assert f"warning: {tmp_path / 'a.png'}: TIFFReadDirectory: Warning, unknown field" in err
    assert err.count("unknown field") == 1


def test_scan_cache_writes_only_what_changed(tmp_path: Path) -> None:
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


_SPLIT_SCAN = """
import json, sys
from pathlib import Path
import training.scan as scan
from training.distributed import setup, teardown


root = Path(sys.argv[1])
info = setup("cpu")
probed = []
real = scan.probe_file
def probe(path, *args):
    probed.append(str(Path(path).relative_to(root)))
    return real(path, *args)
scan.probe_file = probe
scans = [scan.scan_folder(root / "img", use_classes=True, num_workers=1,
                          cache_dir=root / "cache", dist=info) for _ in range(2)]
out = {"probed": probed, "read": [s.read for s in scans],
       "records": [[r.rel, r.label, r.sha256, r.width] for r in scans[1].records],
       "skipped": [[s.path, s.reason] for s in scans[1].skipped]}
(root / f"rank{info.rank}.json").write_text(json.dumps(out))
teardown()
"""


def test_scan_splits_the_files_to_read_over_torchrun_ranks(tmp_path: Path) -> None:
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
