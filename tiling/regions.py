"""Region prompts: MultiDiffusion's region-based formulation (Bar-Tal et al. 2023, sec. 4.2) over tiles.

Prompt 0 is the image's own prompt, the background; prompt r >= 1 holds a box of the picture (fractions), with a
soft edge `feather` wide (a fraction of the side, centred on the box's edge; none where the box meets the
picture's edge) and a `weight`. On a canvas, region r counts w_r * m_r, where m_r is its soft box, and the
background 1 - sum_r min(w_r, 1) m_r (at least 0), so a box of weight 1 replaces the background inside it and a
box of weight 0 does nothing. Every step the MultiDiffusion fusion of the paper is

    eps(x) = sum_{t, p} W_t(x) C_p(x) eps_{t, p}(x) / sum_{t, p} W_t(x) C_p(x)

over tiles t (blend weights W_t) and prompts p (contributions C_p). As the C_p are functions of the canvas, the
sum splits: each tile's predictions under the prompts it touches are mixed pixel by pixel with C_p / sum_p C_p,
and the tiles are then fused as without regions. So :func:`region_predict` wraps the denoise loop's `predict`
and leaves the loop as it is: a tile that one prompt touches is predicted once, as today; a tile across a box's
soft edge once per prompt it touches. DemoFusion's dilated views are pictures of the whole canvas at a lower
resolution (`TileBatch.canvas` is the view's size), so the same fractions mask them too.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .fuse import crop


class Region(NamedTuple):
    """A region's geometry: box (x0, y0, x1, y1) in fractions of the picture, weight, feather (a fraction)."""

    box: Tuple[float, float, float, float]
    weight: float = 1.0
    feather: float = 0.05


def _edge(u: torch.Tensor, at: float, feather: float) -> torch.Tensor:
    """0 before `at`, 1 after, a smoothstep `feather` wide centred on it; a hard step for feather 0."""
    if feather <= 0:
        return (u >= at).double()
    s = ((u - (at - feather / 2)) / feather).clamp(0, 1)
    return s * s * (3 - 2 * s)


def box_profile(n: int, lo: float, hi: float, feather: float) -> torch.Tensor:
    """One axis of a soft box over n pixels (pixel centres at (i + 0.5) / n): 1 inside [lo, hi], soft edges,
    no edge where the box meets the picture's border."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    rise = torch.ones(n, dtype=torch.float64) if lo <= 0 else _edge(u, lo, feather)
    fall = torch.ones(n, dtype=torch.float64) if hi >= 1 else 1 - _edge(u, hi, feather)
    return rise * fall


def region_masks(regions: Sequence[Region], h: int, w: int) -> torch.Tensor:
    """The contributions C_p [1 + R, h, w] (float32) of the background and each region on an h x w canvas."""
    boxes = [torch.outer(box_profile(h, r.box[1], r.box[3], r.feather), box_profile(w, r.box[0], r.box[2], r.feather))
             for r in regions]
    cover = sum((min(r.weight, 1.0) * m for r, m in zip(regions, boxes)), torch.zeros(h, w, dtype=torch.float64))
    background = (1 - cover).clamp(min=0)
    return torch.stack([background] + [r.weight * m for r, m in zip(regions, boxes)]).float()


def noise_levels(scheduler) -> Callable[[float], Tuple[float, float]]:
    """(a, s) with the model's input at timestep t equal to a * clean + s * noise: sqrt(alpha_bar_t) and
    sqrt(1 - alpha_bar_t) for the noise-prediction schedulers (their scaled input is in that form), 1 - sigma and
    sigma for flow matching (t = sigma * num_train_timesteps)."""
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        ac = scheduler.alphas_cumprod.double()
        return lambda t: (float(ac[int(t)].sqrt()), float((1 - ac[int(t)]).sqrt()))
    T = float(scheduler.config.num_train_timesteps)
    return lambda t: (1 - float(t) / T, float(t) / T)


class Bootstrap(NamedTuple):
    """MultiDiffusion's bootstrapping (sec. 4.2): while t >= `until`, a tile under several prompts is predicted
    under each on its own part only, the rest of the tile replaced by a flat latent at the step's noise level
    (`levels(t)`), so that no prompt's first strokes are drawn from its neighbours' colours."""

    until: float
    levels: Callable[[float], Tuple[float, float]]


BOOTSTRAP = 0.2  # MultiDiffusion's: the first 20% of the schedule (by timestep)


def region_bootstrap(scheduler, share: float = BOOTSTRAP) -> Optional[Bootstrap]:
    """Bootstrapping for the timesteps in the first `share` of the scheduler's training range (t >= (1 - share) T):
    a base from noise gets it; an img2img stage that starts below that, none."""
    if share <= 0:
        return None
    return Bootstrap((1 - share) * scheduler.config.num_train_timesteps, noise_levels(scheduler))


def _isolated(x: torch.Tensor, keep: torch.Tensor, tile, prompt: int, t, levels) -> torch.Tensor:
    """A tile's input [C, h, w] kept where `keep` is 1, elsewhere noise at t's level around a flat zero latent;
    the noise seeded by the timestep, the tile's place and the prompt (never by the batch it lands in)."""
    _, s = levels(t)
    g = torch.Generator().manual_seed((int(t) * 1_000_003 + tile.y * 10_007 + tile.x * 101 + prompt) % 2**63)
    noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
    k = keep.to(x.device, x.dtype)
    return k * x + (1 - k) * s * noise


