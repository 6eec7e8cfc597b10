"""An image request as tiling's math: its denoise loops (the plan of stages), each loop's start canvas and tile
layouts, the denoise of a group of images over a `predict` callable, its tile-step count and the seam scores of
its finished picture.

Plain functions of an image's `RenderSpec` (an `ImageRequest`: everything that decides its pixels, the tiling
too) and the loaded model's `ModelInfo` (`Renderer.info`: the
scheduler config, latent channels, VAE factor, patch and native size), called by the worker (`Renderer`) and by
the tile-parallel driver (`cluster.scheduler`) alike. No Ray, no files: `predict` and `reference` bring the model.
A loop's scheduler is built by `models.schedulers` from the model's config (the one import of `models` here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from jobs import ImageRequest, RenderSpec
from models.schedulers import make_scheduler, tile_seq_len, timestep_kwargs

from .grid import padded_size, step_layouts
from .progressive import (Dilation, dilation_stride, first_step, low_pass_anchor, noised, skip_residual,
                          stage_sizes)
from .regions import Region, region_bootstrap, region_predict
from .sampling import denoise_canvases
from .seams import gradients, image_borders, seam_score


@dataclass(frozen=True)
class ModelInfo:
    """What the render math needs of a loaded model (`cluster.renderer.Renderer.info`; sent to the tile-parallel
    driver): its scheduler's config, latent channels, VAE factor (pixels per latent pixel), native size (pixels)
    and, for a transformer, its patch size; the worker and device that hold it, for the summary."""

    scheduler_config: Mapping
    latent_channels: int
    vae_scale_factor: int
    native_size: int
    patch_size: Optional[int] = None  # None for a UNet
    worker: str = ""
    device: str = "cpu"


def latent_hw(width: int, height: int, factor: int) -> Tuple[int, int]:
    """The latent canvas (height, width) of a picture: its size rounded up to the VAE factor, divided by it."""
    width, height = padded_size(width, height, factor)
    return height // factor, width // factor


def latent_size(req: ImageRequest, factor: int) -> Tuple[int, int]:
    """The latent canvas (height, width) of an image (its last stage)."""
    return latent_hw(req.width, req.height, factor)


def wraps(spec: RenderSpec) -> dict:
    """`tiling.wrap` as the wrap_y / wrap_x flags the grids and the tiled decode take."""
    return {"wrap_y": spec.wrap in ("y", "both"), "wrap_x": spec.wrap in ("x", "both")}


def vae_options(spec: RenderSpec) -> dict:
    """What every VAE pass of `spec` takes besides its tiles: the wrap flags and `tiling.vae_attention_keys`."""
    return dict(wraps(spec), attention_keys=spec.vae_attention_keys)


class Stage(NamedTuple):
    """One denoise loop of an image: its latent canvas (h, w), the index of its first timestep (0 for a base
    drawn from noise; a stage that refines a reference, an enlarged stage or an init image, runs the last
    `job.strength` share of its schedule), its picture's size in pixels, and whether it refines."""

    h: int
    w: int
    first: int
    size: Tuple[int, int]
    refine: bool

    @staticmethod
    def of(width: int, height: int, factor: int, first: int = 0, refine: bool = False) -> "Stage":
        return Stage(*latent_hw(width, height, factor), first, (width, height), refine)


def native_side(req: ImageRequest, info: ModelInfo) -> int:
    """The side (pixels) whose square is the base's area: `job.base_size`, else the model's native size."""
    return req.base_size or info.native_size


def stages_of(req: ImageRequest, info: ModelInfo) -> List[Stage]:
    """The image's denoise loops, smallest first, the last at its own size. `direct`: one loop at full size;
    `progressive`: a base at the model's native area (`job.base_size`, else `info.native_size`), or the
    init image, then stages of at most `job.stage_factor` each (`tiling.progressive.stage_sizes`)."""
    f = info.vae_scale_factor
    if req.strategy == "direct" and not req.init_image:
        return [Stage.of(req.width, req.height, f)]
    align = f * (info.patch_size or 1)
    sizes = stage_sizes(req.width, req.height, native_side(req, info), req.stage_factor, align,
                        start=req.init_size if req.init_image else None)
    later = [Stage.of(w, h, f, first_step(req.steps, req.strength * req.strength_decay ** k), True)
             for k, (w, h) in enumerate(sizes[1:])]
    return later if req.init_image else [Stage.of(*sizes[0], f)] + later  # an init picture is the first size


