"""DeepCache (Ma, Fang and Wang, CVPR 2024): the denoiser's forward in two parts, for the UNets and for Z-Image.

A UNet's deep blocks change little from one denoising step to the next; its outermost level (the first down block
and the last up block, at the latent's own resolution) carries the detail. So a *full* call runs the whole UNet and
also returns the deep feature, the input of the last up block; a *shallow* call takes a feature cached from an
earlier step and runs only `conv_in`, the first down block's layers (not its downsampler), the last up block and
`conv_out`: DeepCache's shallowest branch at block granularity. The feature is at the latent's resolution, so the
denoise loop can keep it in canvas coordinates (`tiling.features`) and crop it for tiles that move every step.

This is the one module that walks `diffusers.UNet2DConditionModel`'s blocks by hand (its `forward` as of diffusers
0.42, without ControlNet, T2I-adapter or GLIGEN inputs, which Tessera never passes); `tests/test_deepcache.py` holds
`full`'s prediction to the model's own `forward` bit for bit, so a diffusers release that changes the forward fails
there loudly.

Z-Image's single-stream transformer has no levels; its analogue is the first-block cache of the DiT literature
(FORA, Delta-DiT; diffusers' FirstBlockCache decides by a threshold, here at DeepCache's fixed interval): a *full*
call runs every block and returns the residual the blocks after the first add to the image tokens, a *shallow*
call runs the embedders, the refiners, the first block and the final layer, and adds a cached residual between
them. The residual is a map of tokens, one per 2x2 patch; `dit_full` returns it at the latent's resolution (each
token repeated over its patch), so the same canvas cache holds it and tiles whose windows start on any latent
pixel find it (`dit_shallow` averages each patch back to a token). `dit_full` walks
`ZImageTransformer2DModel.forward` (diffusers 0.42, its basic mode: one image a sample, no ControlNet), and the
same test holds it to the forward bit for bit.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch


class DeepStep(NamedTuple):
    """One model call's part in DeepCache: `features` [n, halves x C', h, w] of its n tiles to reuse (a shallow
    call), or None (a full call, whose features per tile go to `keep`)."""

    features: Optional[torch.Tensor]
    keep: Callable[[torch.Tensor], None]


def per_tile(feats: torch.Tensor, halves: int) -> torch.Tensor:
    """A model batch's features [halves x n, C', h, w] (guidance's halves one after the other) as [n, halves x C',
    h, w]: one row a tile, the halves side by side."""
    m, c, h, w = feats.shape
    return feats.view(halves, m // halves, c, h, w).transpose(0, 1).reshape(m // halves, halves * c, h, w)


def per_call(feats: torch.Tensor, halves: int) -> torch.Tensor:
    """`per_tile` undone."""
    n, c, h, w = feats.shape
    return feats.view(n, halves, c // halves, h, w).transpose(0, 1).reshape(n * halves, c // halves, h, w)


def why_not(unet) -> Optional[str]:
    """None where the denoiser `unet` can run in two parts, else why not (another transformer than Z-Image's, a
    class-conditioned UNet, ...)."""
    unet = getattr(unet, "_orig_mod", unet)
    if type(unet).__name__ == "ZImageTransformer2DModel":
        return None if len(unet.layers) >= 2 else "the transformer has one block"
    if not hasattr(unet, "up_blocks") or not hasattr(unet, "down_blocks"):
        return f"{type(unet).__name__} is neither a UNet nor Z-Image's transformer"
    if len(unet.down_blocks) < 2 or unet.class_embedding is not None or unet.config.center_input_sample:
        return "the UNet has one level, class embeddings or a centred input"
    if unet.config.addition_embed_type not in (None, "text_time"):
        return f"the UNet's addition_embed_type {unet.config.addition_embed_type!r} is not SDXL's"
    return None


def _embed(unet, sample, t, enc, added):
    """The timestep embedding (with SDXL's text and size embedding) and the processed text states, as
    `UNet2DConditionModel.forward` computes them."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=enc, added_cond_kwargs=added or {})
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return emb, unet.process_encoder_hidden_states(encoder_hidden_states=enc, added_cond_kwargs=added or {})


def _cross(block) -> bool:
    return getattr(block, "has_cross_attention", False)


def _up(block, x, res, emb, enc, upsample_size=None):
    if _cross(block):
        return block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=enc,
                     upsample_size=upsample_size)
    return block(hidden_states=x, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)


def _out(unet, x):
    if unet.conv_norm_out is not None:
        x = unet.conv_act(unet.conv_norm_out(x))
    return unet.conv_out(x)


