"""KL autoencoder (the Stable Diffusion family VAE), weight-compatible with diffusers AutoencoderKL.

The module tree and state-dict names follow diffusers exactly, so a diffusers VAE folder loads with
no renaming and `save_vae` writes a folder diffusers can load. `load_vae` also reads the original
LDM / SGM / FLUX single-file layout (alone or inside a full model checkpoint) and converts it.

Shapes: images are (B, 3, H, W) in [-1, 1]; latents are (B, latent_channels, H / f, W / f) with
f = `downsample_factor`. Diffusion models see `normalize(latent)`; `denormalize` undoes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"

# Keys a diffusers AutoencoderKL config.json may hold that are not VAEConfig fields. The
# architecture-bearing ones (act_fn, block types) are checked against what this module builds.
_DIFFUSERS_ONLY_KEYS = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "act_fn",
    "down_block_types",
    "up_block_types",
}
# Per-channel latent statistics; both are set or neither (see VAEConfig).
_LATENT_STATS_KEYS = ("latents_mean", "latents_std")


@dataclass
class VAEConfig:
    """Architecture and latent normalisation of a KL autoencoder, in diffusers' config vocabulary.

    Defaults are the published SD-family layout (SD 1.x scale). `sample_size` is also the tile size
    in pixels for tiled encode/decode.

    Latent normalisation (`AutoencoderKL.normalize`) takes one of two forms, as in diffusers:
    - scalar: (latent - shift_factor) * scaling_factor, shift_factor None meaning 0 (SD, SDXL,
      SD3, FLUX.1);
    - per channel, when `latents_mean` and `latents_std` are set (one value per latent channel,
      e.g. Playground v2.5): (latent - latents_mean) * scaling_factor / latents_std. The two come
      together: diffusers' pipelines ignore one given alone, so a config holding only one is
      refused rather than silently normalised the scalar way. diffusers never applies
      shift_factor with them, so a non-zero shift_factor beside them is refused too.
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 256
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: list[float] | None = None  # (latent_channels,) per-channel mean, with std
    latents_std: list[float] | None = None  # (latent_channels,) per-channel std > 0, with mean
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must name at least one level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: block_out_channels {bad} are not divisible by "
                f"norm_num_groups={self.norm_num_groups}"
            )
        if not isinstance(self.sample_size, int) or self.sample_size < self.downsample_factor:
            raise ValueError(
                f"VAEConfig.sample_size must be an int >= the downsample factor "
                f"{self.downsample_factor}, got {self.sample_size!r}"
            )
        self._check_latent_stats()

    def _check_latent_stats(self) -> None:
        """Validate latents_mean / latents_std and store them as lists of floats."""
        given = [k for k in _LATENT_STATS_KEYS if getattr(self, k) is not None]
        if len(given) == 1:
            (missing,) = set(_LATENT_STATS_KEYS) - set(given)
            raise ValueError(
                f"VAEConfig.{given[0]} is set but {missing} is not; per-channel normalisation "
                f"needs both (diffusers ignores one given alone)"
            )
        if not given:
            return
        for key in _LATENT_STATS_KEYS:
            values = getattr(self, key)
            if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in values
            ):
                raise ValueError(
                    f"VAEConfig.{key} must be a list of finite numbers, got {values!r}"
                )
            if len(values) != self.latent_channels:
                raise ValueError(
                    f"VAEConfig.{key} must hold one value per latent channel "
                    f"({self.latent_channels}), got {len(values)}"
                )
            setattr(self, key, [float(v) for v in values])
        if any(v <= 0 for v in self.latents_std):
            raise ValueError(f"VAEConfig.latents_std entries must be > 0, got {self.latents_std}")
        if self.shift_factor:
            raise ValueError(
                f"VAEConfig.shift_factor {self.shift_factor} cannot be combined with latents_mean "
                f"/ latents_std (the per-channel mean is the shift); leave it null"
            )

    def latent_affine(self) -> tuple[list[float], list[float]]:
        """(shift, scale), one value per latent channel: `normalize` is (latent - shift) * scale.

        The same map in either form of normalisation, for code that normalises latents without
        the model (the latent cache's reader).
        """
        if self.latents_mean is not None and self.latents_std is not None:
            return list(self.latents_mean), [self.scaling_factor / s for s in self.latents_std]
        return ([self.shift_factor or 0.0] * self.latent_channels,
                [self.scaling_factor] * self.latent_channels)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> VAEConfig:
        """Build a config from our fields or a diffusers AutoencoderKL config.json dict.

        Diffusers-only keys are accepted and checked for consistency; any other key is an error.
        `source` names the file in error messages.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields - _DIFFUSERS_ONLY_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown VAE config keys {unknown}")
        class_name = data.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"{source}: expected an AutoencoderKL config, got {class_name!r}")
        if data.get("act_fn", "silu") != "silu":
            raise ValueError(f"{source}: only act_fn 'silu' is supported, got {data['act_fn']!r}")
        levels = len(data.get("block_out_channels", cls.block_out_channels))
        for key, expected in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            if key in data and list(data[key]) != [expected] * levels:
                raise ValueError(
                    f"{source}: {key} must be {levels} x {expected!r}, got {data[key]!r}"
                )
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: invalid VAE config: {err}") from err

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        """Read a config.json (ours or diffusers')."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """Our fields as plain JSON data; latents_mean / latents_std only when set.

        Leaving the unset statistics out keeps the JSON, and so `vae_fingerprint`, of configs
        without them what it was before these fields existed.
        """
        data = dataclasses.asdict(self)
        data["block_out_channels"] = list(self.block_out_channels)
        for key in _LATENT_STATS_KEYS:
            if data[key] is None:
                del data[key]
        return data

    def to_diffusers_dict(self) -> dict[str, Any]:
        """A config.json that diffusers' AutoencoderKL.from_pretrained accepts."""
        levels = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            **self.to_dict(),
        }


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from the encoder's moments (B, 2C, h, w)."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        """Standard deviation, exp(logvar / 2)."""
        return torch.exp(0.5 * self.logvar)

    def sample(
        self, generator: torch.Generator | None = None, part: tuple[int, int] = (0, 1)
    ) -> Tensor:
        """Draw mean + std * noise; the noise comes from `generator` (on its device) if given.

        Under torchrun, with `part` = (rank, world size), this batch of B is one rank's slice
        of a global batch: the noise is drawn for all world size × B samples and this rank
        keeps rows rank·B to (rank + 1)·B, so training does not depend on how its batch is
        split across processes.
        """
        (rank, world), B = part, self.mean.shape[0]
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(
            (world * B, *self.mean.shape[1:]), generator=generator, device=noise_device,
            dtype=self.mean.dtype,
        )[rank * B:(rank + 1) * B].to(self.mean.device)  # (B, C, h, w)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(posterior || N(0, I)) summed over latent elements, one value per sample: (B,)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)  # (B, C, h, w)
        return kl.flatten(1).sum(1)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        # In place where autograd allows (norm and conv outputs are not needed for backward):
        # fewer large allocations measurably speed up CPU inference.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad: (B, C, H+1, W+1)


