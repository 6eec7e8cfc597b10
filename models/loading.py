"""Loading a family's pipeline from local files: a diffusers folder, one .safetensors file, or random weights.

Every path is local (``local_files_only=True``); the options are checked before any weights are read:

* a diffusers folder: ``from_pretrained``, safetensors only unless ``model.allow_pickle``; a family whose
  weights ship Python code (``jobs.families.FamilySpec.remote_code``) only with ``model.trust_remote_code``;
* one ``.safetensors`` (or, with ``model.allow_pickle``, ``.ckpt``) file in the original (LDM / A1111)
  layout: ``from_single_file(..., config=model.config)``, where ``model.config`` is a local diffusers
  folder of the same architecture that supplies the component configs, the scheduler and the tokenizers
  (a single file holds none of them, and no hub is asked);
* for the DiTs whose single files hold the transformer alone (Z-Image, Lumina 2: e.g. ComfyUI's
  ``model.diffusion_model.`` files): the family's ``single_file_transformer`` class reads the file
  (``from_single_file``, its config from ``model.config``'s ``transformer/``), and the pipeline comes from the
  ``model.config`` folder, its text encoder, tokenizer, VAE and scheduler included, around that transformer;
* ``model.weights=random``: the family's full-size architecture, random weights, for benchmarks.

Then the VAE's dtype (fp32 when fp16 is asked and the VAE has ``force_upcast``), the attention backend,
and the placement: on the device, or under diffusers' model / sequential CPU offload (GPU only; `cpu_offload`,
the family's `offload_keep` and, under sequential offload, the VAE left out of it).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from jobs.spec import LIGHT_VAE, ConfigError, ModelConfig, validate_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device_dtype(dtype: str):
    """The device (first visible GPU, else CPU) and torch dtype; `auto` is bf16 on GPU, fp32 on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[dtype]


def resolve_path(model_cfg) -> str:
    """The local folder or file of the model's weights: the shipped demo's package folder, the random demo's
    cache folder (built on first use), or `model.path`."""
    if model_cfg.name == "demo":
        from .demo import shipped_demo_path
        return shipped_demo_path()
    if model_cfg.name == "demo_random":
        from .demo import ensure_demo
        return ensure_demo(os.path.expanduser(model_cfg.path) if model_cfg.path else None)
    return os.path.expanduser(model_cfg.path)


def quiet() -> None:
    """Keep the libraries' load-time bars and notices out of a worker's log; errors still show."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def check_runtime(m: ModelConfig, device: torch.device) -> None:
    """What only the worker can know (a GPU, xformers), checked before gigabytes of weights are read."""
    if m.offload != "none" and device.type != "cuda":
        raise ConfigError("model.offload", m.offload,
                          "CPU offload moves weights between the CPU and a GPU; this worker has no GPU "
                          "(use model.offload=none)")
    if m.attention == "xformers":
        from diffusers.utils import is_xformers_available

        if not is_xformers_available():
            raise ConfigError("model.attention", m.attention,
                              "xformers is not installed here (pip install xformers, a build matching torch "
                              f"{torch.__version__}), or use model.attention=sdpa")
        if device.type != "cuda":
            raise ConfigError("model.attention", m.attention, "xformers needs a GPU; this worker has none")


def load_pipeline(family, m: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The family's diffusers pipeline from `m`'s weights, in `dtype`, still on the CPU (or built on
    `device` for random weights without offload)."""
    import diffusers

    if m.weights == "random":
        return family.random_pipeline(device if m.offload == "none" else torch.device("cpu"), dtype)
    cls = family.pipeline_class or getattr(diffusers, family.pipeline)
    path = resolve_path(m)
    # allow_pickle: safetensors where a component has them, pickles where not (False would refuse safetensors)
    folder = dict(local_files_only=True, dtype=dtype, use_safetensors=None if m.allow_pickle else True,
                  **family.pipeline_kwargs)
    if family.spec.remote_code:
        folder["trust_remote_code"] = m.trust_remote_code
    if os.path.isdir(path):
        return cls.from_pretrained(path, **folder)
    config = os.path.expanduser(m.config)
    if family.single_file_transformer:
        return cls.from_pretrained(config, transformer=load_transformer_file(family, m, path, config, dtype), **folder)
    return cls.from_single_file(path, config=config, local_files_only=True, dtype=dtype, **family.pipeline_kwargs)


def load_transformer_file(family, m: ModelConfig, path: str, config: str, dtype: torch.dtype):
    """The transformer of a transformer-only single file, its config from `config`'s transformer/.

    diffusers only logs the file's tensors its converter cannot place, and a tensor the file lacks stays on the
    meta device until the cast to `dtype` fails with "Cannot copy out of meta tensor": that is told here as the
    file's fault."""
    import diffusers

    cls = family.single_file_transformer
    try:
        return getattr(diffusers, cls).from_single_file(path, config=config, subfolder="transformer",
                                                        local_files_only=True, dtype=dtype)
    except NotImplementedError as e:
        if "meta tensor" not in str(e):
            raise
        raise ConfigError("model.path", m.path,
                          f"lacks some of the {cls}'s tensors: not a model={m.name} transformer file, or not of the "
                          "architecture in model.config's transformer/config.json") from e


