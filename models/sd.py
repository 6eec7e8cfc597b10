"""Stable Diffusion 1.x family (and the demo model): a UNet that predicts noise, CLIP text, an 8x VAE."""
from __future__ import annotations

from typing import Dict, Tuple

import torch


class SDModel:
    """One loaded SD 1.x pipeline behind Tessera's model interface."""

    family = "sd"

    def __init__(self, pipe, name: str, device: torch.device, dtype: torch.dtype):
        self.name, self.device, self.dtype = name, device, dtype
        self.unet, self.vae = pipe.unet, pipe.vae
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.scheduler_config = dict(pipe.scheduler.config)
        self.latent_channels = self.unet.config.in_channels
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        upcast = dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        self.vae_dtype = torch.float32 if upcast else dtype
        self.unet.to(device, dtype).eval()
        self.text_encoder.to(device, dtype).eval()
        self.vae.to(device, self.vae_dtype).eval()
        self._cond: Dict[Tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def encode(self, prompt: str, negative: str) -> torch.Tensor:
        """[2, L, D] text embeddings (negative, prompt), computed once per pair and kept."""
        key = (prompt, negative)
        if key not in self._cond:
            self._cond[key] = torch.cat([self._embed(negative), self._embed(prompt)])
        return self._cond[key]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t, cond: torch.Tensor, guidance: float, tiles=None, canvas=None) -> torch.Tensor:
        """Noise for a batch of latent tiles [n, C, h, w], both halves of guidance in one UNet call.

        `tiles` (where each lies) and `canvas` (the latent canvas's size) matter to families with size
        conditioning, not to SD 1.x."""
        n = x.shape[0]
        x = x.to(self.device, self.dtype)
        if guidance > 1.0:
            emb = cond.repeat_interleave(n, dim=0)  # n negatives, then n prompts
            uncond, text = self.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample.float().chunk(2)
            eps = uncond + guidance * (text - uncond)
        else:
            eps = self.unet(x, t, encoder_hidden_states=cond[1:].expand(n, -1, -1)).sample.float()
        return eps.cpu()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [1, C, h, w] to an image [1, 3, 8h, 8w] in [-1, 1]."""
        cfg = self.vae.config
        z = z.to(self.device, self.vae_dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        return self.vae.decode(z).sample.float().cpu()
