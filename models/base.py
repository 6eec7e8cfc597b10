"""What every family adapter shares: the family record the registry holds, the prompt cache, the VAE decode."""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import torch

from jobs.families import FamilySpec, family_of

from . import deepcache


@dataclass(frozen=True)
class Family:
    """How torch loads a model family and which adapter serves it; the rest of what the family is, its
    :class:`jobs.families.FamilySpec`, is `spec` (by `name`).

    `adapter(pipe, name, device, dtype, offload=..., weights=...)` wraps a loaded diffusers pipeline;
    `random_pipeline(device, dtype)` builds the family's full-size architecture with random weights
    (benchmarks only; configs written out in code, nothing downloaded); `pipeline_kwargs` go to
    `from_pretrained` / `from_single_file`.  The pipeline class is diffusers' `pipeline` (the spec's name), or
    `pipeline_class` for a family whose pipeline diffusers does not ship.  `single_file_transformer` names the
    diffusers transformer class whose `from_single_file` reads the family's single files where they hold the
    transformer alone (the spec's `single_file` is "transformer"); None where a single file is a whole pipeline
    (SD, SDXL) or is not taken.  `offload_keep` names the pipeline components that diffusers' CPU offload
    (`model.offload`) leaves out, moved to the GPU whole (`models.loading.cpu_offload`).
    """

    name: str
    adapter: Callable[..., Any]
    random_pipeline: Callable[[torch.device, torch.dtype], Any]
    pipeline_kwargs: Dict[str, Any] = field(default_factory=dict)
    pipeline_class: Optional[type] = None
    single_file_transformer: Optional[str] = None
    offload_keep: Tuple[str, ...] = ()

    @property
    def spec(self) -> FamilySpec:
        return family_of(self.name)

    @property
    def pipeline(self) -> str:
        """The diffusers pipeline class's name (model_index.json's `_class_name`)."""
        return self.spec.pipeline


class PromptCache:
    """The text conditioning of the last `size` (prompt, negative) pairs, each encoded once while in use.

    Jobs are prompt-major, so a prompt's seeds reach a worker together; the bound keeps a worker that sees
    thousands of prompts from holding all their embeddings (an SDXL pair is 1.3 MB in fp32)."""

    def __init__(self, encode: Callable[[str, str], Any], size: int = 64):
        self._encode, self.size = encode, size
        self._items: "OrderedDict[Tuple[str, str], Any]" = OrderedDict()

    def __call__(self, prompt: str, negative: str):
        key = (prompt, negative)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = self._encode(prompt, negative)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items


