"""Structured configs of a render job, and their validation.

Hydra merges the YAML groups in ``conf/`` onto these dataclasses, so a wrong type or an unknown key
fails at composition.  Ranges and cross-field rules are checked by :func:`validate`, which raises one
:class:`ConfigError` naming the field and the value.

Model families are validated against their :class:`jobs.families.FamilySpec` (no torch): which ``model.name``
belongs to which family, which ``job.scheduler`` values fit it, which diffusers pipeline class its folder must
hold, whether single files load, its patch size, and whether it needs ``model.trust_remote_code``.

Prompts: ``job.prompt_template`` (e.g. ``"archer style {prompt}"``) wraps every prompt; the *effective*
prompt (:func:`effective_prompt`) is what the model encodes, what enters the image id, and what the
manifest's ``prompt`` column and the image's embedded parameters record, so a row alone reproduces its
image in any diffusers pipeline.  The raw prompt is the template's ``{prompt}`` part.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

from .families import DEMO_MODELS, FLOW_SCHEDULERS, MODELS, NOISE_SCHEDULERS, family_of

MAX_SIDE = 16384  # pixels; 16K is already 256 Mpx
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0

MODEL_NAMES = tuple(MODELS)
# Which weights the shipped demo holds, for image ids (its folder's place on disk depends on the install, its pixels
# do not): the test bed of ../shared/testbed as copied into the project on 2026-12-01; a new name with new weights.
DEMO_WEIGHTS = "scenes-sd-2026-12-01"
# `model.vae=light` (model=demo): the VAE distilled from the demo's own (bench/train_light_vae.py), shipped as
# models/scenes-sd-light-vae; named in image ids as the demo's weights are
LIGHT_VAE = "light"
LIGHT_VAE_WEIGHTS = "scenes-sd-light-vae-2026-12-03"
DEEP_CACHE_MAX = 10  # model.deep_cache: at most the whole denoiser every 10th step
VAE_FACTOR = 8  # image pixels per latent pixel, for every family here
DTYPES = ("auto", "fp32", "fp16", "bf16")
WEIGHTS = ("pretrained", "random")
ATTENTIONS = ("sdpa", "xformers")
OFFLOADS = ("none", "model", "sequential")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")  # torch pickles: they can run code when loaded
SCHEDULERS = NOISE_SCHEDULERS + FLOW_SCHEDULERS
TILING_METHODS = ("uniform", "gaussian", "shifted")
WRAPS = ("none", "x", "y", "both")
OUTPUT_FORMATS = ("png", "webp", "jpeg")
CLUSTER_MODES = ("auto", "bulk", "tile_parallel")
STRATEGIES = ("progressive", "direct")
UPSCALES = ("pixel", "latent")
GUIDE_CLOCKS = ("schedule", "stage")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what a folder of init images is read for
ASPECT_TOLERANCE = 0.01  # an init image's aspect may differ from the target's by this share


class TesseraError(Exception):
    """An error a user can act on: run.py prints its message on one line and exits non-zero."""


class ConfigError(TesseraError, ValueError):
    """A bad value in a render job: the message names the field and the value."""

    def __init__(self, field_name: str, value, why: str):
        self.field_name, self.value, self.why = field_name, value, why
        super().__init__(f"{field_name}={value!r}: {why}")


@dataclass
class ModelConfig:
    name: str = "demo"  # demo | demo_random | sd15 | sdxl | z_image | lumina2 | newbie: the family (families.MODELS)
    path: Optional[str] = None  # a local diffusers folder or one .safetensors file; demo: none (shipped);
    #                             demo_random: its cache folder (None: $TESSERA_CACHE/demo-v1)
    config: Optional[str] = None  # for a single-file path: a local diffusers folder with the pipeline's configs
    #                               (for a DiT's transformer-only file, its other components' weights too)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    weights: str = "pretrained"  # random: the family's full-size architecture, random weights (benchmarks)
    attention: str = "sdpa"  # sdpa (torch) | xformers (must be installed)
    offload: str = "none"  # none | model | sequential: diffusers' CPU offload (GPU workers only)
    allow_pickle: bool = False  # load .ckpt/.bin/.pt/.pth weights (torch pickles)
    trust_remote_code: bool = False  # for families whose weights ship Python code (FamilySpec.remote_code: newbie)
    compile: bool = False  # torch.compile the denoiser for the fixed tile shape (GPU; compile time paid once)
    stage_path: Optional[str] = None  # a hires checkpoint: a diffusers folder of the same family whose weights run
    #                                   the enlarged stages (and an init image's); the base stays model.path's
    deep_cache: int = 0  # DeepCache: the whole denoiser every N-th step of each loop, in between a UNet's outermost
    #                      level alone (Z-Image: its first block) on the deep features cached in canvas coordinates
    #                      (models/deepcache.py); 0, 1: off
    vae: Optional[str] = None  # another VAE in the model's latent space in place of its own: a local diffusers VAE
    #                            folder (config.json and its weights, e.g. a fp16-safe SDXL VAE), or `light` for
    #                            model=demo (its distilled light VAE: 3x quicker on a CPU, a rougher picture); None:
    #                            its own


@dataclass
class RegionConfig:
    """A region prompt over part of the picture (`job.regions`), the job's prompt being the background."""

    box: List[float] = field(default_factory=lambda: [0.0, 0.0, 1.0, 1.0])  # x0, y0, x1, y1 in fractions
    prompt: str = ""
    negative_prompt: Optional[str] = None  # None: the job's negative_prompt
    weight: float = 1.0  # >= 0: 1 replaces the background inside the box, 0 does nothing
    feather: float = 0.05  # the soft edge's width, a fraction of the picture's side, centred on the box's edge


