"""Diffusion transformer on latents: patchify, adaLN-Zero blocks with 2D RoPE attention, unpatchify.

The model predicts the rectified-flow velocity v = noise - x0 (see `training/flow.py`). Tokens are
patches of the latent in row-major order; positions enter only through the rotary tables, so any
latent whose sides are multiples of the patch size runs with the same weights.
"""

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.attention import ROPE_BASE, Attention, rope_2d
from models.conditioning import (ByteTextEncoder, ClassCondition, TextBatch, TextCondition,
                                 byte_condition, pool_words)

TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features fed to the timestep MLP
TIMESTEP_SCALE = 1000.0  # t in [0, 1] is scaled to [0, 1000] before the sinusoid


@dataclass(kw_only=True)
class DiTConfig:
    """Architecture of a DiT. `num_classes = 0` is unconditional (only the null class exists)."""

    hidden_size: int
    depth: int
    num_heads: int
    in_channels: int = 4  # latent channels
    patch_size: int = 2  # latent pixels per token side
    mlp_ratio: float = 4.0  # MLP hidden width / hidden_size
    num_classes: int = 0  # real classes; index num_classes is the null class for CFG
    rope_base: float = ROPE_BASE  # frequency base of the 2D rotary embedding
    # Text conditioning (joint attention over image and caption tokens; see `DiT`): "" none,
    # "builtin" (byte encoder trained with the model, `models/conditioning.ByteTextEncoder`) or
    # "frozen" (features of a frozen encoder, `training/text_encoders.py`, of width text_dim).
    text: str = ""
    text_dim: int = 0  # frozen: width of the encoder's token features
    text_pooled_dim: int = 0  # frozen: width of its pooled output (CLIP), 0 when it has none
    text_max_length: int = 0  # builtin: most tokens (bytes + 1) a caption keeps
    text_depth: int = 1  # builtin: transformer blocks of the byte encoder
    # builtin: the caption tokens the DiT attends to, "words" (the encoder's byte states averaged
    # per word, `models/conditioning.pool_words`) or "bytes" (every byte state: the models
    # before 2026-12-08, whose configs lack the key, load as that)
    text_tokens: str = "words"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"DiTConfig: hidden_size {self.hidden_size} / num_heads {self.num_heads} must be "
                "a head dimension divisible by 4 (2D RoPE)"
            )
        if min(self.depth, self.in_channels, self.patch_size) < 1 or self.num_classes < 0:
            raise ValueError(f"DiTConfig: depth, in_channels, patch_size must be >= 1: {self}")
        if self.text not in ("", "builtin", "frozen"):
            raise ValueError(f"DiTConfig: text must be '', 'builtin' or 'frozen', not "
                             f"{self.text!r}")
        if self.text and self.num_classes:
            raise ValueError("DiTConfig: a model is conditioned on classes or on text, not both")
        if self.text == "frozen" and self.text_dim < 1:
            raise ValueError("DiTConfig: a frozen text encoder needs text_dim >= 1")
        if self.text_tokens not in ("words", "bytes"):
            raise ValueError(f"DiTConfig: text_tokens must be 'words' or 'bytes', not "
                             f"{self.text_tokens!r}")
        if self.text == "builtin" and min(self.text_max_length, self.text_depth) < 1:
            raise ValueError("DiTConfig: the built-in text encoder needs text_max_length and "
                             "text_depth >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiTConfig":
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"DiTConfig: unknown keys {unknown}; expected a subset of {sorted(known)}"
            )
        if data.get("text") == "builtin" and "text_tokens" not in data:
            data = {**data, "text_tokens": "bytes"}  # saved before word pooling existed
        return cls(**data)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with shift and scale (B, 1, hidden) broadcast over tokens.

    Computed in the dtype of shift and scale: under autocast that is the autocast dtype, so the
    normalised x is cast once here (instead of the result being cast by the next Linear) and the
    copy kept for backward is half the size.
    """
    return torch.addcmul(shift, x.to(shift.dtype), 1 + scale)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t * 1000 followed by a two-layer MLP."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed t (B,) in [0, 1] as (B, hidden)."""
        half = TIMESTEP_FREQ_DIM // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        angles = (t.float() * TIMESTEP_SCALE)[:, None] * freqs  # (B, half)
        return self.mlp(torch.cat((angles.cos(), angles.sin()), dim=-1))  # (B, hidden)


