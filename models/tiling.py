"""Tiled encoding and decoding: a VAE applied tile by tile to images too large to run whole.

Tiles of the VAE's `sample_size` pixels overlap by a quarter and are blended linearly across the
overlap, so the seams do not show; each tile normalises on its own, so flat regions can shift
tone between tiles. An image that fits in one tile gives exactly the untiled result.
`models/vae.py` (`AutoencoderKL.encode_tiled`, `decode_tiled`) calls `run_tiled`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm import tqdm


def tile_starts(length: int, tile: int) -> list[int]:
    """Evenly spread starts of tiles covering [0, length), neighbours overlapping >= tile // 4."""
    if length <= tile:
        return [0]
    overlap = tile // 4
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_weights(starts: list[int], tile: int, length: int, scale: int) -> list[Tensor]:
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


def run_tiled(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, in_scale: int = 1, out_scale: int = 1,
    progress: str | None = None,
) -> Tensor:
    """Apply fn tile by tile and blend. Tiles are laid out on the latent grid: `tile` latent
    pixels, which are `in_scale` units of x and `out_scale` units of fn's output each.
    `progress`, when given, is the description of a progress bar over the tiles."""
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale  # latent grid size
    if x.shape[-2] % in_scale or x.shape[-1] % in_scale:
        raise ValueError(
            f"tiled VAE input {tuple(x.shape)}: H and W must be multiples of {in_scale}"
        )
    if height <= tile and width <= tile:
        return fn(x)
    rows, cols = tile_starts(height, tile), tile_starts(width, tile)
    row_w = blend_weights(rows, tile, height, out_scale)
    col_w = blend_weights(cols, tile, width, out_scale)
    th, tw = min(tile, height), min(tile, width)
    out = weight_sum = None
    bar = tqdm(total=len(rows) * len(cols), desc=progress, unit="tile", leave=False,
               disable=progress is None, dynamic_ncols=True)
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
            bar.update(1)
    bar.close()
    return out / weight_sum