@dataclass
class JobConfig:
    name: str = "default"
    prompts: List[str] = field(default_factory=lambda: ["a vast mountain lake at dawn, wallpaper"])
    prompt_file: Optional[str] = None  # .txt (a prompt a line), .jsonl, .csv, .parquet or a Parquet folder (jobs.sources)
    negative_prompt: str = ""
    seeds: List[int] = field(default_factory=lambda: [0])
    width: int = 3840
    height: int = 2160
    steps: int = 20
    guidance: float = 7.0
    scheduler: str = "auto"  # auto: the family's first (euler; flow_euler for DiTs), or one that fits it
    prompt_template: Optional[str] = None  # e.g. "archer style {prompt}"; None: prompts as they are
    # A picture larger than the model's native size: `progressive` draws a base at the native area, then enlarges it
    # by at most stage_factor a stage, each stage running the last `strength` share of its schedule over tiles;
    # `direct` denoises the full size from noise (one subject per tile on a canvas many tiles large).
    strategy: str = "progressive"
    strength: float = 0.3  # measured on the test bed (BENCHMARKS.md "Coherent large pictures")
    stage_factor: float = 2.0
    base_size: int = 0  # the base's side in pixels (its area is base_size squared); 0: the model's native size
    upscale: str = "pixel"  # between stages: pixel (decode, bicubic, encode) or latent (bicubic on the latents)
    sharpen: float = 0.0  # pixel upscale: an unsharp mask of this amount on each enlarged picture before its encode
    #                       (1: adds once what a Gaussian blur removes); 0: off
    sharpen_sigma: float = 3.0  # that mask's Gaussian sigma, in the previous stage's (or init picture's) pixels
    color_fix: float = 0.0  # pixel upscale: each enlarged picture's content at the base's resolution made the base's
    #                         (or the init picture's), blurred by this sigma in base pixels; 0: off
    skip_residual: float = 0.0  # DemoFusion's skip residual, the power of its cosine weight (3 in the paper); 0: off
    dilation: Optional[float] = None  # DemoFusion's dilated sampling, the power of its cosine weight (1 in the paper);
    #                                  0: off; null: the family's (FamilySpec.dilation)
    strength_decay: float = 1.0  # the k-th enlarged stage runs strength * strength_decay ** (k - 1) of its schedule
    guide_clock: str = "stage"  # the skip residual's and dilation's cosine weights run over the whole schedule
    #                                (DemoFusion's, whose stages start from noise) or over each stage's own steps
    anchor: Optional[float] = None  # each enlarged stage's predicted clean canvas keeps its reference's low
    #                      frequencies by this weight (1: exactly, 0: off; tiling.progressive.low_pass_anchor); null:
    #                      the family's (FamilySpec.anchor)
    anchor_sigma: float = 1.0  # that low-pass Gaussian's sigma, in the previous stage's latent pixels
    anchor_detail: Optional[float] = None  # the anchor keeps a stage's own detail only where its reference has
    #                      detail of its own, gated at this quantile of the reference's detail energy (0.9: the
    #                      busiest tenth keeps all); null: off, the stage's detail everywhere
    init_image: Optional[str] = None  # img2img / upscaling: a picture, a folder of them, or a Parquet file whose
    #                                   `init_image` (or `path`) column lists them; the stages start from it
    date: Optional[str] = None  # null: no partition; "today" or YYYY-MM-DD: images/ and manifest/ under date=<day>/
    # Region prompts over the job's prompt (the background), MultiDiffusion's region-based fusion at every stage:
    # [{box: [x0, y0, x1, y1], prompt: ..., negative_prompt: ..., weight: 1.0, feather: 0.05}], box in fractions.
    regions: List[RegionConfig] = field(default_factory=list)


