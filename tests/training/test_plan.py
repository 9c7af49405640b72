"""The data plan: validation labels and skips, ranks agreeing, copies of validation pictures."""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bucketing import BatchSchedule, assign, format_report, report
from training.config import DataConfig
from training.plan import bucket_dataset, held_out

from tests.test_bucketing import _log_uniform_sizes

REPO = Path(__file__).resolve().parents[2]


def _plan(rels: list[str], buckets: list[int]):
    from bucketing import PlacementTable
    from training.image_table import ImageRecord, ImageTable
    from training.plan import DataPlan

    records = ImageTable.from_records("/data", [ImageRecord(f"/data/{r}", r, 64, 64, -1,
                                                            f"{i:064x}")
                                                for i, r in enumerate(rels)])
    grid = [(32, 32), (48, 16)]
    placements = PlacementTable(records, buckets, grid)
    return DataPlan(records, placements, grid, None, records.take([]), placements.take([]), [],
                    [])


def test_plan_fingerprint_hashes_each_path_with_its_bucket() -> None:
    import hashlib

    plan = _plan(["a.png", "sub/b.png", "caf\udce9.png"], [0, 1, 0])
    # as checkpoints have recorded it since it was introduced
    expected = hashlib.sha256(b"a.png\x0032x32\nsub/b.png\x0048x16\ncaf\xe9.png\x0032x32\n")
    assert plan.fingerprint() == expected.hexdigest()


def test_plan_plan_data_gives_validation_images_the_training_labels(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from training.config import Config, ConfigError, from_dict
    from training.distributed import DistInfo
    from training.plan import plan_data

    rng = np.random.default_rng(0)
    for folder, classes in (("train", ("apples", "birds", "cars")), ("val", ("birds", "cars"))):
        for name in classes:
            (tmp_path / folder / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / folder / name / f"{i}.png")
    cfg = from_dict(Config, {"batch_size": 2, "data": {
        "dataset": str(tmp_path / "train"), "eval_dataset": str(tmp_path / "val"),
        "use_classes": True, "resolution": 32, "num_workers": 0}})
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    plan = plan_data(cfg, one)
    assert plan.class_names == ["apples", "birds", "cars"]
    # the validation folder's own class list is (birds, cars): labels 0, 1 there, 1, 2 here
    assert sorted(r.label for r in plan.eval_records) == [1, 1, 2, 2]
    (tmp_path / "val" / "dogs").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        tmp_path / "val" / "dogs" / "0.png")
    with pytest.raises(ConfigError, match=r"validation classes \['dogs'\] are not among"):
        plan_data(cfg, one)
    (tmp_path / "empty").mkdir()
    cfg.data.eval_dataset = str(tmp_path / "empty")  # no silent run without validation
    with pytest.raises(ConfigError, match="empty: no usable validation image"):
        plan_data(cfg, one)


