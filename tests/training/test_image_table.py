"""The table of images: reads like a list of records; exact duplicates folded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from training.scan import scan_folder

from tests.training.test_images import _photo


def test_image_table_reads_like_a_list_of_records(tmp_path: Path) -> None:
    from training.image_table import ImageRecord, ImageTable

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


def test_image_table_fold_duplicates_keeps_each_picture_once_by_its_first_path(
        tmp_path: Path) -> None:
    from training.image_table import fold_duplicates

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
