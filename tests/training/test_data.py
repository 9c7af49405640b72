"""Data sets: pixel batches, the synthetic set, resolving --dataset, unprintable names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from bucketing import PlacementTable, make_buckets, nearest_buckets
from training.data import PixelDataset, resolve_dataset
from training.synthetic import make_synthetic
from training.images import ImageLoadError
from training.scan import scan_folder

from tests.training.test_images import _photo


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