class _GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias) that keeps h but not gelu(h) for backward.

    The MLP's hidden activations are the largest tensors a block saves (4x the width). Autograd
    would keep both h (for GELU's backward) and gelu(h) (for the second linear's weight
    gradient). Recomputing gelu(h) in backward costs one elementwise pass, about 1 % of a
    dit-s/2 step, and lowers its peak training memory at batch 16 from 2.57 to 2.41 GB in fp32
    and from 1.85 to 1.67 GB in bf16 (`bench/train.py`). Computed in h's dtype with the
    parameters cast to it, as autocast would for the linear alone.
    """

    @staticmethod
    def forward(ctx, h, weight, bias):
        """h (..., hidden) -> (..., out)."""
        ctx.save_for_backward(h, weight)
        with torch.autocast(h.device.type, enabled=False):
            return F.linear(F.gelu(h), weight.to(h.dtype), bias.to(h.dtype))

    @staticmethod
    def backward(ctx, g):
        """Gradients for h, weight and bias; g has h's dtype."""
        h, weight = ctx.saved_tensors
        a = F.gelu(h)  # recomputed (..., hidden)
        g_rows, a_rows = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])
        g_weight = (g_rows.t() @ a_rows).to(weight.dtype)  # (out, hidden)
        g_bias = g_rows.sum(0).to(weight.dtype)
        g_h = torch.ops.aten.gelu_backward(g @ weight.to(h.dtype), h)
        return g_h, g_weight, g_bias


class MLP(nn.Module):
    """Linear, exact GELU, linear; GELU's output is recomputed in backward (`_GeluLinear`).

    Exact (erf) GELU rather than DiT's tanh approximation: the same function to within 1e-3,
    and on CPUs 3x cheaper forward and 2x backward (bench/train.py, bench/sample.py).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        if torch.compiler.is_compiling():  # the compiler decides what to recompute itself
            return self.fc2(F.gelu(self.fc1(x)))
        return _GeluLinear.apply(self.fc1(x), self.fc2.weight, self.fc2.bias)


# Older checkpoints' keys: before `MLP` existed, a block's MLP was an nn.Sequential, whose
# layers 0 and 2 are today's fc1 and fc2 (the timestep embedder's nn.Sequential is unchanged).
_SEQUENTIAL_MLP = re.compile(r"^(blocks\.\d+\.mlp\.)([02])\.")


def _no_encoder(captions: list[str]) -> list:
    raise RuntimeError("this DiT reads a frozen text encoder's features: attach a "
                       "TextCondition that encodes captions (training/text_encoders.py)")


def upgrade_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DiT state dict (model weights or their EMA) with older checkpoints' keys renamed to
    today's layout; today's keys pass through unchanged."""
    def rename(match: re.Match) -> str:
        return f"{match[1]}fc{1 if match[2] == '0' else 2}."

    return {_SEQUENTIAL_MLP.sub(rename, key): value for key, value in state_dict.items()}


