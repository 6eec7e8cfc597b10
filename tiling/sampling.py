"""The tiled denoise loop: every step, fuse all tiles' predictions, then one scheduler step on each canvas."""
from __future__ import annotations

import inspect
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .blend import tile_weights
from .fuse import crop, fuse, weight_sum
from .grid import Tile
from .progressive import Dilation, cosine_weight, dilated_views, gaussian_blur, undilate


class TileBatch(NamedTuple):
    """Tiles cut from canvases of size (H, W) [n, C, h, w], where they lie, and (H, W): one model call; `prompt`
    the image's prompt it is predicted under (0 its own; r its r-th region's: tiling.regions); `images`, which
    canvas of the group each tile was cut from (empty for pictures of a whole canvas, the dilated views), and
    `step`, the loop's step (0 its first): what a cache of features across steps (tiling.features) keys on."""

    x: torch.Tensor
    tiles: Tuple[Tile, ...]
    canvas: Tuple[int, int]
    prompt: int = 0
    images: Tuple[int, ...] = ()
    step: int = 0


# predict(batches, t) -> one prediction [n, C, h, w] per batch, batches in tile-index order.
Predict = Callable[[List[TileBatch], torch.Tensor], List[torch.Tensor]]


def batches_of(tiles: Sequence, size: int) -> List[list]:
    """Consecutive groups of at most `size` tiles, as few as can be and as equal as can be (larger first):
    the grouping depends on the tile index only, and a compiled model sees one batch shape a step."""
    calls = -(-len(tiles) // size)
    base, extra = divmod(len(tiles), calls) if calls else (0, 0)
    bounds = [0]
    for c in range(calls):
        bounds.append(bounds[-1] + base + (c < extra))
    return [list(tiles[a:b]) for a, b in zip(bounds, bounds[1:])]


def _model_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's scaled input (noise-prediction schedulers); flow-matching ones take x as it is."""
    return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x


# guide(k, i, t, x) -> x: canvas k before step i at timestep t, changed (DemoFusion's skip residual) or as it is.
Guide = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]
# correct(k, i, t, x_in, pred) -> pred: canvas k's fused prediction at step i, from its model input x_in [1, C, H, W],
# changed (tiling.progressive.low_pass_anchor) or as it is.
Correct = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def denoise_canvas(predict: Predict, x: torch.Tensor, scheduler, layouts: Sequence[Sequence[Tile]], method: str,
                   batch: int, generator: Optional[torch.Generator] = None,
                   callback: Optional[Callable[[int, int], None]] = None, first: int = 0,
                   guide: Optional[Guide] = None, dilation: Optional[Dilation] = None,
                   correct: Optional[Correct] = None) -> torch.Tensor:
    """MultiDiffusion (Bar-Tal et al. 2023) over a [1, C, H, W] canvas; `layouts[i]` are step i's tiles."""
    return denoise_canvases(predict, [x], [scheduler], [layouts], method, batch, [generator], callback, first, guide,
                            dilation, correct)[0]


