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


def wrap_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Window starts around a periodic axis: evenly spaced, at least `overlap` shared, the last wrapping over the edge."""
    n = max(2, math.ceil(length / (tile - overlap)))
    return sorted({round(k * length / n) for k in range(n)})


def fitted_side(length: int, tile: int) -> Tuple[int, int]:
    """(side, n): the fewest windows of at most `tile` that cover `length`, made as equal as the tile's own
    alignment allows (a multiple of the largest of 8, 4, 2 that divides `tile`, so a UNet's or a patch
    transformer's tile stays valid): n * side >= length, with the least overlap."""
    n = math.ceil(length / tile)
    align = next(a for a in (8, 4, 2, 1) if tile % a == 0)
    return min(length, -(-math.ceil(length / n) // align) * align), n


def shifted_starts(length: int, side: int, n: int, offset: int) -> List[int]:
    """SpotDiffusion's rolled windows: `n` windows of `side` from `offset`, around the axis (the last one
    continues at the near edge); an axis one window covers is not moved."""
    if n == 1:
        return [0]
    return sorted({(offset + k * side) % length for k in range(n)})


def layout(height: int, width: int, tile: int, overlap: int, wrap_y: bool = False, wrap_x: bool = False) -> List[Tile]:
    """The tiles of an overlapping grid; on a wrapped axis a tile may run past the far edge and continue at
    the near one."""
    th, tw = min(tile, height), min(tile, width)
    ys = wrap_starts(height, th, min(overlap, th - 1)) if wrap_y else axis_starts(height, th, min(overlap, th - 1))
    xs = wrap_starts(width, tw, min(overlap, tw - 1)) if wrap_x else axis_starts(width, tw, min(overlap, tw - 1))
    return [Tile(y, x, th, tw) for y in ys for x in xs]


def shifted_layout(height: int, width: int, tile: int, offset: Tuple[int, int]) -> List[Tile]:
    """One step of `shifted` (SpotDiffusion, Frolov et al. 2024): the fewest near-equal windows of at most
    `tile` that cover the canvas, rolled by `offset`, so no work goes to overlap (at most 7 latent pixels an
    axis, from rounding the side) and the borders move every step. Windows that cross an edge continue at
    the opposite one, as the paper's torch.roll does, wrap or not."""
    (sh, ny), (sw, nx) = fitted_side(height, tile), fitted_side(width, tile)
    return [Tile(y, x, sh, sw) for y in shifted_starts(height, sh, ny, offset[0] % sh)
            for x in shifted_starts(width, sw, nx, offset[1] % sw)]


def step_layouts(height: int, width: int, tile: int, overlap: int, method: str, steps: int, seed: int,
                 wrap_y: bool = False, wrap_x: bool = False) -> List[List[Tile]]:
    """The tiles of every step; `shifted` moves its grid by offsets drawn from the image's seed (it wraps
    around every axis, so `wrap_y`/`wrap_x` change nothing for it)."""
    if method != "shifted":
        return [layout(height, width, tile, overlap, wrap_y, wrap_x)] * steps
    rng = random.Random(seed)
    th, tw = min(tile, height), min(tile, width)
    return [shifted_layout(height, width, tile, (rng.randrange(th), rng.randrange(tw))) for _ in range(steps)]


def padded_size(width: int, height: int, multiple: int = 8) -> Tuple[int, int]:
    """The render size: width and height rounded up to a multiple of the VAE factor (cropped after)."""
    return -(-width // multiple) * multiple, -(-height // multiple) * multiple


def scale_tiles(tiles: List[Tile], factor: int) -> List[Tile]:
    """The same tiles in image pixels (for seam maps and decode layouts)."""
    return [Tile(t.y * factor, t.x * factor, t.h * factor, t.w * factor) for t in tiles]