@dataclass
class TilingConfig:
    method: str = "gaussian"  # uniform (MultiDiffusion), gaussian (Mixture of Diffusers), shifted (SpotDiffusion)
    wrap: str = "none"  # x, y, both: the canvas wraps around, so the image tiles seamlessly
    tile: int = 64  # latent pixels (512 image pixels with an 8x VAE)
    overlap: int = 16  # latent pixels shared by neighbouring tiles
    batch: int = 4  # tiles per model call, fixed so the picture never depends on the worker count; 0: auto,
    #                 as many as the GPU's free memory holds (at most 8 SDXL-size tiles' worth), 4 on a CPU
    vae_tile: int = 0  # latent pixels per VAE decode/encode tile; 0: auto, the largest the free memory holds
    vae_overlap: int = 8
    vae_passes: int = 3  # sweeps of the tiled decode: 1 each tile its own GroupNorm statistics; 3 shared (exact)
    vae_attention_keys: int = 0  # 0: the VAE's mid-block attention exact; N: over at most N average-pooled positions


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # unset: an embedded local Ray; "auto" or "host:port": join one
    workers: Optional[int] = None  # unset: one per GPU; on a CPU-only cluster one per cpus_per_worker (<= 8)
    mode: str = "auto"  # auto: bulk when there are at least as many images as workers
    cpus_per_worker: Optional[int] = None  # threads of a CPU worker; unset: 1
    group: int = 1  # bulk mode: images of one prompt and size a worker steps together, their tiles batched


@dataclass
class OutputConfig:
    dir: str = "outputs"
    format: str = "png"
    quality: int = 95  # webp and jpeg
    keep_stages: bool = False  # also write each stage's picture beside the image (<image_id>.stage<k>.<ext>)
    verify: bool = False  # resume: hash every finished file against its row (default: its size and time stamp)


