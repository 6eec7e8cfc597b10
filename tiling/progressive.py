"""Progressive rendering: the composition at the model's native size, then stages that enlarge it and add detail.

A picture many times the model's size rendered directly gets one subject per tile (each tile paints a picture
of its own). The methods that hold together at 4K (hires-fix, Ultimate SD Upscale, DemoFusion, FreeScale) all
draw a base at the native area first and then refine enlarged copies of it, img2img, part-way down the schedule.
This module holds that plan's arithmetic: the stage sizes, the share of the schedule each stage runs, the
noising of an enlarged stage, and DemoFusion's skip residual and dilated views. Pure math, no model.
"""
from __future__ import annotations

import math
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Size = Tuple[int, int]  # (width, height) in pixels


def _aligned(x: float, align: int) -> int:
    return max(align, int(round(x / align)) * align)


def base_size(width: int, height: int, native: int, align: int = 8) -> Size:
    """The base picture: about native x native pixels of area with the target's aspect, sides multiples of
    `align` (e.g. 1920x1080 on a 256-px model: 344x192)."""
    aspect = width / height
    return _aligned(native * math.sqrt(aspect), align), _aligned(native / math.sqrt(aspect), align)


def stage_sizes(width: int, height: int, native: int, factor: float, align: int = 8,
                start: Optional[Size] = None) -> List[Size]:
    """Pixel sizes of every stage, the last exactly (width, height): a base of the native area (or `start`, an
    existing picture's size), then sizes that grow by the same ratio, at most `factor`, each a stage.

    A target no larger than the base's area is one stage: the direct render."""
    first = start or base_size(width, height, native, align)
    scale = max(width / first[0], height / first[1])
    if start is None and width * height <= first[0] * first[1]:
        return [(width, height)]
    if scale <= 1.0 + 1e-9:
        return [first, (width, height)] if start else [(width, height)]
    n = max(1, math.ceil(math.log(scale) / math.log(factor) - 1e-9))
    sizes = [first] + [(_aligned(first[0] * (width / first[0]) ** (k / n), align),
                        _aligned(first[1] * (height / first[1]) ** (k / n), align)) for k in range(1, n)]
    return sizes + [(width, height)]


def first_step(steps: int, strength: float) -> int:
    """The index of the first timestep an img2img stage runs: the last `strength` share of a `steps` schedule,
    as diffusers' img2img pipelines count it (int(steps * strength), at least one step)."""
    return steps - min(steps, max(1, int(steps * strength)))


