"""Typed configs: JSON round trip, unknown keys, overrides, portable paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import (REPO_ROOT, Config, ConfigError, absolute_config, apply_overrides,
                             from_dict, load_config, portable_config, portable_path, resolve_path,
                             save_config, to_dict)


def test_config_round_trips_through_json(tmp_path: Path) -> None:
    cfg = from_dict(Config, {"seed": 3, "data": {"resolution": 128, "min_area_ratio": 1}})
    assert cfg.data.min_area_ratio == 1.0 and isinstance(cfg.data.min_area_ratio, float)
    save_config(cfg, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text()) == to_dict(cfg)


def test_config_unknown_keys_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"sede": 1, "data": {"resolutoin": 64}}))
    with pytest.raises(ConfigError, match="sede"):
        load_config(path)
    path.write_text(json.dumps({"data": {"resolutoin": 64}}))
    with pytest.raises(ConfigError, match=r"bad.json.*data\.resolutoin"):
        load_config(path)
    # every unknown key at once, each section's with the keys it knows
    path.write_text(json.dumps({"sede": 1, "data": {"resolutoin": 64, "flip": True},
                                "train": {"lr_sched": "cosine"}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: unknown config key(s): sede (known: ")
    assert "; data.resolutoin (known in data: " in message and "resolution" in message
    assert "; train.lr_sched (known in train: " in message and "lr_schedule" in message


def test_config_wrong_types_and_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.resolution"):
        from_dict(Config, {"data": {"resolution": "big"}})
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="broken.json"):
        load_config(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")


def test_config_overrides_apply_dotted_keys() -> None:
    cfg = apply_overrides(Config(), {"data.resolution": 64, "seed": None, "batch_size": 2})
    assert cfg.data.resolution == 64 and cfg.seed == 0 and cfg.batch_size == 2
    with pytest.raises(ConfigError, match="data.nope"):
        apply_overrides(Config(), {"data.nope": 1})


def test_config_every_shipped_config_loads() -> None:
    files = sorted((REPO_ROOT / "configs").glob("*.json"))
    assert files
    for path in files:
        cfg = load_config(path)
        assert cfg.description, f"{path} needs a description"


def test_config_portable_paths(tmp_path: Path) -> None:
    assert portable_path(REPO_ROOT / "runs" / "x") == "runs/x"
    assert portable_path(tmp_path / "y", root=tmp_path) == "y"
    outside = portable_path(tmp_path / "z")
    assert Path(outside).is_absolute()
    assert resolve_path("runs/x") == REPO_ROOT / "runs" / "x"
    assert resolve_path(outside) == Path(outside)


def test_config_portable_config_rewrites_paths_inside_the_repo(tmp_path: Path) -> None:
    cfg = from_dict(Config, {"run_dir": str(REPO_ROOT / "runs" / "a"),
                             "data": {"dataset": "synthetic:8",
                                      "eval_dataset": str(tmp_path / "held")},
                             "dit": {"vae": str(REPO_ROOT / "vae")}})
    out = portable_config(cfg)
    assert out.run_dir == "runs/a" and out.dit.vae == "vae"
    assert out.data.dataset == "synthetic:8"
    assert out.data.eval_dataset == str((tmp_path / "held").resolve())
    assert cfg.run_dir == str(REPO_ROOT / "runs" / "a")  # the original is untouched


def test_config_absolute_config_reads_saved_paths_from_the_repo(tmp_path: Path) -> None:
    """A config saved in a checkpoint (portable paths) means the same from any working folder."""
    cfg = from_dict(Config, {"run_dir": "runs/a", "data": {"dataset": "data/photos",
                                                          "eval_dataset": str(tmp_path / "held")},
                             "dit": {"vae": "vae", "cache_dir": ""}})
    out = absolute_config(cfg)
    assert out.run_dir == str(REPO_ROOT / "runs" / "a") and out.dit.vae == str(REPO_ROOT / "vae")
    assert out.data.dataset == str(REPO_ROOT / "data" / "photos")
    assert out.data.eval_dataset == str(tmp_path / "held") and out.dit.cache_dir == ""
    assert portable_config(out) == cfg and cfg.run_dir == "runs/a"


def test_config_portable_path_reads_relative_paths_from_the_repo_not_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run started from another folder saves its repo-relative defaults ("vae") as they were
    # used (the repo's vae/), so that its resume finds them again.
    monkeypatch.chdir(tmp_path)
    assert portable_path("vae") == "vae"
    assert resolve_path(portable_path("runs/x")) == REPO_ROOT / "runs" / "x"
    cfg = from_dict(Config, {"run_dir": "runs/a", "dit": {"vae": "vae"},
                             "data": {"dataset": "synthetic_photos"}})
    saved = portable_config(cfg)
    assert (saved.run_dir, saved.dit.vae) == ("runs/a", "vae")
    # a folder whose name starts with "synthetic" is a folder, not the synthetic set
    assert saved.data.dataset == "synthetic_photos"  # repo-relative, like any folder
    assert absolute_config(saved).data.dataset == str(REPO_ROOT / "synthetic_photos")
    assert portable_config(from_dict(Config, {"data": {"dataset": "synthetic:8"}})
                           ).data.dataset == "synthetic:8"


@pytest.mark.parametrize("override, key", [
    ({"stage": "gan"}, "stage"),
    ({"train": {"precision": "fp16"}}, "train.precision"),
    ({"train": {"lr_schedule": "cosin"}}, "train.lr_schedule"),
    ({"vae": {"rec_loss": "l3"}}, "vae.rec_loss"),
    ({"train": {"device": "gpu"}}, "train.device"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"train": {"log_every": 0}}, "train.log_every"),
    ({"train": {"eval_every": 0}}, "train.eval_every"),
    ({"train": {"sample_every": 0}}, "train.sample_every"),
    ({"data": {"holdout": -3}}, "data.holdout"),
    ({"data": {"num_workers": -1}}, "data.num_workers"),
    ({"train": {"lr": float("nan")}}, "train.lr"),
    ({"dit": {"sample_sizes": ["256x256", "64x"]}}, "dit.sample_sizes"),
    ({"vae": {"lpips_vgg": "vgg.pth"}}, "vae.lpips_vgg"),
])
def test_config_validate_refuses_values_that_would_fail_later(override: dict, key: str) -> None:
    from training.config import validate_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(from_dict(Config, override))


def test_config_validate_accepts_the_shipped_configs() -> None:
    from training.config import validate_config

    for path in sorted((REPO_ROOT / "configs").glob("*.json")):
        validate_config(load_config(path))
    validate_config(Config())
    validate_config(from_dict(Config, {"train": {"device": "cuda:1", "ckpt_every": 0}}))
