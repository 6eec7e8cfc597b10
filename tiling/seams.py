"""The seam score: how much stronger an image's colour gradients are across tile borders than elsewhere.

Pure numpy on H x W x 3 (or H x W) arrays, uint8 or float; everything is computed in float64.
A border at column c is the boundary between columns c-1 and c (likewise rows), so the gradient that
crosses it is |I[:, c] - I[:, c-1]|.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional, Tuple

import numpy as np

from .grid import Tile


def border_lines(tiles: Iterable[Tile], height: int, width: int, wrap_y: bool = False,
                 wrap_x: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The rows and columns, sorted and unique, where a tile edge lies strictly inside the image.

    On a wrapped axis (`wrap_y`, `wrap_x`) a tile that runs past the far edge ends inside the image, at its
    edge modulo the side; the wrapped edge itself (0) is no interior border: `wrap_seam_score` scores it.
    """
    tiles = list(tiles)
    ys = {e % height if wrap_y else e for t in tiles for e in (t.y, t.y + t.h)}
    xs = {e % width if wrap_x else e for t in tiles for e in (t.x, t.x + t.w)}
    return (np.array(sorted(p for p in ys if 0 < p < height), dtype=np.int64),
            np.array(sorted(p for p in xs if 0 < p < width), dtype=np.int64))


