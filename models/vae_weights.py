"""Weight formats of the KL autoencoder in models/vae.py: reading, converting and writing them.

`load_vae` reads a diffusers AutoencoderKL folder (or its config.json) or one original LDM / SGM /
FLUX file, alone or inside a full model checkpoint: it strips the checkpoint's key prefix, renames
the original layout and diffusers' pre-0.17 attention names to diffusers' current names, and
infers the config from tensor shapes when no config.json lies beside the file. `save_vae` writes a
folder diffusers can load, keeping a different VAE it replaces (`kept_vae_folder`);
`vae_fingerprint` names a VAE by its config and weights (latent caches key on it).

The config, the modules, encode / decode and tiling live in models/vae.py, which this module
imports (never the other way round).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from models.vae import AutoencoderKL, VAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"


# --- renaming to the diffusers layout ----------------------------------------------------------
# Original LDM / SGM / FLUX names -> diffusers names (decoder.up.K is handled separately).
_LDM_RENAMES = [
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."), r"encoder.down_blocks.\1.resnets.\2."),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\."), r"encoder.down_blocks.\1.downsamplers.0."),
    (re.compile(r"\.mid\.block_1\."), ".mid_block.resnets.0."),
    (re.compile(r"\.mid\.block_2\."), ".mid_block.resnets.1."),
    (re.compile(r"\.mid\.attn_1\.norm\."), ".mid_block.attentions.0.group_norm."),
    (re.compile(r"\.mid\.attn_1\.([qkv])\."), r".mid_block.attentions.0.to_\1."),
    (re.compile(r"\.mid\.attn_1\.proj_out\."), ".mid_block.attentions.0.to_out.0."),
    (re.compile(r"\.nin_shortcut\."), ".conv_shortcut."),
    (re.compile(r"^(encoder|decoder)\.norm_out\."), r"\1.conv_norm_out."),
]
_LDM_DECODER_UP = re.compile(r"^decoder\.up\.(\d+)\.(block\.(\d+)|upsample)\.")
# diffusers < 0.17 attention names -> current ones.
_OLD_ATTENTION_RENAMES = [
    (re.compile(r"\.attentions\.0\.query\."), ".attentions.0.to_q."),
    (re.compile(r"\.attentions\.0\.key\."), ".attentions.0.to_k."),
    (re.compile(r"\.attentions\.0\.value\."), ".attentions.0.to_v."),
    (re.compile(r"\.attentions\.0\.proj_attn\."), ".attentions.0.to_out.0."),
]


def _ldm_key_to_diffusers(key: str, levels: int) -> str:
    """Rename one original-layout VAE key; `levels` is the number of resolution levels."""
    match = _LDM_DECODER_UP.match(key)
    if match:  # LDM numbers decoder levels from the highest resolution, diffusers from the lowest
        level = levels - 1 - int(match.group(1))
        inner = f"resnets.{match.group(3)}" if match.group(3) else "upsamplers.0"
        key = f"decoder.up_blocks.{level}.{inner}." + key[match.end() :]
    for pattern, replacement in _LDM_RENAMES:
        key = pattern.sub(replacement, key)
    return key


# Training bookkeeping some files carry beside the weights: the LDM loss module (loss.*) and EMA
# counters (model_ema.decay, model_ema.num_updates in Stability's SD VAE files).
_NOT_WEIGHTS = ("loss.", "model_ema.")


def _to_diffusers_layout(state: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """Rename a file's VAE tensors (prefix already stripped) to diffusers' layout."""
    state = {k: v for k, v in state.items() if not k.startswith(_NOT_WEIGHTS)}
    if any(k.startswith("encoder.down.") for k in state):
        levels = len({k.split(".")[2] for k in state if k.startswith("decoder.up.")})
        state = {_ldm_key_to_diffusers(k, levels): v for k, v in state.items()}
    elif not any(k.startswith("encoder.down_blocks.") for k in state):
        raise ValueError(
            f"{source}: keys match neither the diffusers AutoencoderKL layout "
            f"(encoder.down_blocks.*) nor the original LDM layout (encoder.down.*); "
            f"first keys: {sorted(state)[:5]}"
        )
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in _OLD_ATTENTION_RENAMES:
            key = pattern.sub(replacement, key)
        if ".attentions.0.to_" in key and key.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        renamed[key] = value
    return renamed


# --- the config of a single file ---------------------------------------------------------------
# Scale and shift are not stored in single-file weights; these are the published values, keyed on
# (latent_channels, has quant convs), with the VAE they belong to. Four channels with quant convs
# is ambiguous: SD 1.x uses 0.18215, SDXL 0.13025; we pick SD 1.x. Sixteen channels without quant
# convs is ambiguous too: FLUX.1 uses (0.3611, 0.1159), SD3 (1.5305, 0.0609); we pick FLUX.1 (its
# ae.safetensors is the common single file). None of them has per-channel statistics (Playground
# v2.5's VAE, also 4 channels with quant convs, does). A config.json beside the file, or the
# scaling_factor / shift_factor / latents_mean / latents_std passed to load_vae, override them.
_KNOWN_SINGLE_FILE_VAES: dict[tuple[int, bool], tuple[str, dict[str, Any]]] = {
    (4, True): (
        "SD 1.x; SDXL uses 0.13025",
        {"scaling_factor": 0.18215, "shift_factor": None, "sample_size": 256},
    ),
    (16, False): (
        "FLUX.1; SD3 uses 1.5305 and 0.0609",
        {"scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024},
    ),
}


def _infer_config(
    state: Mapping[str, Tensor], source: Path, overrides: Mapping[str, Any] | None = None
) -> VAEConfig:
    """Read the architecture off tensor shapes (diffusers names); scale and shift from the table.

    Warns naming the values that are guesses: the GroupNorm group count (the weights leave no
    trace of it), and scale and shift unless the caller `overrides` them (load_vae applies them).
    """
    overrides = overrides or {}
    try:
        levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down_blocks.")})
        widths = tuple(
            state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
            for i in range(levels)
        )
        layers = len(
            {k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")}
        )
        latent_channels = state["decoder.conv_in.weight"].shape[1]
        in_channels = state["encoder.conv_in.weight"].shape[1]
        out_channels = state["decoder.conv_out.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"{source}: incomplete VAE weights, {err.args[0]} is missing") from err
    groups = math.gcd(32, *widths)  # published VAEs use 32
    use_quant_conv = "quant_conv.weight" in state
    known_as, known = _KNOWN_SINGLE_FILE_VAES.get(
        (latent_channels, use_quant_conv),
        (
            f"no known VAE has {latent_channels} latent channels "
            f"{'with' if use_quant_conv else 'without'} quant convs",
            {"scaling_factor": 1.0, "shift_factor": None},
        ),
    )
    table = [f"{k} {known[k]}" for k in ("scaling_factor", "shift_factor") if k not in overrides]
    guesses = [f"norm_num_groups {groups}"]
    if table:
        guesses.append(f"{' and '.join(table)} ({known_as})")
    warnings.warn(
        f"{source}: no AutoencoderKL {CONFIG_NAME} beside it, so these are guesses: "
        f"{', '.join(guesses)}; put the VAE's diffusers {CONFIG_NAME} next to it to use its "
        f"values",
        stacklevel=3,
    )
    return VAEConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        latent_channels=latent_channels,
        block_out_channels=widths,
        layers_per_block=layers,
        norm_num_groups=groups,
        use_quant_conv=use_quant_conv,
        use_post_quant_conv="post_quant_conv.weight" in state,
        mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in state,
        force_upcast=True,
        **known,
    )


def _config_beside(weights: Path) -> VAEConfig | None:
    """The config of a diffusers AutoencoderKL config.json next to a weights file, if any."""
    path = weights.parent / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none there, or not a diffusers config
        return None
    if not isinstance(data, dict) or data.get("_class_name") != "AutoencoderKL":
        return None
    return VAEConfig.from_dict(data, source=str(path))


# --- loading -----------------------------------------------------------------------------------
def _vae_key_prefix(keys: Iterable[str]) -> str:
    """'first_stage_model.' or 'vae.' when the VAE sits inside a full model checkpoint."""
    keys = list(keys)
    prefixes = ("first_stage_model.", "vae.")
    return next((p for p in prefixes if any(k.startswith(p) for k in keys)), "")


def _read_vae_tensors(path: Path) -> dict[str, Tensor]:
    """The VAE's tensors from a .safetensors or torch pickle file (a 'state_dict' entry is
    unwrapped), without the prefix a full model checkpoint puts on them; other models' tensors
    are not read (safetensors) or dropped (pickles)."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as file:
                prefix = _vae_key_prefix(file.keys())
                return {
                    k[len(prefix) :]: file.get_tensor(k)
                    for k in file.keys()
                    if k.startswith(prefix)
                }
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{path}: cannot read as safetensors "
                             f"({' '.join(str(err).split())})") from err
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        # torch's own message spans lines and suggests weights_only=False: not for a VAE file
        raise ValueError(f"{path}: not a torch checkpoint of tensors alone "
                         f"({type(err).__name__})") from err
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    prefix = _vae_key_prefix(data)
    return {
        k[len(prefix) :]: v
        for k, v in data.items()
        if k.startswith(prefix) and isinstance(v, Tensor)
    }


