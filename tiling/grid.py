"""Tile grids over a latent canvas: pure geometry, no tensors."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Tuple


class Tile(NamedTuple):
    """A window of the canvas: rows y..y+h, columns x..x+w."""

    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> Tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


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
    th, tw = min(tile, height), min(tile, width)
    ys = axis_starts(height, th, min(overlap, th - 1))
    xs = axis_starts(width, tw, min(overlap, tw - 1))
    return [Tile(y, x, th, tw) for y in ys for x in xs]


def padded_size(width: int, height: int, multiple: int = 8) -> Tuple[int, int]:
    """The render size: width and height rounded up to a multiple of the VAE factor (cropped after)."""
    return -(-width // multiple) * multiple, -(-height // multiple) * multiple


def scale_tiles(tiles: List[Tile], factor: int) -> List[Tile]:
    """The same tiles in image pixels (for seam maps and decode layouts)."""
    return [Tile(t.y * factor, t.x * factor, t.h * factor, t.w * factor) for t in tiles]