def start_canvas(info: ModelInfo, req: ImageRequest, stage: Optional[Stage] = None, generator=None):
    """One loop's fresh scheduler (timesteps set, begun at the stage's first), the noise [1, C, h, w] drawn on
    the CPU from the image's generator (seeded with its seed: the picture does not depend on the device), and
    that generator (the scheduler's steps draw from it too). A base's canvas is that noise scaled to the
    scheduler's first sigma; an enlarged stage's is its reference noised to the first timestep (`noised`).

    A flow transformer's schedule (sigmas, dynamic shift) follows its pipeline for a picture the size of one
    tile, the input the model sees (`info.patch_size`; see models/flow.py)."""
    stage = stage or Stage.of(req.width, req.height, info.vae_scale_factor)
    scheduler = make_scheduler(req.scheduler, info.scheduler_config)
    seq_len = tile_seq_len(stage.h, stage.w, stage_tile(req, stage, info), info.patch_size)
    scheduler.set_timesteps(req.steps, **timestep_kwargs(scheduler.config, req.steps, seq_len))
    if stage.refine and hasattr(scheduler, "set_begin_index"):  # DDIM finds its place from t alone
        scheduler.set_begin_index(stage.first)
    g = generator or torch.Generator("cpu").manual_seed(req.seed)
    noise = torch.randn((1, info.latent_channels, stage.h, stage.w), generator=g)
    return scheduler, noise if stage.refine else noise * getattr(scheduler, "init_noise_sigma", 1.0), g


def stage_tile(req: ImageRequest, stage: Stage, info: ModelInfo) -> int:
    """A loop's tile side (latent pixels): `tiling.tile`, except for a progressive render's base, which is drawn
    whole as hires-fix draws it (at the native area the model composes the frame; tiles of the native size would
    each compose one of their own: two suns in a 344x192 base of the test bed cut in two tiles). A base whose
    long side passes twice the native side (an extreme aspect) stays tiled, and so does a picture no larger
    than the base (one stage: the direct render)."""
    base = req.strategy == "progressive" and not stage.refine and stage.size != (req.width, req.height)
    if base and max(stage.h, stage.w) <= 2 * native_side(req, info) // info.vae_scale_factor:
        return max(stage.h, stage.w, req.tile)
    return req.tile


def stage_layouts(req: RenderSpec, stage: Stage, number: int, steps: int, info: ModelInfo):
    """Every step's tiles of one loop (the same grid each step, or `shifted`'s seeded moving grid; each stage
    draws its own offsets), of side `stage_tile`."""
    return step_layouts(stage.h, stage.w, stage_tile(req, stage, info), req.overlap, req.tiling_method, steps,
                        req.seed + number, **wraps(req))


# reference(k, zs, stage, bases) -> stage k's starting canvases, one an image: the canvases zs of stage k - 1 enlarged,
# or at the first stage of an img2img render (zs None) the init pictures (the model's VAE does either); `bases`, the
# base's canvases from stage 2 on where `job.color_fix` wants them (else None).
Reference = Callable[[int, Optional[List[torch.Tensor]], "Stage", Optional[List[torch.Tensor]]], List[torch.Tensor]]


