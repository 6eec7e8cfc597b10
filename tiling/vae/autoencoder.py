"""The tiled decode and encode of a diffusers AutoencoderKL: the context its blocks need, and the one place
that calls into its blocks."""
from __future__ import annotations

import math
from functools import partial
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Canvas, Grid
from .sweeps import Precisions, Sweeps, either, periodic, pointwise, rebuilt, run_sweeps
from .stats import TileStats

# ------------------------------------------------------------------------------------------ receptive field


def _reach(conv: nn.Module) -> int:
    """How far a conv looks to one side, in its input's pixels (both sides for unpadded, strided ones)."""
    if not isinstance(conv, nn.Conv2d):
        return 0
    ext = max(d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
    same = not isinstance(conv.padding, str) and 2 * max(conv.padding) == ext and max(conv.stride) == 1
    return ext // 2 if same else ext


def _convs(module: nn.Module) -> int:
    return sum(_reach(m) for m in module.modules())


def _needs(reaches: List[float], context: Optional[int]) -> List[int]:
    """Context (latent pixels) to keep before each stage: what the stages from there on look across."""
    needs = [math.ceil(sum(reaches[i:]) - 1e-9) for i in range(len(reaches))]
    return needs if context is None else [min(n, context) for n in needs]


def vae_factor(vae) -> int:
    """Image pixels per latent pixel: 2 per down block that downsamples."""
    return 2 ** sum(1 for b in vae.encoder.down_blocks if getattr(b, "downsamplers", None))


def decoder_needs(vae, context: Optional[int] = None) -> List[int]:
    """Latent pixels of context before each up block and before conv_norm_out that make a tile see
    exactly what the full decode sees (at most `context`)."""
    dec, reaches, s = vae.decoder, [], 1
    for up in dec.up_blocks:
        r = _convs(up.resnets) / s
        for u in up.upsamplers or []:
            s *= 2
            r += _convs(u) / s
        reaches.append(r)
    return _needs(reaches + [_reach(dec.conv_out) / s], context)


def encoder_needs(vae, context: Optional[int] = None) -> List[int]:
    """Latent pixels of context before conv_in and before each down block that make a tile see exactly
    what the full encode sees (at most `context`)."""
    enc, f, s = vae.encoder, vae_factor(vae), 1
    reaches = [_reach(enc.conv_in) / f]
    for down in enc.down_blocks:
        r = _convs(down.resnets) * s
        for d in down.downsamplers or []:
            r += _convs(d) * s
            s *= 2
        reaches.append(r / f)
    return _needs(reaches, context)


def work_dtype(vae) -> torch.dtype:
    """fp32 for an fp16 VAE that asks for `force_upcast` (SDXL's overflows fp16's range), else its own dtype.
    As diffusers' pipelines do, bf16 is not upcast: it has fp32's range (SDXL at 4K on an H100: 1.4x faster)."""
    dtype = next(vae.parameters()).dtype
    return torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype


def _or_identity(vae, name: str) -> nn.Module:
    """vae.quant_conv / post_quant_conv, or an identity where the config leaves it out."""
    conv = getattr(vae, name, None)
    return conv if conv is not None else nn.Identity()


# ------------------------------------------------------------- diffusers' blocks: called here, nowhere else
# Checked against diffusers 0.42.1 (diffusers.models.autoencoders.vae). AutoencoderKL.decode runs post_quant_conv
# and Decoder.forward: conv_in, mid_block(x, latent_embeds=None), each up block (x, None), conv_norm_out,
# conv_act, conv_out; AutoencoderKL.encode runs Encoder.forward: conv_in, each down block (x), mid_block(x),
# conv_norm_out, conv_act, conv_out, then quant_conv. The four functions below split those forwards into a
# whole-canvas part and a per-tile part. tests/test_vae.py holds a one-tile decode and encode to
# `vae.decode(z).sample` and `vae.encode(x).latent_dist.mean`: a change in diffusers there fails them.

def _no_attention(blocks: nn.Module, what: str):
    from diffusers.models.attention_processor import Attention

    if any(isinstance(m, Attention) for m in blocks.modules()):
        raise ValueError(f"{what} hold attention, which tiles cannot reproduce")


class PooledAttention(nn.Module):
    """Stands in for a VAE mid block's self-attention: its keys and values come from the normalised input
    average-pooled to at most `keys` positions (token downsampling, as ToDo, arXiv 2402.13573, does in a
    UNet), through diffusers' own processor as a cross attention; every position still queries. The cost of the
    attention falls by the pooling factor squared: at 3840x2160 (129,600 latent positions) it is most of a
    small VAE's decode and encode on a CPU. A canvas with at most `keys` positions is attended exactly."""

    def __init__(self, attn: nn.Module, keys: int):
        super().__init__()
        if attn.group_norm is None or attn.spatial_norm is not None or attn.norm_cross:
            raise ValueError("tiling.vae_attention_keys: the VAE's attention is not a GroupNorm self-attention")
        self.attn, self.keys = attn, keys

    def factor(self, h: int, w: int) -> int:
        """The smallest pooling factor that leaves at most `keys` positions of an h x w canvas."""
        p = max(1, math.ceil(math.sqrt(h * w / self.keys)))
        while math.ceil(h / p) * math.ceil(w / p) > self.keys:
            p += 1
        return p

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        p = self.factor(*x.shape[-2:])
        if p == 1:
            return self.attn(x, temb=temb)
        kv = F.avg_pool2d(self.attn.group_norm(x), p, ceil_mode=True, count_include_pad=False)
        return self.attn(x, encoder_hidden_states=kv.flatten(2).transpose(1, 2), temb=temb)


def pooled_attention(keys: int):
    """For `rebuilt`: the attentions swapped for PooledAttentions of at most `keys` keys (0: none swapped)."""
    from diffusers.models.attention_processor import Attention

    return lambda name, m: PooledAttention(m, keys) if keys and isinstance(m, Attention) else None


def _latent_stage(wrap_y: bool, wrap_x: bool, keys: int):
    """The copy of the latent-resolution blocks a tiled pass runs: periodic convs, pooled attention, a CPU's
    1x1 convs as matrix products."""
    return lambda m: rebuilt(m, either(periodic(wrap_y, wrap_x), pooled_attention(keys), pointwise(m)))


def _decoder_head(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The latent-resolution part of the decode, on the whole canvas: post_quant_conv, conv_in, mid block."""
    return m.dec.mid_block(m.dec.conv_in(m.quant(z)), None)


def _decoder_tile(needs: List[int], d: nn.Module, x: torch.Tensor, t: TileStats) -> torch.Tensor:
    """The up blocks and the output on one tile, its context cut down as it is used up."""
    for up, c in zip(d.up_blocks, needs):
        x = up(t.cut(x, c), None)
    return t.cut(d.conv_out(d.conv_act(d.conv_norm_out(t.cut(x, needs[-1])))), 0)


def _encoder_tile(needs: List[int], d: nn.Module, x: torch.Tensor, t: TileStats) -> torch.Tensor:
    """conv_in and the down blocks on one tile, its context cut down as it is used up."""
    x = d.conv_in(t.cut(x, needs[0]))
    for down, c in zip(d.down_blocks, needs[1:]):
        x = down(t.cut(x, c))
    return t.cut(x, 0)


def _encoder_tail(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The latent-resolution part of the encode, on the whole canvas: mid block, output, quant_conv."""
    return m.quant(m.enc.conv_out(m.enc.conv_act(m.enc.conv_norm_out(m.enc.mid_block(x)))))


# -------------------------------------------------------------------------------------- decode and encode

def decode_tiled_shared(vae, z: torch.Tensor, tile: int, overlap: int, context: Optional[int] = None,
                        wrap_x: bool = False, wrap_y: bool = False, passes: int = 3,
                        attention_keys: int = 0) -> torch.Tensor:
    """Decode unscaled latents [1, C, H, W] with an AutoencoderKL into a [3, H*f, W*f] float32 CPU image
    that matches `vae.decode(z).sample`; peak memory follows the tile (plus the latent-resolution mid block).

    `tile`, `overlap`, `context` are latent pixels (context defaults to the up blocks' receptive field, and
    is cut down block by block as it is used up); `wrap_x`/`wrap_y` make that axis periodic, so that the
    picture tiles seamlessly. `passes` sweeps over the tiles: 1 normalises each tile with its own statistics
    (one sweep, tiles differ in tone); 3 (the default) and more gather, refine and apply shared statistics as
    the module says; 2 applies the first sweep's, biased by the per-tile normalisation before each layer.
    `attention_keys` > 0: the mid block's attention attends to at most that many pooled positions
    (`PooledAttention`; 0, the default, is exact).
    """
    return run_sweeps(decoder_sweeps(vae, z, tile, overlap, context, wrap_x, wrap_y, attention_keys), passes,
                      Canvas(3, *z.shape[-2:], vae_factor(vae), overlap))


@torch.no_grad()
def decoder_sweeps(vae, z: torch.Tensor, tile: int, overlap: int, context: Optional[int] = None,
                   wrap_x: bool = False, wrap_y: bool = False, attention_keys: int = 0) -> Sweeps:
    """The tiled decode of `decode_tiled_shared` up to its sweeps: the latent-resolution stage run on the whole
    canvas, the up blocks' tiles ready to sweep (output: [3, h*f, w*f] each)."""
    if z.dim() != 4 or z.shape[0] != 1:
        raise ValueError(f"z must be [1, C, H, W], got {tuple(z.shape)}")
    dec = vae.decoder
    if not isinstance(dec.conv_norm_out, nn.GroupNorm):
        raise ValueError(f"decode_tiled_shared needs a GroupNorm decoder, got {type(dec.conv_norm_out).__name__}")
    _no_attention(dec.up_blocks, "the decoder's up blocks")
    needs = decoder_needs(vae, context)
    device, dtype = next(vae.parameters()).device, work_dtype(vae)
    head = nn.ModuleDict({"dec": dec, "quant": _or_identity(vae, "post_quant_conv")})
    h = Precisions(head, dtype, _latent_stage(wrap_y, wrap_x, attention_keys)).run(
        _decoder_head, z.to(device), "the latent-resolution stage (conv_in, mid block)")
    grid = Grid(tuple(z.shape[-2:]), tile, overlap, needs[0], (wrap_y, wrap_x))
    return Sweeps(dec, dtype, partial(_decoder_tile, needs), h, grid)


@torch.no_grad()
def encode_tiled(vae, image: torch.Tensor, tile: int, overlap: int, context: Optional[int] = None,
                 wrap_x: bool = False, wrap_y: bool = False, passes: int = 3, attention_keys: int = 0) -> torch.Tensor:
    """Encode an image [1, 3, H, W] in [-1, 1] (H, W multiples of the VAE factor) into the latent mean
    [1, C, H/f, W/f] (float32, CPU, before scaling) that matches `vae.encode(x).latent_dist.mean`.

    The down blocks run tile by tile with shared GroupNorm statistics, the mid block on the whole latent;
    `tile`, `overlap`, `context` are latent pixels, the rest as in `decode_tiled_shared`.
    """
    f = vae_factor(vae)
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[-2] % f or image.shape[-1] % f:
        raise ValueError(f"image must be [1, 3, H, W] with H and W multiples of {f}, got {tuple(image.shape)}")
    enc = vae.encoder
    _no_attention(enc.down_blocks, "the encoder's down blocks")
    needs = encoder_needs(vae, context)
    device, dtype = next(vae.parameters()).device, work_dtype(vae)
    grid = Grid((image.shape[-2] // f, image.shape[-1] // f), tile, overlap, needs[0], (wrap_y, wrap_x))
    feats = run_sweeps(Sweeps(enc, dtype, partial(_encoder_tile, needs), image.to(device), grid), passes,
                       Canvas(enc.conv_norm_out.num_channels, *grid.size, 1, overlap, device))
    tail = nn.ModuleDict({"enc": enc, "quant": _or_identity(vae, "quant_conv")})
    moments = Precisions(tail, dtype, _latent_stage(wrap_y, wrap_x, attention_keys)).run(
        _encoder_tail, feats[None], "the latent-resolution stage (mid block, conv_out)")
    return moments[:, :moments.shape[1] // 2].float().cpu()
