"""The VAE tile that fits the memory a decode or encode may take, counted from the VAE's module tree."""
from __future__ import annotations

import torch

from .autoencoder import decoder_needs, encoder_needs, vae_factor, work_dtype


def activation_bytes(vae, dtype_bytes: int, slack: float = 3.0) -> float:
    """Bytes per latent pixel that the largest activation of the VAE's decoder or encoder takes, times `slack`
    (a resnet holds its input, its output and a normalised copy at once): the decode or encode of an h x w
    latent window peaks at about h * w times this. Counted from the module tree (channels x the square of the
    resolution over the latent's), so it holds for any AutoencoderKL layout."""
    dec, enc, f = vae.decoder, vae.encoder, vae_factor(vae)
    peak, r = dec.conv_in.out_channels, 1
    for up in dec.up_blocks:
        for res in up.resnets:
            peak = max(peak, (res.in_channels + res.out_channels) * r * r)
        if getattr(up, "upsamplers", None):
            r *= 2
            peak = max(peak, 2 * up.upsamplers[0].channels * r * r)  # the nearest-2x copy and the conv's output
    r = f
    peak = max(peak, (enc.conv_in.in_channels + enc.conv_in.out_channels) * r * r)
    for down in enc.down_blocks:
        for res in down.resnets:
            peak = max(peak, (res.in_channels + res.out_channels) * r * r)
        if getattr(down, "downsamplers", None):
            r //= 2
    return peak * dtype_bytes * slack


LADDER = (256, 192, 128, 96, 64, 48, 32, 16)  # tile sides tried below the whole frame, latent pixels


# Copies of the mid block's input that the latent-resolution stage holds at its peak (the input, its normalised copy,
# the attention's queries, keys, values, output and projection, the residual sum): 8.1 for the decode's head and 7.1
# for the encode's tail, measured (live tensor bytes, SDXL's VAE on the CPU at 96x96 and 128x128 latents).
STAGE_COPIES = 8.5


def stage_bytes(vae, h: int, w: int) -> float:
    """What a tiled decode or encode of an h x w latent canvas holds at its peak outside its tiles: the
    latent-resolution stage (conv_in and the mid block of the decoder, the mid block and after of the encoder) over
    the whole canvas, beside the encode's fp32 feature canvas and its quotient and the picture on the device. It
    grows with the canvas whatever the tile: SDXL's VAE in bf16 at 7680x4320 holds ~7 GB."""
    mid = max(vae.decoder.conv_in.out_channels, vae.encoder.conv_norm_out.num_channels)
    item, f = work_dtype(vae).itemsize, vae_factor(vae)
    return h * w * (mid * (STAGE_COPIES * item + 8) + 3 * f * f * item)


def tile_bytes(vae, h: int, w: int, tile: int) -> float:
    """What the tiled decode or encode of an h x w latent canvas in `tile`-sided tiles takes at its peak (in the
    dtype the tiled decode runs the VAE in): its latent-resolution stage (`stage_bytes`), or its sweeps where they
    take more: the whole frame's activations when the tile covers it, else one tile's window (the tile and the
    context its convolutions need on each side), beside the canvas the tiles read or write and the picture."""
    f, item = vae_factor(vae), work_dtype(vae).itemsize
    resident = h * w * (vae.encoder.conv_norm_out.num_channels * 4 + 3 * f * f * item)
    if tile >= max(h, w):
        window = h * w
    else:
        context = max(decoder_needs(vae) + encoder_needs(vae))
        window = (min(tile, h) + 2 * context) * (min(tile, w) + 2 * context)
    return max(stage_bytes(vae, h, w), resident + window * activation_bytes(vae, item))


def fitting_tile(vae, h: int, w: int, free_bytes: float) -> int:
    """The VAE tile side (latent pixels) that costs what memory forces and no more for an h x w canvas:
    max(h, w), the whole frame in one sweep (the exact full-frame pass), when it fits in `free_bytes`
    (`tile_bytes`); else the largest side of `LADDER` that fits; at least the ladder's smallest."""
    for side in (max(h, w),) + tuple(s for s in LADDER if s < max(h, w)):
        if tile_bytes(vae, h, w, side) <= free_bytes:
            return side
    return LADDER[-1]


def free_memory(device, share: float) -> float:
    """`share` of the memory a decode on `device` may take: the GPU's free memory plus what the caching
    allocator holds unused, no more than `torch.cuda.set_per_process_memory_fraction` leaves this process (a
    small card stood in for on a large one), or the machine's available memory for a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current one (get_per_process_memory_fraction wants an index)
            device = torch.device("cuda", torch.cuda.current_device())
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
        free = min(free + torch.cuda.memory_reserved(device) - allocated, fraction * total - allocated)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return share * free

