"""DiT weights for inference: export a run's EMA weights, and load a run, checkpoint or export.

An export, `checkpoints/NAME/` by default, holds

- `model.safetensors`: the EMA weights (fp32), keyed like `models.dit.DiT.state_dict()`;
- `config.json`: `{"format": "dit-export", "step", "model_config", "class_names", "base_tokens",
  "resolution", "vae", "vae_fingerprint", "text", "source"}`. `text` records a text-conditioned
  model's encoder (`training/conditions.py`): "builtin" (inside the weights), or a frozen
  encoder's folder, fingerprint and max_length, checked when the model is loaded.
  `resolution` is the run's `data.resolution` (the side of its square training size in
  pixels), `vae` a portable path (repo-relative when inside the repository),
  `vae_fingerprint` the `models.vae.vae_fingerprint` of that VAE at export time, so loading
  with another VAE is refused with a clear error instead of decoding garbage; `source` the
  checkpoint folder exported.

An export is written into a temporary sibling folder and renamed into place; an earlier export
of the same run at the same place is replaced only once the new one is complete, and a folder
that is not an export, or an export of another run, is never overwritten.

    UV_CACHE_DIR=.uv-cache uv run python train.py --export runs/NAME [--out checkpoints/NAME]
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.conditioning import ClassCondition, TextCondition
from models.dit import DiT, DiTConfig, upgrade_state_dict
from models.vae import AutoencoderKL
from models.vae_weights import kept_vae_folder, load_vae, state_dict_problems, vae_fingerprint
from training.checkpoint import (SET_ASIDE, STATE_FILE, list_checkpoints, resolve_resume,
                                 share_like_other_files, step_dir_name)
from training.config import REPO_ROOT, portable_path, resolve_path

EXPORT_FORMAT = "dit-export"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # the EMA group of a training checkpoint (training/checkpoint.py)


class ExportError(ValueError):
    """A run, checkpoint or export that cannot be exported or loaded; the message says why."""


@dataclass
class GeneratorInfo:
    """What a loaded DiT was trained with, and where it came from."""

    source: Path  # the checkpoint folder or export folder the weights came from
    step: int  # training step of the weights
    class_names: list[str]  # empty for an unconditional model
    base_tokens: int  # token count at which the timestep shift is 1
    vae: Path  # the VAE loaded with it
    vae_fingerprint: str | None  # recorded in training (or at export); None for older runs
    resolution: int | None  # training data.resolution in pixels; None for older exports
    text: dict[str, Any] = field(default_factory=dict)  # the text encoder; {} without captions
    # what the model is conditioned on (`models/conditioning.py`); set by `load_generator`
    condition: ClassCondition | TextCondition | None = None

    def __post_init__(self) -> None:
        if self.condition is None:
            self.condition = ClassCondition(self.num_classes, self.class_names)

    @property
    def num_classes(self) -> int:
        """Number of real classes (0: unconditional)."""
        return len(self.class_names)


def is_export(folder: Path) -> bool:
    """Whether `folder` holds an export written by `export_dit` (its config.json says so)."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights missing")
    try:
        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ExportError(f"{path}: cannot read safetensors file ({exc})") from None


def checkpoint_folder(path: Path, step: int | None = None) -> Path:
    """The training checkpoint `path` names (a run folder, its checkpoints/ or a step folder);
    with `step`, that step's checkpoint of the run. Errors list the steps that exist."""
    if step is not None and path.is_dir() and not path.name.startswith("step_") \
            and not (path / STATE_FILE).is_file():  # a run folder or its checkpoints/
        run = path.parent if path.name == "checkpoints" else path
        folder = run / "checkpoints" / step_dir_name(step)
        if not (folder / STATE_FILE).is_file():
            steps = [int(p.name.split("_")[1]) for p in list_checkpoints(run)]
            raise FileNotFoundError(f"{folder}: no complete checkpoint of step {step} "
                                    f"(complete steps: {steps or 'none'})")
        return folder
    folder = resolve_resume(path)
    found = _read_json(folder / STATE_FILE).get("step")
    if step is not None and found != step:
        raise ExportError(f"{folder}: holds step {found}, not --step {step}")
    return folder