def noised(scheduler, z: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """`z` noised to timestep `t` of the scheduler: `scale_noise` for flow matching, `add_noise` otherwise."""
    t = torch.as_tensor(t).reshape(1)
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(z, t, noise)
    return scheduler.add_noise(z, noise, t)


def resize(x: torch.Tensor, size: Tuple[int, int], mode: str = "bicubic", wrap_y: bool = False,
           wrap_x: bool = False) -> torch.Tensor:
    """A [n, C, H, W] tensor resized to (H', W') = `size` (antialiased when it shrinks). Along a wrapped axis (a
    seamless panorama's) it is resized as the periodic signal it is: three copies side by side, resized to three
    times the size, the middle kept, so the two edges are interpolated from each other as from any neighbours."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    reps = (3 if wrap_y and size[0] != x.shape[-2] else 1, 3 if wrap_x and size[1] != x.shape[-1] else 1)
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    y = F.interpolate(x.float().repeat(1, 1, *reps), size=(size[0] * reps[0], size[1] * reps[1]), mode=mode,
                      align_corners=False, antialias=shrink and mode != "nearest")
    return y[..., size[0] * (reps[0] // 2):size[0] * (reps[0] // 2 + 1), size[1] * (reps[1] // 2):size[1] * (reps[1] // 2 + 1)]


def cosine_weight(t, num_train_timesteps: int, power: float) -> float:
    """DemoFusion's decaying weight ((1 + cos(pi (T - t) / T)) / 2) ** power: 1 at pure noise, 0 at the image."""
    c = 0.5 * (1 + math.cos(math.pi * (num_train_timesteps - float(t)) / num_train_timesteps))
    return c ** power


def skip_residual(schedulers: Sequence, references: Sequence[torch.Tensor], noises: Sequence[torch.Tensor],
                  power: float, start: Optional[float] = None) -> Callable[[int, int, torch.Tensor, torch.Tensor],
                                                                            torch.Tensor]:
    """DemoFusion's skip residual (Du et al. 2024, eq. 4) as a `guide` for the denoise loop: before each step,
    canvas k becomes c * (its reference noised to t with its stage noise) + (1 - c) * itself, with the cosine
    weight c (1 at timestep `start`, by default pure noise), so the enlarged stage's layout holds while the
    noise is high and the model is free near the end."""
    T = start or int(schedulers[0].config.num_train_timesteps)

    def guide(k: int, i: int, t, x: torch.Tensor) -> torch.Tensor:
        c = cosine_weight(t, T, power)
        if c < 1e-4:
            return x
        ref = noised(schedulers[k], references[k].to(x.device), noises[k].to(x.device), t)
        return c * ref + (1 - c) * x

    return guide


def _input_levels(scheduler, t) -> Tuple[float, float]:
    """(a, s): the model input at timestep t is a * x0 + s * noise. Noise-prediction schedulers: a = sqrt(alpha_bar),
    s = sqrt(1 - alpha_bar), with sigma = s / a interpolated over the training timesteps as the Euler schedulers
    do (fractional timesteps); flow matching: a = 1 - sigma, s = sigma = t / num_train_timesteps."""
    if not hasattr(scheduler, "alphas_cumprod"):
        sigma = float(t) / scheduler.config.num_train_timesteps
        return 1.0 - sigma, sigma
    ac = scheduler.alphas_cumprod.double()
    sigmas = ((1 - ac) / ac).sqrt()
    i = min(max(float(t), 0.0), len(ac) - 1.0)
    lo = int(math.floor(i))
    hi = min(lo + 1, len(ac) - 1)
    sigma = float(sigmas[lo] + (i - lo) * (sigmas[hi] - sigmas[lo]))
    a = 1.0 / math.sqrt(1.0 + sigma * sigma)
    return a, sigma * a


def predicted_x0(scheduler, x_in: torch.Tensor, pred: torch.Tensor, t) -> Tuple[torch.Tensor, Callable]:
    """The clean canvas a prediction points at, from the model input `x_in` at timestep t, and the map back:
    `back(delta)` is the prediction whose clean canvas is x0 + delta for the same input (epsilon, v_prediction
    or flow velocity, as `Predict` returns them: what the scheduler's `step` takes)."""
    a, s = _input_levels(scheduler, t)
    if not hasattr(scheduler, "alphas_cumprod"):  # flow matching: x = (1 - s) x0 + s n, pred = n - x0
        return x_in - s * pred, lambda delta: pred - delta / max(s, 1e-6)
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":  # v = a n - s x0
        return a * x_in - s * pred, lambda delta: pred - delta / max(s, 1e-6)
    return (x_in - s * pred) / a, lambda delta: pred - delta * (a / max(s, 1e-6))


def low_pass_anchor(schedulers: Sequence, references: Sequence[torch.Tensor], weight: float, sigma: float,
                    detail: Optional[float] = None, wrap_y: bool = False, wrap_x: bool = False
                    ) -> Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `correct` for the denoise loop that holds an enlarged stage's composition: before canvas k's step, its
    fused prediction is changed so that the clean canvas it points at (`predicted_x0`), split into its blurred
    part (a Gaussian of `sigma` latent pixels) and what the blur removes (its detail), has its blurred part moved
    to its reference's (the previous stage enlarged) by `weight`: x0 + weight * (blur(ref) - blur(x0)). At 1 the
    stage keeps its own detail on the reference's low frequencies: it cannot repaint a region's tone or paint a
    new subject larger than the blur. I-Max's projected flow (Du et al. 2024) does this for flow models; here in
    any scheduler's terms. Elementwise, like `gaussian_blur`: its bits do not depend on the thread count. A
    wrapped axis is blurred around its seam (`wrap_y`, `wrap_x`).

    `detail` (a quantile in (0, 1), or None: off) gates the stage's own detail by its reference's: x0's detail is
    scaled by g = clamp(e / quantile(e, detail), 0, 1), e the blurred channel mean of |ref - blur(ref)|. The stage
    then sharpens what its reference outlines (rims, ridges) and paints nothing into what the reference has flat (an
    enlarged sun's inside, a clear sky), where an ungated stage paints texture of its own."""
    radius = blur_radius(sigma, references[0])
    wrap = {"wrap_y": wrap_y, "wrap_x": wrap_x}
    lows = [gaussian_blur(r.float(), sigma, radius, **wrap) for r in references]
    gates = [None if detail is None else detail_gate(r.float(), low, detail, sigma, radius, **wrap)
             for r, low in zip(references, lows)]

    def correct(k: int, i: int, t, x_in: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        x0, back = predicted_x0(schedulers[k], x_in.float(), pred.float(), t)
        low = lows[k].to(x0.device)
        blurred = gaussian_blur(x0, sigma, radius, **wrap)
        delta = weight * (low - blurred)
        if gates[k] is not None:  # x0's detail (x0 - blurred) scaled by the gate
            delta = delta + (gates[k].to(x0.device) - 1) * (x0 - blurred)
        return back(delta)

    return correct


def detail_gate(reference: torch.Tensor, low: torch.Tensor, quantile: float, sigma: float, radius: int,
                wrap_y: bool = False, wrap_x: bool = False) -> torch.Tensor:
    """[n, 1, H, W] in [0, 1]: the reference's detail energy (the blurred channel mean of |reference - low|) over
    its `quantile` in each canvas, clamped at 1. The channel mean as a sum of slices, elementwise as the blur is."""
    d = (reference - low).abs()
    energy = gaussian_blur(sum(d[:, c:c + 1] for c in range(d.shape[1])) / d.shape[1], sigma, radius,
                           wrap_y=wrap_y, wrap_x=wrap_x)
    scale = torch.quantile(energy.flatten(1).double(), quantile, dim=1).float().clamp_min(1e-12)
    return (energy / scale[:, None, None, None]).clamp(0.0, 1.0)


def unsharp(x: torch.Tensor, amount: float, sigma: float, wrap_y: bool = False, wrap_x: bool = False
            ) -> torch.Tensor:
    """x + amount * (x - blur(x)): an unsharp mask (a Gaussian of `sigma` pixels), as a bicubic enlargement is
    sharpened before a stage encodes it. A model trained on sharp pictures reads an enlarged picture's soft edges as
    something to paint (the test bed: dark outlines and a neon sky over a day landscape); sharpened, the stage
    refines the picture it was given. Elementwise (`gaussian_blur`)."""
    if amount <= 0:
        return x
    return x + amount * (x - gaussian_blur(x, sigma, blur_radius(sigma, x), wrap_y=wrap_y, wrap_x=wrap_x))


def color_fix(x: torch.Tensor, base: torch.Tensor, sigma: float, wrap_y: bool = False, wrap_x: bool = False
              ) -> torch.Tensor:
    """[n, C, H, W] `x` with what it shows at the base's resolution made the base's: x + up(blur(base) -
    blur(down(x))), `base` [n, C, h, w] the picture the stages started from, down and up antialiased bicubic
    resizes, blur a Gaussian of `sigma` base pixels (0: none). StableSR's and SUPIR's colour fix (the upscale's
    low frequencies from its input), with the base as the reference: each VAE round trip shifts a picture's
    colours a little, and over several stages the shifts add up (the test bed's dusk sky turns grey)."""
    wrap = {"wrap_y": wrap_y, "wrap_x": wrap_x}
    d = base.float() - resize(x, tuple(base.shape[-2:]), **wrap)
    if sigma > 0:
        d = gaussian_blur(d, sigma, blur_radius(sigma, d), **wrap)
    return x + resize(d, tuple(x.shape[-2:]), **wrap)


def blur_radius(sigma: float, x: torch.Tensor) -> int:
    """A Gaussian blur's reach over [..., H, W] `x`: 3 sigma, at least 1, at most one less than its shorter side
    (reflect padding's limit)."""
    return max(1, min(math.ceil(3 * sigma), min(x.shape[-2:]) - 1))


def gaussian_blur(x: torch.Tensor, sigma: float, radius: int, wrap_y: bool = False,
                  wrap_x: bool = False) -> torch.Tensor:
    """A separable Gaussian blur of [n, C, H, W] (reflect padding; circular along a wrapped axis), as DemoFusion
    blurs a dilated view's input so that its sub-sampling does not alias. Written as weighted sums of shifted
    copies: elementwise, so its bits do not depend on the thread count (the driver of a tile-parallel render runs
    it with its own)."""
    if sigma <= 0 or radius < 1:
        return x
    k = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2 / 2)
    k = (k / k.sum()).tolist()
    h, w = x.shape[-2:]
    y = F.pad(x, (0, 0, radius, radius), mode="circular" if wrap_y else "reflect")
    y = sum(c * y[..., i:i + h, :] for i, c in enumerate(k))
    y = F.pad(y, (radius, radius, 0, 0), mode="circular" if wrap_x else "reflect")
    return sum(c * y[..., :, i:i + w] for i, c in enumerate(k))


def dilation_stride(h: int, w: int, native: int) -> int:
    """DemoFusion's dilation of a latent h x w canvas: the stride whose sub-lattices are about the native
    latent area (the stage's scale over its base, rounded); 1 for a canvas of about the native area."""
    return max(1, round(math.sqrt(h * w / native ** 2)))


class Dilation(NamedTuple):
    """DemoFusion's dilated sampling for a stage: `stride` (`dilation_stride`), the power of the cosine weight
    the global prediction is blended with (1 in the paper), views padded to multiples of `multiple` (a patch),
    the timestep where that weight is 1 (None: pure noise, the paper's; else the stage's first)."""

    stride: int
    power: float = 1.0
    multiple: int = 1
    start: Optional[float] = None


def dilated_views(x: torch.Tensor, stride: int, multiple: int = 1) -> List[torch.Tensor]:
    """The stride x stride sub-lattices x[..., a::stride, b::stride] of a [C, H, W] canvas (row-major in (a, b)),
    each a small picture of the whole canvas: what DemoFusion's dilated sampling denoises for the global layout.
    The canvas is first padded (edge values) so that every view has the same size, a multiple of `multiple`."""
    step = stride * multiple
    h, w = x.shape[-2:]
    x = F.pad(x[None], (0, -w % step, 0, -h % step), mode="replicate")[0]
    return [x[..., a::stride, b::stride] for a in range(stride) for b in range(stride)]


def undilate(views: Sequence[torch.Tensor], stride: int, like: torch.Tensor) -> torch.Tensor:
    """The canvas `dilated_views` cut `views` from, put back together and cropped to `like` (float32, its device)."""
    vh, vw = views[0].shape[-2:]
    out = torch.empty(like.shape[:-2] + (vh * stride, vw * stride), dtype=torch.float32, device=like.device)
    for v, (a, b) in zip(views, [(a, b) for a in range(stride) for b in range(stride)]):
        out[..., a::stride, b::stride] = v.to(out.device, torch.float32)
    return out[..., :like.shape[-2], :like.shape[-1]]
