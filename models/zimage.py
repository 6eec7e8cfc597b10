"""Z-Image (Z-Image-Turbo and its fine-tunes): a single-stream flow-matching DiT, Qwen3 text, the FLUX VAE.

As `ZImagePipeline` (diffusers 0.42) does it, per tile (see models/flow.py for the shared contract):

* text: the prompt in Qwen's chat markup (`apply_chat_template`, generation prompt, thinking enabled), padded
  to 512 tokens, the text encoder's penultimate hidden states, then only the real tokens (a variable-length
  [L, 2560] per prompt); an empty `job.negative_prompt` is encoded as "" (the pipeline's default);
* guidance: `job.guidance` is the pipeline's `guidance_scale`, with Z-Image's own convention
  v = v_text + g (v_text - v_negative): guidance is on for g > 0, and g = 0 is the plain prompt (Z-Image-Turbo
  is run with 0).  The pipeline's `cfg_normalization` and `cfg_truncation` are left at their defaults (off);
* the transformer takes a list of [16, 1, h, w] tiles with 2x2 patches and the time 1 - t/1000, and the
  prediction is negated for the scheduler.

Dynamic shift: Z-Image-Turbo's published scheduler uses a static shift (3.0); a config with
`use_dynamic_shifting` gets `mu` from the token count of one *tile* (what the model sees, and what the
pipeline would use for a picture of that size), not of the whole canvas: a 4K canvas has 32,400 tokens, 8x
the schedule's max_image_seq_len, and its extrapolated mu would leave nearly every step at full noise.

Weights: a diffusers folder, or a single file of the transformer alone in its original layout (fused `qkv`,
`x_embedder`/`final_layer`; ComfyUI's carry a `model.diffusion_model.` prefix), which diffusers'
`ZImageTransformer2DModel.from_single_file` converts; the rest comes from the `model.config` folder.

`ZIMAGE_*` / `QWEN3_4B` are Tongyi-MAI/Z-Image-Turbo's published component configs, written out so that
`model.weights=random` builds the full-size architecture (6.2 B transformer, 4.0 B text encoder) offline.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import deepcache
from .base import Family, seeded_build
from .flow import CHAT_TEMPLATE, FLUX_VAE, FlowModel, byte_tokenizer

ZIMAGE_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
    axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512),
)
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_theta=1000000.0, attention_bias=False, tie_word_embeddings=True,
)  # Qwen3-4B, as Z-Image ships it (a Qwen3Model: no LM head)
ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default


class ZImageCond(NamedTuple):
    """Text conditioning of one (prompt, negative) pair: the real tokens' hidden states, [L, D] each."""

    prompt: torch.Tensor
    negative: torch.Tensor


def random_pipeline(device: torch.device, dtype: torch.dtype):
    """Z-Image-Turbo's full-size architecture with random weights (seeded), on `device` in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = byte_tokenizer(bos=False, model_max_length=MAX_SEQUENCE_LENGTH, chat_template=CHAT_TEMPLATE)

    def build():
        return ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER), vae=AutoencoderKL(**FLUX_VAE),
            text_encoder=Qwen3Model(Qwen3Config(**QWEN3_4B)), tokenizer=tokenizer,
            transformer=ZImageTransformer2DModel(**ZIMAGE_TRANSFORMER))

    return seeded_build(build, device, dtype)


class ZImageModel(FlowModel):
    """One loaded `ZImagePipeline` behind Tessera's model interface."""

    patch_size = 2  # ZImagePipeline's (the transformer's forward default)

    def __init__(self, pipe, name: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 weights: str = "pretrained"):
        super().__init__(pipe, name, device, dtype, offload, weights)
        self.deep_calls = (deepcache.dit_full, deepcache.dit_shallow)
        patches = tuple(self.transformer.config.all_patch_size)
        if self.patch_size not in patches:
            raise ValueError(f"model={name}: the transformer has patch sizes {patches}; ZImagePipeline uses "
                             f"{self.patch_size}")

    @torch.no_grad()
    def _embed(self, text: str) -> torch.Tensor:
        chat = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)
        tok = self.tokenizer(chat, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                             return_tensors="pt")
        mask = tok.attention_mask.to(self.device).bool()
        hidden = self.text_encoder(input_ids=tok.input_ids.to(self.device), attention_mask=mask,
                                   output_hidden_states=True).hidden_states[-2]
        return hidden[0][mask[0]]

    def _encode_pair(self, prompt: str, negative: str) -> ZImageCond:
        cond = ZImageCond(self._embed(prompt), self._embed(negative))
        self._release_text_encoders()
        return cond

    def _call(self, x: torch.Tensor, s: torch.Tensor, caps, deep, halves: int):
        """The transformer on a model batch x [m, C, h, w] (`halves` copies of the tiles), whole or under
        DeepCache (`deep`)."""
        xs = list(x.unsqueeze(2).unbind(0))
        if deep is None:
            return self.transformer(xs, s, caps, return_dict=False)[0]
        return self.deep_call(deep, halves, xs, s, caps)

    def _guided(self, x: torch.Tensor, s: torch.Tensor, cond: ZImageCond, guidance: float, deep=None
                ) -> torch.Tensor:
        n = x.shape[0]
        if guidance > 0:  # ZImagePipeline: prompts first, then negatives, in one call
            out = self._call(torch.cat([x, x]), torch.cat([s, s]), [cond.prompt] * n + [cond.negative] * n, deep, 2)
            pos = torch.stack([o.float() for o in out[:n]])
            neg = torch.stack([o.float() for o in out[n:]])
            v = pos + guidance * (pos - neg)
        else:
            v = torch.stack([o.float() for o in self._call(x, s, [cond.prompt] * n, deep, 1)])
        return v.squeeze(2)


FAMILY = Family(name="z_image", adapter=ZImageModel, random_pipeline=random_pipeline,
                single_file_transformer="ZImageTransformer2DModel")
