"""GroupNorm statistics shared across the tiles of a pass: the moments each tile gathers over the part of the
canvas it owns, merged in tile order, and the SharedGroupNorm that normalises a tile with them.

A sweep with nothing `applied` lets each tile normalise with its own statistics; a gathering sweep with
statistics applied uses them tracked to the tile (its window's statistics now, scaled as they moved since the
last sweep, so that errors do not compound through the layers); the last sweep applies the same merged
statistics to every tile. Gathering sweeps merge, per GroupNorm, the moments of the part of the canvas each
tile owns, so every pixel counts once.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .geometry import Win, shrink

Moments = Tuple[float, torch.Tensor, torch.Tensor]  # count, mean per group, sum of squared deviations
Stats = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # GroupNorm name -> mean, var per group


def _merge(a: Optional[Moments], b: Moments) -> Moments:
    """Chan et al.'s parallel update of (count, mean, M2)."""
    if a is None:
        return b
    (na, ma, qa), (nb, mb, qb) = a, b
    n, d = na + nb, mb - ma
    return n, ma + d * (nb / n), qa + qb + d * d * (na * nb / n)


def merged(parts: Sequence[Dict[str, Moments]]) -> Stats:
    """The statistics of the whole canvas, per GroupNorm, from the moments of the parts its tiles own, merged
    in the order given (tile order: the same sums wherever the tiles ran)."""
    total: Dict[str, Moments] = {}
    for owned in parts:
        for name, m in owned.items():
            total[name] = _merge(total.get(name), m)
    return {name: (m, q / n) for name, (n, m, q) in total.items()}


def _group_moments(x: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Variance and mean per channel group of a [C, h, w] activation, in fp32, without copying it."""
    return torch.var_mean(x.unflatten(0, (groups, -1)).float(), dim=(1, 2, 3), correction=0)


class TileStats:
    """The GroupNorm statistics of one run of one tile, made fresh for each run (an fp32 retry starts clean).

    `win` is where the tile lies in the activation its next GroupNorms see: it starts as the tile's window and
    moves only by `cut`. Its SharedGroupNorms normalise with what `normalizer` gives; a gathering run leaves
    the moments of the part the tile owns in `owned`, and its window's statistics (the next sweep's `ref`) in
    `windows`."""

    def __init__(self, win: Win, own: Tuple[int, int, int, int], gather: bool, applied: Optional[Stats],
                 ref: Optional[Stats]):
        self.win, self.own, self.gather, self.applied, self.ref = win, own, gather, applied, ref
        self.owned: Dict[str, Moments] = {}
        self.windows: Stats = {}

    def cut(self, x: torch.Tensor, context: int) -> torch.Tensor:
        """`shrink` x to the tile and `context` latent pixels round it; the GroupNorms after it see that window."""
        x, self.win = shrink(x, self.win, context)
        return x

    def normalizer(self, name: str, x: torch.Tensor, groups: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Record x's statistics; the mean and var to normalise it with per group (None: its own)."""
        if not self.gather:
            return None if self.applied is None else self.applied[name]
        win, (ly, hy, lx, hx) = self.win, self.own
        s = x.shape[-1] // win.W
        if x.shape[-2] != win.H * s or x.shape[-1] != win.W * s:
            raise ValueError(f"GroupNorm {name} sees {tuple(x.shape)}, no multiple of the {win.H}x{win.W} window")
        var, mean = _group_moments(x[0], groups)
        self.windows[name] = m, v = mean.double(), var.double()
        part = x[0, :, (win.y + ly) * s:(win.y + hy) * s, (win.x + lx) * s:(win.x + hx) * s]
        pv, pm = _group_moments(part, groups)
        n = part[0].numel() * (part.shape[0] // groups)
        self.owned[name] = (n, pm.double(), pv.double() * n)
        if self.applied is None:
            return None
        (M, V), (m0, v0) = self.applied[name], self.ref[name]
        r2 = (v + 1e-12) / (v0 + 1e-12)
        return m + (M - m0) * r2.sqrt(), V * r2

    def finite(self) -> bool:
        return all(bool(torch.isfinite(q).all()) for _, _, q in self.owned.values())


class Current:
    """The TileStats of the tile a tiled net is running: what its SharedGroupNorms read. `Sweeps` sets it before
    each run of a tile, and nothing else does."""

    tile: Optional[TileStats] = None


class SharedGroupNorm(nn.Module):
    """Stands in for one nn.GroupNorm of a tiled net: normalises with the statistics of the tile running now."""

    def __init__(self, name: str, norm: nn.GroupNorm, current: Current):
        super().__init__()
        self.name, self.norm, self.current = name, norm, current

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.norm.num_groups
        stats = self.current.tile.normalizer(self.name, x, g)
        if stats is None:
            return self.norm(x)
        mean, var = stats
        c = x.shape[1] // g
        scale = (var + self.norm.eps).rsqrt().float().repeat_interleave(c)
        shift = -mean.float().repeat_interleave(c) * scale
        if self.norm.affine:
            scale, shift = scale * self.norm.weight.float(), shift * self.norm.weight.float() + self.norm.bias.float()
        return x * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None]


def shared_norms(current: Current):
    """For `rebuilt`: every nn.GroupNorm swapped for a SharedGroupNorm reading `current`."""
    return lambda name, m: SharedGroupNorm(name, m, current) if isinstance(m, nn.GroupNorm) else None
