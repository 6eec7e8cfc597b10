"""Tiled VAE decode and encode whose tiles agree with the full-frame pass.

A VAE's convolutions are local but its GroupNorms are global: decoded on its own, each tile normalises with
its own statistics and comes out in its own tone. Here each tile runs with as much latent context as its
convolutions look across (cut down block by block as it is used up), and the GroupNorms of the tiled part
share statistics of the whole canvas, gathered over the part of the canvas each tile owns and merged. Each
GroupNorm's input depends on the normalisations before it, so the tiles are swept three times: the first
sweep lets each tile normalise with its own statistics and gathers; the second normalises with the merged
statistics tracked to the tile (so that errors do not compound through the layers) and gathers again; the
third applies those to every tile and writes the picture. The global parts (decoder: conv_in and the mid
block with its attention; encoder: the mid block and after) run on the whole canvas at latent resolution.
Nothing is patched: the tiled part runs on a copy of the module tree that shares the caller's parameters.

Modules: `geometry` (where the tiles and their windows lie, the feathered canvas), `stats` (the moments, their
merge, the SharedGroupNorm and the per-tile statistics it reads), `sweeps` (the sweeps over the tiles and the
fp32 retry), `autoencoder` (the AutoencoderKL's receptive field and the one place that calls its blocks),
`memory` (the tile that fits).
"""
from .autoencoder import decode_tiled_shared, decoder_needs, decoder_sweeps, encode_tiled, encoder_needs, vae_factor
from .geometry import Span, assemble, axis_spans, to_uint8, window
from .memory import LADDER, activation_bytes, fitting_tile, free_memory, stage_bytes, tile_bytes
from .stats import SharedGroupNorm, merged
from .sweeps import DecodeError, Sweeps, decode_each, run_sweeps

__all__ = ["decode_tiled_shared", "decoder_needs", "decoder_sweeps", "encode_tiled", "encoder_needs", "vae_factor",
           "Span", "assemble", "axis_spans", "to_uint8", "window", "LADDER", "activation_bytes", "fitting_tile",
           "free_memory", "stage_bytes", "tile_bytes", "SharedGroupNorm", "merged", "DecodeError", "Sweeps",
           "decode_each", "run_sweeps"]
