"""What every family adapter shares: the family record the registry holds, the prompt cache, the VAE decode."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Tuple

import torch


@dataclass(frozen=True)
class Family:
    """One model family: how its weights load and which adapter serves them.

    `adapter(pipe, name, device, dtype, offload=..., weights=...)` wraps a loaded diffusers pipeline;
    `random_pipeline(device, dtype)` builds the family's full-size architecture with random weights
    (benchmarks only; configs written out in code, nothing downloaded); `pipeline_kwargs` go to
    `from_pretrained` / `from_single_file`.  The pipeline class is `jobs.spec.FAMILY_PIPELINES[name]`.
    """

    name: str
    pipeline: str
    adapter: Callable[..., Any]
    random_pipeline: Callable[[torch.device, torch.dtype], Any]
    pipeline_kwargs: Dict[str, Any] = field(default_factory=dict)


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


def decode_latents(vae, z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Latents [1, C, h, w] to an image [1, 3, f*h, f*w] in [-1, 1] in one piece (full-frame decode)."""
    return vae.decode(unscale_latents(vae, z, device)).sample.float().cpu()


def seeded_build(build: Callable[[], Any], device: torch.device, seed: int = 0):
    """`build()` with the global RNG seeded (and restored after), its tensors allocated on `device`.

    Random full-size weights are the same on every worker with the same device kind, so a benchmark's
    pictures are reproducible; building on the GPU directly skips gigabytes of CPU init and copy."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        return build()
