"""The diffusers schedulers behind `job.scheduler`, built from a model's own scheduler config.

Which of them fit which family is `jobs.families.FamilySpec.schedulers` (checked before anything runs): the
noise-prediction UNets (SD 1.x, SDXL) take the first five; `flow_euler` is for flow-matching families.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),
}


def make_scheduler(name: str, config: dict):
    """A fresh scheduler of kind `name` from a model's scheduler config (one per image: steppers keep state)."""
    if name not in SCHEDULERS:
        raise ValueError(f"job.scheduler={name!r}: must be one of {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    return cls.from_config(dict(config), **extra)


def calculate_shift(seq_len: int, config) -> float:
    """The dynamic shift `mu` for `seq_len` image tokens: the line through (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) of the scheduler's config, as diffusers' flow pipelines compute it."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (top - base) / (hi - lo)
    return seq_len * m + base - m * lo


def tile_seq_len(height: int, width: int, tile: int, patch: Optional[int]) -> Optional[int]:
    """Image tokens a transformer with `patch` x `patch` patches sees in one tile of a height x width latent
    canvas (a tile is min(tile, side) a side); None for a model without patches (a UNet)."""
    if not patch:
        return None
    return (min(tile, height) // patch) * (min(tile, width) // patch)


def timestep_kwargs(config, steps: int, seq_len: Optional[int]) -> dict:
    """Extra `set_timesteps` arguments: none for a UNet's scheduler; for a flow transformer (`seq_len` image
    tokens), the sigmas linspace(1, 1/steps, steps) and the dynamic shift `mu`, as `ZImagePipeline` and
    `Lumina2Pipeline` pass them (the scheduler ignores mu unless its config has use_dynamic_shifting)."""
    if seq_len is None:
        return {}
    return {"sigmas": np.linspace(1.0, 1.0 / steps, steps).tolist(),
            "mu": calculate_shift(seq_len, dict(config))}