def image_borders(height: int, width: int, factor: int, tile: int, overlap: int, method: str = "gaussian",
                  wrap_y: bool = False, wrap_x: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The border rows and columns (image pixels) of a height x width picture rendered in tiles of `tile` latent
    pixels overlapping by `overlap` on its latent canvas (the picture rounded up to `factor`, divided by it; the
    picture is that canvas's top left): what the manifest's seam scores and the seam tool both score.
    `shifted` has no fixed grid: its borders are the unshifted grid's a plain tiler would have used."""
    from .grid import layout, padded_size, scale_tiles

    pw, ph = padded_size(width, height, factor)
    tiles = scale_tiles(layout(ph // factor, pw // factor, tile, 0 if method == "shifted" else overlap,
                               wrap_y=wrap_y, wrap_x=wrap_x), factor)
    rows, cols = border_lines(tiles, ph, pw, wrap_y=wrap_y, wrap_x=wrap_x)
    return rows[rows < height], cols[cols < width]  # inside the cropped picture


def gradients(image) -> Tuple[np.ndarray, np.ndarray]:
    """|I[:, c] - I[:, c-1]| (H x W-1) and |I[r] - I[r-1]| (H-1 x W), channel means, in float32 (exact for
    uint8 differences; means taken in float64 later)."""
    img = np.asarray(image, dtype=np.float32)
    img = img[..., None] if img.ndim == 2 else img
    if img.ndim != 3:
        raise ValueError(f"image of shape {img.shape}: must be H x W or H x W x C")
    return np.abs(np.diff(img, axis=1)).mean(axis=2), np.abs(np.diff(img, axis=0)).mean(axis=2)


def _ratio(g: np.ndarray, lines: np.ndarray, axis: int, period: int = 1) -> Tuple[float, int]:
    """Border mean / non-border mean of the gradients g along `axis` (the non-border ones taken at the
    borders' phases modulo `period`), and the number of border samples."""
    on = np.zeros(g.shape[axis], dtype=bool)
    on[lines - 1] = True
    position = np.arange(1, g.shape[axis] + 1)
    same_phase = np.isin(position % period, lines % period)
    border, rest = np.compress(on, g, axis=axis), np.compress(~on & same_phase, g, axis=axis)
    if border.size == 0 or rest.size == 0:
        return np.nan, 0
    b, r = border.mean(dtype=np.float64), rest.mean(dtype=np.float64)
    return (b / r if r > 0 else (1.0 if b == 0 else np.inf)), border.size


def seam_score(image, tiles: Optional[Iterable[Tile]] = None, rows=None, cols=None, period: int = 1,
               grads: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> float:
    """Mean absolute colour gradient across tile borders over the mean elsewhere (1.0: no visible seams).

    Give `tiles` (image pixels) or explicit border `rows`/`cols`. Each direction's ratio (horizontal
    gradients at border columns, vertical ones at border rows) is averaged, weighted by its number of
    border samples. Read it as "borders are this many times as sharp as the rest of the picture":
    1.0 means invisible to this measure; as a rough guide 1.1 is a faint seam and 1.5 a plain one. A
    direction whose reference gradients are all zero counts 1.0 if its borders are flat too, else inf.
    Returns NaN when no border has gradients to compare with: no interior border (one tile, an image
    smaller than a tile) or, in a sliver, every gradient of a direction crossing a border.
    `period`: compare with gradients at the borders' positions modulo `period` only. A VAE that
    upsamples 8x leaves an 8-pixel pattern in gradient strength and tile borders sit on multiples of
    8, so Tessera scores with period=8; period=1 compares with every other position.
    `grads`: `gradients(image)` computed once for several scores of one image (`image` is then unused).
    """
    g_x, g_y = grads if grads is not None else gradients(image)
    h, w = g_x.shape[0], g_y.shape[1]
    if tiles is not None and (rows is not None or cols is not None):
        raise ValueError("seam_score: give tiles or rows/cols, not both")
    if tiles is not None:
        rows, cols = border_lines(tiles, h, w)
    rows, cols = (np.asarray([] if v is None else v, dtype=np.int64).ravel() for v in (rows, cols))
    for name, v, n in (("rows", rows, h), ("cols", cols, w)):
        if v.size and not (0 < v.min() and v.max() < n):
            raise ValueError(f"seam_score: {name} must lie strictly inside 0..{n}, got {v.tolist()}")
    parts = [p for p in (_ratio(g_x, np.unique(cols), 1, period), _ratio(g_y, np.unique(rows), 0, period)) if p[1]]
    return float(sum(r * n for r, n in parts) / sum(n for _, n in parts)) if parts else float("nan")


def wrap_seam_score(image, axis: str, period: int = 1) -> float:
    """The seam score of the wrap-around edge: along "x" the right edge meets the left, along "y" the bottom the top.

    The image is laid beside itself and the one border where the copies meet is scored against the
    gradients inside the image. About 1.0: it tiles as a wallpaper without a visible edge; a
    horizontal ramp scores about its width along x (the whole ramp is undone in one step).
    """
    if axis not in ("x", "y"):
        raise ValueError(f"wrap_seam_score: axis={axis!r}: must be 'x' or 'y'")
    img = np.asarray(image)
    if axis == "x":
        return seam_score(np.concatenate([img, img], axis=1), rows=[], cols=[img.shape[1]], period=period)
    return seam_score(np.concatenate([img, img], axis=0), rows=[img.shape[0]], cols=[], period=period)


def border_heatmap(image, tiles: Optional[Iterable[Tile]] = None, cell: int = 16,
                   lines: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> np.ndarray:
    """An H x W float32 map of each pixel's gradient over its neighbourhood's typical gradient.

    The value at (y, x) is |I[y,x] - I[y,x-1]| + |I[y,x] - I[y-1,x]| (channel mean) divided by the
    median of that quantity over the cell x cell block holding the pixel (never less than a quarter of
    the whole image's median; border pixels left out of both medians when `tiles` are given). About 1:
    ordinary texture for that place; a seam reads as a straight line on the border row or column
    itself, brighter than its surroundings even in a flat sky beside busy texture: a step of s in texture
    whose gradients are typically t reads about 1/2 + s / 2t.
    """
    if cell < 1:
        raise ValueError(f"border_heatmap: cell={cell}: must be at least 1")
    g_x, g_y = gradients(image)
    h, w = g_x.shape[0], g_y.shape[1]
    g = np.zeros((h, w))
    g[:, 1:] += g_x
    g[1:, :] += g_y
    ref = g.copy()
    rows, cols = lines if lines is not None else border_lines(tiles or [], h, w)
    ref[rows, :], ref[:, cols] = np.nan, np.nan
    ph, pw = -(-h // cell) * cell, -(-w // cell) * cell
    blocks = np.pad(ref, ((0, ph - h), (0, pw - w)), constant_values=np.nan)
    blocks = blocks.reshape(ph // cell, cell, pw // cell, cell).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(ph // cell, pw // cell, cell * cell)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks: fmax below falls back to the floor
        local = np.nanmedian(blocks, axis=-1)
        floor = np.nanmedian(ref) / 4 if np.isfinite(ref).any() else 0.0
    local = np.repeat(np.repeat(local, cell, axis=0), cell, axis=1)[:h, :w]
    return (g / np.fmax(local, max(floor, 1e-12))).astype(np.float32)