def state_dict_problems(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """What keeps `state` from loading into `model`: counts and examples of missing, unexpected
    and wrongly shaped tensors (empty when it fits key for key)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: expected {expected[k]}, got {tuple(state[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    return [
        f"{len(items)} {what} (e.g. {items[:3]})"
        for what, items in (("missing", missing), ("unexpected", unexpected),
                            ("wrongly shaped", shapes))
        if items
    ]


def _check_state_dict(model: AutoencoderKL, state: Mapping[str, Tensor], source: Path) -> None:
    """Raise one ValueError listing missing, unexpected and wrongly shaped tensors."""
    problems = state_dict_problems(model, state)
    if problems:
        raise ValueError(
            f"{source}: weights do not fit the VAE config {model.config.to_dict()}: "
            + "; ".join(problems)
        )


def _diffusers_weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, WEIGHTS_NAME_BIN):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder}: no VAE weights; expected {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN} next to "
        f"{CONFIG_NAME}"
    )


def load_vae(
    path: str | Path,
    *,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    latents_mean: list[float] | None = None,
    latents_std: list[float] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> AutoencoderKL:
    """Load a VAE from any of the common layouts, in eval mode.

    `path` is (a) a diffusers folder with config.json and diffusion_pytorch_model.safetensors (or
    .bin), (b) such a config.json, or (c) a single original LDM / SGM / FLUX (or diffusers-named)
    file: .safetensors, or .ckpt / .pt / .pth / .bin read with weights_only=True. A full model
    checkpoint works too: its `first_stage_model.` or `vae.` tensors are taken; training
    bookkeeping (`loss.*`, `model_ema.*`) is dropped.

    A single file takes its config from a diffusers AutoencoderKL config.json beside it. Without
    one, the architecture is read off the tensor shapes, with a warning naming what is guessed:
    the GroupNorm group count (32, or fewer where the widths need it) and scaling/shift, taken
    from published values by latent channels and quant convs: 4 channels with quant convs ->
    SD 1.x (0.18215; SDXL files need scaling_factor=0.13025), 16 without -> FLUX.1 (0.3611,
    0.1159; SD3 files need scaling_factor=1.5305, shift_factor=0.0609); no per-channel
    statistics (Playground v2.5 files need its latents_mean, latents_std and scaling_factor=0.5).
    The keyword arguments override the config or table; passing latents_mean / latents_std
    without shift_factor also clears shift_factor (the two forms of normalisation do not mix, see
    `VAEConfig`). `dtype` defaults to float32; a VAE whose config sets force_upcast keeps float32
    weights whatever `dtype` says (it computes in float32).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: not found; expected a diffusers VAE folder ({CONFIG_NAME} + {WEIGHTS_NAME}), "
            f"its {CONFIG_NAME}, or a single .safetensors/.ckpt/.pt VAE file"
        )
    given = {
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "latents_mean": latents_mean,
        "latents_std": latents_std,
    }
    overrides = {key: value for key, value in given.items() if value is not None}
    if (latents_mean is not None or latents_std is not None) and shift_factor is None:
        overrides["shift_factor"] = None  # per-channel statistics replace the shift
    if path.is_dir() or path.suffix == ".json":
        config_path = path / CONFIG_NAME if path.is_dir() else path
        if not config_path.is_file():
            hint = " (a pipeline folder? try its vae/ subfolder)" if (path / "vae").is_dir() else ""
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} in this folder{hint}")
        config = VAEConfig.from_json(config_path)
        weights_path = _diffusers_weights_file(config_path.parent)
        state = _to_diffusers_layout(_read_vae_tensors(weights_path), weights_path)
    else:
        weights_path = path
        state = _to_diffusers_layout(_read_vae_tensors(path), path)
        config = _config_beside(path) or _infer_config(state, path, overrides)
    try:
        config = dataclasses.replace(config, **overrides)
    except ValueError as err:
        raise ValueError(f"{path}: the overrides {sorted(overrides)} do not fit its VAE config: "
                         f"{err}") from None

    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = AutoencoderKL(config)
    _check_state_dict(model, state, weights_path)
    model.load_state_dict(state, assign=True)
    if dtype is None or (config.force_upcast and dtype in (torch.float16, torch.bfloat16)):
        dtype = torch.float32
    return model.to(device=device, dtype=dtype).eval()


