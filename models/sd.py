"""Stable Diffusion 1.x family (and the demo model): a UNet that predicts noise, CLIP-L text, an 8x VAE.

`SD15_*` are Stable Diffusion 1.5's published component configs (runwayml/stable-diffusion-v1-5), written
out here so that `model.weights=random` builds the full-size architecture without reaching a hub.
"""
from __future__ import annotations

import torch

from .base import Adapter, Family, seeded_build

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu",
)  # 859.5 M parameters
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
)  # 83.7 M
CLIP_L_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)  # OpenAI CLIP ViT-L/14's text tower, 123.1 M
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, prediction_type="epsilon", timestep_spacing="leading",
)


def offline_tokenizer():
    """A CLIP BPE tokenizer over a tiny byte-level vocabulary (models.demo): for random weights only,
    where the ids need only be valid, never meaningful."""
    from .demo import _build_tokenizer

    return _build_tokenizer()


def clip_text_config(tokenizer, **arch):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def random_pipeline(device: torch.device, dtype: torch.dtype):
    """SD 1.5's full-size architecture with random weights (seeded), on `device` in `dtype`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = offline_tokenizer()
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER)  # outside the device context: it keeps its tables on the CPU

    def build():
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(clip_text_config(tokenizer, **CLIP_L_TEXT)),
            tokenizer=tokenizer, unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    return seeded_build(build, device, dtype)


class SDModel(Adapter):
    """One loaded SD 1.x pipeline behind Tessera's model interface (`models.base.Adapter`)."""

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def _encode_pair(self, prompt: str, negative: str) -> torch.Tensor:
        """[2, L, D] text embeddings (negative, prompt); an empty negative is the embedding of "" as in
        StableDiffusionPipeline."""
        cond = torch.cat([self._embed(negative), self._embed(prompt)])
        self._release_text_encoders()
        return cond

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t, cond: torch.Tensor, guidance: float, tiles=None, canvas=None,
                deep=None) -> torch.Tensor:
        """Noise for a batch of latent tiles [n, C, h, w], both halves of guidance in one UNet call (`deep`:
        under DeepCache, `Adapter.unet_call`).

        `tiles` (where each lies) and `canvas` (the latent canvas's size) matter to families with size
        conditioning, not to SD 1.x."""
        n = x.shape[0]
        x = x.to(self.device, self.dtype)
        if guidance > 1.0:
            emb = cond.repeat_interleave(n, dim=0)  # n negatives, then n prompts
            uncond, text = self.unet_call(torch.cat([x, x]), t, emb, deep=deep, halves=2).float().chunk(2)
            eps = uncond + guidance * (text - uncond)
        else:
            eps = self.unet_call(x, t, cond[1:].expand(n, -1, -1), deep=deep).float()
        return eps


FAMILY = Family(name="sd", adapter=SDModel, random_pipeline=random_pipeline,
                pipeline_kwargs={"safety_checker": None, "requires_safety_checker": False})
