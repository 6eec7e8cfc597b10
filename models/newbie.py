"""NewBie-image (Exp0.1 and fine-tunes): Lumina 2's Next-DiT with pooled Jina CLIP text in its adaLN input, Gemma 3
text, the FLUX VAE.

A NewBie diffusers folder names a `NewbiePipeline` that diffusers 0.42 does not ship (its pull request was not
merged); Tessera holds the folder in its own :class:`NewbiePipeline` and drives the model with :class:`NewbieModel`,
Lumina 2's adapter (models/lumina2.py, models/flow.py) with these differences, as the official repository
(NewBieAI-Lab/NewBie-image-Exp0.1: models/model.py, demo.py, finetune.py, README.md) does it:

* the transformer (:class:`NewbieTransformer2DModel`, models/model.py's `NextDiT_CLIP`): the adaLN input of every
  modulated block and of the output norm is `time_text_embed([t_emb, clip_text_pooled_proj(pooled)])`, with
  `clip_text_pooled_proj` = RMSNorm + Linear (1024 -> 1024) and `time_text_embed` = SiLU + Linear
  (1024 + 1024 -> 1024), where diffusers' Lumina2Transformer2DModel uses `t_emb` alone;
* Gemma 3 (Gemma3-4B-it, 2560 wide): the penultimate hidden states of `"<system prompt> <Prompt Start> <prompt>"`,
  at most 512 tokens, with the attention mask; the system prompt is the one NewBie trained plain prompts with, or,
  for an XML prompt (jobs/xml_prompts.py: one that opens `<character_N>` or `<general_tags>`), the one it trained
  XML captions with (finetune.py); a non-empty negative prompt goes behind the prompt's system prompt (demo.py
  puts both behind one), an empty one is "" (demo.py);
* Jina CLIP v2 (`text_encoder_2`, code shipped with the weights, loaded only with `model.trust_remote_code=true`):
  `get_text_features(input_ids=...)` of the *raw* prompt (and raw negative), at most 2048 tokens: its pooled,
  1024-wide text embedding (demo.py unpacks `(pooled, sequence)`; Jina's own code returns the pooled tensor; both
  are taken);
* guidance (demo.py's `forward_with_cfg` at its defaults): v = v_neg + g (v_text - v_neg) while the normalised
  time 1 - t/1000 is below 0.25 (`cfg_trunc`; 0 is noise), the text velocity alone after that; no renormalisation
  (the demo's `renorm_cfg` is 0).  `job.guidance` is g, on above 1 as for Lumina 2.

Where diffusers' pull request (src/diffusers/pipelines/newbie/pipeline_newbie.py) differs, this module follows the
official repository: the PR feeds Jina the system-prompted prompt (official: the raw prompt), encodes the negative
without the system prompt, keeps Lumina2Pipeline's system prompt, caps both encoders at 512 tokens, and guides at
every step with Lumina 2's per-row renormalisation.  The official demo samples with a midpoint ODE solver (time
shift 6); Tessera steps `flow_euler` on the folder's own scheduler config.

Weights: a diffusers folder only.  Unlike Z-Image and Lumina 2, a single transformer file is refused: the
transformer is Tessera's own class, and diffusers' single-file loader has no converter for its original layout.

`NEWBIE_TRANSFORMER` is models/model.py's `NextDiT_3B_GQA_patch2_Adaln_Refiner_WHIT_CLIP` (3.5 B), `GEMMA3_4B` the
text part of Gemma3-4B-it.  Jina CLIP v2 cannot be built without its shipped code, so `model.weights=random` uses
:class:`JinaTextStandIn` (XLM-RoBERTa-large's size, the same 1024-wide mean-pooled output): for benchmarks only.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Tuple

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import RMSNorm
from torch import nn

from jobs.spec import ConfigError
from jobs.xml_prompts import is_xml

from .base import Family, seeded_build
from .flow import FLUX_VAE, byte_tokenizer
from .lumina2 import Lumina2Cond, Lumina2Model

NEWBIE_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=36, num_refiner_layers=2,
    num_attention_heads=24, num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
    scaling_factor=1.0, axes_dim_rope=(32, 32, 32), axes_lens=(1024, 512, 512), cap_feat_dim=2560, clip_text_dim=1024,
)
GEMMA3_4B = dict(
    vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256,
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
)
JINA_TEXT = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1, layer_norm_eps=1e-5)
NEWBIE_SCHEDULER = dict(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)  # demo.py's time shift
# finetune.py's system prompts, for plain (tag or natural-language) prompts and for XML prompts (its
# "super_high_quality_caption" items); " <Prompt Start> " follows either.
SYSTEM_PROMPT = ("You are an assistant designed to generate high-quality anime images with the highest degree of "
                 "image-text alignment based on textual prompts.")
XML_SYSTEM_PROMPT = "You are an assistant designed to generate high-quality anime images based on xml format prompts."
MAX_SEQUENCE_LENGTH = 512  # Gemma 3 tokens (demo.py, finetune.py)
JINA_MAX_LENGTH = 2048  # Jina CLIP tokens (demo.py, finetune.py)


class NewbieTransformer2DModel(Lumina2Transformer2DModel):
    """Lumina2Transformer2DModel with NewBie's pooled-text conditioning, under the released parameter names
    (`clip_text_pooled_proj.{0,1}`, `time_text_embed.1`); `clip_text_dim` is Jina CLIP v2's width."""

    @register_to_config
    def __init__(self, sample_size: int = 128, patch_size: int = 2, in_channels: int = 16,
                 out_channels: int | None = None, hidden_size: int = 2304, num_layers: int = 36,
                 num_refiner_layers: int = 2, num_attention_heads: int = 24, num_kv_heads: int = 8,
                 multiple_of: int = 256, ffn_dim_multiplier: float | None = None, norm_eps: float = 1e-5,
                 scaling_factor: float = 1.0, axes_dim_rope: tuple = (32, 32, 32),
                 axes_lens: tuple = (1024, 512, 512), cap_feat_dim: int = 2560, clip_text_dim: int = 1024):
        super().__init__(sample_size, patch_size, in_channels, out_channels, hidden_size, num_layers,
                         num_refiner_layers, num_attention_heads, num_kv_heads, multiple_of, ffn_dim_multiplier,
                         norm_eps, scaling_factor, axes_dim_rope, axes_lens, cap_feat_dim)
        t_dim = min(hidden_size, 1024)  # the width of Lumina 2's timestep embedding and adaLN input
        # RMSNorm's eps: models/model.py passes none, so its components.RMSNorm default (1e-6) holds.
        self.clip_text_pooled_proj = nn.Sequential(RMSNorm(clip_text_dim, eps=1e-6),
                                                   nn.Linear(clip_text_dim, clip_text_dim))
        self.time_text_embed = nn.Sequential(nn.SiLU(), nn.Linear(t_dim + clip_text_dim, t_dim))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor, pooled_projections: torch.Tensor, return_dict: bool = True):
        """Lumina 2's forward, conditioned on `temb = time_text_embed([t_emb, clip_text_pooled_proj(pooled)])`
        wherever Lumina 2 uses the timestep embedding (noise refiner, joint blocks, output norm).

        Coupled to diffusers: `Lumina2Transformer2DModel.forward` rewritten over its modules (`time_caption_embed`,
        `rope_embedder`, `x_embedder`, the refiners, `layers`, `norm_out`), since it has no argument for another
        adaLN input.  Checked against diffusers 0.42.1 (its gradient checkpointing and `attention_kwargs` left out:
        inference only, no LoRA scale); tests/test_newbie.py's
        `test_the_forward_walks_diffusers_lumina2_forward_to_the_bit` holds it to diffusers' own forward bit for bit
        and fails when that changes."""
        b, _, h, w = hidden_states.shape
        t_emb, caption = self.time_caption_embed(hidden_states, timestep, encoder_hidden_states)
        temb = self.time_text_embed(torch.cat([t_emb, self.clip_text_pooled_proj(pooled_projections)], dim=-1))
        x, cap_rope, img_rope, rope, cap_lens, seq_lens = self.rope_embedder(hidden_states, encoder_attention_mask)
        x = self.x_embedder(x)
        for layer in self.context_refiner:
            caption = layer(caption, encoder_attention_mask, cap_rope)
        for layer in self.noise_refiner:
            x = layer(x, None, img_rope, temb)
        # One sequence a row: the caption's real tokens, then the image's; rows of unequal length are masked.
        joint = x.new_zeros(b, max(seq_lens), self.config.hidden_size)
        mask = x.new_zeros(b, max(seq_lens), dtype=torch.bool)
        for i, (c, s) in enumerate(zip(cap_lens, seq_lens)):
            joint[i, :c], joint[i, c:s], mask[i, :s] = caption[i, :c], x[i], True
        mask = mask if len(set(seq_lens)) > 1 else None
        for layer in self.layers:
            joint = layer(joint, mask, rope, temb)
        joint = self.norm_out(joint, temb)
        p, c_out = self.config.patch_size, self.out_channels
        out = torch.stack([joint[i, c:s].view(h // p, w // p, p, p, c_out).permute(4, 0, 2, 1, 3).reshape(c_out, h, w)
                           for i, (c, s) in enumerate(zip(cap_lens, seq_lens))])
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class JinaTextStandIn(nn.Module):
    """A random-weights stand-in for Jina CLIP v2's text tower, for `model.weights=random` only: Jina's code ships
    with its weights and cannot be built here.  XLM-RoBERTa-large's size (Jina's text backbone, 0.57 B), mean-pooled
    over the real tokens to the same 1024 wide output, called as Jina is (`get_text_features(input_ids=...)`)."""

    def __init__(self, pad_token_id: int):
        from transformers import XLMRobertaConfig, XLMRobertaModel

        super().__init__()
        self.pad_token_id = pad_token_id
        self.encoder = XLMRobertaModel(XLMRobertaConfig(**JINA_TEXT, pad_token_id=pad_token_id),
                                       add_pooling_layer=False)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    def get_text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_token_id).to(self.dtype)
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class NewbiePipeline(DiffusionPipeline):
    """A NewBie diffusers folder's components, loaded from local files; Tessera's adapter drives them (no __call__).
    Under CPU offload Jina CLIP (`text_encoder_2`) stays on the GPU: `FAMILY.offload_keep`."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    system_prompt = SYSTEM_PROMPT

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype = torch.float32, use_safetensors: bool | None = True,
                        local_files_only: bool = True, trust_remote_code: bool = False) -> "NewbiePipeline":
        """Each component from its sub-folder of the local diffusers folder `path`, by a class fixed here (the
        folder's model_index.json names classes diffusers 0.42 cannot load); `text_encoder_2`'s shipped code runs
        only with `trust_remote_code`."""
        from transformers import AutoModel, AutoTokenizer

        if not trust_remote_code:
            raise ConfigError("model.trust_remote_code", trust_remote_code,
                              "NewBie's text_encoder_2 (Jina CLIP v2) is Python code shipped with the weights; set "
                              "it to true only for weights you trust")
        def sub(name: str) -> str:
            return os.path.join(path, name)

        weights = dict(dtype=dtype, use_safetensors=use_safetensors, local_files_only=local_files_only)
        return cls(
            transformer=NewbieTransformer2DModel.from_pretrained(path, subfolder="transformer", **weights),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
            text_encoder=AutoModel.from_pretrained(sub("text_encoder"), **weights),
            tokenizer=AutoTokenizer.from_pretrained(sub("tokenizer"), local_files_only=local_files_only),
            # .to: Jina's own from_pretrained sets torch_dtype="auto" when it is not given under that name
            text_encoder_2=AutoModel.from_pretrained(sub("text_encoder_2"), trust_remote_code=True,
                                                     **weights).to(dtype=dtype),
            tokenizer_2=AutoTokenizer.from_pretrained(sub("tokenizer_2"), local_files_only=local_files_only))


class NewbieCond(NamedTuple):
    """Text conditioning of one (prompt, negative) pair: Gemma's, as Lumina 2's, and Jina's pooled [2, 1024]; row 0
    the negative, row 1 the prompt."""

    text: Lumina2Cond
    pooled: torch.Tensor

    def inputs(self, rows: slice, n: int) -> dict:
        return {**self.text.inputs(rows, n), "pooled_projections": self.pooled[rows].repeat_interleave(n, dim=0)}


def random_pipeline(device: torch.device, dtype: torch.dtype) -> NewbiePipeline:
    """NewBie-image Exp0.1's full-size architecture with random weights (seeded), on `device` in `dtype`; Jina CLIP
    v2 is :class:`JinaTextStandIn`."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    tokenizer = byte_tokenizer(bos=True, model_max_length=MAX_SEQUENCE_LENGTH)
    tokenizer_2 = byte_tokenizer(bos=True, model_max_length=JINA_MAX_LENGTH)  # XLM-R opens with <s>: "" is a token

    def build():
        return NewbiePipeline(
            transformer=NewbieTransformer2DModel(**NEWBIE_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(**NEWBIE_SCHEDULER), vae=AutoencoderKL(**FLUX_VAE),
            text_encoder=Gemma3TextModel(Gemma3TextConfig(**GEMMA3_4B)), tokenizer=tokenizer,
            text_encoder_2=JinaTextStandIn(tokenizer_2.pad_token_id), tokenizer_2=tokenizer_2)

    return seeded_build(build, device, dtype)


class NewbieModel(Lumina2Model):
    """One loaded :class:`NewbiePipeline` behind Tessera's model interface."""

    max_sequence_length = MAX_SEQUENCE_LENGTH
    cfg_normalization = False  # demo.py: renorm_cfg 0
    cfg_trunc = 0.25  # demo.py: guidance while 1 - t/1000 < 0.25

    def __init__(self, pipe, name: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 weights: str = "pretrained"):
        super().__init__(pipe, name, device, dtype, offload, weights)
        self.text_encoder_2, self.tokenizer_2 = pipe.text_encoder_2.eval(), pipe.tokenizer_2

    def _texts(self, prompt: str, negative: str) -> Tuple[str, str]:
        """What Gemma reads: both behind the prompt's system prompt (XML_SYSTEM_PROMPT for an XML prompt), an empty
        negative as "" (demo.py)."""
        system = XML_SYSTEM_PROMPT if is_xml(prompt) else self.system_prompt
        return f"{system} <Prompt Start> {prompt}", f"{system} <Prompt Start> {negative}" if negative else ""

    @torch.no_grad()
    def _pooled(self, text: str) -> torch.Tensor:
        """Jina CLIP's pooled embedding [1, 1024] of `text` as it is, in the transformer's dtype."""
        ids = self.tokenizer_2(text, truncation=True, max_length=JINA_MAX_LENGTH, return_tensors="pt").input_ids
        features = self.text_encoder_2.get_text_features(input_ids=ids.to(self.device))
        if isinstance(features, (tuple, list)):  # (pooled, sequence), as demo.py unpacks it
            features = features[0]
        return features.to(self.dtype)

    def _encode_pair(self, prompt: str, negative: str) -> NewbieCond:
        pooled = torch.cat([self._pooled(negative), self._pooled(prompt)])
        return NewbieCond(super()._encode_pair(prompt, negative), pooled)


# Jina CLIP stays out of diffusers' CPU offload (kept on the GPU, 1.1 GB in bf16): accelerate's hooks wrap a module's
# `forward`, and its text features come from `get_text_features`.
FAMILY = Family(name="newbie", adapter=NewbieModel, random_pipeline=random_pipeline, pipeline_class=NewbiePipeline,
                offload_keep=("text_encoder_2",))

