"""The tiled denoise loop: every step, fuse all tiles' predictions, then one scheduler step on the canvas."""
from __future__ import annotations

import inspect
from typing import Callable, List, Optional, Sequence

import torch

from .blend import tile_weights
from .fuse import fuse, weight_sum
from .grid import Tile

# predict(batches, t) -> one prediction per batch; each batch is [n, C, h, w] tiles in tile-index order.
Predict = Callable[[List[torch.Tensor], torch.Tensor], List[torch.Tensor]]


def batches_of(tiles: Sequence[Tile], size: int) -> List[List[Tile]]:
    """Consecutive groups of `size` tiles: the grouping depends on the tile index only."""
    return [list(tiles[i:i + size]) for i in range(0, len(tiles), size)]


def initial_noise(seed: int, shape, init_sigma: float) -> torch.Tensor:
    """The whole canvas's starting noise, drawn on the CPU from the image's seed alone."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32) * init_sigma


def denoise_canvas(predict: Predict, x: torch.Tensor, scheduler, tiles: Sequence[Tile], method: str,
                   batch: int, generator: Optional[torch.Generator] = None,
                   callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """MultiDiffusion (Bar-Tal et al. 2023) over a [1, C, H, W] canvas with the scheduler's timesteps set."""
    weights = tile_weights(tiles[0].h, tiles[0].w, method)
    total = weight_sum(tiles, weights, x.shape[-2], x.shape[-1])
    groups = batches_of(tiles, batch)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t)[0]
        preds = predict([torch.stack([x_in[(slice(None),) + s.slices] for s in g]) for g in groups], t)
        eps = fuse(torch.cat(preds), tiles, weights, total)[None]
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        if callback is not None:
            callback(i, len(tiles))
    return x
