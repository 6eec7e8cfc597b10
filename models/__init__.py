"""Model families loaded from local weights, behind one small interface.

An adapter has ``encode(prompt, negative) -> cond``, ``predict(x, t, cond, guidance, tiles, canvas)`` (what the
scheduler's step takes, for a batch of latent tiles, both halves of guidance: noise for the UNets, the negated
velocity for the flow DiTs), ``decode(latents)``, ``unscale(latents)``, and ``scheduler_config``,
``latent_channels``, ``vae_scale_factor``, ``patch_size`` (DiTs only), ``name``, ``device``, ``weights_kind``
(pretrained | random).

The registry: ``jobs.spec.MODEL_FAMILIES`` maps ``model.name`` to a family, :data:`FAMILIES` maps a family
to the module whose ``FAMILY`` (:class:`models.base.Family`) says how to load it and which adapter serves
it; :func:`load_model` is the one entry point.  A new family is a module with an adapter and a ``FAMILY``,
one row here, and one row in each table of ``jobs.spec`` (names, pipeline class, schedulers; patch size for a
transformer).  The flow-matching DiTs (Z-Image, Lumina 2, NewBie) share ``models.flow``; NewBie extends Lumina 2's
adapter.  Nothing here reaches a hub.
"""
from __future__ import annotations

import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers / transformers are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices (no torchvision, ...)

import torch  # noqa: E402

from jobs.spec import MODEL_FAMILIES  # noqa: E402

from .loading import DTYPES, load_model, pick_device_dtype, quiet, resolve_path  # noqa: E402
from .schedulers import SCHEDULERS, make_scheduler  # noqa: E402

FAMILIES = {"sd": "models.sd", "sdxl": "models.sdxl", "z_image": "models.zimage",
            "lumina2": "models.lumina2", "newbie": "models.newbie"}  # family -> module defining FAMILY


def family(name: str):
    """The :class:`models.base.Family` of a family name ("sd") or a model name ("sd15")."""
    fam = MODEL_FAMILIES.get(name, name)
    if fam not in FAMILIES:
        raise ValueError(f"model.name={name!r}: no adapter for family {fam!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[fam]).FAMILY


__all__ = ["DTYPES", "FAMILIES", "SCHEDULERS", "family", "load_model", "make_scheduler", "pick_device_dtype",
           "quiet", "resolve_path"]
