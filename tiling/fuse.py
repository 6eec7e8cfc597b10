"""Fusing per-tile predictions onto a canvas with blend weights."""
from __future__ import annotations

from typing import Sequence

import torch

from .grid import Tile


def weight_sum(tiles: Sequence[Tile], weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The summed blend weight of every canvas pixel (positive wherever the tiles cover)."""
    total = torch.zeros(height, width, dtype=weights.dtype, device=weights.device)
    for t in tiles:
        total[t.index(height, width)] += weights
    return total


def fuse(preds: torch.Tensor, tiles: Sequence[Tile], weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Weighted average of tile predictions [N, C, h, w] on a [C, H, W] canvas, in tile-index order, on the
    device of `total` (the canvas's)."""
    out = torch.zeros((preds.shape[1],) + tuple(total.shape), dtype=torch.float32, device=total.device)
    w = weights.to(total.device, torch.float32)
    preds = preds.to(total.device)
    for pred, t in zip(preds, tiles):
        out[(slice(None),) + t.index(*total.shape)] += pred.to(torch.float32) * w
    return out / total


def crop(x: torch.Tensor, tile: Tile) -> torch.Tensor:
    """The tile's window of a [C, H, W] canvas (wrapping around the edges where the tile does)."""
    return x[(slice(None),) + tile.index(x.shape[-2], x.shape[-1])]
