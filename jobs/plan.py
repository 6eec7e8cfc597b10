"""Expansion of a render job into image requests: each one's `RenderSpec` (what decides its pixels, hashed into its
stable id) and where it goes."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Tuple

from . import sources, xml_prompts
from .images import EXTENSIONS, sha256_file
from .families import family_of
from .spec import (DEMO_WEIGHTS, LIGHT_VAE, LIGHT_VAE_WEIGHTS, ModelConfig, RegionConfig, TesseraConfig,
                   check_init_image, effective_prompt, init_images, partition_date, scheduler_of, validate)


class RegionPrompt(NamedTuple):
    """A region of an image (`job.regions`): its box in fractions, its effective prompt and negative prompt (the
    job's where the region names none), weight and feather."""

    box: Tuple[float, float, float, float]
    prompt: str
    negative_prompt: str
    weight: float
    feather: float

    def as_dict(self) -> dict:
        return {"box": list(self.box), "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "weight": self.weight, "feather": self.feather}


def regions_of(job) -> Tuple[RegionPrompt, ...]:
    """`job.regions` as the renderer takes them: prompts through `job.prompt_template`, negatives defaulted."""
    return tuple(RegionPrompt(tuple(float(v) for v in r.box), effective_prompt(job, r.prompt),
                              job.negative_prompt if r.negative_prompt is None else r.negative_prompt,
                              float(r.weight), float(r.feather)) for r in job.regions)


@dataclass(frozen=True, kw_only=True)
class RenderSpec:
    """Everything that changes an image's pixels, and nothing else; its hash is the image id (`key`, `image_id`).

    The weights (what the id knows of them), the prompt, seed, size and schedule, how the canvas is cut into tiles
    and how the VAE decodes it, the strategy and its knobs, the init picture. The renderer, the tiling math and the
    tile-parallel driver read it alone: no config travels beside it. `ImageRequest` adds where the image goes.
    Keys added after the first release appear in `key` only when they differ from their default, so older ids stay
    valid; `spec_fields` builds one from a config and one prompt row."""

    # the weights
    model_name: str  # model.name
    dtype: str
    weights: str = "pretrained"
    model_path: Optional[str] = None  # `model_path_key`
    model_config: Optional[str] = None  # model.config's real path
    stage_model_path: Optional[str] = None  # model.stage_path's real path, where the enlarged stages run it
    vae_path: Optional[str] = None  # model.vae: the light VAE by name, or a folder's real path
    deep_cache: int = 0  # model.deep_cache: the whole denoiser every N-th step (0, 1: every step)
    # the picture
    source_prompt: str  # the effective prompt as written (job.prompt_template applied; an XML prompt whole)
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    # the tiles: the denoise's (tiling.method, tile, overlap, batch, wrap) and the VAE's
    tiling_method: str
    tile: int
    overlap: int
    batch: int = 0  # 0: as many as the worker's memory holds
    wrap: str = "none"  # none, x, y or both
    vae_tile: int = 0  # 0: what the worker's memory allows
    vae_overlap: int = 0
    vae_passes: int = 3
    vae_attention_keys: int = 0  # 0: exact
    # the strategy (job.strategy) and the knobs of its stages
    strategy: str = "direct"
    strength: float = 0.3
    stage_factor: float = 2.0
    base_size: int = 0  # 0: the model's native size
    upscale: str = "pixel"
    sharpen: float = 0.0  # job.sharpen, job.sharpen_sigma
    sharpen_sigma: float = 3.0
    color_fix: float = 0.0  # job.color_fix
    skip_residual: float = 0.0
    dilation: float = 0.0  # job.dilation, or the family's
    strength_decay: float = 1.0
    guide_clock: str = "stage"
    anchor: float = 1.0  # job.anchor, or the family's
    anchor_sigma: float = 1.0
    anchor_detail: Optional[float] = None  # job.anchor_detail: the detail gate's quantile
    init_sha256: Optional[str] = None  # the picture an img2img render starts from
    init_size: Optional[Tuple[int, int]] = None  # its (width, height): its sha256 decides it, so it is not hashed
    job_regions: Tuple[RegionPrompt, ...] = ()  # job.regions (or a prompt row's)
    xml: Optional[xml_prompts.XmlSplit] = None  # an XML prompt's split (jobs.xml_prompts)
    image_id: str = field(init=False, compare=False)

    def __post_init__(self):
        canonical = json.dumps(self.key(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        object.__setattr__(self, "image_id", hashlib.sha256(canonical.encode()).hexdigest()[:16])

    @property
    def prompt(self) -> str:
        """The background prompt, as encoded: the effective prompt, or an XML prompt's background."""
        return self.xml.background if self.xml is not None else self.source_prompt

    @functools.cached_property
    def regions(self) -> Tuple[RegionPrompt, ...]:
        """Region prompts over `prompt`: `job.regions`, then an XML prompt's placed characters (each weight 1 and
        feather 0.05 under the job's negative prompt)."""
        if self.xml is None:
            return self.job_regions
        d = RegionConfig()
        return self.job_regions + tuple(RegionPrompt(box, text, self.negative_prompt, d.weight, d.feather)
                                        for box, text in self.xml.regions)

    @property
    def model(self) -> str:
        """The manifest's `model` value: model.name, marked "+random" when the weights are random (benchmarks)."""
        return self.model_name if self.weights == "pretrained" else f"{self.model_name}+{self.weights}"

    def key(self) -> dict:
        """What the image id hashes."""
        key = {
            "model": self.model_name, "dtype": self.dtype, "model_path": self.model_path,
            "prompt": self.source_prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
            "width": self.width, "height": self.height, "steps": self.steps,
            "guidance": self.guidance, "scheduler": self.scheduler,
            "tiling": [self.tiling_method, self.tile, self.overlap, self.batch] + (
                [self.wrap] if self.wrap != "none" else []),
            "vae": [self.vae_tile, self.vae_overlap] + ([self.vae_passes] if self.vae_passes != 3 else []),
        }
        if self.vae_attention_keys:  # exact, the only way before, keeps the ids it had
            key["vae_attention_keys"] = self.vae_attention_keys
        if self.weights != "pretrained":
            key["weights"] = self.weights
        staged = self.strategy == "progressive" or bool(self.init_sha256)
        if self.strategy == "progressive":  # `direct`, the one strategy before, keeps the ids it had
            key["strategy"] = [self.strategy, self.strength, self.stage_factor, self.base_size, self.upscale,
                               self.skip_residual] + ([self.dilation] if self.dilation else [])
            key["base"] = "whole"  # drawn as one tile (session 5); the ids of tiled bases are not reused
        if self.init_sha256:
            key["init"] = [self.init_sha256, self.strength]
        if staged and self.strength_decay != 1.0:
            key["strength_decay"] = self.strength_decay
        if staged and self.guide_clock != "schedule":
            key["guide_clock"] = self.guide_clock
        if staged and self.sharpen:  # off: the ids they had before
            key["sharpen"] = [self.sharpen, self.sharpen_sigma]
        if staged and self.color_fix:  # off: the ids they had before
            key["color_fix"] = self.color_fix
        if staged and self.anchor:
            key["anchor"] = [self.anchor, self.anchor_sigma]
            if self.anchor_detail is not None:  # off: the ids they had before
                key["anchor_detail"] = self.anchor_detail
        for name in ("model_config", "stage_model_path", "vae_path"):
            if getattr(self, name):
                key[name] = getattr(self, name)
        if self.deep_cache > 1:  # an approximation of the model's calls: other pixels
            key["deep_cache"] = self.deep_cache
        if self.job_regions:  # no regions: the ids they had before
            key["regions"] = [r.as_dict() for r in self.job_regions]
        if self.xml is not None:  # what an XML prompt is encoded as: its format, background and placed characters
            key["xml"] = self.xml.key()
        return key


def model_path_key(m: ModelConfig) -> Optional[str]:
    """What the image id knows of the weights' place: the real path of a folder or file, the shipped demo's
    weights by name (its folder moves with the install), nothing for random weights built in code (the random
    demo's cache folder holds what its builder makes wherever it is)."""
    if m.weights != "pretrained" or m.name == "demo_random":
        return None
    if m.name == "demo":
        return f"tessera:{DEMO_WEIGHTS}"
    return _real(m.path)


def _real(path) -> str:
    return os.path.realpath(os.path.expanduser(path))


def runs_stage_model(m: ModelConfig, job, init) -> bool:
    """Whether an image's enlarged stages run `model.stage_path` (a hires checkpoint): a progressive render's, or
    an init image's."""
    return bool(m.stage_path) and (job.strategy == "progressive" or bool(init))


def stage_guides(cfg: TesseraConfig) -> Tuple[float, float]:
    """(job.anchor, job.dilation), each null one the model family's (FamilySpec.anchor, .dilation)."""
    fam = family_of(cfg.model.name)
    anchor, dilation = fam.anchor, fam.dilation
    j = cfg.job
    return (anchor if j.anchor is None else float(j.anchor)), (dilation if j.dilation is None else float(j.dilation))


def spec_fields(cfg: TesseraConfig, prompt: str, seed: int, init_sha256: Optional[str] = None,
                init_size: Optional[Tuple[int, int]] = None) -> dict:
    """The `RenderSpec` fields of one image of `cfg` (its job: the prompt row's): `prompt` is the raw prompt; the
    effective one (job.prompt_template applied) is hashed, so a template and a prompt that spells it out give the
    same id."""
    m, j, t = cfg.model, cfg.job, cfg.tiling
    anchor, dilation = stage_guides(cfg)
    source = effective_prompt(j, prompt)
    vae = m.vae
    return dict(
        model_name=m.name, dtype=m.dtype, weights=m.weights, model_path=model_path_key(m),
        model_config=_real(m.config) if m.config else None,
        stage_model_path=_real(m.stage_path) if runs_stage_model(m, j, init_sha256) else None,
        vae_path=None if vae is None else f"tessera:{LIGHT_VAE_WEIGHTS}" if vae == LIGHT_VAE else _real(vae),
        deep_cache=int(m.deep_cache),
        source_prompt=source, negative_prompt=j.negative_prompt, seed=int(seed), width=int(j.width),
        height=int(j.height), steps=int(j.steps), guidance=float(j.guidance), scheduler=scheduler_of(cfg),
        tiling_method=t.method, tile=int(t.tile), overlap=int(t.overlap), batch=int(t.batch), wrap=t.wrap,
        vae_tile=int(t.vae_tile), vae_overlap=int(t.vae_overlap), vae_passes=int(t.vae_passes),
        vae_attention_keys=int(t.vae_attention_keys),
        strategy=j.strategy, strength=float(j.strength), stage_factor=float(j.stage_factor),
        base_size=int(j.base_size), upscale=j.upscale, sharpen=float(j.sharpen), sharpen_sigma=float(j.sharpen_sigma),
        color_fix=float(j.color_fix),
        skip_residual=float(j.skip_residual), dilation=dilation, strength_decay=float(j.strength_decay),
        guide_clock=j.guide_clock, anchor=anchor,
        anchor_sigma=float(j.anchor_sigma), anchor_detail=None if j.anchor_detail is None else float(j.anchor_detail),
        init_sha256=init_sha256, init_size=init_size,
        job_regions=regions_of(j), xml=xml_prompts.expand(source, family_of(m.name).name))


def image_id(cfg: TesseraConfig, prompt: str, seed: int, init_sha256: Optional[str] = None) -> str:
    """First 16 hex chars of sha256 over everything that changes the pixels, and nothing else (`RenderSpec`)."""
    return RenderSpec(**spec_fields(cfg, prompt, seed, init_sha256)).image_id


@dataclass(frozen=True, kw_only=True)
class ImageRequest(RenderSpec):
    """One image to render: its `RenderSpec`, and where it goes and how it is labelled (none of which changes
    its pixels)."""

    job: str
    folder: str  # relative to output.dir: images/<job>, or images/date=<day>/<job> (job.date)
    format: str
    init_image: Optional[str] = None  # the init picture's path
    stage_model: Optional[str] = None  # model.stage_path's folder name (a hires checkpoint), or None
    vae_model: Optional[str] = None  # model.vae: `light`, or its folder's name; None: the model's own VAE

    @property
    def path(self) -> str:
        """Where the image is written, relative to output.dir: <folder>/<image_id>.<ext>."""
        return f"{self.folder}/{self.image_id}.{EXTENSIONS[self.format]}"

    def prompt_pairs(self) -> Tuple[Tuple[str, str], ...]:
        """(prompt, negative) of the background and of each region: what `TileBatch.prompt` indexes."""
        return ((self.prompt, self.negative_prompt),) + tuple((r.prompt, r.negative_prompt) for r in self.regions)

    def regions_json(self) -> Optional[str]:
        regions = self.regions
        return json.dumps([r.as_dict() for r in regions], ensure_ascii=False) if regions else None

    def stage_path(self, number: int) -> str:
        """Where `output.keep_stages` writes stage `number`'s picture: beside the image."""
        stem, ext = os.path.splitext(self.path)
        return f"{stem}.stage{number}{ext}"

    def parameters_text(self, stages: Optional[str] = None) -> str:
        """AUTOMATIC1111-style generation parameters, as embedded in the image file; `stages`, the sizes the
        renderer denoised (e.g. 344x192>608x344>1920x1080), where there were several."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [f"Steps: {self.steps}", f"Sampler: {self.scheduler}", f"CFG scale: {self.guidance}",
                  f"Seed: {self.seed}", f"Size: {self.width}x{self.height}", f"Model: {self.model}",
                  f"Tiling: {self.tiling_method} {self.tile}/{self.overlap}"]
        if self.wrap != "none":
            fields.append(f"Wrap: {self.wrap}")
        if self.strategy == "progressive":
            fields.append(f"Strategy: progressive x{self.stage_factor:g} from {self.base_size or 'native'}")
            fields += [f"{name}: {value:g}" if isinstance(value, float) else f"{name}: {value}"
                       for name, value, off in (("Upscale", self.upscale, "pixel"),
                                                ("Skip residual", self.skip_residual, 0.0),
                                                ("Dilation", self.dilation, 0.0),
                                                ("Strength decay", self.strength_decay, 1.0),
                                                ("Guide clock", self.guide_clock, "stage"),
                                                ("Anchor", self.anchor, 0.0)) if value != off]
            if self.sharpen:
                fields.append(f"Sharpen: {self.sharpen:g} sigma {self.sharpen_sigma:g}")
            if self.color_fix:
                fields.append(f"Color fix: {self.color_fix:g}")
            if self.anchor:
                fields.append(f"Anchor sigma: {self.anchor_sigma:g}")
                if self.anchor_detail is not None:
                    fields.append(f"Anchor detail gate: {self.anchor_detail:g}")
        if self.stage_model:
            fields.append(f"Hires checkpoint: {self.stage_model}")
        if self.vae_model:
            fields.append(f"VAE: {self.vae_model}")
        if self.deep_cache > 1:
            fields.append(f"DeepCache: every {self.deep_cache} steps")
        if self.vae_attention_keys:
            fields.append(f"VAE attention keys: {self.vae_attention_keys}")
        if self.init_image:
            fields.append(f"Init image: {os.path.basename(self.init_image)} sha256 {self.init_sha256}")
        if self.strategy == "progressive" or self.init_image:
            fields.append(f"Denoising strength: {self.strength:g}")
        if stages and ">" in stages:
            fields.append(f"Stages: {stages}")
        if self.regions:
            fields.append(f"Regions: {self.regions_json()}")
        lines.append(", ".join(fields + [f"Tessera image id: {self.image_id}"]))
        return "\n".join(lines)

    def manifest_row(self, **extra) -> dict:
        """The manifest columns this request knows, updated with ``extra`` (status, sha256, ...)."""
        row = {k: getattr(self, k) for k in (
            "image_id", "job", "prompt", "negative_prompt", "seed", "model", "width", "height",
            "steps", "guidance", "scheduler", "tiling_method", "tile", "overlap", "path", "wrap", "strategy",
            "strength", "init_image", "init_sha256", "deep_cache")}
        row["regions"] = self.regions_json()
        row.update(extra)
        return row


class Plan:
    """A job's images, streamed: prompts (`job.prompts`, then `job.prompt_file`'s rows, each with its own fields)
    x init images x seeds, prompt-major, duplicates dropped.

    Building it validates the config and reads the prompt source once through, checking every row and counting
    the images (`images`, before duplicates), so a bad row fails before anything is written and the progress line
    knows the night's size; iterating reads the source again and yields one request at a time, so a million rows
    never sit in memory (the set of ids seen, 8-byte integers, is what grows: about 60 bytes an image).
    `partition` is the Hive partition (`date=YYYY-MM-DD`) images and manifest rows go under, or None."""

    def __init__(self, cfg: TesseraConfig):
        validate(cfg)
        self.cfg, j = cfg, cfg.job
        self.date = partition_date(j.date) if j.date is not None else None  # "today" read once, at the start
        self.partition = f"date={self.date}" if self.date else None
        self.inits = [(p, sha256_file(p), check_init_image(p, j.width, j.height)) for p in init_images(j)] \
            if j.init_image else [(None, None, None)]
        self.rows, self.images = len(j.prompts), len(j.prompts) * len(j.seeds)
        if j.prompt_file:
            rows, images = sources.count(j.prompt_file, j)
            self.rows, self.images = self.rows + rows, self.images + images
        self.images *= len(self.inits)
        self.duplicates = 0

    def __iter__(self) -> Iterator[ImageRequest]:
        cfg, fmt = self.cfg, self.cfg.output.format
        folder = f"images/{self.partition}/{cfg.job.name}" if self.partition else f"images/{cfg.job.name}"
        vae = cfg.model.vae
        vae_model = None if vae is None else vae if vae == LIGHT_VAE else os.path.basename(os.path.normpath(vae))
        seen = set()
        self.duplicates = 0
        for prompt, j in sources.prompt_rows(cfg.job):
            row_cfg = cfg if j is cfg.job else dataclasses.replace(cfg, job=j)
            for init, sha, size in self.inits:
                stage_model = os.path.basename(os.path.normpath(cfg.model.stage_path)) \
                    if runs_stage_model(cfg.model, j, init) else None
                fields = spec_fields(row_cfg, prompt, 0, sha, size)  # once a row and init: the seed alone varies
                for seed in j.seeds:
                    req = ImageRequest(**{**fields, "seed": int(seed)}, job=j.name, folder=folder, format=fmt,
                                       init_image=init, stage_model=stage_model, vae_model=vae_model)
                    key = int(req.image_id, 16)
                    if key in seen:
                        self.duplicates += 1
                        continue
                    seen.add(key)
                    yield req


def plan(cfg: TesseraConfig) -> list[ImageRequest]:
    """Validate ``cfg`` and expand it into prompts x init images x seeds, prompt-major, duplicates dropped (a
    list: for small jobs and tests; `Plan` streams)."""
    return list(Plan(cfg))
