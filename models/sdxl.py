"""Stable Diffusion XL family: two CLIP text encoders, a UNet with size conditioning, an 8x VAE.

Text, as `StableDiffusionXLPipeline.encode_prompt` does it: each encoder's penultimate hidden states,
concatenated (768 + 1280 = 2048 features), and the pooled, projected embedding of the second encoder.
An empty `job.negative_prompt` is diffusers' `negative_prompt=None`: with `force_zeros_for_empty_prompt`
(SDXL base sets it) the unconditional half is all zeros; any other negative prompt is encoded.

Size conditioning (`add_time_ids` = original_size, crops_coords_top_left, target_size, in pixels) is set
per tile: original_size is the whole canvas (canvas x vae_scale_factor), crops_coords_top_left the tile's
top-left corner (tile.y x 8, tile.x x 8) and target_size the tile's size.  That is what SDXL saw in
training for a random crop of a larger picture -- "this is the window at (top, left) of an H x W image" --
and a tile is exactly such a window, so the model draws a part of one big picture rather than a whole
picture framed in every tile.  A canvas that fits in one tile gets (H, W, 0, 0, H, W), diffusers' default
for an H x W image, so a one-tile render equals `StableDiffusionXLPipeline`'s (tests/test_models.py).
Both halves of guidance get the same ids, as in diffusers when no negative_* sizes are given.

`SDXL_*` are SDXL base 1.0's published component configs (stabilityai/stable-diffusion-xl-base-1.0),
written out so that `model.weights=random` builds the full-size architecture without reaching a hub.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch

from .base import Family, seeded_build
from .sd import CLIP_L_TEXT, SD_SCHEDULER, SD_VAE, SDModel, clip_text_config, offline_tokenizer

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + 1280 pooled text
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)  # 2,567.5 M parameters
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_BIGG_TEXT = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
)  # OpenCLIP ViT-bigG/14's text tower with its projection, 694.7 M


class SDXLCond(NamedTuple):
    """Text conditioning of one (prompt, negative) pair: [2, 77, 2048] hidden states, [2, 1280] pooled;
    row 0 the negative, row 1 the prompt."""

    embeds: torch.Tensor
    pooled: torch.Tensor


def random_pipeline(device: torch.device, dtype: torch.dtype):
    """SDXL base's full-size architecture with random weights (seeded), on `device` in `dtype`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = offline_tokenizer()
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER)  # outside the device context: it keeps its tables on the CPU

    def build():
        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(clip_text_config(tokenizer, **CLIP_L_TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tokenizer, **CLIP_BIGG_TEXT)),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False)

    return seeded_build(build, device, dtype)


class SDXLModel(SDModel):
    """One loaded SDXL (base) pipeline behind Tessera's model interface."""

    def __init__(self, pipe, name: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 weights: str = "pretrained"):
        # Both encoders, or only the second (as diffusers allows); the pooled embedding is the second's.
        self.text_encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
        self.tokenizers = [t for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
                           if e is not None]
        self.text_encoder_2, self.tokenizer_2 = pipe.text_encoder_2, pipe.tokenizer_2
        self.force_zeros_for_empty_prompt = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
        super().__init__(pipe, name, device, dtype, offload, weights)
        n_ids = 6  # original_size, crops_coords_top_left, target_size: (h, w) each
        want = self.unet.add_embedding.linear_1.in_features
        got = self.unet.config.addition_time_embed_dim * n_ids + self.text_encoder_2.config.projection_dim
        if want != got:
            raise ValueError(f"model={name}: the UNet takes {want} added-condition features, SDXL base gives {got} "
                             "(6 size ids and the pooled text); is this an SDXL refiner or another family?")

    def text_modules(self):
        return list(self.text_encoders)

    @torch.no_grad()
    def _embed(self, text: str) -> Tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def _encode_pair(self, prompt: str, negative: str) -> SDXLCond:
        embeds, pooled = self._embed(prompt)
        if negative == "" and self.force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = self._embed(negative)
        self._release_text_encoders()
        return SDXLCond(torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled]))

    def time_ids(self, tiles: Sequence, canvas: Tuple[int, int]) -> torch.Tensor:
        """[n, 6] add_time_ids of tiles (latent y, x, h, w) on a latent canvas (H, W): the canvas's size,
        the tile's top-left corner and the tile's size, in pixels."""
        f = self.vae_scale_factor
        rows = [(canvas[0] * f, canvas[1] * f, tile.y * f, tile.x * f, tile.h * f, tile.w * f) for tile in tiles]
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t, cond: SDXLCond, guidance: float, tiles: Optional[Sequence] = None,
                canvas: Optional[Tuple[int, int]] = None, deep=None) -> torch.Tensor:
        """Noise for a batch of latent tiles [n, C, h, w], both halves of guidance in one UNet call (`deep`:
        under DeepCache, `Adapter.unet_call`).

        Without `tiles`, each tile is taken as a whole h x w canvas (diffusers' conditioning of an image)."""
        from tiling.grid import Tile

        n, _, h, w = x.shape
        if tiles is None:
            tiles, canvas = [Tile(0, 0, h, w)] * n, (h, w)
        ids = self.time_ids(tiles, canvas)
        x = x.to(self.device, self.dtype)
        if guidance > 1.0:
            emb = cond.embeds.repeat_interleave(n, dim=0)  # n negatives, then n prompts
            added = {"text_embeds": cond.pooled.repeat_interleave(n, dim=0), "time_ids": torch.cat([ids, ids])}
            out = self.unet_call(torch.cat([x, x]), t, emb, added, deep, halves=2)
            uncond, text = out.float().chunk(2)
            eps = uncond + guidance * (text - uncond)
        else:
            added = {"text_embeds": cond.pooled[1:].expand(n, -1), "time_ids": ids}
            eps = self.unet_call(x, t, cond.embeds[1:].expand(n, -1, -1), added, deep).float()
        return eps


FAMILY = Family(name="sdxl", adapter=SDXLModel, random_pipeline=random_pipeline,
                pipeline_kwargs={"add_watermarker": False})
