"""Model families loaded from local weights, behind one small interface:

``encode(prompt, negative)``, ``predict(tiles, t, cond, guidance)``, ``decode(latents)``, plus
``scheduler_config``, ``latent_channels`` and ``vae_scale_factor``.  Nothing here reaches a model hub.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers / transformers are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notices (no torchvision, ...)

import torch  # noqa: E402

from .schedulers import SCHEDULERS, make_scheduler  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device_dtype(dtype: str):
    """The device (first visible GPU, else CPU) and torch dtype; `auto` is bf16 on GPU, fp32 on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[dtype]


def resolve_path(model_cfg) -> str:
    """The local folder of the model's weights (building the demo model on first use)."""
    if model_cfg.name == "demo":
        from .demo import ensure_demo
        return ensure_demo(os.path.expanduser(model_cfg.path) if model_cfg.path else None)
    path = os.path.expanduser(model_cfg.path)
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise ValueError(f"model.path={model_cfg.path!r}: not a diffusers folder (no model_index.json)")
    return path


def quiet() -> None:
    """Keep the libraries' load-time bars and notices out of a worker's log; errors still show."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(model_cfg):
    """Load `model_cfg` (name, path, dtype) from local files onto this process's device."""
    from diffusers import StableDiffusionPipeline

    from .sd import SDModel

    quiet()
    device, dtype = pick_device_dtype(model_cfg.dtype)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_path(model_cfg), local_files_only=True, dtype=dtype,
                                                   safety_checker=None, requires_safety_checker=False)
    return SDModel(pipe, model_cfg.name, device, dtype)


__all__ = ["SCHEDULERS", "make_scheduler", "load_model", "resolve_path", "pick_device_dtype"]