def region_predict(predict, regions: Sequence[Region], batch: int, bootstrap: Optional[Bootstrap] = None):
    """`predict` (the denoise loop's: batches of prompt 0's tiles -> predictions) under regions: each tile is
    predicted under every prompt whose contribution is non-zero on it, in batches of at most `batch` tiles of
    one prompt (`TileBatch.prompt`, the index: 0 the image's prompt, r the r-th region's), and the predictions
    are mixed with the contributions (module docstring). Tiles under one prompt return its prediction as is."""
    from .sampling import TileBatch, batches_of  # sampling imports progressive; keep this module light

    masks: Dict[Tuple[int, int], torch.Tensor] = {}

    def call(batches: List, t) -> List[torch.Tensor]:
        jobs = []  # (batch index, row, prompt, its contribution on the tile) for every prediction needed
        for bi, b in enumerate(batches):
            if b.canvas not in masks:
                masks[b.canvas] = region_masks(regions, *b.canvas)
            for j, tile in enumerate(b.tiles):
                c = crop(masks[b.canvas], tile)
                jobs += [(bi, j, p, c[p]) for p in range(c.shape[0]) if c[p].max() > 0]
        shared = _shared(jobs)
        boot = bootstrap is not None and float(t) >= bootstrap.until

        def tile_input(bi, j, p, c):
            x = batches[bi].x[j]
            if boot and (bi, j) in shared:
                return _isolated(x, c.clamp(max=1.0), batches[bi].tiles[j], p, t, bootstrap.levels)
            return x

        calls, order = [], []
        for key in sorted({(p, batches[bi].canvas) for bi, _, p, _ in jobs}):
            mine = [job for job in jobs if (job[2], batches[job[0]].canvas) == key]
            for g in batches_of(mine, batch):
                calls.append(TileBatch(torch.stack([tile_input(*job) for job in g]),
                                       tuple(batches[bi].tiles[j] for bi, j, _, _ in g), key[1], key[0],
                                       tuple(batches[bi].images[j] for bi, j, _, _ in g)
                                       if all(batches[bi].images for bi, _, _, _ in g) else (),
                                       batches[0].step))
                order += g
        preds = [p for out in predict(calls, t) for p in out]
        parts: Dict[Tuple[int, int], list] = {}
        for (bi, j, p, c), pred in zip(order, preds):
            parts.setdefault((bi, j), []).append((c, pred))
        outs = []
        for bi, b in enumerate(batches):
            rows = []
            for j in range(len(b.tiles)):
                got = parts[(bi, j)]
                if len(got) == 1:
                    rows.append(got[0][1])
                    continue
                num = sum(c.to(pred.device) * pred.float() for c, pred in got)
                rows.append(num / sum(c for c, _ in got).to(num.device))
            outs.append(torch.stack(rows))
        return outs

    return call


def _shared(jobs) -> set:
    """(batch, row) of the tiles predicted under more than one prompt."""
    seen, shared = set(), set()
    for bi, j, _, _ in jobs:
        (shared if (bi, j) in seen else seen).add((bi, j))
    return shared