# --- saving and identity -----------------------------------------------------------------------
def kept_vae_folder(folder: str | Path, fingerprint: str) -> Path:
    """Where `save_vae` keeps an earlier VAE it replaced: the sibling `<folder>-<fingerprint[:12]>`
    (`fingerprint` is that VAE's `vae_fingerprint`)."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}-{fingerprint[:12]}")


def _folder_fingerprint(folder: Path) -> str:
    """`vae_fingerprint` of the VAE in `folder` as `load_vae` reads it (as a DiT run records it)."""
    try:
        return vae_fingerprint(load_vae(folder))
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: holds a VAE config but no loadable VAE "
                         f"({' '.join(str(err).split())}); refusing to replace it") from None


def save_vae(model: AutoencoderKL, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors (diffusers layout) as `folder`.

    An existing VAE folder is replaced only with `overwrite` (else FileExistsError); a non-empty
    folder that does not hold a VAE (no config.json, or not a VAE config) is never replaced
    (ValueError). A replaced VAE whose fingerprint differs from the new one's is kept: renamed to
    `kept_vae_folder(folder, its fingerprint)`, with a printed line saying so (if that folder
    exists, it already holds that VAE). The new VAE is written whole into a temporary sibling
    folder first and then renamed into place, so each VAE is always complete under some name: no
    crash leaves new weights beside an old config. On an error nothing changes.
    """
    folder = Path(folder)
    earlier = None  # fingerprint of the VAE being replaced
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder}: exists and is not a folder; refusing to replace it")
        files = [str(folder / n) for n in (CONFIG_NAME, WEIGHTS_NAME) if (folder / n).exists()]
        if files and not overwrite:
            raise FileExistsError(f"{files}: already exist; pass overwrite=True to replace them")
        try:
            VAEConfig.from_json(folder / CONFIG_NAME)
        except (OSError, ValueError):
            if any(folder.iterdir()):
                raise ValueError(f"{folder}: not a VAE folder ({CONFIG_NAME} missing or not a "
                                 "VAE config); refusing to overwrite it") from None
        else:
            earlier = _folder_fingerprint(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    aside = folder.with_name(f".old-{folder.name}-{os.getpid()}")  # deleted once replaced
    moved_to = None  # where the earlier folder went
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed process of the same id
    try:
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        umask = os.umask(0)  # safetensors creates the file owner-only (0600): as other files
        os.umask(umask)
        os.chmod(tmp / WEIGHTS_NAME, 0o666 & ~umask)
        config = json.dumps(model.config.to_diffusers_dict(), indent=2) + "\n"
        (tmp / CONFIG_NAME).write_text(config)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with open(tmp / name, "rb") as file:
                os.fsync(file.fileno())
        if folder.exists():
            kept = None if earlier is None else kept_vae_folder(folder, earlier)
            keep = kept is not None and not kept.exists() and earlier != _folder_fingerprint(tmp)
            moved_to = kept if keep else aside  # aside: empty, the same VAE, or kept already
            os.rename(folder, moved_to)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_to is not None and moved_to.exists() and not folder.exists():
            os.rename(moved_to, folder)  # the earlier folder back where it was
        raise
    if moved_to == aside:
        shutil.rmtree(aside)
    elif moved_to is not None:
        print(f"{folder}: the VAE it held (fingerprint {earlier[:12]}) differs from the new one; "
              f"kept it in {moved_to}", flush=True)
    return folder


def vae_fingerprint(model: AutoencoderKL) -> str:
    """sha256 hex digest of the config and every tensor (name, dtype, shape, bytes), sorted by name.

    Any change to weights or config changes it; latent caches key their entries on it.
    """
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
