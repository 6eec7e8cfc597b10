"""Tile grids over a latent canvas: pure geometry, no tensors."""
from __future__ import annotations

import math
import random
from typing import List, NamedTuple, Tuple


class Tile(NamedTuple):
    """A window of the canvas: rows y..y+h, columns x..x+w."""

    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> Tuple[slice, slice]:
        """Row and column slices (for a tile inside the canvas)."""
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)

    def index(self, height: int, width: int) -> Tuple:
        """Indices of the tile's rows and columns in a height x width canvas, wrapping around its edges."""
        if self.y + self.h <= height and self.x + self.w <= width:
            return self.slices
        rows = [(self.y + i) % height for i in range(self.h)]
        cols = [(self.x + j) % width for j in range(self.w)]
        return _ix(rows, cols)


def _ix(rows: List[int], cols: List[int]):
    import torch  # geometry stays tensor-free unless a tile wraps

    return torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]


def axis_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Window starts along one axis: stride tile-overlap, the last window aligned to the far edge.

    Unlike MultiDiffusion's ``get_views``, which drops the remainder, every position is covered.
    """
    if length < 1 or tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"bad axis: length={length}, tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(n)})


def tile_grid(height: int, width: int, tile: int, overlap: int) -> List[Tile]:
    """Row-major overlapping tiles of side min(tile, canvas side) that cover a height x width canvas."""
    return layout(height, width, tile, overlap)


def wrap_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Window starts around a periodic axis: evenly spaced, at least `overlap` shared, the last wrapping over the edge."""
    n = max(2, math.ceil(length / (tile - overlap)))
    return sorted({round(k * length / n) for k in range(n)})


def shifted_starts(length: int, tile: int, offset: int, wrap: bool = False) -> List[int]:
    """Non-overlapping window starts moved by `offset` (SpotDiffusion); edge windows are clamped inside."""
    if wrap:
        return sorted({(offset + k * tile) % length for k in range(math.ceil(length / tile))})
    if length <= tile:
        return [0]
    return sorted({min(max(offset + k * tile, 0), length - tile) for k in range(-1, math.ceil(length / tile) + 1)})


def layout(height: int, width: int, tile: int, overlap: int, wrap_y: bool = False, wrap_x: bool = False,
           offset: Tuple[int, int] | None = None) -> List[Tile]:
    """The tiles of one step: an overlapping grid, or with `offset` a shifted non-overlapping one.

    On a wrapped axis a tile may run past the far edge and continue at the near one.
    """
    th, tw = min(tile, height), min(tile, width)
    if offset is not None:
        ys = shifted_starts(height, th, offset[0], wrap_y)
        xs = shifted_starts(width, tw, offset[1], wrap_x)
    else:
        ys = wrap_starts(height, th, min(overlap, th - 1)) if wrap_y else axis_starts(height, th, min(overlap, th - 1))
        xs = wrap_starts(width, tw, min(overlap, tw - 1)) if wrap_x else axis_starts(width, tw, min(overlap, tw - 1))
    return [Tile(y, x, th, tw) for y in ys for x in xs]


def step_layouts(height: int, width: int, tile: int, overlap: int, method: str, steps: int, seed: int,
                 wrap_y: bool = False, wrap_x: bool = False) -> List[List[Tile]]:
    """The tiles of every step; `shifted` moves its grid by offsets drawn from the image's seed."""
    if method != "shifted":
        return [layout(height, width, tile, overlap, wrap_y, wrap_x)] * steps
    rng = random.Random(seed)
    th, tw = min(tile, height), min(tile, width)
    return [layout(height, width, tile, 0, wrap_y, wrap_x, (rng.randrange(th), rng.randrange(tw)))
            for _ in range(steps)]


def padded_size(width: int, height: int, multiple: int = 8) -> Tuple[int, int]:
    """The render size: width and height rounded up to a multiple of the VAE factor (cropped after)."""
    return -(-width // multiple) * multiple, -(-height // multiple) * multiple


def scale_tiles(tiles: List[Tile], factor: int) -> List[Tile]:
    """The same tiles in image pixels (for seam maps and decode layouts)."""
    return [Tile(t.y * factor, t.x * factor, t.h * factor, t.w * factor) for t in tiles]
