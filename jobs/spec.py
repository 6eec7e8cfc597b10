"""Structured configs of a render job, and their validation.

Hydra merges the YAML groups in ``conf/`` onto these dataclasses, so a wrong type or an unknown key
fails at composition.  Ranges and cross-field rules are checked by :func:`validate`, which raises one
:class:`ConfigError` naming the field and the value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

MAX_SIDE = 16384  # pixels; 16K is already 256 Mpx
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0

MODEL_NAMES = ("demo", "sd15")
DTYPES = ("auto", "fp32", "fp16", "bf16")
SCHEDULERS = ("euler", "euler_a", "ddim", "dpmpp_2m_karras", "unipc")
TILING_METHODS = ("uniform", "gaussian", "shifted")
WRAPS = ("none", "x", "y", "both")
OUTPUT_FORMATS = ("png", "webp", "jpeg")
CLUSTER_MODES = ("auto", "bulk", "tile_parallel")


class TesseraError(Exception):
    """An error a user can act on: run.py prints its message on one line and exits non-zero."""


class ConfigError(TesseraError, ValueError):
    """A bad value in a render job: the message names the field and the value."""

    def __init__(self, field_name: str, value, why: str):
        self.field_name, self.value, self.why = field_name, value, why
        super().__init__(f"{field_name}={value!r}: {why}")


@dataclass
class ModelConfig:
    name: str = "demo"
    path: Optional[str] = None  # local diffusers folder; for the demo model, its cache folder
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU


@dataclass
class JobConfig:
    name: str = "default"
    prompts: List[str] = field(default_factory=lambda: ["a vast mountain lake at dawn, wallpaper"])
    prompt_file: Optional[str] = None  # one prompt per line, added after `prompts`
    negative_prompt: str = ""
    seeds: List[int] = field(default_factory=lambda: [0])
    width: int = 3840
    height: int = 2160
    steps: int = 20
    guidance: float = 7.0
    scheduler: str = "euler"


@dataclass
class TilingConfig:
    method: str = "gaussian"  # uniform (MultiDiffusion), gaussian (Mixture of Diffusers), shifted (SpotDiffusion)
    wrap: str = "none"  # x, y, both: the canvas wraps around, so the image tiles seamlessly
    tile: int = 64  # latent pixels (512 image pixels with an 8x VAE)
    overlap: int = 16  # latent pixels shared by neighbouring tiles
    batch: int = 4  # tiles per model call; fixed, so the picture never depends on the worker count
    vae_tile: int = 64  # latent pixels per VAE decode tile
    vae_overlap: int = 8


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # unset: an embedded local Ray; "auto" or "host:port": join one
    workers: Optional[int] = None  # unset: one per GPU; on a CPU-only cluster one per cpus_per_worker (<= 8)
    mode: str = "auto"  # auto: bulk when there are at least as many images as workers
    cpus_per_worker: Optional[int] = None  # threads of a CPU worker; unset: 1


@dataclass
class OutputConfig:
    dir: str = "outputs"
    format: str = "png"
    quality: int = 95  # webp and jpeg


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


def _int_in(name: str, value, lo: int, hi: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
           name, value, f"must be an integer from {lo} to {hi}")


def read_prompt_file(path: str) -> List[str]:
    """Non-empty, stripped lines of a prompt file; lines starting with '#' are comments."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def validate(cfg: TesseraConfig) -> TesseraConfig:
    """Check every range and rule of a job; raise ConfigError on the first bad field."""
    m, j, t, c, o = cfg.model, cfg.job, cfg.tiling, cfg.cluster, cfg.output
    _one_of("model.name", m.name, MODEL_NAMES)
    _one_of("model.dtype", m.dtype, DTYPES)
    if m.name != "demo":
        _check(bool(m.path), "model.path", m.path, f"model={m.name} needs a local diffusers folder")
    if m.path and m.name != "demo":
        path = os.path.expanduser(m.path)
        _check(os.path.exists(path), "model.path", m.path, "no such file or folder")
        _check(os.path.isfile(os.path.join(path, "model_index.json")), "model.path", m.path,
               "not a diffusers folder (no model_index.json)")

    _int_in("job.width", j.width, 8, MAX_SIDE)
    _int_in("job.height", j.height, 8, MAX_SIDE)
    _int_in("job.steps", j.steps, 1, MAX_STEPS)
    _check(isinstance(j.guidance, (int, float)) and not isinstance(j.guidance, bool) and 0.0 <= j.guidance <= MAX_GUIDANCE,
           "job.guidance", j.guidance, f"must be a number from 0 to {MAX_GUIDANCE:g}")
    _one_of("job.scheduler", j.scheduler, SCHEDULERS)
    _check(bool(j.name) and "/" not in j.name and not j.name.startswith("."), "job.name", j.name,
           "must be a non-empty folder name")
    if j.prompt_file:
        _check(os.path.isfile(j.prompt_file), "job.prompt_file", j.prompt_file, "no such file")
    _check(len(prompts_of(j)) > 0, "job.prompts", list(j.prompts), "no prompt to render")
    for p in j.prompts:
        _check(isinstance(p, str) and p.strip() != "", "job.prompts", list(j.prompts),
               "prompts must be non-empty strings")
    _check(len(j.seeds) > 0, "job.seeds", list(j.seeds), "no seed to render")
    for s in j.seeds:
        _check(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63, "job.seeds", list(j.seeds),
               "seeds must be integers from 0 to 2**63-1")

    _one_of("tiling.method", t.method, TILING_METHODS)
    _one_of("tiling.wrap", t.wrap, WRAPS)
    _int_in("tiling.tile", t.tile, 8, 512)
    _int_in("tiling.overlap", t.overlap, 0, t.tile - 1)
    _int_in("tiling.batch", t.batch, 1, 256)
    _int_in("tiling.vae_tile", t.vae_tile, 8, 512)
    _int_in("tiling.vae_overlap", t.vae_overlap, 0, t.vae_tile // 2)

    if c.workers is not None:
        _int_in("cluster.workers", c.workers, 1, 4096)
    if c.cpus_per_worker is not None:
        _int_in("cluster.cpus_per_worker", c.cpus_per_worker, 1, 1024)
    _one_of("cluster.mode", c.mode, CLUSTER_MODES)

    _one_of("output.format", o.format, OUTPUT_FORMATS)
    _int_in("output.quality", o.quality, 1, 100)
    if o.format == "webp":  # libwebp's limit
        _check(max(j.width, j.height) <= 16383, "output.format", o.format, "WebP holds at most 16383 px a side")
    _check(bool(o.dir), "output.dir", o.dir, "must be a folder path")
    return cfg


def prompts_of(job: JobConfig) -> List[str]:
    """The job's prompts: `prompts` then the lines of `prompt_file`."""
    prompts = [p for p in job.prompts]
    if job.prompt_file and os.path.isfile(job.prompt_file):
        prompts += read_prompt_file(job.prompt_file)
    return prompts