def denoise_canvases(predict: Predict, xs: Sequence[torch.Tensor], schedulers: Sequence, layouts: Sequence,
                     method: str, batch: int, generators: Sequence[Optional[torch.Generator]],
                     callback: Optional[Callable[[int, int], None]] = None, first: int = 0,
                     guide: Optional[Guide] = None, dilation: Optional[Dilation] = None,
                     correct: Optional[Correct] = None) -> List[torch.Tensor]:
    """MultiDiffusion over a group of same-size canvases [1, C, H, W] that share one prompt and timesteps,
    stepped together: each step, all their tiles (canvas-major, tile-index order) go through `predict` in
    batches of `batch`, each canvas is fused on its own device and stepped by its own scheduler.
    The timesteps run from index `first` (img2img: the caller has set each scheduler's begin index there);
    `layouts[k][i]` are canvas k's tiles at the i-th step run; `guide` may change each canvas before its step;
    under `dilation` each fused prediction is blended with the dilated views' (`dilated_prediction`), and then
    `correct` may change it (the enlarged stage's low-frequency anchor).
    A group of one batches exactly as a single image."""
    xs = list(xs)
    canvas = tuple(xs[0].shape[-2:])
    steppers = [("generator" in inspect.signature(s.step).parameters, s) for s in schedulers]
    cache = {}  # id(layout) -> (tile weights, their sum): each distinct layout computed once
    for i, t in enumerate(schedulers[0].timesteps[first:]):
        if guide is not None:
            xs = [guide(k, i, t, x) for k, x in enumerate(xs)]
        step_tiles = [lay[i] for lay in layouts]
        cache = {id(tiles): cache.get(id(tiles)) or _weights(tiles, method, canvas, xs[0].device)
                 for tiles in step_tiles}
        inputs = [_model_input(s, x, t)[0] for x, s in zip(xs, schedulers)]
        cuts = [(k, tile, crop(inputs[k], tile)) for k, tiles in enumerate(step_tiles) for tile in tiles]
        preds = predict([TileBatch(torch.stack([c for _, _, c in g]), tuple(tile for _, tile, _ in g), canvas,
                                   images=tuple(k for k, _, _ in g), step=i)
                         for g in batches_of(cuts, batch)], t)
        eps = torch.cat([p.to(xs[0].device) for p in preds]).split([len(tiles) for tiles in step_tiles])
        c = cosine_weight(t, dilation.start or schedulers[0].config.num_train_timesteps, dilation.power) \
            if dilation else 0.0
        wide = dilated_prediction(predict, inputs, t, dilation, batch, schedulers[0].config.num_train_timesteps) \
            if c > 1e-3 else None
        for k, (tiles, (with_generator, s)) in enumerate(zip(step_tiles, steppers)):
            fused = fuse(eps[k], tiles, *cache[id(tiles)])[None]
            if wide is not None:
                fused = (1 - c) * fused + c * wide[k]
            if correct is not None:
                fused = correct(k, i, t, inputs[k][None], fused)
            kwargs = {"generator": generators[k]} if with_generator else {}
            xs[k] = s.step(fused, t, xs[k], **kwargs).prev_sample
        if callback is not None:
            callback(i, len(cuts))
    return xs


def dilated_prediction(predict: Predict, inputs: Sequence[torch.Tensor], t, dilation: Dilation,
                       batch: int, num_train_timesteps: int = 1000) -> List[torch.Tensor]:
    """DemoFusion's dilated sampling (Du et al. 2024, sec. 3.3): each canvas [C, H, W], blurred, cut into its
    stride x stride sub-lattices, each predicted as a whole picture, and the predictions put back: [1, C, H, W]
    each, a prediction that sees the whole layout at once. Each canvas's views are batched on their own, so a
    canvas stepped in a group gets the batches (and the bits) it gets alone."""
    s = dilation.stride
    blur = 0.8 * cosine_weight(t, num_train_timesteps, 1.0)
    views = [dilated_views(gaussian_blur(x[None], blur, s - 1)[0], s, dilation.multiple) for x in inputs]
    size = tuple(views[0][0].shape[-2:])
    whole = (Tile(0, 0, *size),)
    preds = predict([TileBatch(torch.stack(g), whole * len(g), size) for vs in views for g in batches_of(vs, batch)],
                    t)
    per = torch.cat([p.to(inputs[0].device) for p in preds]).split(s * s)
    return [undilate(list(p), s, x)[None] for p, x in zip(per, inputs)]


def _weights(tiles: Sequence[Tile], method: str, canvas: Tuple[int, int], device) -> Tuple[torch.Tensor, torch.Tensor]:
    w = tile_weights(tiles[0].h, tiles[0].w, method).to(device)
    return w, weight_sum(tiles, w, *canvas)
