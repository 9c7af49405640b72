"""Typed run configuration, read from and written to plain JSON.

A config file in `configs/` is a JSON object whose keys mirror the dataclasses below; nested
sections are nested objects. Unknown keys are an error naming them, so a typo never silently
falls back to a default. `train.py` loads a file (or, when resuming, the config saved in the
checkpoint), applies command-line overrides, and saves the resolved config into the run folder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file or override that does not match the dataclasses."""


class TrainingAborted(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


class TrainingStopped(RuntimeError):
    """Training stopped early on signal `signum` (SIGTERM, SIGINT), after saving a checkpoint."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = int(signum)


@dataclass
class DataConfig:
    """Where images come from and how they are bucketed."""

    dataset: str = "synthetic"  # image folder, or "synthetic" / "synthetic:N" (generated files)
    resolution: int = 256  # bucket area is at most resolution² pixels
    step: int = 16  # bucket sides are multiples of this (VAE factor × DiT patch)
    min_area_ratio: float = 0.8  # bucket area is at least min_area_ratio × resolution²
    max_aspect: float = 4.0  # buckets range from 1:max_aspect to max_aspect:1
    use_classes: bool = False  # label = first-level sub-folder name
    captions: bool = False  # text-to-image: NAME.txt sidecars or metadata.jsonl (see `text`)
    allow_upscale: bool = False  # upscale images smaller than their bucket instead of skipping
    max_image_pixels: int = 100_000_000  # larger images are skipped as decompression bombs
    merge_small_buckets: bool = True  # fold buckets smaller than a global batch into neighbours
    holdout: int = 0  # images kept out of training for validation (taken deterministically)
    eval_dataset: str = ""  # separate folder of validation images (replaces `holdout`)
    keep_duplicates: bool = False  # train on every copy of a picture, not once per content
    random_crop: bool = False  # VAE stage: random crops at random scale instead of cover + centre
    flip: bool = True  # random horizontal flips (the latent cache stores both orientations)
    num_workers: int = 2  # DataLoader / scan worker processes


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping; `grad_accum`, `compile` and `grad_checkpointing` are for
    the DiT stage (the VAE stage refuses them)."""

    max_steps: int = 1000
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant" or "cosine" (to 10% at max_steps), after warmup
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step (DiT stage; the VAE stage needs 1)
    ema_decay: float = 0.999
    precision: str = "auto"  # "auto" (bf16 where supported), "bf16" or "fp32"
    device: str = "auto"  # "auto", "cpu" or "cuda"
    compile: bool = False  # torch.compile each transformer block (DiT.compile_blocks)
    grad_checkpointing: bool = False  # recompute each block's activations in backward
    log_every: int = 10
    eval_every: int = 500
    ckpt_every: int = 1000
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a new one lands
    sample_every: int = 1000  # DiT sample grids; VAE reconstruction grids (at evaluations)
    max_nonfinite: int = 5  # abort after this many non-finite steps in a row
    threads: int = 0  # CPU threads of torch; 0: the CPUs this process may use less its workers
    # Quality metrics (docs/evaluation.md "During training"); all need the FID Inception file.
    inception: str = ""  # pt_inception-2015-12-05 weights; empty: LDM_INCEPTION, else off
    fid_every: int = 5000  # DiT FID/KID of EMA samples every this many steps; 0: metrics off
    fid_samples: int = 1000  # EMA samples per FID, shared over ranks
    fid_ref_images: int = 10_000  # training images whose statistics FID compares against


@dataclass
class VAEStageConfig:
    """KL-VAE training: architecture, loss weights and the adversarial schedule."""

    init: str = ""  # start from these weights (folder, config.json or file) instead of scratch
    latent_channels: int = 16
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mid_block_add_attention: bool = False
    use_quant_conv: bool = False
    sample_size: int = 256  # tile size for tiled encode/decode
    rec_loss: str = "l1"  # "l1" or "l2"
    kl_weight: float = 1e-6  # KL (summed over latents) per reconstruction summed over pixels
    perceptual_weight: float = 1.0  # used only when both LPIPS files are given
    lpips_vgg: str = ""  # local torchvision vgg16 state dict (.pth)
    lpips_lin: str = ""  # local LPIPS linear-layer weights (lpips package's vgg.pth)
    disc_start: int = 5000  # step at which the adversarial term enters the generator loss
    disc_warmup: int = 500  # the discriminator trains alone this many steps before disc_start
    disc_ramp: int = 1000  # the adversarial weight ramps linearly from 0 over these steps
    disc_weight: float = 0.5  # multiplies the adaptive weight
    disc_lr: float = 1e-4
    disc_channels: int = 64
    disc_layers: int = 3
    eval_crop: int = 256  # validation PSNR/SSIM on centre and side crops of this size
    eval_images: int = 16  # at most this many validation images
    scale_images: int = 64  # images encoded to measure scaling/shift factors at export


@dataclass
class DiTStageConfig:
    """Diffusion transformer on cached latents: model, VAE, objective, sampling previews."""

    model: str = "dit-s/2"  # a name from models/registry.py
    vae: str = "vae"  # VAE folder, config.json or single file used to build the latent cache
    cache_dir: str = ""  # latent cache folder (default: $LDM_CACHE_DIR/latents)
    label_dropout: float = 0.1  # labels replaced by the null class, for classifier-free guidance
    # token count at which the timestep shift s = sqrt(tokens / base_tokens) is 1 (SD3's 256;
    # configs/default.json: 4, i.e. s = 4 at 128 px, measured in docs/training.md)
    base_tokens: int = 256
    logit_mean: float = 0.0  # training timesteps: sigmoid(N(logit_mean, logit_std²)), shifted
    logit_std: float = 1.0
    direction_loss: float = 0.0  # weight of the velocity-direction term 1 - cos (LightningDiT)
    adam_beta2: float = 0.95
    val_bins: int = 8  # validation loss is reported per timestep bin
    val_images: int = 64  # at most this many held-out images for the validation loss
    # preview grids, "WxH" in pixels; empty: the run's buckets nearest to 1:1, 5:3 and 3:5
    sample_sizes: list[str] = field(default_factory=list)
    sample_steps: int = 28
    sampler: str = "euler"  # of the preview grids: a name from inference/samplers.py SAMPLERS
    cfg_scale: float = 4.0
    num_samples: int = 4  # images per sample grid


@dataclass
class TextConfig:
    """Text conditioning of a DiT trained on captions (`data.captions`)."""

    encoder: str = "builtin"  # "builtin" (trained with the DiT) or a local Hugging Face folder
    max_length: int = 120  # tokens kept per caption (built-in: bytes + 1; a CLIP: at most 77)
    dropout: float = 0.1  # captions replaced by the empty one, for classifier-free guidance
    dtype: str = "bf16"  # a frozen encoder's precision while caching: "bf16" or "fp32"
    depth: int = 1  # blocks of the built-in encoder (its width and heads are the DiT's)
    # prompts of the preview grids; empty: captions of the validation (else training) images
    sample_prompts: list[str] = field(default_factory=list)


@dataclass
class Config:
    """One training run: the data, optimisation, and the section of its stage (`vae` or `dit`)."""

    description: str = ""  # what this config is for and which environment variables it reads
    stage: str = "dit"  # "vae" or "dit"
    run_dir: str = "runs/default"  # outputs: config.json, tb/, checkpoints/, samples/
    seed: int = 0
    batch_size: int = 8  # per process; the global batch is batch_size × world size
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    dit: DiTStageConfig = field(default_factory=DiTStageConfig)
    text: TextConfig = field(default_factory=TextConfig)


def validate_config(cfg: Config) -> Config:
    """Refuse (ConfigError naming the key) values that would fail, or be silently replaced,
    only once training is under way. Returns `cfg`. The data, model and VAE are checked
    where they are loaded."""
    t, d = cfg.train, cfg.dit
    choices = {"stage": (cfg.stage, ("vae", "dit")),
               "train.precision": (t.precision, ("auto", "bf16", "fp32")),
               "train.lr_schedule": (t.lr_schedule, ("constant", "cosine")),
               "vae.rec_loss": (cfg.vae.rec_loss, ("l1", "l2"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    at_least_one = {"batch_size": cfg.batch_size, "train.max_steps": t.max_steps,
                    "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                    "train.eval_every": t.eval_every, "train.sample_every": t.sample_every,
                    "train.max_nonfinite": t.max_nonfinite, "dit.sample_steps": d.sample_steps,
                    "dit.num_samples": d.num_samples, "dit.val_bins": d.val_bins,
                    "vae.scale_images": cfg.vae.scale_images}
    not_negative = {"data.holdout": cfg.data.holdout, "data.num_workers": cfg.data.num_workers,
                    "train.ckpt_every (0: only at the end)": t.ckpt_every,
                    "train.warmup_steps": t.warmup_steps, "train.lr": t.lr,
                    "train.threads (0: chosen)": t.threads,
                    "train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip,
                    "train.fid_every (0: off)": t.fid_every}
    if cfg.text.dtype not in ("bf16", "fp32"):
        raise ConfigError(f"text.dtype must be bf16 or fp32, got {cfg.text.dtype!r}")
    if cfg.data.captions and cfg.data.use_classes:
        raise ConfigError("data.captions and data.use_classes: a DiT is conditioned on captions "
                          "or on classes, not both")
    if cfg.data.captions and cfg.stage == "vae":
        raise ConfigError("data.captions is for the DiT stage; a VAE trains on images alone")
    if cfg.text.encoder != "builtin" and not cfg.data.captions:
        raise ConfigError("text.encoder names a frozen encoder but data.captions is off (it would "
                          "go unused); add --captions")
    if not 0 <= cfg.text.dropout <= 1:
        raise ConfigError(f"text.dropout must lie in [0, 1], got {cfg.text.dropout}")
    at_least_one["text.max_length"] = cfg.text.max_length
    at_least_one["text.depth"] = cfg.text.depth
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in not_negative.items():
        if not value >= 0:  # NaN too
            raise ConfigError(f"{key} must not be negative, got {value}")
    for key in ("fid_samples", "fid_ref_images"):  # a covariance needs two
        if getattr(t, key) < 2:
            raise ConfigError(f"train.{key} must be at least 2, got {getattr(t, key)}")
    if bool(cfg.vae.lpips_vgg) != bool(cfg.vae.lpips_lin):
        raise ConfigError("vae.lpips_vgg and vae.lpips_lin come together (both files, or neither "
                          "for no perceptual loss)")
    for size in d.sample_sizes:
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", size):
            raise ConfigError(f"dit.sample_sizes: {size!r} is not WIDTHxHEIGHT in pixels")
    from inference.samplers import SAMPLERS  # here: importing torch is slow

    if d.sampler not in SAMPLERS:
        raise ConfigError(f"dit.sampler must be one of {', '.join(SAMPLERS)}, got {d.sampler!r}")
    return cfg


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


def _unknown_keys(cls: type, data: dict[str, Any], prefix: str = "") -> list[str]:
    """One entry per section of `data` (nested sections included) that holds keys `cls` does
    not have: those keys, then the section's known keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    found = []
    if unknown:
        where = f" in {prefix[:-1]}" if prefix else ""
        found.append(f"{', '.join(prefix + k for k in unknown)} (known{where}: "
                     f"{', '.join(sorted(names))})")
    for key in sorted(set(data) & names):
        if _is_dataclass_type(hints[key]) and isinstance(data[key], dict):
            found += _unknown_keys(hints[key], data[key], f"{prefix}{key}.")
    return found


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a JSON object, refusing unknown keys (all of them at once,
    in every section) and wrong types."""
    unknown = _unknown_keys(cls, data, prefix)
    if unknown:
        raise ConfigError(f"unknown config key(s): {'; '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_value(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config, ready for JSON."""
    return dataclasses.asdict(cfg)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read a JSON config file into a `Config`; errors name the file."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys")
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


def get_dotted(cfg: Any, key: str) -> Any:
    """The value of dotted `key` ("data.resolution") in config `cfg` (or one of its sections)."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def set_dotted(cfg: Any, key: str, value: Any) -> None:
    """Set dotted `key` ("data.resolution") of config `cfg` to `value`, checked against the
    field's annotated type; ConfigError for a key the config does not have."""
    section, _, name = key.rpartition(".")
    target = get_dotted(cfg, section) if section else cfg
    if name not in {f.name for f in dataclasses.fields(target)}:
        raise ConfigError(f"unknown config key: {key}")
    hint = typing.get_type_hints(type(target))[name]
    setattr(target, name, _check_value(value, hint, key))


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set dotted keys (e.g. ``{"data.resolution": 128}``), skipping values that are None."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        set_dotted(cfg, dotted, value)
    return cfg


def portable_path(path: str | os.PathLike[str], root: str | os.PathLike[str] = REPO_ROOT) -> str:
    """Return `path` relative to `root` when it lies inside it, else absolute.

    Paths saved in configs and checkpoints go through this so that runs and exports stay
    valid when the repository is moved or cloned elsewhere. A relative `path` is taken from
    `root`, as `resolve_path` reads it back (not from the current folder).
    """
    resolved = resolve_path(path, root).resolve()
    try:
        return resolved.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(resolved)


PATH_KEYS = ("run_dir", "data.dataset", "data.eval_dataset", "dit.vae", "dit.cache_dir",
             "vae.init", "vae.lpips_vgg", "vae.lpips_lin", "train.inception")


def portable_config(cfg: Config) -> Config:
    """A copy of `cfg` whose path fields are repo-relative when they lie inside the repo."""
    return _map_paths(cfg, portable_path)


def absolute_config(cfg: Config) -> Config:
    """Inverse of `portable_config`: a copy whose relative path fields are taken from the repo."""
    return _map_paths(cfg, lambda path: str(resolve_path(path)))


def _map_paths(cfg: Config, convert: typing.Callable[[str], str]) -> Config:
    """A copy of `cfg` with `convert` applied to each set `PATH_KEYS` path (not the synthetic
    set's name)."""
    out = copy.deepcopy(cfg)
    for dotted in PATH_KEYS:
        value = get_dotted(out, dotted)
        if value and not is_synthetic(value):
            set_dotted(out, dotted, convert(value))
    return out


def default_cache_dir() -> Path:
    """Folder for the scan cache, synthetic data and latents: $LDM_CACHE_DIR or `.cache/`."""
    return Path(os.environ.get("LDM_CACHE_DIR") or REPO_ROOT / ".cache")


def is_synthetic(dataset: str) -> bool:
    """Whether `dataset` names the built-in synthetic set ("synthetic" or "synthetic:N"), not a
    folder (a folder may well be called "synthetic_photos")."""
    return dataset == "synthetic" or dataset.startswith("synthetic:")


def resolve_path(path: str | os.PathLike[str], root: str | os.PathLike[str] = REPO_ROOT) -> Path:
    """Inverse of `portable_path`: relative paths are taken from `root`."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root) / p


def from_cwd(path: str) -> str:
    """A path from the command line or the environment, made absolute against the current
    folder ("~" expanded); the synthetic set and "" (nothing) stay as they are."""
    if not path or is_synthetic(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def resolve_run_config(config_file: str | os.PathLike[str], overrides: dict[str, Any],
                       resume: str | None, explicit_config: bool = True,
                       environ: typing.Mapping[str, str] = os.environ
                       ) -> tuple[Config, str | None]:
    """The config a run trains with, and the checkpoint it resumes (None for a new run).

    Layers, each over the one before: the config file (its relative paths are the
    repository's, whatever the current folder), LDM_DATASET as its dataset when it names none,
    LDM_RUNS_DIR/<config name> as its run folder, then `overrides` (dotted keys from the
    command line; None: not given; paths already absolute). `resume` ("" for the newest
    checkpoint of the run folder) without `explicit_config` instead takes the config saved
    with the checkpoint and applies only `overrides`, and the run folder is the checkpoint's
    own unless `overrides` names one. Last, LDM_INCEPTION fills `train.inception` when the
    result leaves it empty (new and resumed runs alike: the file is a machine's setting). The
    stages refuse a change that would break the batch schedule
    (`training.resume.find_resume`). Bad values are refused here (`validate_config`), not
    steps into training.
    """
    from training.checkpoint import read_state, resolve_resume
    from training.resume import saved_config

    env = {}
    # LDM_DATASET is the dataset of a config file that names none (the shipped ones do not)
    names_dataset = "dataset" in json.loads(Path(config_file).read_text()).get("data", {})
    if overrides.get("data.dataset") is None and not names_dataset and environ.get("LDM_DATASET"):
        env["data.dataset"] = from_cwd(environ["LDM_DATASET"])
    if overrides.get("run_dir") is None and environ.get("LDM_RUNS_DIR"):
        env["run_dir"] = str(Path(from_cwd(environ["LDM_RUNS_DIR"])) / Path(config_file).stem)
    cfg = apply_overrides(apply_overrides(absolute_config(load_config(config_file)), env),
                          overrides)
    if resume is not None:
        checkpoint = resolve_resume(Path(from_cwd(resume)) if resume
                                    else resolve_path(cfg.run_dir))
        resume = str(checkpoint)
        if not explicit_config:
            cfg = apply_overrides(saved_config(read_state(checkpoint), checkpoint), overrides)
            if overrides.get("run_dir") is None:
                cfg.run_dir = str(checkpoint.parent.parent)
    if not cfg.train.inception and environ.get("LDM_INCEPTION"):
        cfg.train.inception = from_cwd(environ["LDM_INCEPTION"])
    return validate_config(cfg), resume
