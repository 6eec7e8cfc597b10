"""The tiled denoise loop: every step, fuse all tiles' predictions, then one scheduler step on the canvas."""
from __future__ import annotations

import inspect
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .blend import tile_weights
from .fuse import crop, fuse, weight_sum
from .grid import Tile

class TileBatch(NamedTuple):
    """Tiles cut from the canvas [n, C, h, w], where they lie, and the canvas's (H, W): one model call."""

    x: torch.Tensor
    tiles: Tuple[Tile, ...]
    canvas: Tuple[int, int]


# predict(batches, t) -> one prediction [n, C, h, w] per batch, batches in tile-index order.
Predict = Callable[[List[TileBatch], torch.Tensor], List[torch.Tensor]]


def batches_of(tiles: Sequence[Tile], size: int) -> List[List[Tile]]:
    """Consecutive groups of `size` tiles: the grouping depends on the tile index only."""
    return [list(tiles[i:i + size]) for i in range(0, len(tiles), size)]


def denoise_canvas(predict: Predict, x: torch.Tensor, scheduler, layouts: Sequence[Sequence[Tile]], method: str,
                   batch: int, generator: Optional[torch.Generator] = None,
                   callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """MultiDiffusion (Bar-Tal et al. 2023) over a [1, C, H, W] canvas; `layouts[i]` are step i's tiles."""
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    fused_with = {}  # the weights of each distinct layout, computed once
    for i, t in enumerate(scheduler.timesteps):
        tiles = layouts[i]
        if id(tiles) not in fused_with:
            w = tile_weights(tiles[0].h, tiles[0].w, method)
            fused_with = {id(tiles): (w, weight_sum(tiles, w, x.shape[-2], x.shape[-1]))}
        weights, total = fused_with[id(tiles)]
        x_in = (scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x)[0]  # flow: none
        canvas = tuple(x.shape[-2:])
        preds = predict([TileBatch(torch.stack([crop(x_in, s) for s in g]), tuple(g), canvas)
                         for g in batches_of(tiles, batch)], t)
        eps = fuse(torch.cat(preds), tiles, weights, total)[None]
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        if callback is not None:
            callback(i, len(tiles))
    return x