@dataclass
class TesseraConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    job: JobConfig = field(default_factory=JobConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def _check(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(name, value, why)


def _one_of(name: str, value, choices) -> None:
    _check(value in choices, name, value, f"must be one of {', '.join(choices)}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _int_in(name: str, value, lo: int, hi: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
           name, value, f"must be an integer from {lo} to {hi}")


def read_prompt_file(path: str) -> List[str]:
    """The prompts of a prompt source (jobs.sources: a .txt's non-empty stripped lines, '#' lines comments)."""
    from .sources import rows

    return [r.prompt for r in rows(path)]


def check_job_values(j: JobConfig) -> None:
    """The job fields a prompt source's row may set too (jobs.sources.ROW_KEYS): size, steps, guidance, strategy,
    negative prompt, seeds and region prompts."""
    _int_in("job.width", j.width, 8, MAX_SIDE)
    _int_in("job.height", j.height, 8, MAX_SIDE)
    _int_in("job.steps", j.steps, 1, MAX_STEPS)
    _check(_number(j.guidance) and 0.0 <= j.guidance <= MAX_GUIDANCE,
           "job.guidance", j.guidance, f"must be a number from 0 to {MAX_GUIDANCE:g}")
    _one_of("job.strategy", j.strategy, STRATEGIES)
    _check(isinstance(j.negative_prompt, str), "job.negative_prompt", j.negative_prompt, "must be a string")
    _check(len(j.seeds) > 0, "job.seeds", list(j.seeds), "no seed to render")
    for s in j.seeds:
        _check(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63, "job.seeds", list(j.seeds),
               "seeds must be integers from 0 to 2**63-1")
    for k, r in enumerate(j.regions):
        validate_region(f"job.regions[{k}]", r)


def check_xml_prompts(j: JobConfig) -> None:
    """Every XML prompt of `job.prompts` (after the template) parses and checks (jobs.xml_prompts), or one
    ConfigError of `job.prompts[k]` naming the tag; `job.prompt_file`'s rows are checked as they are counted."""
    from .xml_prompts import check

    for k, p in enumerate(j.prompts):
        check(effective_prompt(j, p), f"job.prompts[{k}]")


def partition_date(value: str) -> str:
    """`job.date` as the day of its partition, YYYY-MM-DD ("today": this machine's local date, read once)."""
    import datetime as dt

    if value == "today":
        return dt.date.today().isoformat()
    try:
        ok = isinstance(value, str) and dt.date.fromisoformat(value).isoformat() == value
    except ValueError:
        ok = False
    _check(ok, "job.date", value, "must be today or a date YYYY-MM-DD (null: no date partition)")
    return value


def validate(cfg: TesseraConfig) -> TesseraConfig:
    """Check every range and rule of a job; raise ConfigError on the first bad field."""
    m, j, t, c, o = cfg.model, cfg.job, cfg.tiling, cfg.cluster, cfg.output
    validate_model(m)

    check_job_values(j)
    if m.stage_path is not None:
        _check(j.upscale == "pixel", "job.upscale", j.upscale, "must be pixel with model.stage_path: the stages' "
               "model has its own VAE, so its latents are not the base's (each stage encodes the picture anew)")
    _one_of("job.scheduler", j.scheduler, ("auto",) + SCHEDULERS)
    fam = family_of(m.name)
    _check(j.scheduler == "auto" or j.scheduler in fam.schedulers, "job.scheduler", j.scheduler,
           f"does not fit model={m.name} ({fam.name} family); use one of {', '.join(fam.schedulers)}")
    if j.prompt_template is not None:
        _check(isinstance(j.prompt_template, str) and "{prompt}" in j.prompt_template, "job.prompt_template",
               j.prompt_template, "must contain {prompt}, where each prompt goes")
    _check(bool(j.name) and "/" not in j.name and not j.name.startswith("."), "job.name", j.name,
           "must be a non-empty folder name")
    if j.prompt_file:  # its rows are read and checked, streamed, by jobs.sources (when the job is planned)
        _check(os.path.exists(os.path.expanduser(j.prompt_file)), "job.prompt_file", j.prompt_file,
               "no such file or folder")
    else:
        _check(len(j.prompts) > 0, "job.prompts", list(j.prompts), "no prompt to render (set job.prompts or "
               "job.prompt_file)")
    for p in j.prompts:
        _check(isinstance(p, str) and p.strip() != "", "job.prompts", list(j.prompts),
               "prompts must be non-empty strings")
    check_xml_prompts(j)
    if j.date is not None:
        partition_date(j.date)
    _one_of("job.upscale", j.upscale, UPSCALES)
    _check(_number(j.strength) and 0.0 < j.strength <= 1.0, "job.strength", j.strength,
           "must be a number in (0, 1]: the share of each enlarged stage's schedule that runs")
    _check(_number(j.stage_factor) and 1.1 <= j.stage_factor <= 8.0, "job.stage_factor", j.stage_factor,
           "must be a number from 1.1 to 8: how much each stage enlarges the one before")
    _check(j.base_size == 0 or (isinstance(j.base_size, int) and 64 <= j.base_size <= 4096), "job.base_size",
           j.base_size, "must be 0 (the model's native size) or an integer from 64 to 4096 pixels")
    _check(_number(j.skip_residual) and 0.0 <= j.skip_residual <= 20.0, "job.skip_residual", j.skip_residual,
           "must be a number from 0 (off) to 20")
    _check(j.dilation is None or (_number(j.dilation) and 0.0 <= j.dilation <= 20.0), "job.dilation", j.dilation,
           "must be a number from 0 (off) to 20")
    _check(_number(j.strength_decay) and 0.0 < j.strength_decay <= 1.0, "job.strength_decay", j.strength_decay,
           "must be a number in (0, 1]: each enlarged stage's strength over the one before")
    _one_of("job.guide_clock", j.guide_clock, GUIDE_CLOCKS)
    _check(j.anchor is None or (_number(j.anchor) and 0.0 <= j.anchor <= 1.0), "job.anchor", j.anchor,
           "must be a number in [0, 1]: how much of the reference's low frequencies each enlarged stage keeps")
    _check(_number(j.anchor_sigma) and 0.1 <= j.anchor_sigma <= 8.0, "job.anchor_sigma", j.anchor_sigma,
           "must be a number from 0.1 to 8: the low-pass blur's sigma in the previous stage's latent pixels")
    _check(_number(j.sharpen) and 0.0 <= j.sharpen <= 10.0, "job.sharpen", j.sharpen,
           "must be a number from 0 (off) to 10: the unsharp mask's amount on each enlarged picture")
    _check(not j.sharpen or j.upscale == "pixel", "job.sharpen", j.sharpen,
           "sharpens the enlarged picture of job.upscale=pixel; a latent upscale has none (set job.sharpen=0)")
    _check(_number(j.color_fix) and 0.0 <= j.color_fix <= 64.0, "job.color_fix", j.color_fix,
           "must be a number from 0 (off) to 64: the colour fix's blur sigma in the base's pixels")
    _check(not j.color_fix or j.upscale == "pixel", "job.color_fix", j.color_fix,
           "fixes the enlarged picture of job.upscale=pixel; a latent upscale has none (set job.color_fix=0)")
    _check(_number(j.sharpen_sigma) and 0.1 <= j.sharpen_sigma <= 32.0, "job.sharpen_sigma", j.sharpen_sigma,
           "must be a number from 0.1 to 32: the unsharp mask's sigma in the previous stage's pixels")
    _check(j.anchor_detail is None or (_number(j.anchor_detail) and 0.0 < j.anchor_detail < 1.0), "job.anchor_detail",
           j.anchor_detail, "must be null (off) or a quantile in (0, 1) of the reference's detail energy")
    if j.init_image is not None:  # what it lists is read once, when the job is planned (init_images)
        _check(os.path.exists(os.path.expanduser(j.init_image)), "job.init_image", j.init_image,
               "no such file or folder")

    _one_of("tiling.method", t.method, TILING_METHODS)
    _one_of("tiling.wrap", t.wrap, WRAPS)
    _int_in("tiling.tile", t.tile, 8, 512)
    _int_in("tiling.overlap", t.overlap, 0, t.tile - 1)
    _int_in("tiling.batch", t.batch, 0, 256)
    _check(t.vae_tile == 0 or (isinstance(t.vae_tile, int) and 8 <= t.vae_tile <= 512), "tiling.vae_tile",
           t.vae_tile, "must be 0 (auto: the largest tile the worker's free memory holds) or an integer from 8 to 512")
    # auto may go down to 16-latent tiles (tiling.vae.LADDER's smallest; jobs/ does not import tiling/)
    _int_in("tiling.vae_overlap", t.vae_overlap, 0, (t.vae_tile or 16) // 2)
    _int_in("tiling.vae_passes", t.vae_passes, 1, 5)
    _check(t.vae_attention_keys == 0 or (isinstance(t.vae_attention_keys, int) and 64 <= t.vae_attention_keys <= 2**20),
           "tiling.vae_attention_keys", t.vae_attention_keys,
           "must be 0 (the VAE's attention exact) or an integer from 64 to 1048576 (at most that many pooled keys)")
    _check_patches(cfg)

    if c.workers is not None:
        _int_in("cluster.workers", c.workers, 1, 4096)
    if c.cpus_per_worker is not None:
        _int_in("cluster.cpus_per_worker", c.cpus_per_worker, 1, 1024)
    _one_of("cluster.mode", c.mode, CLUSTER_MODES)
    _check(c.mode != "tile_parallel" or cfg.model.deep_cache <= 1, "model.deep_cache", cfg.model.deep_cache,
           "needs cluster.mode bulk or auto: its features stay on the worker that renders the whole image")
    _int_in("cluster.group", c.group, 1, 64)

    _one_of("output.format", o.format, OUTPUT_FORMATS)
    _int_in("output.quality", o.quality, 1, 100)
    if o.format == "webp":  # libwebp's limit
        _check(max(j.width, j.height) <= 16383, "output.format", o.format, "WebP holds at most 16383 px a side")
    _check(bool(o.dir), "output.dir", o.dir, "must be a folder path")
    return cfg


def validate_region(name: str, r: RegionConfig) -> None:
    """One region prompt: a box of four fractions with x0 < x1 and y0 < y1, a prompt, a weight >= 0, a feather
    from 0 to 0.5."""
    box = list(r.box) if isinstance(r.box, (list, tuple)) or hasattr(r.box, "__len__") else r.box
    _check(isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box), f"{name}.box", box,
           "must be four numbers [x0, y0, x1, y1], fractions of the picture")
    _check(all(0.0 <= v <= 1.0 for v in box), f"{name}.box", box, "must lie in [0, 1] (fractions of the picture)")
    _check(box[0] < box[2], f"{name}.box", box, "x0 must be less than x1")
    _check(box[1] < box[3], f"{name}.box", box, "y0 must be less than y1")
    _check(isinstance(r.prompt, str) and r.prompt.strip() != "", f"{name}.prompt", r.prompt,
           "must be a non-empty string")
    _check(r.negative_prompt is None or isinstance(r.negative_prompt, str), f"{name}.negative_prompt",
           r.negative_prompt, "must be a string (unset: the job's negative_prompt)")
    _check(_number(r.weight) and 0.0 <= r.weight <= 100.0, f"{name}.weight", r.weight,
           "must be a number from 0 (off) to 100")
    _check(_number(r.feather) and 0.0 <= r.feather <= 0.5, f"{name}.feather", r.feather,
           "must be a number from 0 (a hard edge) to 0.5 (a fraction of the picture's side)")


def stage_model_config(m: ModelConfig) -> ModelConfig:
    """The model section that loads `model.stage_path`: the same family, dtype and options, from that folder (the
    demo models' family loads it as any SD 1.x folder), with that folder's own VAE (not model.vae)."""
    return replace(m, name="sd15" if m.name in DEMO_MODELS else m.name, path=m.stage_path, config=None,
                   stage_path=None, vae=None)


def validate_model(m: ModelConfig) -> None:
    """The model section: names, the weights' files (single files need a config folder; pickles are refused)."""
    _one_of("model.name", m.name, MODEL_NAMES)
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.weights", m.weights, WEIGHTS)
    _one_of("model.attention", m.attention, ATTENTIONS)
    _one_of("model.offload", m.offload, OFFLOADS)
    fam = family_of(m.name)
    family = fam.name
    _int_in("model.deep_cache", m.deep_cache, 0, DEEP_CACHE_MAX)
    _check(m.deep_cache <= 1 or fam.deep_cache, "model.deep_cache", m.deep_cache,
           f"caches the deep features of a UNet or of Z-Image's transformer; model={m.name} ({family} family) has "
           "no two-part forward here")
    if m.vae is not None:
        _check_vae(m)
    if m.stage_path is not None:
        _check(m.weights == "pretrained", "model.stage_path", m.stage_path, "not used with model.weights=random")
        _check(isinstance(m.stage_path, str) and os.path.isdir(os.path.expanduser(m.stage_path)), "model.stage_path",
               m.stage_path, f"must be a local diffusers folder (model_index.json and its component folders) of the "
               f"{family} family, as model={m.name}")
        _check_pipeline_folder("model.stage_path", m.stage_path, family)
        if not m.allow_pickle:
            _check_no_pickles("model.stage_path", m.stage_path)
    if m.weights == "random":
        _check(m.name not in DEMO_MODELS, "model.weights", m.weights,
               "random builds a family's full-size architecture (model="
               f"{' or '.join(n for n in MODEL_NAMES if n not in DEMO_MODELS)}); the small random-weight demo is "
               "model=demo_random")
        for name, value in (("model.path", m.path), ("model.config", m.config)):
            _check(not value, name, value, "not used with model.weights=random (the architecture is built in code); "
                   "unset it")
        return
    if fam.remote_code:  # random weights (above) are built in code: nothing shipped runs
        _check(m.trust_remote_code, "model.trust_remote_code", m.trust_remote_code,
               f"model={m.name} runs code shipped with its weights; set it to true only for weights you trust")
    if m.name == "demo":
        _check(not m.path, "model.path", m.path, "the demo model's weights ship with Tessera (models/scenes-sd); "
               "for other weights of its layout use model=sd15 model.path=...")
    if m.name in DEMO_MODELS:
        _check(not m.config, "model.config", m.config, "only for a single-file model.path; not for the demo models")
        return
    _check(bool(m.path), "model.path", m.path,
           f"model={m.name} needs a local diffusers folder or a .safetensors file")
    path = os.path.expanduser(m.path)
    _check(os.path.exists(path), "model.path", m.path, "no such file or folder")
    if os.path.isdir(path):
        _check(not m.config, "model.config", m.config,
               "only for a single-file model.path; a diffusers folder carries its own configs")
        _check_pipeline_folder("model.path", m.path, family)
        if not m.allow_pickle:
            _check_no_pickles("model.path", m.path)
        return
    if fam.single_file is None:
        raise ConfigError("model.path", m.path, f"model={m.name} loads only from a diffusers folder (model_index.json "
                          f"and its component folders), not a single file: {fam.folder_only}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PICKLE_SUFFIXES:
        _check(m.allow_pickle, "model.path", m.path,
               f"a {suffix} file is a torch pickle, which can run code when loaded; use a .safetensors file "
               "or set model.allow_pickle=true for weights you trust")
    else:
        _check(suffix == ".safetensors", "model.path", m.path,
               "must be a diffusers folder (with model_index.json) or a .safetensors file")
    transformer_only = fam.single_file == "transformer"
    _check(bool(m.config), "model.config", m.config,
           f"a single file of model={m.name} holds the transformer only: set model.config to a local diffusers "
           "folder of the same model, for the transformer's config and the text encoder, tokenizer, VAE and "
           f"scheduler (no hub is reached), e.g. model.config=/weights/{m.name}-diffusers" if transformer_only else
           "a single-file model.path needs a local diffusers folder of the same architecture for its configs "
           f"and tokenizers (no hub is reached), e.g. model.config=/weights/{m.name}-base")
    config = os.path.expanduser(m.config)
    _check(os.path.isdir(config), "model.config", m.config, "no such folder")
    _check_pipeline_folder("model.config", m.config, family)
    if transformer_only:
        _check(os.path.isfile(os.path.join(config, "transformer", "config.json")), "model.config", m.config,
               "no transformer/config.json: the single file's transformer takes its config from it")
        if not m.allow_pickle:  # its other components are loaded from it, weights and all
            _check_no_pickles("model.config", m.config, skip="transformer")


def _check_vae(m: ModelConfig) -> None:
    """model.vae: `light` for the demo, else a local diffusers VAE folder (its latent space is checked on loading)."""
    _check(m.weights == "pretrained", "model.vae", m.vae, "not used with model.weights=random")
    if m.vae == LIGHT_VAE:
        _check(m.name == "demo", "model.vae", m.vae, "the light VAE is the demo model's own (model=demo); other "
               "models take a local diffusers VAE folder of their latent space")
        return
    _check(isinstance(m.vae, str) and os.path.isfile(os.path.join(os.path.expanduser(m.vae), "config.json")),
           "model.vae", m.vae, f"must be a local diffusers VAE folder (config.json and its weights) or, for "
           f"model=demo, {LIGHT_VAE!r}")
    if not m.allow_pickle:
        _check(not _pickles_only(os.path.expanduser(m.vae)), "model.vae", m.vae,
               "holds only pickle weights (.bin/.ckpt/.pt/.pth), which can run code when loaded; convert them to "
               ".safetensors or set model.allow_pickle=true for weights you trust")


def _check_pipeline_folder(name: str, value: str, family: str) -> None:
    """`value` is a diffusers folder (model_index.json) of the family's pipeline class."""
    index = os.path.join(os.path.expanduser(value), "model_index.json")
    _check(os.path.isfile(index), name, value, "not a diffusers folder (no model_index.json)")
    try:
        with open(index, encoding="utf-8") as f:
            cls = json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(name, value, f"unreadable model_index.json ({e})") from e
    fam = family_of(family)
    _check(cls in (None, fam.pipeline, *fam.pipeline_aliases), name, value,
           f"holds a {cls}, not a {fam.pipeline} (the {family} family)")


def _check_patches(cfg: TesseraConfig) -> None:
    """A transformer family sees each tile as whole patches: tiling.tile, and a canvas side smaller than a tile
    (which is then the tile's side), must be multiples of the patch."""
    p = family_of(cfg.model.name).patch
    if not p:
        return
    t = cfg.tiling.tile
    _check(t % p == 0, "tiling.tile", t,
           f"model={cfg.model.name} works on {p}x{p} latent patches; use a multiple of {p} (128: 1024 px tiles, "
           "the size these models are trained at)")
    for field_name, px in (("job.width", cfg.job.width), ("job.height", cfg.job.height)):
        side = -(-px // VAE_FACTOR)
        _check(side >= t or side % p == 0, field_name, px,
               f"a side smaller than a tile ({t * VAE_FACTOR} px) is one tile, and model={cfg.model.name} needs "
               f"it a multiple of {p * VAE_FACTOR} px (its {p}x{p} latent patches)")


def _check_no_pickles(name: str, value: str, skip: str = "") -> None:
    """No component of the diffusers folder `value` (but `skip`, which is not loaded from it) is pickles only."""
    pickles = [c for c in _pickle_only_components(os.path.expanduser(value)) if c != skip]
    _check(not pickles, name, value,
           f"{', '.join(pickles)} hold only pickle weights (.bin/.ckpt/.pt/.pth), which can run code when "
           "loaded; convert them to .safetensors or set model.allow_pickle=true for weights you trust")


def _pickle_only_components(path: str) -> List[str]:
    """Sub-folders of a diffusers folder whose weights exist only as pickles."""
    found = []
    for sub in sorted(os.listdir(path)):
        d = os.path.join(path, sub)
        if os.path.isdir(d) and _pickles_only(d):
            found.append(sub)
    return found


def _pickles_only(folder: str) -> bool:
    """Whether a component folder's weights exist only as pickles (no .safetensors beside them)."""
    names = os.listdir(folder)
    return any(n.endswith(PICKLE_SUFFIXES) for n in names) and not any(n.endswith(".safetensors") for n in names)


def scheduler_of(cfg: TesseraConfig) -> str:
    """`job.scheduler`, with `auto` resolved to the model family's first (what ids and the manifest record)."""
    j = cfg.job
    return family_of(cfg.model.name).schedulers[0] if j.scheduler == "auto" else j.scheduler


def effective_prompt(job: JobConfig, prompt: str) -> str:
    """The prompt the model encodes: `prompt` put into job.prompt_template, or as it is."""
    return job.prompt_template.replace("{prompt}", prompt) if job.prompt_template else prompt


def prompts_of(job: JobConfig) -> List[str]:
    """The job's prompts, as a list: `prompts` then `prompt_file`'s rows' (jobs.sources; the planner streams them)."""
    from .sources import prompt_rows

    return [p for p, _ in prompt_rows(job)]


def init_images(job: JobConfig) -> List[str]:
    """The pictures `job.init_image` names: the file itself, a folder's pictures (sorted by name), or the paths in
    a Parquet file's `init_image` (or `path`) column, relative ones taken from the Parquet file's folder."""
    given = job.init_image
    path = os.path.expanduser(given)
    _check(os.path.exists(path), "job.init_image", given, "no such file or folder")
    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.lower().endswith(PICTURE_SUFFIXES) and not n.startswith("."))
        _check(bool(found), "job.init_image", given, f"the folder holds no picture ({', '.join(PICTURE_SUFFIXES)})")
        return found
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds
            raise ConfigError("job.init_image", given, f"unreadable Parquet file ({e})") from e
        column = next((c for c in ("init_image", "path") if c in table.column_names), None)
        _check(column is not None, "job.init_image", given, "the Parquet file has no init_image or path column")
        folder = os.path.dirname(path)
        paths = [os.path.join(folder, os.path.expanduser(p)) for p in table.column(column).to_pylist() if p]
        _check(bool(paths), "job.init_image", given, f"the Parquet file's {column} column lists no picture")
        return paths
    return [path]


def check_init_image(path: str, width: int, height: int) -> Tuple[int, int]:
    """An init image's (width, height), after checking it is a picture of the target's aspect (within 1%)."""
    from PIL import Image, UnidentifiedImageError

    _check(os.path.isfile(path), "job.init_image", path, "no such file")
    try:
        with Image.open(path) as im:
            im.verify()
            size = im.size
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ConfigError("job.init_image", path, f"not a readable picture ({e})") from e
    want, got = width / height, size[0] / size[1]
    _check(abs(got / want - 1) <= ASPECT_TOLERANCE, "job.init_image", path,
           f"its aspect {size[0]}x{size[1]} differs from job.width x job.height ({width}x{height}) by more than "
           f"{ASPECT_TOLERANCE:.0%}; crop or pad it to {want:.4g}:1")
    return size
