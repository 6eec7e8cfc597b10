"""Pure tensor math of tiled diffusion: grids, blend weights, fusion, the denoise loop, tiled decode.

`tiling.render` (an image request's stages, canvases, layouts and denoise over that math) is imported on its own:
it builds each loop's scheduler through `models.schedulers`, which this package does not load."""
from .blend import METHODS, tile_weights
from .fuse import crop, fuse, weight_sum
from .grid import Tile, axis_starts, layout, padded_size, scale_tiles, step_layouts
from .seams import border_heatmap, border_lines, seam_score, wrap_seam_score
from .sampling import TileBatch, batches_of, denoise_canvas, denoise_canvases
from .vae import (DecodeError, Sweeps, assemble, decode_each, decode_tiled_shared, decoder_sweeps, encode_tiled,
                  fitting_tile, free_memory, merged, tile_bytes, to_uint8)

__all__ = ["METHODS", "tile_weights", "crop", "fuse", "weight_sum", "Tile", "axis_starts", "layout", "padded_size",
           "scale_tiles", "step_layouts", "TileBatch", "batches_of", "denoise_canvas",
           "denoise_canvases", "DecodeError", "Sweeps", "assemble", "decode_each", "decode_tiled_shared",
           "decoder_sweeps", "encode_tiled", "fitting_tile", "free_memory", "merged", "tile_bytes", "to_uint8",
           "border_heatmap", "border_lines", "seam_score", "wrap_seam_score"]
