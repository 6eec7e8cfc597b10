"""Lumina 2 (Lumina-Image-2.0, Next-DiT, and fine-tunes): a flow-matching DiT, Gemma 2 text, the FLUX VAE.

As `Lumina2Pipeline` (diffusers 0.42) does it, per tile (see models/flow.py for the shared contract):

* text: the prompt behind the pipeline's system prompt (`"<system prompt> <Prompt Start> <prompt>"`), the
  negative prompt as it is ("" when empty), each padded to 256 tokens on the right; the text encoder's
  penultimate hidden states and the attention mask go to the transformer;
* guidance: `job.guidance` is the pipeline's `guidance_scale` (v = v_neg + g (v_text - v_neg), on for g > 1),
  followed, as the pipeline does by default (`cfg_normalization=True`), by rescaling the guided velocity to
  the norm of the text velocity along the last (width) axis: per tile, as the pipeline does per picture.
  `cfg_trunc_ratio` stays at its default 1.0 (guidance at every step);
* the transformer takes [n, 16, h, w] tiles (2x2 patches) and the time 1 - t/1000; the output is negated.

Dynamic shift: the published scheduler uses a static shift; a config with `use_dynamic_shifting` gets `mu`
from the token count of one tile (see models/zimage.py for why the tile, not the canvas).  Note: diffusers'
`Lumina2Pipeline` passes `latents.shape[1]` (the channel count, 16) as its "image_seq_len", so with dynamic
shifting its schedule does not depend on the size at all; Tessera uses the real token count of a tile.

Weights: a diffusers folder, or a single file of the transformer alone in its original (Next-DiT) layout, which
diffusers' `Lumina2Transformer2DModel.from_single_file` converts; the rest comes from the `model.config` folder.
Its converter splits the fused `qkv` at Lumina-Image-2.0's widths (2304 / 768 / 768), so only transformers of that
size load from a single file.

`LUMINA2_*` / `GEMMA2_2B` are Alpha-VLLM/Lumina-Image-2.0's published component configs (the Gemma 2 2B text
encoder as a Gemma2Model), written out so that `model.weights=random` builds the full-size architecture.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from .base import Family, seeded_build
from .flow import FLUX_VAE, FlowModel, byte_tokenizer

LUMINA2_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26, num_refiner_layers=2,
    num_attention_heads=24, num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
    scaling_factor=1.0, axes_dim_rope=(32, 32, 32), axes_lens=(300, 512, 512), cap_feat_dim=2304,
)
GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
    rms_norm_eps=1e-6, rope_theta=10000.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    query_pre_attn_scalar=256, sliding_window=4096,
)
LUMINA2_SCHEDULER = dict(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)
MAX_SEQUENCE_LENGTH = 256  # Lumina2Pipeline's default


class Lumina2Cond(NamedTuple):
    """Text conditioning of one (prompt, negative) pair: [2, L, D] hidden states and their [2, L] attention mask
    (L = the adapter's `max_sequence_length`, 256 here); row 0 the negative, row 1 the prompt."""

    embeds: torch.Tensor
    mask: torch.Tensor

    def inputs(self, rows: slice, n: int) -> dict:
        """The transformer's text arguments for `rows` (slice(1, None): the prompt; slice(None): negative then
        prompt), each row repeated for `n` tiles."""
        return {"encoder_hidden_states": self.embeds[rows].repeat_interleave(n, dim=0),
                "encoder_attention_mask": self.mask[rows].repeat_interleave(n, dim=0)}


def random_pipeline(device: torch.device, dtype: torch.dtype):
    """Lumina-Image-2.0's full-size architecture with random weights (seeded), on `device` in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = byte_tokenizer(bos=True, model_max_length=MAX_SEQUENCE_LENGTH)

    def build():
        return Lumina2Pipeline(
            transformer=Lumina2Transformer2DModel(**LUMINA2_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(**LUMINA2_SCHEDULER), vae=AutoencoderKL(**FLUX_VAE),
            text_encoder=Gemma2Model(Gemma2Config(**GEMMA2_2B)), tokenizer=tokenizer)

    return seeded_build(build, device, dtype)


class Lumina2Model(FlowModel):
    """One loaded `Lumina2Pipeline` behind Tessera's model interface."""

    max_sequence_length = MAX_SEQUENCE_LENGTH
    cfg_normalization = True  # Lumina2Pipeline's default
    cfg_trunc = 1.0  # guidance while the normalised time 1 - t/1000 is below this; 1.0: every step, as the pipeline

    def __init__(self, pipe, name: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 weights: str = "pretrained"):
        super().__init__(pipe, name, device, dtype, offload, weights)
        self.patch_size = self.transformer.config.patch_size
        self.system_prompt = pipe.system_prompt
        self.tokenizer.padding_side = "right"  # the transformer reads the mask as a prefix of real tokens

    @torch.no_grad()
    def _embed(self, text: str) -> Tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(text, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                             return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        hidden = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True)
        return hidden.hidden_states[-2].to(self.text_encoder.dtype), mask

    def _behind_system_prompt(self, text: str) -> str:
        return f"{self.system_prompt} <Prompt Start> {text}"

    def _texts(self, prompt: str, negative: str) -> Tuple[str, str]:
        """What the text encoder reads: the prompt behind the system prompt, the negative as it is."""
        return self._behind_system_prompt(prompt), negative

    def _encode_pair(self, prompt: str, negative: str) -> Lumina2Cond:
        text, neg_text = self._texts(prompt, negative)
        emb, mask = self._embed(text)
        neg, neg_mask = self._embed(neg_text)
        self._release_text_encoders()
        return Lumina2Cond(torch.cat([neg, emb]), torch.cat([neg_mask, mask]))

    def _guided(self, x: torch.Tensor, s: torch.Tensor, cond: Lumina2Cond, guidance: float) -> torch.Tensor:
        n = x.shape[0]
        # cfg_trunc < 1 reads s once a call (all tiles share it): a device sync on a GPU, small next to the call.
        if guidance > 1.0 and (self.cfg_trunc >= 1.0 or s[0].item() < self.cfg_trunc):
            # n negatives, then n prompts, in one call (the pipeline makes two)
            out = self.transformer(torch.cat([x, x]), torch.cat([s, s]), **cond.inputs(slice(None), n),
                                   return_dict=False)[0]
            uncond, text = out.float().chunk(2)
            v = uncond + guidance * (text - uncond)
            if self.cfg_normalization:
                v = v * (text.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True))
            return v
        return self.transformer(x, s, **cond.inputs(slice(1, None), n), return_dict=False)[0].float()


FAMILY = Family(name="lumina2", adapter=Lumina2Model, random_pipeline=random_pipeline,
                single_file_transformer="Lumina2Transformer2DModel")
