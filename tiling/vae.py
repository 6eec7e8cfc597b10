"""Tiled VAE decode: overlapping latent tiles, each decoded with context, feathered together."""
from __future__ import annotations

from typing import Callable

import torch

from .blend import ramp_profile
from .grid import tile_grid

Decode = Callable[[torch.Tensor], torch.Tensor]  # [1, C, h, w] latents -> [1, 3, h*f, w*f] in [-1, 1]


class DecodeError(RuntimeError):
    """The decoder produced non-finite values (fp16 overflow, broken weights): no image is written."""


def decode_tiled(decode: Decode, z: torch.Tensor, factor: int, tile: int, overlap: int,
                 context: int = 8) -> torch.Tensor:
    """Decode a [1, C, H, W] latent canvas into a [3, H*f, W*f] float32 image, one tile at a time.

    Each tile is decoded with `context` latent pixels of true neighbours on every side (cut away after),
    then tiles are blended with linear ramps over their `overlap`; peak memory follows the tile.
    """
    H, W = z.shape[-2:]
    out = torch.zeros(3, H * factor, W * factor)
    total = torch.zeros(H * factor, W * factor)
    for t in tile_grid(H, W, tile, overlap):
        y0, x0 = max(t.y - context, 0), max(t.x - context, 0)
        y1, x1 = min(t.y + t.h + context, H), min(t.x + t.w + context, W)
        img = decode(z[:, :, y0:y1, x0:x1])[0].float()
        if not torch.isfinite(img).all():
            raise DecodeError(f"VAE decode gave non-finite values in the tile at latent ({t.y}, {t.x})")
        oy, ox = (t.y - y0) * factor, (t.x - x0) * factor
        img = img[:, oy:oy + t.h * factor, ox:ox + t.w * factor]
        ov = overlap * factor
        w = torch.outer(ramp_profile(t.h * factor, ov), ramp_profile(t.w * factor, ov)).float()
        ys, xs = slice(t.y * factor, (t.y + t.h) * factor), slice(t.x * factor, (t.x + t.w) * factor)
        out[:, ys, xs] += img * w
        total[ys, xs] += w
    return out / total


def to_uint8(img: torch.Tensor, width: int, height: int) -> "numpy.ndarray":
    """A [3, H, W] image in [-1, 1] cropped to width x height, as an H x W x 3 uint8 array."""
    img = img[:, :height, :width]
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