def test_plan_plan_data_lists_the_validation_folders_skipped_files(tmp_path: Path,
                                                                   capsys) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from training.config import Config, ConfigError, from_dict
    from training.distributed import DistInfo
    from training.plan import plan_data

    rng = np.random.default_rng(0)
    for folder in ("train", "val"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png")
    (tmp_path / "val" / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "tiny.png")
    cfg = from_dict(Config, {"batch_size": 2, "data": {
        "dataset": str(tmp_path / "train"), "eval_dataset": str(tmp_path / "val"),
        "resolution": 32, "num_workers": 0}})
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    plan = plan_data(cfg, one)
    assert len(plan.eval_records) == 2
    reasons = {Path(s.path).name: s.reason for s in plan.skipped}  # what skipped.json lists
    assert set(reasons) == {"broken.png", "tiny.png"}
    assert reasons["tiny.png"].startswith("too small or too thin: 8x8 covers no bucket")
    summary = f"{(tmp_path / 'val').resolve()}: 3 usable image(s), 1 skipped"
    assert summary in capsys.readouterr().out
    (tmp_path / "val" / "0.png").unlink()
    (tmp_path / "val" / "1.png").unlink()
    with pytest.raises(ConfigError, match="none of its 1 usable validation images covers a bucket"):
        plan_data(cfg, one)


_DATA_VIEWS = """
import json, sys
from pathlib import Path
from training.config import Config, ConfigError, from_dict
from training.distributed import setup, teardown
from training.plan import plan_data


root = Path(sys.argv[1])
info = setup("cpu")
outcomes = []
# rank 1 sees the same folder, one with an extra image (still being copied in), none at all
for theirs in ("a", "b", "missing"):
    mine = "a" if info.rank == 0 else theirs
    cfg = from_dict(Config, {"batch_size": 1, "data": {
        "dataset": str(root / mine), "resolution": 32, "num_workers": 0}})
    try:
        outcomes.append(["ok", len(plan_data(cfg, info).records)])
    except (ConfigError, FileNotFoundError) as exc:
        outcomes.append([type(exc).__name__, str(exc)])
(root / f"rank{info.rank}.json").write_text(json.dumps(outcomes))
teardown()
"""


def test_plan_plan_data_ranks_agree_on_the_images(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from tests.training.test_distributed import _two_ranks

    rng = np.random.default_rng(0)
    for folder, count in (("a", 4), ("b", 5)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"{i}.png")
    _two_ranks(_DATA_VIEWS, tmp_path, 29542)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank ends the same way
    same, extra, missing = ranks[0]
    assert same == ["ok", 4]
    assert extra[0] == "ConfigError" and "the ranks see different files" in extra[1]
    assert "rank 0: 4 images" in extra[1] and "rank 1: 5 images" in extra[1]
    assert missing[1].startswith("rank 1 (") and str(tmp_path / "missing") in missing[1]


def test_plan_plan_data_trains_no_copy_of_a_validation_picture(tmp_path: Path,
                                                               capsys) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from training.config import Config, from_dict
    from training.distributed import DistInfo
    from training.plan import plan_data
    from training.resume import SCHEDULE_KEYS

    rng = np.random.default_rng(0)
    for folder in ("train", "val"):
        (tmp_path / folder).mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "train" / f"{i}.png")
    for name in ("v.png", "v_again.png"):  # a picture twice in validation, once in training
        (tmp_path / "val" / name).write_bytes((tmp_path / "train" / "4.png").read_bytes())
    (tmp_path / "train" / "5_copy.png").write_bytes((tmp_path / "train" / "5.png").read_bytes())
    cfg = from_dict(Config, {"batch_size": 1, "data": {
        "dataset": str(tmp_path / "train"), "eval_dataset": str(tmp_path / "val"),
        "resolution": 32, "num_workers": 0}})
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    plan = plan_data(cfg, one)
    assert [r.rel for r in plan.eval_records] == ["v.png"]
    assert [r.rel for r in plan.records] == ["0.png", "1.png", "2.png", "3.png", "5.png"]
    out = capsys.readouterr().out
    assert "1 training image(s) are copies of validation images" in out
    assert "exact duplicates: 1 cop(ies) of 1 picture(s) folded" in out
    cfg.data.keep_duplicates = True
    plan = plan_data(cfg, one)
    assert len(plan.eval_records) == 2 and "4.png" not in [r.rel for r in plan.records]
    assert [r.rel for r in plan.records] == ["0.png", "1.png", "2.png", "3.png", "5.png",
                                             "5_copy.png"]
    assert "data.keep_duplicates" in SCHEDULE_KEYS  # a resumed run keeps its schedule


def test_plan_bucket_dataset_tells_thin_images_from_small_ones(tmp_path: Path) -> None:
    for name, size in (("thin.png", (400, 20)), ("tall.png", (20, 400)), ("small.png", (40, 40)),
                       ("ok.png", (90, 70))):
        Image.new("RGB", size).save(tmp_path / name)
    scan, _, _ = bucket_dataset(DataConfig(dataset=str(tmp_path), resolution=64, num_workers=1))
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert [r.rel for r in scan.records] == ["ok.png"]
    assert reasons["thin.png"].startswith("too thin: 400x20 is more elongated than any bucket "
                                          "(at most 4:1)")
    assert reasons["tall.png"].startswith("too thin: 20x400")
    assert reasons["small.png"].startswith("too small: 40x40 covers no bucket")


def test_plan_merges_buckets_over_training_images_only(tmp_path: Path, capsys) -> None:
    # Held-out images leave before training: had they counted when small buckets were merged,
    # some buckets would fall back below one global batch and their images never be trained on.
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(_log_uniform_sizes(40, 32, seed=0)):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    batch = 5  # merging over all 40 images instead leaves 7 of the 30 unused
    cfg = DataConfig(dataset=str(tmp_path), resolution=32, step=8, holdout=10, num_workers=1)
    scan, buckets, placements = bucket_dataset(cfg, batch)
    held = held_out(scan.records, cfg)
    assert len(held) == 10 and held == sorted(held)
    assert held == sorted(sorted(range(len(scan.records)), key=lambda i: scan.records[i].sha256)
                          [:10])  # smallest content hashes
    train = [placements[i].bucket for i in range(len(placements)) if i not in held]
    counts = Counter(train)
    assert len(counts) > 1 and min(counts.values()) >= batch, counts
    assert BatchSchedule(train, batch).unused_samples() == 0
    for i in held:  # held-out images keep their own bucket, as training validates them
        r = scan.records[i]
        assert placements[i] == assign(r.width, r.height, np.asarray(buckets))
    assert held_out(scan.records, DataConfig(dataset="x", holdout=10, eval_dataset="y")) == []
    # the command line's table, given training's holdout, shows these buckets
    from bucketing import main

    assert main(["--dataset", str(tmp_path), "--resolution", "32", "--step", "8", "--batch-size",
                 str(batch), "--holdout", "10", "--num-workers", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(b["count"] for b in rep["buckets"]) == sorted(
        Counter(p.bucket for p in placements).values())


@pytest.mark.parametrize("keep", [False, True], ids=["folded", "kept"])
def test_plan_validation_pictures_never_train(tmp_path: Path, keep: bool) -> None:
    from training.plan import split_validation

    root = _copies(tmp_path / "img")
    cfg = DataConfig(dataset=str(root), resolution=32, step=8, holdout=6, num_workers=1,
                     keep_duplicates=keep)
    scan, buckets, placements = bucket_dataset(cfg, batch_size=2)
    records = scan.records
    assert len(records) == (24 if keep else 12)
    assert (scan.duplicates.copies, scan.duplicates.contents, scan.duplicates.kept) == (
        12, 4, keep)
    held, train = split_validation(records, cfg)
    digests = [r.sha256 for r in records]
    assert len({digests[i] for i in held}) == 6  # six pictures, each once
    assert held == held_out(records, cfg)
    trained = {digests[i] for i in np.flatnonzero(train)}
    assert not trained & {digests[i] for i in held}  # no copy of them trains
    assert len(trained) == 6 and int(train.sum()) == len(records) - (
        len(held) + sum(digests.count(digests[i]) - 1 for i in held))
    # the smallest hashes among the pictures, each as its first file by path
    firsts = sorted({d: i for i, d in reversed(list(enumerate(digests)))}.items())
    assert held == sorted(i for _, i in firsts[:6])
    rep = report(scan, buckets, placements)
    assert rep["duplicates"] == {"copies": 12, "contents": 4, "mixed_classes": 0, "kept": keep}
    assert "exact duplicates: 12 cop(ies) of 4 picture(s)" in format_report(rep)


def _copies(root: Path) -> Path:
    """Debian's wallpapers in small: 4 pictures, each also under other names (copies, symlinks,
    hard links), and 8 pictures alone."""
    root.mkdir()
    rng = np.random.default_rng(7)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    for i in range(4):
        (root / f"{i}_copy.png").write_bytes((root / f"{i}.png").read_bytes())
        os.link(root / f"{i}.png", root / f"{i}_link.png")
        os.symlink(root / f"{i}.png", root / f"{i}_symlink.png")
    return root
