"""scripts/prepare_photos.py on real image files: distinct outputs, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from scripts import prepare_photos

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _photo(path: Path, colour: tuple[int, int, int], size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def test_prepare_photos_same_stem_inputs_get_distinct_outputs(tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # output names come from the paths as given: src/a/x.jpg
    src = Path("src")
    _photo(src / "a" / "x.jpg", RED)
    _photo(src / "a" / "x.png", BLUE)
    _photo(src / "a" / "y.png", GREEN)
    out = tmp_path / "out"
    args = ["--source", str(src), "--out", str(out), "--min-side", "16"]
    assert prepare_photos.main(args) == 0
    stdout = capsys.readouterr().out
    assert f"3 images written under {out}" in stdout
    train = out / "train"
    files = sorted(p.name for p in train.iterdir())
    assert files == ["src_a_x_jpg.png", "src_a_x_png.png", "src_a_y.png"]
    colours = {name: Image.open(train / name).convert("RGB").getpixel((20, 20)) for name in files}
    assert colours["src_a_x_png.png"] == BLUE and colours["src_a_y.png"] == GREEN
    assert max(abs(a - b) for a, b in zip(colours["src_a_x_jpg.png"], RED)) < 8  # JPEG
    assert prepare_photos.main(args) == 0  # a rerun rewrites the same files, and says nothing
    assert "note:" not in capsys.readouterr().out  # about files it did not write


def test_prepare_photos_output_names_stay_distinct() -> None:
    files = [Path("a/x.jpg"), Path("a/x.png"), Path("a/x_png.png"), Path("b/X.png"),
             Path("B/x.png")]
    names = prepare_photos.output_names(files)
    assert [names[f] for f in files] == ["a_x_jpg.png", "a_x_png_2.png", "a_x_png.png",
                                         "b_X_png.png", "B_x_png_2.png"]
    assert len({n.lower() for n in names.values()}) == len(files)


@pytest.mark.parametrize("flags, phrase", [
    (["--holdout-every", "0"], "--holdout-every 0: must be positive"),
    (["--max-side", "0"], "--max-side 0: must be positive"),
    (["--min-side", "-1"], "--min-side -1: must be 0 or more"),
    (["--source", "{tmp}/missing"], "--source {tmp}/missing: folder not found"),
    (["--source", "{tmp}/file"], "--source {tmp}/file: not a folder"),
    (["--out", "{tmp}/file/out"], "--out {tmp}/file/out: not a folder ({tmp}/file is a file)"),
    (["--exclude", "src"], "no image file that --exclude keeps under --source {tmp}/src"),
], ids=["holdout-every", "max-side", "min-side", "source-missing", "source-file", "out-file",
        "all-excluded"])
def test_prepare_photos_bad_input_is_one_line_error(tmp_path: Path, error_line, flags: list[str],
                                                    phrase: str) -> None:
    _photo(tmp_path / "src" / "a.png", RED)
    (tmp_path / "file").write_text("not a folder")
    args = ["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--min-side", "16"]
    assert prepare_photos.main([*args, *(f.format(tmp=tmp_path) for f in flags)]) == 2
    assert phrase.format(tmp=tmp_path) in error_line()
    assert not (tmp_path / "out").exists()


def test_prepare_photos_source_without_images_is_one_line_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    args = ["--source", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]
    assert prepare_photos.main(args) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: no image file under --source {tmp_path / 'empty'}"
    assert not (tmp_path / "out").exists()


def test_prepare_photos_notes_files_it_did_not_write(tmp_path: Path, capsys) -> None:
    _photo(tmp_path / "src" / "a.png", RED)
    stale = _photo(tmp_path / "out" / "train" / "old.png", BLUE)
    args = ["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--min-side", "16"]
    assert prepare_photos.main(args) == 0
    out = capsys.readouterr().out
    assert "1 images written" in out
    assert f"note: 1 other PNG file(s) under {tmp_path / 'out'} were not written by this run " \
           f"(e.g. {stale})" in out
    assert stale.exists()  # reported, never deleted
