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

Speed (measured with `bench/train.py`). Each elementwise kernel is a pass over memory and, on a
CPU, a round trip through the thread pool, so q and k are normalised and rotated together by one
autograd node (`norm_rope`) whose closed-form backward runs about half the kernels autograd would
record for the same composition. SDPA reads q, k and v as strided views of the token-major qkv
layout and writes its output in that layout, so nothing between the two projections is copied.
Under `torch.compile` `norm_rope` hands the compiler the plain composition instead, which it fuses
better than the hand-written node.
"""

import torch
import torch.nn.functional as F
from torch import nn

ROPE_BASE = 100.0


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
    `apply_rope` is one swap of the halves and one fused multiply-add. Angles are computed in fp64
    and cast to `dtype` at the end. Callers cache the result per (height, width, device, dtype).
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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Swap the two halves of the last dimension: [x1, x2] -> [x2, x1] (its own inverse)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., D) by `rope_2d`'s tables broadcast to it; pair (i, i + D/2) turns together.

    x * cos + [x2, x1] * [-sin, sin]: one swap of the halves and one fused multiply-add.
    """
    return torch.addcmul(x * cos, rotate_half(x), sin)


class _NormRope(torch.autograd.Function):
    """y = apply_rope(x / sqrt(mean(x^2) + eps) * weight, cos, sin) as one autograd node.

    With xh = x * inv, inv = (mean(x^2) + eps)^-1/2, z = xh * weight and the rotation R (whose
    transpose is g -> g * cos + swap(g * sin), the swap being its own transpose):
        gz = R^T g,  g_weight = sum(gz * xh),  gxh = gz * weight,
        gx = inv * (gxh - xh * mean(gxh * xh)).
    Eleven elementwise kernels, about half of what autograd records for the composition.
    """

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        """See the class; cos and sin are None for no rotation."""
        # The reduction accumulates in fp32 even for bf16 x and rounds only its (..., 1) result
        # to x's dtype; asking for an fp32 result instead would copy all of x to fp32 on a CPU.
        stats = torch.promote_types(x.dtype, torch.float32)
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).to(stats)  # (..., 1)
        # mean square + eps, in place on the small tensor (no CPU scalar tensor: CUDA refuses
        # one as an operand here)
        inv = norm.square_().mul_(1 / x.shape[-1]).add_(eps).rsqrt_()
        inv = inv.to(x.dtype)  # (..., 1); scaling in x's dtype
        z = x * inv * weight
        # Save x rather than x * inv and recompute the latter in backward (one kernel): in
        # Attention x is a view of the qkv output, which v keeps alive anyway.
        ctx.save_for_backward(x, inv, weight, cos, sin)
        return z if cos is None else apply_rope(z, cos, sin)

    @staticmethod
    def backward(ctx, g):
        """Gradients for x and weight from the closed form in the class docstring."""
        x, inv, weight, cos, sin = ctx.saved_tensors
        xh = x * inv
        gz = g if cos is None else torch.addcmul(rotate_half(g * sin), g, cos)  # R^T g
        g_weight = None
        if ctx.needs_input_grad[1]:
            g_weight = (gz * xh).sum_to_size(weight.shape)
        gxh = gz * weight
        mean = (gxh * xh).mean(-1, keepdim=True)  # fp32 accumulation, as in forward
        gx = torch.addcmul(gxh, xh, mean, value=-1) * inv
        return gx, g_weight, None, None, None


def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RMSNorm of `x` (..., D) over its last dimension with scale `weight`, then RoPE if given.

    `weight` and the rope tables broadcast against `x` and share its dtype. The mean square is
    accumulated in fp32 straight from `x`; the result has x's dtype. `weight`'s gradient is summed
    over the dimensions it is broadcast along: give it the trailing shape of `x` (expanded and
    contiguous) to keep that reduction over whole rows.
    """
    cos, sin = rope if rope is not None else (None, None)
    if torch.compiler.is_compiling():
        # The compiler fuses the plain composition and chooses what to keep for backward itself;
        # tracing the hand-written node instead was 2 % (fp32) to 6 % (bf16) slower per dit-s/2
        # training step and kept 5 % more memory in bf16 (bench/train.py --compile, CPU).
        stats = torch.promote_types(x.dtype, torch.float32)
        inv = torch.rsqrt(x.to(stats).square().mean(-1, keepdim=True) + eps).to(x.dtype)
        z = x * inv * weight
        return z if cos is None else apply_rope(z, cos, sin)
    return _NormRope.apply(x, weight, cos, sin, eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale (see `norm_rope`)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise `x` (..., dim); the result has the dtype of `x`."""
        return norm_rope(x, self.weight.to(x.dtype), None, self.eps)


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
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend over the tokens `x` (B, N, dim); `rope` is `rope_2d`'s (cos, sin) for the grid;
        `mask` (B, N) bool, if given, leaves out the keys where it is False (padding)."""
        B, N, C = x.shape
        H, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x).view(B, N, 3, H, hd)  # (B, N, 3, heads, hd)
        qk, v = qkv.split([2, 1], dim=2)  # (B, N, 2, heads, hd), (B, N, 1, heads, hd): views
        # q and k are normalised and rotated together. Their scales are laid out like one token's
        # q and k, (2, heads, hd), so that they broadcast over (B, N) alone.
        weight = torch.stack((self.q_norm.weight, self.k_norm.weight))[:, None].expand(2, H, hd)
        if rope is not None:
            rope = (rope[0][:, None, None], rope[1][:, None, None])  # each (N, 1, 1, hd)
        qk = norm_rope(qk, weight.to(qk.dtype).contiguous(), rope, self.q_norm.eps)
        q, k = qk.unbind(2)  # each (B, N, heads, hd)
        # SDPA takes (B, heads, N, hd) views of the token-major layout and writes its output in
        # that layout too, so neither its inputs nor its output are copied.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)
        keep = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, heads, N, hd)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, heads*hd), a view
        return self.proj(out)

