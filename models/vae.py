"""KL autoencoder (the Stable Diffusion family VAE), weight-compatible with diffusers AutoencoderKL.

This module holds the config (`VAEConfig`, in diffusers' config vocabulary), the modules, whose
tree and state-dict names follow diffusers exactly, the posterior, encode / decode with latent
normalisation, and tiled encode / decode. Reading and writing weights (diffusers folders, original
LDM / SGM / FLUX single files, `load_vae`, `save_vae`, `vae_fingerprint`) lives in
models/vae_weights.py.

Shapes: images are (B, 3, H, W) in [-1, 1]; latents are (B, latent_channels, H / f, W / f) with
f = `downsample_factor`. Diffusion models see `normalize(latent)`; `denormalize` undoes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.tiling import run_tiled

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

    def encode_tiled(self, x: Tensor, progress: bool = False) -> DiagonalGaussian:
        """Like `encode`, in overlapping tiles of `sample_size` pixels blended linearly
        (`models/tiling.py`), with a bar over the tiles when `progress`.

        Memory stays bounded for large images; an image that fits in one tile gives exactly the
        result of `encode`. H and W must be multiples of `downsample_factor`.
        """
        tiled = partial(run_tiled, self._moments, tile=self._latent_tile,
                        in_scale=self.downsample_factor, progress=progress and "encoding tiles")
        return DiagonalGaussian(self._in_compute_dtype(tiled, x))

    def decode_tiled(self, z: Tensor, progress: bool = False) -> Tensor:
        """Like `decode`, in overlapping tiles of `sample_size / f` latent pixels blended linearly,
        with a bar over the tiles when `progress`.

        A latent that fits in one tile gives exactly the result of `decode`.
        """
        tiled = partial(run_tiled, self._decode, tile=self._latent_tile,
                        out_scale=self.downsample_factor, progress=progress and "decoding tiles")
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
