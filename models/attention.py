"""The shared attention block: RMSNorm, 2D axial rotary position embedding, self-attention.

RoPE layout. A head of dimension D is rotated as D/2 pairs (i, i + D/2) ("rotate half" layout, so
no interleaving gathers are needed). The first D/4 pairs rotate with the token's row index, the
last D/4 with its column index: half of the head dimension encodes rows, half columns. Positions
are integer token coordinates, so any h x w grid works and q.k depends only on the offset between
two tokens.

Frequency base: 100 rather than the 10000 of 1D language models (`ROPE_BASE`). The frequencies
per axis are base^(-j / (D/4)), j = 0 .. D/4 - 1. Latent grids have tens, at most a few hundred,
tokens a side; with base 10000 and D = 64 the slowest quarter of each axis' frequencies turns by
under 0.13 rad across a whole 128-token row and carries almost no position signal. Base 100
spreads the wavelengths from 2*pi to about 2*pi * 75 tokens, which covers the bucket sizes we
train on (axial RoPE for ViTs, Heo et al. 2024, makes the same choice).
"""

import torch
import torch.nn.functional as F
from torch import nn

ROPE_BASE = 100.0


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `x` (..., dim); the result has the dtype of `x`."""
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def rope_2d(
    height: int,
    width: int,
    head_dim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    base: float = ROPE_BASE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (cos, sin), each (height*width, head_dim), for a row-major grid of tokens.

    `sin` carries the sign of the rotation: its first half is -sin, its second +sin, so that
    `apply_rope` is one roll and one fused multiply-add. Angles are computed in fp64 and cast to
    `dtype` at the end. Callers cache the result per (height, width, device, dtype).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    # Build as ordinary tensors even when called under torch.inference_mode(): callers cache
    # these tables, and an inference tensor could not later be saved for backward in training.
    with torch.inference_mode(False), torch.no_grad():
        freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
        rows = torch.arange(height, dtype=torch.float64, device=device)
        cols = torch.arange(width, dtype=torch.float64, device=device)
        row_angles = (rows[:, None] * freqs).unsqueeze(1).expand(height, width, quarter)
        col_angles = (cols[:, None] * freqs).unsqueeze(0).expand(height, width, quarter)
        angles = torch.cat((row_angles, col_angles), dim=-1).reshape(height * width, 2 * quarter)
        cos = angles.cos().repeat(1, 2)  # (N, D)
        sin = torch.cat((-angles.sin(), angles.sin()), dim=-1)  # (N, D)
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., N, D) by `rope_2d`'s tables (N, D); pair (i, i + D/2) turns together."""
    # x.roll puts x2 in the first half and x1 in the second: x*cos + [x2, x1]*[-sin, sin].
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv, per-head QK RMSNorm, 2D RoPE, SDPA, projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Attend over the tokens `x` (B, N, dim); `rope` is `rope_2d`'s (cos, sin) for the grid."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim), views
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, heads*head_dim)
        return self.proj(out)