# Nearest x2 then a 3x3 conv equals, per output phase (row parity a, column parity b), a 2x2 conv
# on the low-resolution input: of the three taps along an axis, phase 0 reads the previous low-res
# pixel with tap 0 and the current one with taps 1 + 2; phase 1 reads the current one with taps
# 0 + 1 and the next one with tap 2. _FOLD[phase, low_res_tap, tap] holds that assignment.
_FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W).

    On CPU it runs as one 2x2 conv producing all four output phases at low resolution (16 instead
    of 36 multiply-adds per output pixel and channel pair; bench/vae.py: upsamplers ~1.8x faster),
    then interleaves them. Elsewhere it runs as written (unmeasured there; cuDNN may already use
    Winograd for 3x3 convs).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        b, c, h, w = x.shape
        weight = self.conv.weight  # (C_out, C, 3, 3), taps over the upsampled grid
        fold = _FOLD.to(weight.device, torch.float32)
        kernel = torch.einsum("ary,bsx,ocyx->abocrs", fold, fold, weight.float())
        kernel = kernel.reshape(4 * weight.shape[0], c, 2, 2).to(weight.dtype)  # (4*C_out, C, 2, 2)
        phases = F.conv2d(x, kernel, self.conv.bias.repeat(4), padding=1)  # (B, 4*C_out, H+1, W+1)
        phases = phases.unflatten(1, (2, 2, -1))  # (B, 2, 2, C_out, H+1, W+1)
        out = phases.new_empty(b, h, 2, w, 2, phases.shape[3])  # (B, H, 2, W, 2, C_out)
        for row in (0, 1):  # phase `row` of low-res row i sits at padded position i + row
            for col in (0, 1):
                phase = phases[:, row, col, :, row : row + h, col : col + w]  # (B, C_out, H, W)
                out[:, :, row, :, col] = phase.permute(0, 2, 3, 1)  # (B, H, W, C_out)
        return out.view(b, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)  # (B, C_out, 2H, 2W), NHWC memory