def _read_source(path: Path, step: int | None) -> tuple[DiTConfig, dict[str, torch.Tensor],
                                                         GeneratorInfo]:
    """Model config, EMA weights (keys in today's layout: `upgrade_state_dict`) and info from an
    export folder or a training checkpoint."""
    if is_export(path):
        cfg = _read_json(path / CONFIG_FILE)
        if step is not None and step != cfg.get("step"):
            raise ExportError(f"{path}: export of step {cfg.get('step')}, not --step {step}")
        weights = upgrade_state_dict(_read_weights(path / WEIGHTS_FILE))
        where, source = path / CONFIG_FILE, path
        fields = cfg
    else:
        source = checkpoint_folder(path, step)
        where = source / STATE_FILE
        fields = _read_json(where)
        if fields.get("stage", fields.get("config", {}).get("stage")) != "dit":
            raise ExportError(f"{where}: not a DiT checkpoint (stage "
                              f"{fields.get('config', {}).get('stage')!r})")
        weights = upgrade_state_dict(_read_weights(source / EMA_FILE))
        run_config = fields.get("config", {})
        fields = {**fields, "base_tokens": run_config.get("dit", {}).get("base_tokens"),
                  "resolution": run_config.get("data", {}).get("resolution"),
                  "vae_fingerprint": fields.get("vae_fingerprint")}
    try:
        config = DiTConfig.from_dict(fields["model_config"])
        resolution = fields.get("resolution")
        info = GeneratorInfo(source, int(fields["step"]), list(fields["class_names"]),
                             int(fields["base_tokens"]), resolve_path(fields["vae"]),
                             fields["vae_fingerprint"],
                             None if resolution is None else int(resolution),
                             dict(fields.get("text") or {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{where}: missing or invalid entry ({exc})") from None
    if info.num_classes != config.num_classes:
        raise ExportError(f"{where}: {info.num_classes} class names for a model of "
                          f"{config.num_classes} classes")
    return config, weights, info


def _build(config: DiTConfig, weights: dict[str, torch.Tensor], source: Path,
           device: torch.device | str = "cpu") -> DiT:
    """A DiT on `device` holding `weights`; errors name `source`.

    Built on the device and then filled, not on the meta device: initialising meta tensors
    imports torch's compiler stack, which costs more start-up time than the random init of
    all but the largest models.
    """
    with torch.device(device):
        model = DiT(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        problems = state_dict_problems(model, weights)
        raise ExportError(f"{source}: weights do not fit the model config: "
                          + ("; ".join(problems) or str(exc).splitlines()[0])) from None
    return model.eval().requires_grad_(False)


def load_generator(path: str | os.PathLike, step: int | None = None,
                   device: torch.device | str = "cpu", vae: str | os.PathLike | None = None,
                   vae_dtype: torch.dtype = torch.float32,
                   text_encoder: str | os.PathLike | None = None
                   ) -> tuple[DiT, AutoencoderKL, GeneratorInfo]:
    """Load EMA weights and their VAE for sampling.

    `path` is a run folder (its newest complete checkpoint, or `step`'s), a checkpoint folder,
    or an export folder. The VAE is the one recorded with the weights unless `vae` overrides it;
    it must have the model's latent channels and the fingerprint recorded in training, where
    one was (runs from before that record none).
    `vae_dtype` applies unless the VAE's config sets force_upcast (then it stays fp32).
    A frozen text encoder is the recorded one unless `text_encoder` names another folder; it
    must have the recorded fingerprint, and is loaded when the first prompt is encoded.
    """
    config, weights, info = _read_source(Path(path), step)
    model = _build(config, weights, info.source, device)
    if config.text == "frozen":
        from training.conditions import frozen_text_condition

        info.condition = frozen_text_condition(info.text, text_encoder, device, info.source)
    elif config.text:  # the built-in encoder is part of the model
        info.condition = model.condition
    model.condition = info.condition  # the same kind, with the names the classes had
    vae_path = Path(vae) if vae is not None else info.vae
    if not vae_path.exists():
        if vae is not None:
            raise FileNotFoundError(f"{vae_path}: VAE not found (given by --vae)")
        raise FileNotFoundError(f"{vae_path}: VAE not found (recorded in {info.source}); pass "
                                "--vae PATH")
    autoencoder = load_vae(vae_path)  # fp32 on the CPU: the fingerprint is taken in fp32
    if autoencoder.config.latent_channels != config.in_channels:
        raise ExportError(f"{vae_path}: VAE has {autoencoder.config.latent_channels} latent "
                          f"channels, the model in {info.source} expects {config.in_channels}")
    if info.vae_fingerprint is not None:
        _checked_fingerprint(autoencoder, vae_path, info, "pass --vae with that VAE")
    info.vae = vae_path
    if autoencoder.config.force_upcast:
        vae_dtype = torch.float32
    return model, autoencoder.to(device=device, dtype=vae_dtype), info


def _checked_fingerprint(autoencoder: AutoencoderKL, vae_path: Path, info: GeneratorInfo,
                         remedy: str) -> str:
    """`autoencoder`'s fingerprint; ExportError ending in `remedy` if it is not the one that
    `info` recorded in training (where it recorded one). The error names the folder where a VAE
    export that replaced the recorded one kept it (`models.vae.kept_vae_folder`), if it exists."""
    found = vae_fingerprint(autoencoder)
    if info.vae_fingerprint is not None and found != info.vae_fingerprint:
        kept = kept_vae_folder(info.vae, info.vae_fingerprint)
        where = f"; it was kept in {kept}" if kept.is_dir() else ""
        raise ExportError(f"{vae_path}: not the VAE {info.source} was trained with (fingerprint "
                          f"{found[:12]}, expected {info.vae_fingerprint[:12]}{where}); {remedy}")
    return found


def export_name(checkpoint: Path) -> str:
    """The default export name of `checkpoint` (RUN/checkpoints/step_N): the run's name, or
    `<run>-<branch>` for a branch that a resume set aside (RUN/set_aside/<branch>/checkpoints/)."""
    run = checkpoint.parent.parent
    return f"{run.parent.parent.name}-{run.name}" if run.parent.name == SET_ASIDE else run.name


def export_dit(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None,
               vae: str | os.PathLike | None = None) -> Path:
    """Export the EMA weights of a DiT run's newest checkpoint (or of a checkpoint folder) to
    `out` (default `checkpoints/<run name>`); returns the export folder.

    The export records the run's VAE, or `vae` when given (the run's VAE moved, or kept aside
    by a VAE export that replaced it); either must be the VAE the run was trained with, by
    fingerprint. Refuses to replace a non-empty folder that is not an earlier export of the
    same run. Prints one line naming the export.
    """
    folder = resolve_resume(resolve_path(checkpoint))
    config, weights, info = _read_source(folder, None)
    _build(config, weights, folder)  # refuse weights that would not load
    if vae is not None:
        info.vae = Path(vae)
        if not info.vae.exists():
            raise FileNotFoundError(f"{info.vae}: VAE not found (given by --vae)")
    if not info.vae.exists():
        raise FileNotFoundError(f"{info.vae}: the run's VAE is missing (recorded in "
                                f"{folder / STATE_FILE}); it is needed for its fingerprint")
    target = (resolve_path(out) if out is not None
              else REPO_ROOT / "checkpoints" / export_name(folder))
    if target.exists():
        if not target.is_dir():
            raise ExportError(f"{target}: exists and is not a folder; choose another --out")
        if is_export(target):
            earlier = _read_json(target / CONFIG_FILE).get("source")
            run = folder.resolve().parent.parent  # folder: run/checkpoints/step_N
            if earlier is None or resolve_path(earlier).resolve().parent.parent != run:
                raise ExportError(f"{target}: holds an export of {earlier or 'an unknown run'}, "
                                  f"not of {portable_path(run)}; refusing to overwrite it (choose "
                                  "another --out)")
        elif any(target.iterdir()):
            raise ExportError(f"{target}: not empty and not an earlier export; refusing to "
                              "overwrite it (choose another --out)")
    meta = {"format": EXPORT_FORMAT, "step": info.step, "model_config": config.to_dict(),
            "class_names": info.class_names, "base_tokens": info.base_tokens,
            "resolution": info.resolution, "vae": portable_path(info.vae),
            "vae_fingerprint": _checked_fingerprint(
                load_vae(info.vae), info.vae, info,
                ("it changed since training, so " if vae is None else "given by --vae: ")
                + "an export would pair the model with the wrong latent space"),
            "text": info.text, "source": portable_path(folder)}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    aside = target.parent / f".old-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / WEIGHTS_FILE,
                  metadata={"format": "pt"})
        share_like_other_files(tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for file in (tmp / WEIGHTS_FILE, tmp / CONFIG_FILE):
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        if target.exists():  # an earlier export or an empty folder: move it aside first
            os.rename(target, aside)
        os.rename(tmp, target)
    except BaseException:
        if aside.exists() and not target.exists():
            os.rename(aside, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    print(f"exported {target}")
    return target
