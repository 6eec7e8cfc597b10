"""What the flow-matching DiT families (Z-Image, Lumina 2) share: the FLUX-style VAE, an offline tokenizer for
random weights, and the adapter skeleton.

The contract with the tiled loop, as diffusers' `ZImagePipeline` / `Lumina2Pipeline` do it per image, here per
tile:

* the scheduler is `FlowMatchEulerDiscreteScheduler`, its timesteps t = 1000 sigma run from noise (1000) to
  data; its sigmas are linspace(1, 1/steps, steps), shifted (statically, or by `mu` from the image's token
  count when the config asks for dynamic shifting): `models.schedulers.timestep_kwargs`, called by
  `tiling.render.start_canvas` with the token count of one tile (`patch_size` crosses to the driver in
  `Renderer.info()`);
* the transformer takes the normalised time 1 - t/1000 (0 is noise, 1 the image) and predicts the velocity
  from noise to data; the scheduler steps along data-to-noise, so `predict` returns the *negated*, guided
  output, and the one `scheduler.step` on the fused canvas is the pipeline's step;
* latents have 16 channels and an 8x VAE with `scaling_factor` and `shift_factor` (undone by `unscale`).

Tiles: a tile must be whole patches (`patch_size` latent px a side; `jobs.spec` refuses a `tiling.tile` that is
not).  Both transformers build their rotary position embeddings from the tile's own patch grid, starting at 0,
as for a picture the size of the tile: RoPE is relative, so image-to-image attention inside a tile is the same
wherever the tile lies on the canvas, and image-to-text offsets stay those seen in training.  A tile thus is
"a picture of its own size"; agreement between tiles comes from the overlap fusion, not from positions.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Adapter

FLUX_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", mid_block_add_attention=True,
    use_quant_conv=False, use_post_quant_conv=False, force_upcast=True, scaling_factor=0.3611, shift_factor=0.1159,
)  # FLUX.1's autoencoder (ae.safetensors), which Z-Image and Lumina 2 ship: 83.8 M parameters

# Qwen's chat markup, enough for `apply_chat_template(..., add_generation_prompt=True)` as ZImagePipeline calls it.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(bos: bool, model_max_length: int = 512, chat_template: Optional[str] = None):
    """A fast tokenizer over the 256 byte symbols, no merges, built offline: a byte-level stand-in for Qwen's or
    Gemma's tokenizer (`bos`: prepend `<bos>`, as Gemma's does).  It survives save_pretrained /
    from_pretrained(local_files_only=True).  For tests and random weights, where ids need only be valid."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   model_max_length=model_max_length, chat_template=chat_template,
                                   padding_side="right")


class FlowModel(Adapter):
    """One loaded flow-matching DiT pipeline behind Tessera's model interface (see `models`).

    Subclasses implement `_encode_pair(prompt, negative)` and `_guided(x, s, cond, guidance)`:
    the guided velocity for tiles `x` at normalised time `s` (a [n] tensor, 0 = noise), as their pipeline
    computes it."""

    denoiser = "transformer"

    def __init__(self, pipe, name: str, device: torch.device, dtype: torch.dtype, offload: str = "none",
                 weights: str = "pretrained"):
        super().__init__(pipe, name, device, dtype, offload, weights)
        self.num_train_timesteps = self.scheduler_config.get("num_train_timesteps", 1000)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, t, cond, guidance: float, tiles=None, canvas=None, deep=None) -> torch.Tensor:
        """What `FlowMatchEulerDiscreteScheduler.step` takes for tiles [n, C, h, w] at scheduler timestep t: the
        negated, guided velocity (both halves of guidance in one transformer call).  Tiles carry no size
        conditioning here (`tiles`, `canvas` unused): see the module docstring on positions.  `deep`: under
        DeepCache (Z-Image only: `models.deepcache.dit_full`), `Adapter.deep_call`'s step."""
        n, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"model={self.name}: a {h}x{w} latent tile is not whole {p}x{p} patches "
                             f"(tiling.tile and a canvas smaller than a tile must be multiples of {p})")
        s = (1.0 - torch.as_tensor(t, dtype=torch.float32, device=self.device) / self.num_train_timesteps).expand(n)
        x = x.to(self.device, self.dtype)
        v = self._guided(x, s, cond, guidance) if deep is None else self._guided(x, s, cond, guidance, deep=deep)
        return -v.float()

    def _guided(self, x: torch.Tensor, s: torch.Tensor, cond, guidance: float) -> torch.Tensor:
        raise NotImplementedError
