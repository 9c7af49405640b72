"""training/captions.py: captions from sidecar .txt files and metadata.jsonl, row for row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from training.captions import CaptionError, Captions, read_captions
from training.scan import scan_folder
from training.synthetic import make_synthetic, read_params


def _images(root: Path, *names: str) -> None:
    for k, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10 * k, 40, 90)).save(root / name)


def _table(root: Path):
    return scan_folder(root, num_workers=1).records


def _jsonl(root: Path, *records: dict | str) -> None:
    (root / "metadata.jsonl").write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def test_captions_read_sidecars_and_metadata_with_sidecars_winning(tmp_path: Path) -> None:
    _images(tmp_path, "a.png", "b.jpg", "c.png", "d.png", "e.png", "sub/f.png")
    (tmp_path / "a.txt").write_text("a red disc\n\n  two red discs  \r\nred discs\n")
    (tmp_path / "c.txt").write_text("from the sidecar\n")
    (tmp_path / "sub" / "f.txt").write_bytes("\ufeffcafé au lait\n".encode())  # with a BOM
    (tmp_path / "e.txt").write_text("\n   \n")  # blank: not a caption, metadata applies
    _jsonl(tmp_path, {"file_name": "b.jpg", "text": "from text"},
           {"file_name": "c.png", "caption": "overridden"},
           {"file_name": "e.png", "caption": ["one", " two ", ""]},
           "", {"file_name": "gone.png", "text": "held out"})
    table = _table(tmp_path)
    caps = read_captions(table, tmp_path)
    by_rel = {table.rel(i): caps.options[i] for i in range(len(table))}
    assert by_rel == {"a.png": ("a red disc", "two red discs", "red discs"),
                      "b.jpg": ("from text",), "c.png": ("from the sidecar",), "d.png": (),
                      "e.png": ("one", "two"), "sub/f.png": ("café au lait",)}
    assert len(caps) == 6 and caps.missing == 1
    assert caps.summary() == (
        "captions: 6 images, 5 captioned (3 from .txt, 2 from metadata.jsonl), 1 without "
        "(trained with the empty caption); .txt won over metadata.jsonl for 1 image(s); "
        "1 metadata.jsonl entries name no image of the table (skipped or held out)")
    # captions are read afresh: an edit takes effect on the next read
    (tmp_path / "d.txt").write_text("now captioned\n")
    assert read_captions(table, tmp_path).missing == 0


def test_captions_pick_take_and_distinct(tmp_path: Path) -> None:
    caps = Captions([("x", "y", "z"), (), ("y",)])
    assert caps.pick([0, 1, 2], [0, 5, 9]) == ["x", "", "y"]
    assert caps.pick([0, 0, 0], [4, 4, -1]) == ["y", "y", "z"]  # seed % options: deterministic
    assert {caps.pick([0], [s])[0] for s in range(6)} == {"x", "y", "z"}  # every option
    assert caps.distinct() == ["", "x", "y", "z"]
    assert Captions([(), ()]).distinct() == [""]
    part = caps.take([2, 1, -3])
    assert part.options == [("y",), (), ("x", "y", "z")] and part.missing == 1
    assert part.summary().startswith("captions: 3 images, 2 captioned (0 from .txt, 0 from "
                                      "metadata.jsonl, 2 given), 1 without")
    with pytest.raises(IndexError, match="rows 0..3 of the captions of 3 image"):
        caps.take([0, 3])
    with pytest.raises(ValueError, match="2 rows for 1 seeds"):
        caps.pick([0, 1], [0])


def test_captions_take_follows_the_table(tmp_path: Path) -> None:
    _images(tmp_path, "a.png", "b.png", "c.png")
    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(f"caption {name}\n")
    table = _table(tmp_path)
    rows = [2, 0]
    assert (read_captions(table, tmp_path).take(rows).options
            == read_captions(table.take(rows), tmp_path).options
            == [("caption c",), ("caption a",)])


def test_captions_match_metadata_in_class_folders_and_the_synthetic_set(tmp_path: Path) -> None:
    _images(tmp_path / "own", "discs/00001.png", "clouds/00002.png")
    _jsonl(tmp_path / "own", {"file_name": "discs/00001.png", "text": "a disc"},
           {"file_name": "./clouds/00002.png", "text": "clouds"})
    table = scan_folder(tmp_path / "own", use_classes=True, num_workers=1).records
    assert read_captions(table, tmp_path / "own").options == [("clouds",), ("a disc",)]
    root = make_synthetic(tmp_path / "synthetic", 6, seed=4)
    table = scan_folder(root, use_classes=True, num_workers=1).records
    caps = read_captions(table, root)
    params = read_params(root)
    assert caps.missing == 0 and set(caps.sources) == {"metadata"}
    truth = {json.loads(line)["file_name"]: json.loads(line)["caption"]
             for line in (root / "metadata.jsonl").read_text().splitlines()}
    assert [caps.options[i] for i in range(len(table))] == [
        (truth[table.rel(i)],) for i in range(len(table))]
    assert set(truth) == set(params)
    assert caps.summary().startswith("captions: 6 images, 6 captioned (0 from .txt, 6 from "
                                     "metadata.jsonl), 0 without")


@pytest.mark.parametrize("lines, expected", [
    (["{not json"], ":2: not JSON; expected one JSON object a line"),
    (['["a.png", "x"]'], ":2: expected a JSON object, not list"),
    (['{"text": "x"}'], ":2: no file_name; expected a path relative to the folder"),
    (['{"file_name": "a.png", "label": 1}'], ":2: a.png has neither text nor caption"),
    (['{"file_name": "a.png", "caption": 3}'], ":2: caption of a.png is a int; expected a"),
    (['{"file_name": "a.png", "text": ["x", 1]}'], ":2: text of a.png is a list; expected"),
    (['{"file_name": "b.png", "text": "x"}', '{"file_name": "./b.png", "text": "y"}'],
     ":3: b.png again (first at line 2); expected one line a file"),
])
def test_captions_bad_metadata_names_the_file_and_line(tmp_path: Path, lines: list[str],
                                                       expected: str) -> None:
    _images(tmp_path, "a.png")
    _jsonl(tmp_path, {"file_name": "a.png", "text": "fine"}, *lines)
    with pytest.raises(CaptionError) as caught:
        read_captions(_table(tmp_path), tmp_path)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "metadata.jsonl") + expected)
    assert "\n" not in message


def test_captions_bad_files_are_named(tmp_path: Path) -> None:
    _images(tmp_path, "a.png", "b.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(CaptionError, match=r"a\.txt: not UTF-8 \(byte 3\); expected captions"):
        read_captions(_table(tmp_path), tmp_path)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "a.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(CaptionError, match=r"a\.txt: cannot read the caption file: No such"):
        read_captions(_table(tmp_path), tmp_path)
    (tmp_path / "a.txt").unlink()
    (tmp_path / "b.txt").mkdir()  # a folder: not a sidecar
    assert read_captions(_table(tmp_path), tmp_path).missing == 2
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "ok"}\n\xff\n')
    with pytest.raises(CaptionError, match=r"metadata\.jsonl:2: not UTF-8; expected JSON"):
        read_captions(_table(tmp_path), tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.jsonl").mkdir()
    with pytest.raises(CaptionError, match=r"metadata\.jsonl: cannot read"):
        read_captions(_table(tmp_path), tmp_path)
