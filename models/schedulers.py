"""The diffusers schedulers behind `job.scheduler`, built from a model's own scheduler config.

Which of them fit which family is `jobs.spec.FAMILY_SCHEDULERS` (checked before anything runs): the
noise-prediction UNets (SD 1.x, SDXL) take the first five; `flow_euler` is for flow-matching families.
"""
from __future__ import annotations

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
