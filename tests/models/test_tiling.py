"""Tiled encoding and decoding: blending, and a bar over the tiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.tiling import run_tiled, tile_starts


def test_tiling_blends_local_functions_exactly():
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 13, 30, generator=gen)  # 2 x 4 tiles of 8 latent pixels

    def upsample(t):  # a pixel-local stand-in for the decoder
        return F.interpolate(t, scale_factor=4.0, mode="nearest") * 2 + 1

    def pool(t):  # a pixel-local stand-in for the encoder
        return F.avg_pool2d(t, 4) - 3

    torch.testing.assert_close(run_tiled(upsample, z, tile=8, out_scale=4), upsample(z))
    x = torch.randn(1, 3, 52, 120, generator=gen)
    torch.testing.assert_close(run_tiled(pool, x, tile=8, in_scale=4), pool(x))


def test_tiling_progress_counts_every_tile(capsys) -> None:
    z = torch.randn(1, 2, 13, 30)
    tiles = len(tile_starts(13, 8)) * len(tile_starts(30, 8))
    out = run_tiled(lambda t: t * 2, z, tile=8, progress="decoding tiles")
    torch.testing.assert_close(out, z * 2)
    err = capsys.readouterr().err  # the bar, drawn with "\r" and cleared at the end
    assert f"decoding tiles:   0%|          | 0/{tiles} " in err
    run_tiled(lambda t: t * 2, z, tile=8)
    assert capsys.readouterr().err == ""  # no bar unless asked for
