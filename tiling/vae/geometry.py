"""Where the tiles of a tiled VAE pass lie: spans along an axis, a tile's window of context round it, crops, and
the feathered canvas the tiles are assembled on. Latent pixels throughout; `s` maps them to an activation's."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch

from ..blend import ramp_profile
from ..grid import axis_starts, wrap_starts


class Span(NamedTuple):
    """A tile along one axis: `length` positions from `start` (modulo the axis when it wraps); the tile
    owns positions start+lo .. start+hi-1, and the owned parts of all spans partition the axis."""

    start: int
    length: int
    lo: int
    hi: int


def axis_spans(size: int, tile: int, overlap: int, wrap: bool = False) -> List[Span]:
    """Tiles along one axis; on a periodic axis they are spread evenly round the circle and the last one
    overlaps the first across the edge, otherwise the last one is aligned to the far edge."""
    if size <= tile:
        return [Span(0, size, 0, size)]
    if wrap:
        starts = wrap_starts(size, tile, overlap)
        prev_end = [starts[-1] - size + tile] + [s + tile for s in starts[:-1]]
    else:
        starts = axis_starts(size, tile, overlap)
        prev_end = [0] + [s + tile for s in starts[:-1]]
    bounds = [(s + e) // 2 for s, e in zip(starts, prev_end)]
    bounds.append(bounds[0] + size)
    return [Span(s, tile, bounds[i] - s, bounds[i + 1] - s) for i, s in enumerate(starts)]


def window(span: Span, context: int, size: int, wrap: bool) -> Tuple[torch.Tensor, int]:
    """Canvas indices of a span widened by `context` (modulo `size` on a periodic axis, clipped at the
    canvas edge otherwise), and the offset of the span inside that window."""
    if wrap:
        return torch.arange(span.start - context, span.start + span.length + context) % size, context
    a, b = max(span.start - context, 0), min(span.start + span.length + context, size)
    return torch.arange(a, b), span.start - a


def crop(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, s: int) -> torch.Tensor:
    """The canvas rows and columns (latent pixels) of an activation at `s` pixels per latent pixel."""
    def fine(idx):
        return (idx[:, None] * s + torch.arange(s)).reshape(-1).to(x.device)
    return x.index_select(-2, fine(rows)).index_select(-1, fine(cols))


class Win(NamedTuple):
    """A tile at (y, x), h x w, inside an H x W window of its neighbours; latent pixels."""

    y: int
    x: int
    h: int
    w: int
    H: int
    W: int


def shrink(t: torch.Tensor, win: Win, context: int) -> Tuple[torch.Tensor, Win]:
    """Cut an activation of a window down to the tile and at most `context` latent pixels round it."""
    s = t.shape[-1] // win.W
    y0, y1 = max(win.y - context, 0), min(win.y + win.h + context, win.H)
    x0, x1 = max(win.x - context, 0), min(win.x + win.w + context, win.W)
    return t[..., y0 * s:y1 * s, x0 * s:x1 * s], Win(win.y - y0, win.x - x0, win.h, win.w, y1 - y0, x1 - x0)


class Grid(NamedTuple):
    """The tiles of an h x w latent canvas: `tile`-sided, overlapping by `overlap`, each cut with `context`
    latent pixels of its neighbours round it; `wrap` (y, x) makes an axis periodic."""

    size: Tuple[int, int]
    tile: int
    overlap: int
    context: int
    wrap: Tuple[bool, bool] = (False, False)

    def spans(self) -> List[Tuple[Span, Span]]:
        (h, w), (wy, wx) = self.size, self.wrap
        return [(sy, sx) for sy in axis_spans(h, self.tile, self.overlap, wy)
                for sx in axis_spans(w, self.tile, self.overlap, wx)]

    def window(self, sy: Span, sx: Span) -> Tuple[torch.Tensor, torch.Tensor, Win]:
        """The canvas rows and columns of a tile's window, and where the tile lies in it."""
        (rows, oy), (cols, ox) = (window(sy, self.context, self.size[0], self.wrap[0]),
                                  window(sx, self.context, self.size[1], self.wrap[1]))
        return rows, cols, Win(oy, ox, sy.length, sx.length, len(rows), len(cols))


class Canvas:
    """Feathered accumulation of tiles at `s` canvas pixels per latent pixel, placed modulo the canvas."""

    def __init__(self, channels: int, h: int, w: int, s: int, overlap: int, device=None):
        self.s, self.overlap = s, overlap
        self.sum = torch.zeros(channels, h * s, w * s, device=device)
        self.weight = torch.zeros(h * s, w * s, device=device)

    def add(self, img: torch.Tensor, sy: Span, sx: Span):
        s, ov = self.s, self.overlap * self.s
        H, W = self.weight.shape
        ys = (sy.start * s + torch.arange(sy.length * s)) % H
        xs = (sx.start * s + torch.arange(sx.length * s)) % W
        w = torch.outer(ramp_profile(sy.length * s, ov), ramp_profile(sx.length * s, ov)).float().to(self.sum.device)
        ys, xs = ys.to(self.sum.device), xs.to(self.sum.device)
        self.sum[:, ys[:, None], xs] += img.float().to(self.sum.device) * w
        self.weight[ys[:, None], xs] += w

    def result(self) -> torch.Tensor:
        return self.sum / self.weight


def assemble(spans: Sequence[Tuple[Span, Span]], tiles: Dict[int, torch.Tensor], size: Tuple[int, int], s: int,
             overlap: int) -> torch.Tensor:
    """The feathered canvas of a last sweep's outputs gathered from several devices (tile index -> [C, h, w]),
    added in tile order as `run_sweeps` adds them; float32, CPU."""
    canvas = Canvas(tiles[0].shape[0], *size, s, overlap)
    for i in range(len(spans)):
        canvas.add(tiles[i], *spans[i])
    return canvas.result()


def to_uint8(img: torch.Tensor, width: int, height: int) -> "numpy.ndarray":
    """A [3, H, W] image in [-1, 1] cropped to width x height, as an H x W x 3 uint8 array."""
    img = img[:, :height, :width]
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