class SelfAttention(nn.Module):
    """One attention head over all pixels, head dim = C, with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = _group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        h, w = x.shape[2:]
        tokens = self.group_norm(x).permute(0, 2, 3, 1).flatten(1, 2)  # (B, H*W, C)
        q = self.to_q(tokens).unsqueeze(1)  # (B, 1, H*W, C): one head
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C)
        out = self.to_out[0](out).unflatten(1, (h, w)).permute(0, 3, 1, 2)  # (B, C, H, W) view
        return x + out


class MidBlock(nn.Module):
    """Resnet, optional self-attention, resnet, all at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w)
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    """`num_layers` resnets, then an optional Downsample."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, down: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if down else [])

    def forward(self, x: Tensor) -> Tensor:
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class UpBlock(nn.Module):
    """`num_layers` resnets, then an optional Upsample."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, up: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if up else [])

    def forward(self, x: Tensor) -> Tensor:
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block, groups, i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.mid_block = MidBlock(chs[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(chs[-1], groups)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, chs[0], H, W)
        for block in self.down_blocks:
            x = block(x)  # halves H, W on every level but the last
        x = self.mid_block(x)  # (B, chs[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))  # (B, 2*lat, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(chs[max(i - 1, 0)], ch, cfg.layers_per_block + 1, groups, i < len(chs) - 1)
            for i, ch in enumerate(chs)
        )
        self.conv_norm_out = _group_norm(chs[-1], groups)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))  # (B, chs[0], h, w)
        for block in self.up_blocks:
            x = block(x)  # doubles h, w on every level but the last
        return self.conv_out(F.silu(self.conv_norm_out(x), inplace=True))  # (B, 3, h*f, w*f)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder with diffusers' AutoencoderKL module tree and parameter names."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent pixel along each side: 2 ** (levels - 1)."""
        return self.config.downsample_factor

    # --- core passes (run in the compute dtype, see _in_compute_dtype) ----------------------
    def _moments(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 2 * latent, H/f, W/f)
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _decode(self, z: Tensor) -> Tensor:  # (B, latent, h, w) -> (B, 3, h*f, w*f)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _in_compute_dtype(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Run fn on x in the compute dtype and layout; return a contiguous result in x's dtype.

        With `force_upcast` the compute is fp32 with autocast off (fp16 overflows in these VAEs),
        which needs fp32 weights. Otherwise x is cast to the weights' dtype and an enclosing
        autocast region applies as usual. On CPU the activations run channels_last (oneDNN's
        native layout; bench/vae.py measured decode about 9% faster, encode about 3%).
        """
        upcast, weight_dtype = self.config.force_upcast, self.encoder.conv_in.weight.dtype
        if upcast and weight_dtype != torch.float32:
            raise RuntimeError(
                f"this VAE's config sets force_upcast, so it computes in float32, but its weights "
                f"are {weight_dtype}; call .float() on it or set config.force_upcast = False"
            )
        layout = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
        guard = torch.autocast(x.device.type, enabled=False) if upcast else contextlib.nullcontext()
        with guard:
            out = fn(x.to(torch.float32 if upcast else weight_dtype, memory_format=layout))
        return out.to(x.dtype, memory_format=torch.contiguous_format)

    # --- public API -------------------------------------------------------------------------
    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior over latents for images x (B, 3, H, W) in [-1, 1]."""
        return DiagonalGaussian(self._in_compute_dtype(self._moments, x))

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, 3, h*f, w*f) from raw (denormalised) latents z (B, latent, h, w)."""
        return self._in_compute_dtype(self._decode, z)

    def encode_tiled(self, x: Tensor) -> DiagonalGaussian:
        """Like `encode`, in overlapping tiles of `sample_size` pixels blended linearly.

        Memory stays bounded for large images; an image that fits in one tile gives exactly the
        result of `encode`. H and W must be multiples of `downsample_factor`.
        """
        tiled = partial(
            _run_tiled, self._moments, tile=self._latent_tile, in_scale=self.downsample_factor
        )
        return DiagonalGaussian(self._in_compute_dtype(tiled, x))

    def decode_tiled(self, z: Tensor) -> Tensor:
        """Like `decode`, in overlapping tiles of `sample_size / f` latent pixels blended linearly.

        A latent that fits in one tile gives exactly the result of `decode`.
        """
        tiled = partial(
            _run_tiled, self._decode, tile=self._latent_tile, out_scale=self.downsample_factor
        )
        return self._in_compute_dtype(tiled, z)

    @property
    def _latent_tile(self) -> int:
        return self.config.sample_size // self.downsample_factor

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (or its mode); returns (recon, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _affine(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """`VAEConfig.latent_affine` as (shift, scale), each (C, 1, 1) on latent's device in at
        least float32, broadcasting over (..., C, h, w) latents."""
        channels = self.config.latent_channels
        if latent.ndim < 3 or latent.shape[-3] != channels:
            raise ValueError(f"latent {tuple(latent.shape)}: expected (..., {channels}, h, w)")
        dtype = torch.promote_types(latent.dtype, torch.float32)
        shift, scale = (torch.tensor(v, dtype=dtype, device=latent.device).view(-1, 1, 1)
                        for v in self.config.latent_affine())
        return shift, scale  # (C, 1, 1) each

    def normalize(self, latent: Tensor) -> Tensor:
        """Raw latent (..., C, h, w) -> the diffusion model's space, same shape and dtype:
        (latent - shift) * scale per channel (`VAEConfig.latent_affine`: the scalar shift and
        scaling factor, or diffusers' per-channel statistics), computed in at least float32."""
        shift, scale = self._affine(latent)
        return ((latent.to(shift.dtype) - shift) * scale).to(latent.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """Diffusion model's space (..., C, h, w) -> raw latent for `decode`, same shape and dtype:
        z / scale + shift, the inverse of `normalize`."""
        shift, scale = self._affine(z)
        return (z.to(shift.dtype) / scale + shift).to(z.dtype)


# --- tiling ------------------------------------------------------------------------------------
def _tile_starts(length: int, tile: int) -> list[int]:
    """Evenly spread starts of tiles covering [0, length), neighbours overlapping >= tile // 4."""
    if length <= tile:
        return [0]
    overlap = tile // 4
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _blend_weights(starts: list[int], tile: int, length: int, scale: int) -> list[Tensor]:
    """Per-tile 1D weights in output units (scale per grid unit): 1 inside, linear ramps across
    each overlap with a neighbouring tile, so two overlapping tiles' weights sum to 1."""
    size = min(tile, length) * scale
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(size)
        if i > 0:  # ramp up across the overlap with the previous tile
            n = (starts[i - 1] + tile - start) * scale
            w[:n] = torch.minimum(w[:n], torch.arange(1, n + 1) / (n + 1))
        if i < len(starts) - 1:  # ramp down across the overlap with the next tile
            n = (start + tile - starts[i + 1]) * scale
            w[size - n :] = torch.minimum(w[size - n :], torch.arange(n, 0, -1) / (n + 1))
        weights.append(w)
    return weights


def _run_tiled(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, in_scale: int = 1, out_scale: int = 1
) -> Tensor:
    """Apply fn tile by tile and blend. Tiles are laid out on the latent grid: `tile` latent
    pixels, which are `in_scale` units of x and `out_scale` units of fn's output each."""
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale  # latent grid size
    if x.shape[-2] % in_scale or x.shape[-1] % in_scale:
        raise ValueError(
            f"tiled VAE input {tuple(x.shape)}: H and W must be multiples of {in_scale}"
        )
    if height <= tile and width <= tile:
        return fn(x)
    rows, cols = _tile_starts(height, tile), _tile_starts(width, tile)
    row_w = _blend_weights(rows, tile, height, out_scale)
    col_w = _blend_weights(cols, tile, width, out_scale)
    th, tw = min(tile, height), min(tile, width)
    out = weight_sum = None
    for r, wr in zip(rows, row_w):
        for c, wc in zip(cols, col_w):
            rows_in = slice(r * in_scale, (r + th) * in_scale)
            cols_in = slice(c * in_scale, (c + tw) * in_scale)
            piece = fn(x[..., rows_in, cols_in])  # (B, C_out, th * out_scale, tw * out_scale)
            if out is None:  # (B, C_out, height * out_scale, width * out_scale)
                out = piece.new_zeros(*piece.shape[:2], height * out_scale, width * out_scale)
                weight_sum = piece.new_zeros(height * out_scale, width * out_scale)
            w = (wr[:, None] * wc[None, :]).to(piece)  # (th * out_scale, tw * out_scale)
            rs = slice(r * out_scale, (r + th) * out_scale)
            cs = slice(c * out_scale, (c + tw) * out_scale)
            out[..., rs, cs] += piece * w
            weight_sum[rs, cs] += w
    return out / weight_sum


# --- loading and saving ------------------------------------------------------------------------
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
