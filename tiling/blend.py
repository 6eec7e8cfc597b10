"""Blend weights of a tile: how much each latent pixel of a tile counts when tiles are fused."""
from __future__ import annotations

import math

import torch

METHODS = ("uniform", "gaussian", "shifted")


def gaussian_profile(n: int, var: float = 0.01) -> torch.Tensor:
    """Mixture of Diffusers' weights along one axis (Jiménez 2023): a normal of variance `var` in tile units."""
    mid = (n - 1) / 2
    x = torch.arange(n, dtype=torch.float64)
    return torch.exp(-((x - mid) / n) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)


def ramp_profile(n: int, overlap: int) -> torch.Tensor:
    """A linear feather over `overlap` pixels at both ends, 1 in between; never zero."""
    x = torch.arange(n, dtype=torch.float64) + 0.5
    if overlap <= 0:
        return torch.ones(n, dtype=torch.float64)
    return torch.minimum(torch.ones(n, dtype=torch.float64), torch.minimum(x, n - x) / overlap)


def tile_weights(h: int, w: int, method: str) -> torch.Tensor:
    """An h x w float32 weight map: `uniform` (MultiDiffusion, and `shifted`, whose tiles barely overlap) or
    `gaussian` (Mixture of Diffusers)."""
    if method in ("uniform", "shifted"):
        return torch.ones(h, w)
    if method == "gaussian":
        return torch.outer(gaussian_profile(h), gaussian_profile(w)).float()
    raise ValueError(f"tiling.method={method!r}: must be one of {', '.join(METHODS)}")
