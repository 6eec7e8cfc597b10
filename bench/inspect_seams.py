"""Look for tile seams: ``python3 bench/inspect_seams.py IMAGE [--tile 512 --overlap 128 | --grid-from-parameters]``.

Prints the seam score (see :func:`tiling.seams.seam_score`) and writes a heat map PNG beside the image
(``<name>.seams.png``) or at ``--out``: the map of :func:`tiling.seams.border_heatmap` in a black,
purple, orange, yellow ramp (yellow: 4 times the local gradient or more) over a greyed copy of the
image, the tile borders drawn as cyan dashes (2 pixels in 8, so a seam stays visible between them).
A picture written by Tessera carries ``Tiling: <method> <tile>/<overlap>`` (latent pixels, and ``Wrap: <axes>``
for a wrapped one) in its ``parameters`` text chunk; the grid is then rebuilt and scored exactly as the manifest's
``seam_score`` is (:func:`tiling.seams.image_borders`, the VAE's 8-pixel period), so both print the same number,
unless ``--tile``/``--overlap`` are given (image pixels, every position compared). Exit status 2, with one line,
for bad input.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiling.grid import layout  # noqa: E402
from tiling.seams import border_heatmap, border_lines, image_borders, seam_score  # noqa: E402

RAMP = np.array([[0, 0, 0], [80, 18, 123], [200, 60, 80], [250, 150, 30], [252, 250, 190]], dtype=np.float64)
LINE = np.array([0, 230, 255], dtype=np.float64)
FACTOR = 8  # the VAE's pixels per latent pixel


class Grid(NamedTuple):
    """Where the borders to score lie (image pixels), the period they are scored at, and where they came from."""

    rows: np.ndarray
    cols: np.ndarray
    period: int
    source: str


def parameters_grid(parameters: Optional[str], height: int, width: int) -> Optional[Grid]:
    """The denoise grid named by a ``Tiling: method tile/overlap`` entry (and ``Wrap:``), as the manifest scores
    it, or None."""
    m = re.search(r"Tiling: (\S+) (\d+)/(\d+)", parameters or "")
    if not m:
        return None
    wrap = re.search(r"Wrap: (x|y|both)\b", parameters or "")
    axes = wrap[1] if wrap else "none"
    rows, cols = image_borders(height, width, FACTOR, int(m[2]), int(m[3]), m[1],
                               wrap_y=axes in ("y", "both"), wrap_x=axes in ("x", "both"))
    return Grid(rows, cols, FACTOR, f"{m[1]} {m[2]}/{m[3]} latent{'' if axes == 'none' else ', wrap ' + axes}, "
                                    "from parameters")


def render(image: np.ndarray, heat: np.ndarray, rows, cols, alpha: float) -> np.ndarray:
    """The heat map in RAMP (0 to 4 and above) over a greyed, dimmed image, borders dashed in LINE."""
    t = np.clip(heat.astype(np.float64) / 4, 0, 1) * (len(RAMP) - 1)
    ramp = np.stack([np.interp(t, np.arange(len(RAMP)), RAMP[:, c]) for c in range(3)], axis=-1)
    grey = (image.astype(np.float64) @ [0.299, 0.587, 0.114])[..., None] * 0.6
    out = alpha * ramp + (1 - alpha) * grey
    dash_y, dash_x = np.arange(image.shape[0]) % 8 < 2, np.arange(image.shape[1]) % 8 < 2
    out[np.ix_(rows, dash_x)] = LINE
    out[np.ix_(dash_y, cols)] = LINE
    return out.round().astype(np.uint8)


def choose_grid(args, parameters: Optional[str], height: int, width: int) -> Grid:
    """The borders to score and where they came from: --tile/--overlap, else the parameters, else 512/128 px."""
    pixel_grid = args.tile is not None or args.overlap is not None
    grid = None if pixel_grid else parameters_grid(parameters, height, width)
    if args.grid_from_parameters and grid is None:
        raise ValueError(f"{args.image}: no 'Tiling: <method> <tile>/<overlap>' in a parameters chunk")
    if grid is not None:
        return grid
    tile = 512 if args.tile is None else args.tile
    overlap = tile // 4 if args.overlap is None else args.overlap
    if not 0 <= overlap < tile:
        raise ValueError(f"--tile={tile} --overlap={overlap}: the overlap must be from 0 to tile - 1")
    rows, cols = border_lines(layout(height, width, tile, overlap), height, width)
    return Grid(rows, cols, 1, f"{tile}/{overlap} px")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 bench/inspect_seams.py", description=__doc__.splitlines()[0])
    p.add_argument("image")
    p.add_argument("--tile", type=int, help="tile side in image pixels (512 unless the image has parameters)")
    p.add_argument("--overlap", type=int, help="overlap in image pixels (a quarter of the tile)")
    p.add_argument("--grid-from-parameters", action="store_true",
                   help="the denoise grid from the PNG's parameters chunk (default when it is present)")
    p.add_argument("--out", help="heat map path (default: IMAGE's folder, <name>.seams.png)")
    p.add_argument("--alpha", type=float, default=0.75, help="opacity of the heat map over the image (0.75)")
    a = p.parse_args(argv)
    if (a.tile is not None or a.overlap is not None) and a.grid_from_parameters:
        p.error("--tile/--overlap and --grid-from-parameters exclude each other")
    if not 0 <= a.alpha <= 1:
        p.error(f"--alpha={a.alpha}: must be from 0 to 1")
    out = Path(a.out) if a.out else Path(a.image).with_name(Path(a.image).stem + ".seams.png")
    try:
        with Image.open(a.image) as im:
            parameters, pixels = im.info.get("parameters"), np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        print(f"error: {a.image}: no such file", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"error: {a.image}: cannot read the image: {e}", file=sys.stderr)
        return 2
    try:
        grid = choose_grid(a, parameters, *pixels.shape[:2])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, cols = grid.rows, grid.cols
    try:
        heat = render(pixels, border_heatmap(pixels, lines=(rows, cols)), rows, cols, a.alpha)
        Image.fromarray(heat).save(out, format="PNG")
    except OSError as e:
        print(f"error: {out}: cannot write the heat map: {e.strerror or e}", file=sys.stderr)
        return 2
    score = seam_score(pixels, rows=rows, cols=cols, period=grid.period)
    verdict = "no tile border inside the image" if math.isnan(score) else "1.0: invisible"
    print(f"seam score {score:.4f} ({len(rows)} border rows, {len(cols)} border columns; grid {grid.source}; "
          f"{verdict}) heat map: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
