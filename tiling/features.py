"""DeepCache's cached deep features kept in canvas coordinates, so tiles that move every step find them.

DeepCache (Ma et al. 2024) runs the whole UNet every `interval`-th step and, in between, only its outermost
level, reusing the deep feature of the last full step. Its feature lies on the latent's own grid; with tiles (and
with shifted windows, which move every step) the feature a tile needs was computed by other tiles, so a full
step's features are fused onto the canvas (each tile's weighted towards its centre, where its convolutions saw the
most context) and a later step crops each tile's window from there, as it crops the latent.
"""
from __future__ import annotations

from typing import Dict, Hashable, Optional, Sequence, Tuple

import torch

from .blend import tile_weights
from .grid import Tile


class FeatureCanvas:
    """The last full step's deep features of every (canvas, prompt) key, one canvas size at a time.

    `full_step(step)`: whether step `step` of a loop (0 its first) runs the whole model: every `interval`-th,
    from the first. `put` fuses a full call's per-tile features; `take` crops them for tiles, or None where any
    tile's window was not covered by the last full step (that batch runs in full). A key's weighted sums are
    divided out once, at its first `take` after a full step."""

    def __init__(self, interval: int):
        self.interval = int(interval)
        self._canvas: Optional[Tuple[int, int]] = None
        # key -> [weighted sum [C, H, W], weight sum [H, W], step], the sums replaced by (features, covered) once fused
        self._sums: Dict[Hashable, list] = {}
        self._weights: Dict[tuple, torch.Tensor] = {}  # (h, w, device) -> a tile's weights there

    def full_step(self, step: int) -> bool:
        return self.interval <= 1 or step % self.interval == 0

    def _weight(self, h: int, w: int, device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._weights:
            self._weights[key] = tile_weights(h, w, "gaussian").to(device)
        return self._weights[key]

    def put(self, keys: Sequence[Hashable], step: int, canvas: Tuple[int, int], tiles: Sequence[Tile],
            feats: torch.Tensor) -> None:
        """Fuse features [n, C, h, w] of n tiles (tile j under `keys[j]`) computed at `step`; a key's sums from an
        earlier step (or another canvas size) are dropped first."""
        if canvas != self._canvas:
            self._canvas, self._sums = canvas, {}
        for key, tile, f in zip(keys, tiles, feats):
            entry = self._sums.get(key)
            if entry is None or entry[2] != step:
                entry = self._sums[key] = [torch.zeros((f.shape[0],) + canvas, dtype=torch.float32, device=f.device),
                                           torch.zeros(canvas, dtype=torch.float32, device=f.device), step]
            w = self._weight(tile.h, tile.w, f.device)
            where = tile.index(*canvas)
            entry[0][(slice(None),) + where] += f.float() * w
            entry[1][where] += w

    def take(self, keys: Sequence[Hashable], canvas: Tuple[int, int], tiles: Sequence[Tile],
             dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The fused features [n, C, h, w] in `dtype` under tiles (tile j's from `keys[j]`), or None."""
        if canvas != self._canvas:
            return None
        out = []
        for key, tile in zip(keys, tiles):
            entry = self._sums.get(key)
            if entry is None:
                return None
            if entry[1].dtype != torch.bool:  # fused once: the weighted mean and where the step covered
                covered = entry[1] > 0
                entry[0], entry[1] = (entry[0] / entry[1].clamp(min=1e-30)).to(dtype), covered
            where = tile.index(*canvas)
            if not bool(entry[1][where].all()):
                return None
            out.append(entry[0][(slice(None),) + where])
        return torch.stack(out).to(dtype)
