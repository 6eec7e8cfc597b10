"""The predictor a worker holds: one loaded model, callable on tile batches, able to render whole images.

Plain Python, testable without Ray; `cluster.scheduler` wraps it in a Ray actor at the edge.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone
from typing import Callable, Optional

import torch

from jobs import ImageRequest, write_image
from jobs.spec import ModelConfig, OutputConfig, TilingConfig
from models import load_model, make_scheduler
from tiling import (TileBatch, decode_tiled, denoise_canvas, padded_size, scale_tiles, seam_score, step_layouts,
                    tile_grid, to_uint8)


def now() -> datetime:
    return datetime.now(timezone.utc)


def latent_size(req: ImageRequest, factor: int):
    """The latent canvas (height, width) of an image: its size rounded up to the VAE factor, divided by it."""
    width, height = padded_size(req.width, req.height, factor)
    return height // factor, width // factor


def layouts_of(req: ImageRequest, tiling: TilingConfig, factor: int):
    """Every step's tiles of one image (the same grid each step, or `shifted`'s seeded moving grid)."""
    h, w = latent_size(req, factor)
    return step_layouts(h, w, tiling.tile, tiling.overlap, tiling.method, req.steps, req.seed,
                        wrap_y=tiling.wrap in ("y", "both"), wrap_x=tiling.wrap in ("x", "both"))


def start_canvas(info: dict, req: ImageRequest):
    """One image's fresh scheduler (timesteps set), its initial noise [1, C, h, w] drawn on the CPU from the
    seed (so the picture does not depend on the device), and the generator the scheduler's steps draw from."""
    scheduler = make_scheduler(req.scheduler, info["scheduler_config"])
    scheduler.set_timesteps(req.steps)
    g = torch.Generator("cpu").manual_seed(req.seed)
    shape = (1, info["latent_channels"]) + latent_size(req, info["vae_scale_factor"])
    x = torch.randn(shape, generator=g) * getattr(scheduler, "init_noise_sigma", 1.0)
    return scheduler, x, g


def denoise_request(predict, info: dict, req: ImageRequest, tiling: TilingConfig,
                    callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """The finished latent canvas of one image; `predict` is the local model or a fan-out to workers."""
    scheduler, x, g = start_canvas(info, req)
    layouts = layouts_of(req, tiling, info["vae_scale_factor"])
    return denoise_canvas(predict, x, scheduler, layouts, tiling.method, tiling.batch, generator=g, callback=callback)


def tile_steps(req: ImageRequest, tiling: TilingConfig, factor: int) -> int:
    """Tile-steps of one image, for the progress bar."""
    return sum(len(tiles) for tiles in layouts_of(req, tiling, factor))


def seam_scores(pixels, req: ImageRequest, tiling: TilingConfig, factor: int) -> dict:
    """Seam scores of a finished image across its denoise tiles' and its VAE tiles' borders (1.0: invisible).

    `shifted` has no fixed grid: it is scored against the unshifted grid a plain tiler would have used.
    """
    h, w = latent_size(req, factor)
    fixed = "uniform" if tiling.method == "shifted" else tiling.method
    denoise = step_layouts(h, w, tiling.tile, 0 if tiling.method == "shifted" else tiling.overlap, fixed, 1, 0)[0]
    vae = tile_grid(h, w, tiling.vae_tile, tiling.vae_overlap)
    return {"seam_score": seam_score(pixels, scale_tiles(denoise, factor), period=factor),
            "seam_score_vae": seam_score(pixels, scale_tiles(vae, factor), period=factor)}


def failed_row(req: ImageRequest, started_at: datetime, error: BaseException | str, worker: str = "") -> dict:
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return req.manifest_row(status="failed", error=msg, started_at=started_at, finished_at=now(), worker=worker)


class Renderer:
    """Holds one model for the whole job; `predict` serves tile batches, `render` whole images."""

    def __init__(self, model: ModelConfig, output: OutputConfig, threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(model)
        self.output = output
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def info(self) -> dict:
        m = self.model
        return {"scheduler_config": m.scheduler_config, "latent_channels": m.latent_channels,
                "vae_scale_factor": m.vae_scale_factor, "worker": self.worker, "device": str(m.device)}

    def predict(self, batch: TileBatch, t, prompt: str, negative: str, guidance: float) -> torch.Tensor:
        return self.model.predict(batch.x, t, self.model.encode(prompt, negative), guidance, batch.tiles,
                                  batch.canvas)

    def render(self, req: ImageRequest, tiling: TilingConfig, progress=None) -> dict:
        """Denoise, decode and write one image; a failure becomes a `failed` row, never an exception."""
        started = now()
        try:
            t0 = time.perf_counter()
            tick = (lambda i, n: progress.add.remote(n)) if progress is not None else None
            z = denoise_request(lambda bs, t: [self.predict(b, t, req.prompt, req.negative_prompt, req.guidance)
                                               for b in bs], self.info(), req, tiling, tick)
            return self.finish(req, tiling, z, started, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - recorded in the manifest, the job goes on
            return failed_row(req, started, e, self.worker)

    def finish(self, req: ImageRequest, tiling: TilingConfig, z: torch.Tensor, started_at: datetime,
               seconds_denoise: float) -> dict:
        """Decode a finished canvas in tiles, write the image file, return its manifest row."""
        try:
            t0 = time.perf_counter()
            img = decode_tiled(self.model.vae, self.model.unscale(z), self.model.vae_scale_factor, tiling.vae_tile,
                               tiling.vae_overlap, wrap_x=tiling.wrap in ("x", "both"),
                               wrap_y=tiling.wrap in ("y", "both"), passes=tiling.vae_passes)
            pixels = to_uint8(img, req.width, req.height)
            sha, size = write_image(pixels, self.output.dir, req.path, self.output.format, self.output.quality,
                                    req.parameters_text())
            seconds_decode = time.perf_counter() - t0
            return req.manifest_row(status="ok", error=None, sha256=sha, bytes=size, started_at=started_at,
                                    finished_at=now(), seconds_denoise=seconds_denoise,
                                    seconds_decode=seconds_decode, worker=self.worker,
                                    **seam_scores(pixels, req, tiling, self.model.vae_scale_factor))
        except Exception as e:  # noqa: BLE001
            return failed_row(req, started_at, e, self.worker)
