"""Model families loaded from local weights, behind one small interface.

An adapter has ``encode(prompt, negative) -> cond``, ``predict(x, t, cond, guidance, tiles, canvas)`` (what the
scheduler's step takes, for a batch of latent tiles, both halves of guidance: noise for the UNets, the negated
velocity for the flow DiTs), ``decode(latents)``, ``unscale(latents)``, and ``scheduler_config``,
``latent_channels``, ``vae_scale_factor``, ``patch_size`` (DiTs only), ``name``, ``device``, ``weights_kind``
(pretrained | random).

The registry is ``jobs.families`` (no torch): ``MODELS`` maps ``model.name`` to a family, ``FAMILIES`` holds each
family's :class:`jobs.families.FamilySpec` (pipeline class, schedulers, native size, patch size, single files,
shipped code, stage guides) and names the module here whose ``FAMILY`` (:class:`models.base.Family`) says how
torch loads it and which adapter serves it; :func:`family` finds it, :func:`load_model` is the one entry point.
A new family is one ``FamilySpec`` row and one ``MODELS`` row in ``jobs/families.py``, a module here with an
adapter and a ``FAMILY``, and a ``conf/model/<name>.yaml``.  The flow-matching DiTs (Z-Image, Lumina 2, NewBie)
share ``models.flow``; NewBie extends Lumina 2's adapter.  Nothing here reaches a hub.
"""
from __future__ import annotations

import importlib
import os

# The one place Tessera sets these (run.py, the workers and the benches import diffusers through this package),
# before diffusers / transformers are imported; a user's own setting stands.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices (no torchvision, ...)

import torch  # noqa: E402

from jobs.families import FAMILIES, MODELS  # noqa: E402

from .loading import DTYPES, load_model, pick_device_dtype, quiet, resolve_path  # noqa: E402
from .schedulers import SCHEDULERS, make_scheduler  # noqa: E402


def family(name: str):
    """The :class:`models.base.Family` of a family name ("sd") or a model name ("sd15"): the ``FAMILY`` of the
    module its spec names (``jobs.families.FamilySpec.module``)."""
    fam = MODELS.get(name, name)
    if fam not in FAMILIES:
        raise ValueError(f"model.name={name!r}: no adapter for family {fam!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[fam].module).FAMILY


__all__ = ["DTYPES", "SCHEDULERS", "family", "load_model", "make_scheduler", "pick_device_dtype",
           "quiet", "resolve_path"]