def denoise_group(predict, info: ModelInfo, reqs: Sequence[RenderSpec], batch: int,
                  device="cpu", callback: Optional[Callable[[int, int], None]] = None,
                  reference: Optional[Reference] = None, stage_predict=None) -> List[torch.Tensor]:
    """The finished latent canvases of images that share a `group_key`, stepped together on `device`, stage
    by stage; `predict` is the local model or a fan-out to workers (`stage_predict`, if given, that of the
    stages which refine a reference: `model.stage_path`'s), `reference` gives each later stage (and an img2img
    render's first) the canvases it starts from."""
    gens = [torch.Generator("cpu").manual_seed(req.seed) for req in reqs]
    regions = [Region(r.box, r.weight, r.feather) for r in reqs[0].regions]
    zs, base_predict, bases = None, predict, None
    stages = stages_of(reqs[0], info)
    for number, stage in enumerate(stages):
        begun = [start_canvas(info, req, stage, g) for req, g in zip(reqs, gens)]
        schedulers = [s for s, _, _ in begun]
        predict = stage_predict if stage.refine and stage_predict is not None else base_predict
        if regions:  # every tile under each prompt whose box it touches, the base, every stage, the views
            predict = region_predict(predict, regions, batch, region_bootstrap(schedulers[0]))
        guide = dilation = correct = None
        if stage.refine:
            if reference is None:
                raise ValueError("a progressive or img2img render needs a reference (the model's VAE) for its stages")
            refs = [z.to(device) for z in reference(number, zs, stage, bases if number > 1 else None)]
            t0 = schedulers[0].timesteps[stage.first]
            xs = [noised(s, r, n.to(device), t0) for s, r, (_, n, _) in zip(schedulers, refs, begun)]
            # the cosine weights' clock: 1 at pure noise (DemoFusion's), or at this stage's first step
            start = float(t0) if reqs[0].guide_clock == "stage" else None
            if reqs[0].skip_residual:
                guide = skip_residual(schedulers, refs, [n for _, n, _ in begun], reqs[0].skip_residual, start)
            stride = dilation_stride(stage.h, stage.w, native_side(reqs[0], info) // info.vae_scale_factor)
            if reqs[0].dilation and stride > 1:
                dilation = Dilation(stride, reqs[0].dilation, info.patch_size or 1, start)
            if reqs[0].anchor:  # the blur's side in the previous stage's (or the init picture's) pixels
                before = stages[number - 1].size if number else reqs[0].init_size
                sigma = reqs[0].anchor_sigma * stage.size[0] / before[0]
                correct = low_pass_anchor(schedulers, refs, reqs[0].anchor, sigma, reqs[0].anchor_detail,
                                          **wraps(reqs[0]))
        else:
            xs = [x.to(device) for _, x, _ in begun]
        steps = len(schedulers[0].timesteps) - stage.first
        layouts = [stage_layouts(req, stage, number, steps, info) for req in reqs]
        zs = denoise_canvases(predict, xs, schedulers, layouts, reqs[0].tiling_method, batch, gens, callback,
                              stage.first, guide, dilation, correct)
        if number == 0 and not stage.refine and reqs[0].color_fix:
            bases = zs  # the base drawn: the colour fix's reference at every stage after the first
    return zs


def denoise_request(predict, info: ModelInfo, req: RenderSpec, callback: Optional[Callable[[int, int], None]] = None,
                    batch: Optional[int] = None, device="cpu", reference: Optional[Reference] = None,
                    stage_predict=None) -> torch.Tensor:
    """The finished latent canvas of one image (a group of one)."""
    return denoise_group(predict, info, [req], batch or req.batch or 4, device, callback, reference,
                         stage_predict)[0]


def group_key(req: ImageRequest) -> tuple:
    """Images with equal keys can be stepped together: one prompt pair, guidance, size, schedule and stages."""
    return (req.prompt, req.negative_prompt, req.guidance, req.width, req.height, req.steps, req.scheduler,
            req.strategy, req.strength, req.stage_factor, req.base_size, req.upscale, req.sharpen, req.sharpen_sigma,
            req.color_fix, req.skip_residual, req.dilation, req.strength_decay, req.guide_clock, req.anchor,
            req.anchor_sigma, req.anchor_detail, req.init_size, req.regions)


def iter_groups(reqs, size: int) -> Iterator[List[ImageRequest]]:
    """Runs of consecutive images with one `group_key`, at most `size` each (jobs are prompt-major, so a
    prompt's seeds group together), streamed: `reqs` is read as groups are taken."""
    group: List[ImageRequest] = []
    for req in reqs:
        if group and (len(group) >= size or group_key(group[0]) != group_key(req)):
            yield group
            group = []
        group.append(req)
    if group:
        yield group


def groups_of(reqs: Sequence[ImageRequest], size: int) -> List[List[ImageRequest]]:
    """`iter_groups` as a list."""
    return list(iter_groups(reqs, size))


def layouts_of(req: RenderSpec, factor: int):
    """Every step's tiles of an image rendered directly at its size."""
    h, w = latent_size(req, factor)
    return step_layouts(h, w, req.tile, req.overlap, req.tiling_method, req.steps, req.seed, **wraps(req))


def tile_steps(req: RenderSpec, info: ModelInfo) -> int:
    """Tile-steps of one image, every stage, for the progress bar."""
    return sum(len(tiles) for number, stage in enumerate(stages_of(req, info))
               for tiles in stage_layouts(req, stage, number, req.steps - stage.first, info))


def seam_scores(pixels, req: RenderSpec, factor: int, vae_tile: Optional[int] = None) -> dict:
    """Seam scores of a finished image across its denoise tiles' and its VAE tiles' borders (1.0: invisible);
    `vae_tile`, the side its decode ran with where `tiling.vae_tile` left it to the worker (0).

    `shifted` has no fixed grid: it is scored against the unshifted grid a plain tiler would have used. On a
    wrapped axis the borders are the wrapped grid's inside the image (`tiling.wrap_seam_score` scores the
    wrapped edge itself, the image laid beside itself)."""
    grads = gradients(pixels)
    scores = {}
    for key, tile, overlap, method in (("seam_score", req.tile, req.overlap, req.tiling_method),
                                       ("seam_score_vae", vae_tile or req.vae_tile, req.vae_overlap, "gaussian")):
        rows, cols = image_borders(pixels.shape[0], pixels.shape[1], factor, tile, overlap, method, **wraps(req))
        scores[key] = seam_score(None, rows=rows, cols=cols, period=factor, grads=grads)
    return scores