def replace_vae(pipe, m: ModelConfig, dtype: torch.dtype) -> None:
    """`model.vae`: the pipeline's VAE replaced by one of the same class and latent space read from a local folder
    (`light`: the demo's shipped light VAE), before the VAE's dtype and device are set."""
    from .demo import shipped_light_vae_path

    path = shipped_light_vae_path() if m.vae == LIGHT_VAE else os.path.expanduser(m.vae)
    own = pipe.vae
    try:
        vae = type(own).from_pretrained(path, local_files_only=True, torch_dtype=dtype,
                                        use_safetensors=None if m.allow_pickle else True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError("model.vae", m.vae, f"is not a {type(own).__name__} folder that loads: {e}") from e
    differ = [f"{k} {getattr(vae.config, k, None)} against the model's {getattr(own.config, k, None)}"
              for k in ("latent_channels", "scaling_factor", "shift_factor")
              if getattr(vae.config, k, None) != getattr(own.config, k, None)]
    if len(vae.config.block_out_channels) != len(own.config.block_out_channels):
        differ.append(f"{2 ** (len(vae.config.block_out_channels) - 1)}x downsampling against the model's "
                      f"{2 ** (len(own.config.block_out_channels) - 1)}x")
    if differ:
        raise ConfigError("model.vae", m.vae, "is not in the model's latent space: " + ", ".join(differ))
    pipe.register_modules(vae=vae)


def place(pipe, family, m: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """VAE dtype, attention backend, then the device or CPU offload hooks (in that order: dtype changes
    must precede the hooks)."""
    vae = pipe.vae
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(dtype=torch.float32)  # diffusers upcasts around each decode; kept in fp32 here, 80 M parameters
    if m.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    # sdpa: diffusers' default attention processors already call torch's scaled_dot_product_attention.
    if m.offload == "none":
        pipe.to(device)
        return
    # sequential: the VAE (~0.2 GB) stays on the GPU: its weights would sit on the meta device, streamed in by hooks
    # on each submodule's forward, and the tiled decode runs a copy of its blocks that those hooks do not fit.
    cpu_offload(pipe, m.offload, device, (*family.offload_keep, *(("vae",) if m.offload == "sequential" else ())))


def cpu_offload(pipe, mode: str, device: torch.device, keep: Sequence[str] = ()) -> None:
    """diffusers' CPU offload of `pipe` onto `device`, `mode` "model" (`enable_model_cpu_offload`) or "sequential"
    (`enable_sequential_cpu_offload`), the components named in `keep` left out of it: moved to `device` whole, no
    hooks.

    The one place Tessera reaches into diffusers' offload internals (checked against diffusers 0.42.1): neither
    method takes the components to leave out; both read the pipeline's private `_exclude_from_cpu_offload` (a class
    attribute diffusers' own pipelines set, e.g. for a safety checker), so it is widened here on this instance.
    tests/test_models.py::test_cpu_offload_leaves_the_kept_components_whole fails if diffusers stops honouring it."""
    pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, *keep]
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"CPU offload mode {mode!r}: 'model' or 'sequential'")


def compile_denoiser(adapter) -> None:
    """`model.compile`: torch.compile the adapter's denoiser (its `unet`, or `transformer` for DiTs) with
    static shapes; the renderer feeds it one batch shape (short batches padded), so it compiles once per tile
    size, on the first call, and the worker reuses it for the whole job."""
    setattr(adapter, adapter.denoiser, torch.compile(getattr(adapter, adapter.denoiser), dynamic=False))
    # DeepCache's two parts of the forward (model.deep_cache), compiled lazily: on their first call, if any
    adapter.deep_calls = tuple(torch.compile(f, dynamic=False) for f in adapter.deep_calls)


def load_model(model_cfg: ModelConfig):
    """Load `model_cfg` from local files (or build random weights) onto this process's device: the adapter
    of its family (`models.family`)."""
    from . import family as family_of

    validate_model(model_cfg)
    quiet()
    fam = family_of(model_cfg.name)
    device, dtype = pick_device_dtype(model_cfg.dtype)
    check_runtime(model_cfg, device)
    pipe = load_pipeline(fam, model_cfg, device, dtype)
    if model_cfg.vae is not None:
        replace_vae(pipe, model_cfg, dtype)
    place(pipe, fam, model_cfg, device, dtype)
    return fam.adapter(pipe, model_cfg.name, device, dtype, offload=model_cfg.offload, weights=model_cfg.weights)