@torch.no_grad()
def full(unet, sample: torch.Tensor, t, enc: torch.Tensor, added: Optional[dict] = None
         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's prediction, the deep feature [n, C', h, w] entering its last up block)."""
    unet = getattr(unet, "_orig_mod", unet)
    factor = 2 ** unet.num_upsamplers
    forward_size = any(d % factor for d in sample.shape[-2:])
    emb, enc = _embed(unet, sample, t, enc, added)
    x = unet.conv_in(sample)
    res = (x,)
    for block in unet.down_blocks:
        x, more = block(hidden_states=x, temb=emb, encoder_hidden_states=enc) if _cross(block) \
            else block(hidden_states=x, temb=emb)
        res += more
    if unet.mid_block is not None:
        x = unet.mid_block(x, emb, encoder_hidden_states=enc) if _cross(unet.mid_block) else unet.mid_block(x, emb)
    last = len(unet.up_blocks) - 1
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        mine, res = res[-n:], res[:-n]
        if i == last:
            deep = x
        x = _up(block, x, mine, emb, enc, res[-1].shape[2:] if i < last and forward_size else None)
    return _out(unet, x), deep


@torch.no_grad()
def shallow(unet, sample: torch.Tensor, t, enc: torch.Tensor, added: Optional[dict], deep: torch.Tensor
            ) -> torch.Tensor:
    """The UNet's prediction with its deep part replaced by `deep` (a feature `full` returned, of the same
    shape): the outermost level alone. shallow(x, t, ..., full(x, t, ...)[1]) is full(x, t, ...)[0]."""
    unet = getattr(unet, "_orig_mod", unet)
    emb, enc = _embed(unet, sample, t, enc, added)
    x = unet.conv_in(sample)
    res = (x,)
    first = unet.down_blocks[0]
    attentions = getattr(first, "attentions", None) or [None] * len(first.resnets)
    for resnet, attention in zip(first.resnets, attentions):
        x = resnet(x, emb)
        if attention is not None:
            x = attention(x, encoder_hidden_states=enc, return_dict=False)[0]
        res += (x,)
    return _out(unet, _up(unet.up_blocks[-1], deep.to(x.dtype), res, emb, enc))


def _dit_begin(tr, x: List[torch.Tensor], t: torch.Tensor, caps: List[torch.Tensor], p: int = 2, f: int = 1):
    """Z-Image's forward up to its main blocks: (the unified sequence, its rotary frequencies and mask, the
    time embedding, the images' sizes), as `ZImageTransformer2DModel.forward` computes them in its basic mode."""
    device = x[0].device
    adaln = tr.t_embedder(t * tr.t_scale).type_as(x[0])
    xs, cs, size, x_pos, cap_pos, x_pad, cap_pad = tr.patchify_and_embed(x, caps, p, f)
    x_lens = [len(v) for v in xs]
    h = tr.all_x_embedder[f"{p}-{f}"](torch.cat(xs, dim=0))
    h, h_freqs, h_mask, _, _ = tr._prepare_sequence(list(h.split(x_lens, dim=0)), x_pos, x_pad, tr.x_pad_token,
                                                    None, device)
    for layer in tr.noise_refiner:
        h = layer(h, h_mask, h_freqs, adaln, None, None, None)
    cap_lens = [len(c) for c in cs]
    c = tr.cap_embedder(torch.cat(cs, dim=0))
    c, c_freqs, c_mask, _, _ = tr._prepare_sequence(list(c.split(cap_lens, dim=0)), cap_pos, cap_pad,
                                                    tr.cap_pad_token, None, device)
    for layer in tr.context_refiner:
        c = layer(c, c_mask, c_freqs)
    u, u_freqs, u_mask, _ = tr._build_unified_sequence(h, h_freqs, x_lens, None, c, c_freqs, cap_lens, None, None,
                                                       None, None, None, False, device)
    return u, u_freqs, u_mask, adaln, size


def _dit_end(tr, u: torch.Tensor, adaln: torch.Tensor, size, p: int = 2, f: int = 1) -> List[torch.Tensor]:
    return tr.unpatchify(list(tr.all_final_layer[f"{p}-{f}"](u, c=adaln).unbind(dim=0)), size, p, f)


def _grid(size, p: int) -> Tuple[int, int, int]:
    (frames, h, w), = set(size)  # a batch of tiles: one size
    return frames * (h // p) * (w // p), h // p, w // p


@torch.no_grad()
def dit_full(tr, x: List[torch.Tensor], t: torch.Tensor, caps: List[torch.Tensor]
             ) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """(Z-Image's prediction, as its forward returns it, for n images [C, 1, h, w]; the residual its blocks after
    the first add to the image tokens, [n, D, h, w] in float32, each token over its 2x2 patch)."""
    tr = getattr(tr, "_orig_mod", tr)
    u, freqs, mask, adaln, size = _dit_begin(tr, x, t, caps)
    u = tr.layers[0](u, mask, freqs, adaln, None, None, None)
    first = u
    for layer in tr.layers[1:]:
        u = layer(u, mask, freqs, adaln, None, None, None)
    p = 2
    n_img, gh, gw = _grid(size, p)
    deep = (u[:, :n_img].float() - first[:, :n_img].float()).view(len(x), gh, gw, -1).permute(0, 3, 1, 2)
    return _dit_end(tr, u, adaln, size), deep.repeat_interleave(p, 2).repeat_interleave(p, 3)


@torch.no_grad()
def dit_shallow(tr, x: List[torch.Tensor], t: torch.Tensor, caps: List[torch.Tensor], deep: torch.Tensor
                ) -> List[torch.Tensor]:
    """Z-Image's prediction with the blocks after the first replaced by the residual `deep` (as `dit_full`
    returns it): dit_shallow(x, t, caps, dit_full(x, t, caps)[1]) is dit_full's prediction up to rounding."""
    tr = getattr(tr, "_orig_mod", tr)
    u, freqs, mask, adaln, size = _dit_begin(tr, x, t, caps)
    u = tr.layers[0](u, mask, freqs, adaln, None, None, None)
    p = 2
    n_img, gh, gw = _grid(size, p)
    tokens = torch.nn.functional.avg_pool2d(deep.float(), p).flatten(2).transpose(1, 2)  # [n, tokens, D]
    u = torch.cat([(u[:, :n_img].float() + tokens).to(u.dtype), u[:, n_img:]], dim=1)
    return _dit_end(tr, u, adaln, size)
