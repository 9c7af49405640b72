"""Typed run configuration, read from and written to plain JSON.

A config file in `configs/` is a JSON object whose keys mirror the dataclasses below; nested
sections are nested objects. Unknown keys are an error naming them, so a typo never silently
falls back to a default. `train.py` loads a file, applies command-line overrides, and saves the
resolved config into the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses."""


@dataclass
class DataConfig:
    """Where images come from and how they are bucketed."""

    dataset: str = "synthetic"  # image folder, or "synthetic" / "synthetic:N" (generated files)
    resolution: int = 256  # bucket area is at most resolution² pixels
    step: int = 16  # bucket sides are multiples of this (VAE factor × DiT patch)
    min_area_ratio: float = 0.8  # bucket area is at least min_area_ratio × resolution²
    max_aspect: float = 4.0  # buckets range from 1:max_aspect to max_aspect:1
    use_classes: bool = False  # label = first-level sub-folder name
    allow_upscale: bool = False  # upscale images smaller than their bucket instead of skipping
    max_image_pixels: int = 100_000_000  # larger images are skipped as decompression bombs
    merge_small_buckets: bool = True  # fold buckets smaller than a global batch into neighbours
    holdout: int = 0  # images kept out of training for validation (taken deterministically)
    num_workers: int = 2  # DataLoader / scan worker processes


@dataclass
class Config:
    """One training run. Sections for the VAE and DiT stages extend this as they land."""

    description: str = ""  # what this config is for and which environment variables it reads
    stage: str = "dit"  # "vae" or "dit"
    run_dir: str = "runs/default"  # outputs: config.json, tb/, checkpoints/, samples/
    seed: int = 0
    batch_size: int = 8  # per process; the global batch is batch_size × world size
    data: DataConfig = field(default_factory=DataConfig)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Check one JSON value against a field's annotated type; ints pass where floats are due."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        tp = next(t for t in options if t is not type(None))
        origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected an object, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a JSON object, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        listed = ", ".join(prefix + k for k in unknown)
        raise ConfigError(f"unknown config key(s): {listed} (known: {', '.join(sorted(names))})")
    kwargs = {k: _check_value(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config, ready for JSON."""
    return dataclasses.asdict(cfg)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a JSON config file into a `Config`; errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    try:
        return from_dict(Config, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as indented JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    os.replace(tmp, path)


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set dotted keys (e.g. ``{"data.resolution": 128}``), skipping values that are None."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, name = dotted.split(".")
        target = cfg
        for part in parents:
            target = getattr(target, part)
        if name not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"unknown config key: {dotted}")
        hint = typing.get_type_hints(type(target))[name]
        setattr(target, name, _check_value(value, hint, dotted))
    return cfg


def portable_path(path: str | os.PathLike[str], root: str | os.PathLike[str] = REPO_ROOT) -> str:
    """Return `path` relative to `root` when it lies inside it, else absolute.

    Paths saved in configs and checkpoints go through this so that runs and exports stay
    valid when the repository is moved or cloned elsewhere.
    """
    resolved = Path(path).expanduser().resolve()
    try:
        return resolved.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(resolved)


def resolve_path(path: str | os.PathLike[str], root: str | os.PathLike[str] = REPO_ROOT) -> Path:
    """Inverse of `portable_path`: relative paths are taken from `root`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root) / p