class Adapter:
    """What every family's adapter shares: the pipeline's modules, the scheduler config, the prompt cache,
    text encoders released after encoding under CPU offload, and the VAE decode.

    Subclasses name their `denoiser` ("unet" or "transformer", kept under that attribute) and implement
    `_encode_pair(prompt, negative)` and `predict(x, t, cond, guidance, tiles, canvas)`.  The loader
    (`models.load_model`) has already placed the modules (on the device, or under diffusers' CPU offload
    hooks) and chosen the VAE's dtype; inputs go to `device`, the execution device."""

    denoiser = "unet"

    def __init__(self, pipe, name: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 weights: str = "pretrained"):
        self.name, self.device, self.dtype, self.offload, self.weights_kind = name, device, dtype, offload, weights
        net = getattr(pipe, self.denoiser)
        setattr(self, self.denoiser, net)
        self.vae = pipe.vae
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.scheduler_config = dict(pipe.scheduler.config)
        self.latent_channels = net.config.in_channels
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for m in (net, self.vae, *self.text_modules()):
            m.eval()
        self._cache = PromptCache(self._encode_pair)
        self._host = {}  # id of a parked weight -> its host copy (`parked`)
        self.deep_calls = (deepcache.full, deepcache.shallow)  # model.compile compiles them too

    def deep_call(self, deep, halves: int, *inputs):
        """The denoiser under DeepCache (`deep`, a `models.deepcache.DeepStep`) on a model batch (`inputs`, as
        `deep_calls` take them after the denoiser; `halves` copies of the tiles: 2 under guidance): a full call
        that hands its deep features to `deep.keep` per tile, or a shallow one on `deep.features`."""
        full, shallow = self.deep_calls
        net = getattr(self, self.denoiser)
        if deep.features is None:
            out, feats = full(net, *inputs)
            deep.keep(deepcache.per_tile(feats, halves))
            return out
        return shallow(net, *inputs, deepcache.per_call(deep.features, halves))

    def unet_call(self, x: torch.Tensor, t, enc: torch.Tensor, added: Optional[dict] = None, deep=None,
                  halves: int = 1) -> torch.Tensor:
        """The UNet's prediction for a model batch x (`halves` tiles' copies: 2 under guidance, negatives first):
        the whole UNet, or under DeepCache (`deep`) `deep_call`'s."""
        if deep is None:
            return self.unet(x, t, encoder_hidden_states=enc, added_cond_kwargs=added).sample
        return self.deep_call(deep, halves, x, t, enc, added)

    @property
    def family(self) -> str:
        """The family's name (`jobs.families.MODELS` of the model name)."""
        return family_of(self.name).name

    @property
    def native(self) -> int:
        """The family's native side in pixels, where the model's config does not say (`native_size`)."""
        return family_of(self.name).native

    @property
    def native_size(self) -> int:
        """The side in pixels of the pictures the model was trained on: a UNet's `sample_size` times the VAE
        factor (512 for SD 1.5, 1024 for SDXL), else the family's `native` (`jobs.families.FamilySpec`)."""
        side = getattr(getattr(self, self.denoiser).config, "sample_size", None)
        if isinstance(side, (list, tuple)):
            side = int((side[0] * side[-1]) ** 0.5)
        return int(side) * self.vae_scale_factor if isinstance(side, int) and side > 0 else self.native

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.dtype

    def text_modules(self):
        return [self.text_encoder]

    def encode(self, prompt: str, negative: str):
        """The text conditioning of (prompt, negative): encoded once while the pair is in use, then kept."""
        return self._cache(prompt, negative)

    def _encode_pair(self, prompt: str, negative: str):
        raise NotImplementedError

    def _release_text_encoders(self) -> None:
        """Under CPU offload, hand the text encoders' GPU memory back at once (the cache keeps the embeddings);
        a later new prompt brings them back through the offload hooks."""
        if self.offload == "model" and self.device.type == "cuda":
            for m in self.text_modules():
                m.to("cpu")
            torch.cuda.empty_cache()

    def vae_on_device(self, on: bool) -> None:
        """Under `model.offload=model`, bring the VAE to the GPU for a tiled decode (`on`) and send it back after.
        The tiled decode calls the VAE's blocks, never the `forward` that diffusers' offload hook wraps, so the
        hook would leave it on the CPU; the denoiser makes room (its hook brings it back on its next call)."""
        if self.offload != "model" or self.device.type != "cuda":
            return
        if on:
            getattr(self, self.denoiser).to("cpu")
            self.vae.to(self.device)
        else:
            self.vae.to("cpu")
            torch.cuda.empty_cache()

    @contextmanager
    def parked(self):
        """The denoiser and the text encoders off the device for the block, then back: room for a VAE pass that does
        not fit beside them (`cluster.renderer.Renderer.parks`: a GPU without `model.offload`; under offload they
        are off already). The weights do not change, so their copy in pinned host memory is made at the first park
        and kept: each park after only drops the device copy, each return is one host-to-device copy."""
        if self.offload != "none":
            yield
            return
        tensors = [t for m in (getattr(self, self.denoiser), *self.text_modules())
                   for t in (*m.parameters(), *m.buffers())]
        host = self._host_copies(tensors)
        for t in tensors:
            t.data = host[id(t)]
        torch.cuda.empty_cache()
        try:
            yield
        finally:
            for t in tensors:
                t.data = host[id(t)].to(self.device, non_blocking=True)

    def _host_copies(self, tensors) -> dict:
        """id of each of `tensors` -> its copy in host memory (`_host_empty`), made once and kept while the
        tensor keeps its dtype and shape (an fp32 retry changes them)."""
        for t in tensors:
            kept = self._host.get(id(t))
            if kept is None or kept.dtype != t.dtype or kept.shape != t.shape:
                self._host[id(t)] = _host_empty(t).copy_(t.detach())
        return self._host

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [1, C, h, w] to an image [1, 3, f*h, f*w] in [-1, 1] in one piece."""
        return decode_latents(self.vae, z, self.device)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Latents of the VAE's own space (an encoder's output) as diffusion latents, float32 on the CPU."""
        return scale_latents(self.vae, z)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in the VAE's own space (scale and shift undone), on its device and dtype: what
        `tiling.decode_tiled_shared` takes."""
        return unscale_latents(self.vae, z, self.device)


def _host_empty(t: torch.Tensor) -> torch.Tensor:
    """An empty host tensor like `t`: pinned where CUDA can pin it, else pageable (a host short of memory to lock)."""
    if torch.cuda.is_available():
        try:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(t.shape, dtype=t.dtype)


@torch.no_grad()
def unscale_latents(vae, z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Diffusion latents to the VAE's own latent space, on `device` in the VAE's dtype, as diffusers'
    pipelines do: undo `scaling_factor` (and `shift_factor`, or `latents_mean`/`latents_std`).

    The VAE runs in its own dtype: fp32 when the model is fp16 and the VAE asks for `force_upcast`
    (SDXL's VAE overflows in fp16), else the model's."""
    cfg = vae.config
    z = z.to(device, vae.dtype)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, device=device, dtype=z.dtype).view(shape)
        std = torch.tensor(std, device=device, dtype=z.dtype).view(shape)
        return z * std / cfg.scaling_factor + mean
    return z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)


def scale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The inverse of `unscale_latents`: the VAE's latents [1, C, h, w] as diffusion latents (float32, CPU)."""
    cfg = vae.config
    z = z.float().cpu()
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        return (z - torch.tensor(mean).view(shape)) * cfg.scaling_factor / torch.tensor(std).view(shape)
    return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


def decode_latents(vae, z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Latents [1, C, h, w] to an image [1, 3, f*h, f*w] in [-1, 1] in one piece (full-frame decode)."""
    return vae.decode(unscale_latents(vae, z, device)).sample.float().cpu()


def seeded_build(build: Callable[[], Any], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The pipeline `build()` makes with the global RNG seeded (and restored after), its tensors allocated on
    `device`, then every module cast to `dtype`.

    Random full-size weights are the same on every worker with the same device kind, so a benchmark's
    pictures are reproducible; building on the GPU directly skips gigabytes of CPU init and copy."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        pipe = build()
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.to(dtype=dtype)
    return pipe