class DiTBlock(nn.Module):
    """Pre-norm transformer block; adaLN-Zero gives shift, scale and gate for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, mlp_hidden)
        self.modulation = nn.Linear(hidden_size, 6 * hidden_size)  # applied to SiLU(c)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, hidden), c = SiLU(conditioning) (B, hidden), cos/sin (N, head_dim); `mask`
        (B, N) bool leaves padded tokens out as keys (a caption's padding)."""
        mods = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)  # 6 x (B, 1, hidden)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods
        attn = self.attn(modulate(self.norm1(x), shift_a, scale_a), (cos, sin),
                         mask)  # (B, N, hidden)
        x = torch.addcmul(x, gate_a, attn)  # x + gate * attn
        mlp = self.mlp(modulate(self.norm2(x), shift_m, scale_m))  # (B, N, hidden)
        x = torch.addcmul(x, gate_m, mlp)
        return x  # (B, N, hidden)


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its p x p x C patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(hidden_size, 2 * hidden_size)  # applied to SiLU(c)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, hidden), c = SiLU(conditioning) (B, hidden) -> (B, N, p*p*C)."""
        shift, scale = self.modulation(c).unsqueeze(1).chunk(2, dim=-1)  # 2 x (B, 1, hidden)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Conditional diffusion transformer: `forward(x, t, cond) -> v` on latents (B, C, H, W)
    (`cond` as `models/conditioning.py` describes).

    Class labels enter adaLN through a label table. A caption (`config.text`) enters twice: a
    pooled vector joins the timestep in adaLN, and its tokens join the image tokens in every
    block's self-attention (joint attention with shared weights, as in-context conditioning;
    SD3's MMDiT gives the text its own weights). The caption's tokens carry no rotation and
    leave the sequence after the last block. Measured against cross-attention after
    self-attention (PixArt-α) on the synthetic captions at equal training time (dit-xs/2,
    128 px, 900 s on one CPU thread): the same samples/s, family accuracy 0.56 vs 0.48 and
    validation loss 0.363 vs 0.402 (docs/text.md).
    """

    def __init__(self, config: DiTConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        hidden, p = config.hidden_size, config.patch_size
        self.head_dim = hidden // config.num_heads
        self.gradient_checkpointing = gradient_checkpointing  # recompute blocks in backward
        self.x_embed = nn.Conv2d(config.in_channels, hidden, kernel_size=p, stride=p)
        self.t_embed = TimestepEmbedder(hidden)
        text = config.text
        # what `cond` is, and its null (a frozen encoder's is attached by whoever loads it)
        self.condition: ClassCondition | TextCondition = ClassCondition(config.num_classes)
        if not text:
            self.y_embed = nn.Embedding(config.num_classes + 1, hidden)  # last row: null class
        else:
            if text == "builtin":
                self.text = ByteTextEncoder(hidden, config.text_depth, config.num_heads,
                                            config.text_max_length)
                self.condition = byte_condition(config.text_max_length)
            else:
                self.condition = TextCondition(_no_encoder, {"kind": "frozen"})
            width = hidden if text == "builtin" else config.text_dim
            # caption tokens -> the model's width: normalised, then one linear map. Not
            # PixArt-α's two-layer GELU MLP: early in training, before the captions carry
            # anything the model can use, that MLP's units all went negative and stayed dead
            # (pre-activations about -5 at step 2600 of the text quickstart), cutting the
            # caption off for good; a linear map cannot die.
            self.text_proj = nn.Sequential(nn.LayerNorm(width, elementwise_affine=False),
                                           nn.Linear(width, hidden))
            # always-valid first context token: the empty caption attends to it alone
            self.text_register = nn.Parameter(torch.zeros(1, 1, hidden))
            # the caption as one vector for adaLN: a frozen CLIP's pooled output, else the
            # mean of the projected tokens
            self.text_pool = nn.Linear(config.text_pooled_dim or hidden, hidden)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden, config.num_heads, config.mlp_ratio)
            for _ in range(config.depth)
        )
        self.final = FinalLayer(hidden, p, config.in_channels)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation; adaLN modulations and the output layer start at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.x_embed.weight.view(self.config.hidden_size, -1))
        nn.init.zeros_(self.x_embed.bias)
        if self.config.text:
            nn.init.normal_(self.text_register, std=0.02)
            if self.config.text == "builtin":  # its own initialisation, after the loop above
                self.text.reset_parameters()
        else:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [block.modulation for block in self.blocks] + [
            self.final.modulation,
            self.final.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _rope(
        self, h: int, w: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables for an h x w token grid, built once per (h, w, device, dtype)."""
        key = (h, w, device, dtype)
        if key not in self._rope_cache:
            base = self.config.rope_base
            self._rope_cache[key] = rope_2d(h, w, self.head_dim, device, dtype, base)
        return self._rope_cache[key]

    def _check_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"DiT: latent size {height}x{width} is not a multiple of patch {p}")
        return height // p, width // p

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Velocity for latents x (B, C, H, W) at times t (B,) in [0, 1] with the condition
        `cond`: class labels (B,) (`models/conditioning.py: ClassCondition`).

        `cond=None` means the null condition for every sample (unconditional).
        """
        B, C, H, W = x.shape
        h, w = self._check_size(H, W)
        p = self.config.patch_size
        tokens = self.x_embed(x).flatten(2).transpose(1, 2)  # (B, N, hidden) view, N = h*w
        # A contiguous residual stream (else every LayerNorm copies its input), kept in the
        # parameters' dtype (fp32 under autocast, where the patch conv returns bf16).
        tokens = tokens.contiguous().to(self.x_embed.weight.dtype)
        if t.ndim == 0:
            t = t.expand(B)
        if cond is None:
            cond = self.condition.null(B, x.device)
        mask = None
        if self.config.text:
            ctx, ctx_mask, pooled = self._context(cond)  # (B, T, hidden), (B, T), (B, hidden)
            c = F.silu(self.t_embed(t) + pooled)  # (B, hidden), SiLU shared by adaLNs
        else:
            c = F.silu(self.t_embed(t) + self.y_embed(cond))  # (B, hidden)
        # Tables in the dtype q and k will have: the autocast dtype, else the parameters' dtype.
        device = tokens.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else tokens.dtype
        cos, sin = self._rope(h, w, device, dtype)  # each (N, head_dim)
        if self.config.text:
            # Joint attention: the caption's T tokens join the image tokens' sequence, unrotated
            # (cos 1, sin 0), their padding masked as keys, through the same blocks.
            n_text = ctx.shape[1]
            tokens = torch.cat([tokens, ctx.to(tokens.dtype)], dim=1)  # (B, N+T, hidden)
            cos = torch.cat([cos, cos.new_ones(n_text, cos.shape[1])])  # (N+T, head_dim)
            sin = torch.cat([sin, sin.new_zeros(n_text, sin.shape[1])])
            mask = torch.cat([ctx_mask.new_ones(B, h * w), ctx_mask], dim=1)  # (B, N+T)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, cos, sin, mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, cos, sin, mask)
        tokens = tokens[:, :h * w]  # the image tokens (B, N, hidden)
        out = self.final(tokens, c)  # (B, N, p*p*C)
        out = out.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return out.reshape(B, C, H, W)

    def _context(self, cond: TextBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A caption batch as tokens for joint attention: (tokens (B, T, hidden), T = 1 + L,
        with the register first, their mask (B, T), the pooled vector (B, hidden) for adaLN).
        L: a frozen encoder's tokens, or the built-in encoder's words (`text_tokens`). Padded
        positions change nothing: they are masked in attention and left out of the mean."""
        mask = cond.mask  # (B, L)
        features = cond.tokens  # (B, L) byte ids or (B, L, D) frozen features
        if self.config.text == "builtin":
            states = self.text(features, mask)  # (B, L, hidden) byte states
            features, mask = (pool_words(states, features, mask)  # (B, W, hidden), (B, W)
                              if self.config.text_tokens == "words" else (states, mask))
        ctx = self.text_proj(features.to(self.text_register.dtype))  # (B, L, hidden)
        B = ctx.shape[0]
        ctx = torch.cat([self.text_register.expand(B, 1, -1).to(ctx.dtype), ctx], dim=1)
        mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # (B, 1+L)
        if self.config.text_pooled_dim:
            pooled = cond.pooled.to(self.text_register.dtype)  # (B, P)
        else:
            weights = mask[..., None].to(ctx.dtype)  # (B, 1+L, 1)
            pooled = (ctx * weights).sum(1) / weights.sum(1)  # (B, hidden)
        return ctx, mask, self.text_pool(pooled)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True,
                        assign: bool = False) -> Any:
        """nn.Module.load_state_dict, also of older checkpoints (`upgrade_state_dict`)."""
        return super().load_state_dict(upgrade_state_dict(state_dict), strict=strict,
                                       assign=assign)

    def compile_blocks(self) -> None:
        """`torch.compile` each transformer block in place (regional compilation).

        The blocks are identical, so they share one compiled graph: compiling takes seconds
        instead of minutes for deep models, the rotary-table cache and the code around the blocks
        stay eager (compiling the whole model recompiles when that cache changes), and parameter
        names are unchanged, so checkpoints load either way.
        """
        for block in self.blocks:
            block.compile()

    def flops_per_sample(self, height: int, width: int) -> int:
        """Forward FLOPs for one latent of height x width: 2 x multiply-adds of every matmul.

        Counts the patch embedding, timestep MLP, adaLN modulations, qkv, QK^T, AV, output
        projection, MLP and final layer; elementwise work (norms, RoPE, softmax) is left out.
        A training step (forward + backward) costs about three times this.
        """
        h, w = self._check_size(height, width)
        cfg = self.config
        n, d, patch_dim = h * w, cfg.hidden_size, cfg.patch_size**2 * cfg.in_channels
        mlp = int(d * cfg.mlp_ratio)
        macs = n * patch_dim * d + TIMESTEP_FREQ_DIM * d + d * d  # patch embed, timestep MLP
        block = 6 * d * d + n * (3 * d * d + d * d + 2 * d * mlp) + 2 * n * n * d  # attn: QK^T, AV
        macs += cfg.depth * block
        macs += 2 * d * d + n * d * patch_dim  # final adaLN and linear
        return 2 * macs
