"""The predictor a worker holds: one loaded model, callable on tile batches, able to render whole images.

Plain Python, testable without Ray; `cluster.scheduler` wraps it in a Ray actor at the edge. The render math it
runs (the stages, their start canvases and layouts, a group's denoise, the seam scores) is `tiling.render`'s.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from jobs import ImageRequest, RenderSpec, write_image
from jobs.spec import ConfigError, ModelConfig, OutputConfig, stage_model_config
from models import load_model
from models.base import PromptCache
from models.deepcache import DeepStep, why_not
from models.loading import compile_denoiser
from tiling import (TileBatch, decode_tiled_shared, decoder_sweeps, encode_tiled, fitting_tile, free_memory, tile_bytes,
                    to_uint8)
from tiling.vae import LADDER
from tiling.features import FeatureCanvas
from tiling.progressive import color_fix, resize, unsharp
from tiling.render import ModelInfo, Stage, denoise_group, group_key, seam_scores, stages_of, vae_options, wraps
from tiling.vae import DecodeError

log = logging.getLogger("tessera")


def now() -> datetime:
    return datetime.now(timezone.utc)


def read_picture(path: str) -> torch.Tensor:
    """An image file as a [3, H, W] float32 tensor in [-1, 1] (RGB; an alpha channel is dropped)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1


class RenderError(RuntimeError):
    """An image that cannot be rendered (after its retries); the message goes to its row's `error`."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _notes(notes: Optional[Sequence[str]]) -> Optional[str]:
    return "; ".join(notes) if notes else None


def failed_row(req: ImageRequest, started_at: datetime, error: BaseException | str, worker: str = "",
               notes: Optional[Sequence[str]] = None) -> dict:
    msg = error if isinstance(error, str) else str(error) if isinstance(error, RenderError) \
        else f"{type(error).__name__}: {error}"
    return req.manifest_row(status="failed", error=msg, started_at=started_at, finished_at=now(), worker=worker,
                            warnings=_notes(notes))


@contextmanager
def _in_fp32(m, on: bool):
    """With `on`, adapter `m`'s modules in float32 for the block (a retry of a non-finite render), then back."""
    modules = [getattr(m, m.denoiser), m.vae, *m.text_modules()]
    dtypes = [getattr(mod, "dtype", torch.float32) for mod in modules]
    if not on or (m.dtype == torch.float32 and all(d == torch.float32 for d in dtypes)):
        yield
        return
    old = m.dtype
    for mod in modules:
        mod.to(dtype=torch.float32)
    m.dtype, m._cache = torch.float32, PromptCache(m._encode_pair)  # embeddings in the new dtype
    try:
        yield
    finally:
        for mod, d in zip(modules, dtypes):
            mod.to(dtype=d)
        m.dtype, m._cache = old, PromptCache(m._encode_pair)


class Renderer:
    """Holds one model for the whole job (and its hires checkpoint, `model.stage_path`, for the enlarged
    stages); `predict` serves tile batches, `render_group` whole images.

    Thread-safe for two callers (a Ray actor with max_concurrency=2): the denoise holds the device lock, the CPU
    work (image encoding, seam scores, hashing, the write) no lock, so one image's PNG is written while the next
    one denoises. The VAE passes hold the device lock too, unless they fit beside a denoise (`_fits_beside`: on
    a GPU without offload, where the free memory holds both, with VAE tiles chosen alone before): then they run
    on the worker's own CUDA stream under the decode lock alone, while the other call denoises (the same kernels:
    the same pixels). So run the final decode (`_decode_beside`) and a progressive render's round trip between
    stages (`_reference`: the decode, resize and encode that start the next stage)."""

    def __init__(self, model: ModelConfig, output: OutputConfig, threads: Optional[int] = None):
        self.threads = threads  # torch's CPU threads for each call (None: left as they are)
        if threads:
            torch.set_num_threads(threads)
        # a CUDA caching allocator that grows its segments instead of cutting new ones: the VAE's full-resolution
        # tensors (half a GB each at 4K) then fit where the memory is free but fragmented (read at the process's
        # first CUDA allocation; a user's own setting stays)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        self.model = load_model(model)
        # a hires checkpoint (model.stage_path) for the stages that refine a reference; else the model itself
        self.stage_model = load_model(stage_model_config(model)) if model.stage_path else self.model
        if self.stage_model is not self.model:
            differ = [f"{k} {getattr(self.stage_model, k)} against the model's {getattr(self.model, k)}"
                      for k in ("latent_channels", "vae_scale_factor")
                      if getattr(self.stage_model, k) != getattr(self.model, k)]
            if differ:
                raise ConfigError("model.stage_path", model.stage_path, "does not fit the model: " + ", ".join(differ))
        if model.deep_cache > 1:  # the family can (validated); this checks the loaded denoiser itself
            for m in self.models():
                why = why_not(getattr(m, m.denoiser))
                if why:
                    raise ConfigError("model.deep_cache", model.deep_cache, f"cannot split this model's denoiser: {why}")
        self.compiled = model.compile
        if model.compile:
            for m in self.models():
                compile_denoiser(m)
        self.output = output
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._device = threading.Lock()
        # held by a decode, and by whatever must see no decode beside it: the VAE plan, a denoise whose peak is
        # measured, an fp32 retry (the VAE's dtype changes); taken after the device lock, never before it
        self._decoding = threading.RLock()
        gpu = self.model.device.type == "cuda" and model.offload == "none"
        self._stream = torch.cuda.Stream(self.model.device) if gpu else None  # for a decode beside a denoise
        self.overlap = gpu  # decodes may run beside a denoise (bench/dit_gpu.py compares without)
        self.parks = gpu  # a VAE pass alone may send the denoisers to the CPU (`_vae_room`)
        # (spec.vae_tile, h, w) -> (the VAE tile chosen last, the free memory it saw, the denoisers parked then)
        self._vae_plans = {}
        self._parked = False  # the denoisers are on the CPU for a VAE pass alone (`_vae_room`)
        self._peaks = {}  # (group_key, images) -> the memory its denoise took above what was allocated before
        self._batches = {}  # tile size -> automatic batch size
        self._sweeps = {}  # image id -> its tiled decode's Sweeps, while a tile-parallel decode runs
        self._sweep_models = {}  # image id -> the adapter whose VAE runs them
        self._notes = {}  # prompt -> its truncation warning (or None)
        self._local = threading.local()  # the notes of the group this thread renders (`render_group`)

    def _set_threads(self, lent: int = 1) -> None:
        """This OS thread's torch CPU threads: the worker's own (`cluster.cpus_per_worker`), times `lent` (at most
        the machine's CPUs) for a pass the other workers wait on: tile-parallel mode's round trips and one-tile
        decodes, whose VAE passes give the same bytes on any count (`tiling.vae.sweeps.PointwiseConv`). OpenMP
        keeps a count per OS thread, a new one starts from the count set last anywhere, and a worker's calls run
        on several threads: so every call sets its own."""
        if self.threads and self.model.device.type == "cpu":
            n = min(self.threads * lent, os.cpu_count() or 1) if lent > 1 else self.threads
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)

    @contextmanager
    def _threads(self, lent: int = 1):
        """`_set_threads(lent)` for a call, the worker's own count after it."""
        self._set_threads(lent)
        try:
            yield
        finally:
            self._set_threads()

    def models(self) -> list:
        """The loaded adapters: the model, and the hires checkpoint if it is another."""
        return [self.model] + ([self.stage_model] if self.stage_model is not self.model else [])

    def model_of(self, refine: bool):
        """The adapter that runs a stage (or decodes its canvas): the hires checkpoint's for a stage that refines a
        reference, else the model's."""
        return self.stage_model if refine else self.model

    def final_model(self, req: ImageRequest):
        """The adapter whose VAE decodes `req`'s finished canvas: the one that ran its last stage."""
        return self.model_of(stages_of(req, self.info())[-1].refine)

    def info(self) -> ModelInfo:
        m = self.model
        return ModelInfo(m.scheduler_config, m.latent_channels, m.vae_scale_factor, m.native_size,
                         getattr(m, "patch_size", None), self.worker, str(m.device))

    def batch_size(self, spec: RenderSpec) -> int:
        """`tiling.batch`, or for 0 (auto) as many tiles as the free GPU memory holds (4 on a CPU)."""
        if spec.batch:
            return spec.batch
        if spec.tile not in self._batches:
            with self._device:
                self._batches[spec.tile] = auto_batch(self.model, spec.tile)
        return self._batches[spec.tile]

    def vae_tile(self, spec: RenderSpec, h: int, w: int) -> int:
        """`tiling.vae_tile`, or for 0 (auto) the side that this worker's free memory allows for an h x w latent
        canvas (`tiling.vae.fitting_tile`: the whole frame, one exact sweep, when it fits; 80% of a GPU's free
        memory, 40% of a CPU machine's available memory, which other workers may share), chosen with no decode
        beside it (holding the decode lock), so that a picture never depends on what the worker's other call did;
        a decode beside a denoise takes the side chosen last for its canvas size (`_vae_plans`)."""
        with self._decoding:
            device, free = self.model.device, free_memory(self.model.device, 1.0)
            share = 0.8 if device.type == "cuda" else 0.4
            tile = spec.vae_tile or fitting_tile(self.model.vae, h, w, share * free)
            self._vae_plans[(spec.vae_tile, h, w)] = (tile, free, self._parked)
        return tile

    def _fits_beside(self, spec: RenderSpec, runs, peak: Optional[int]) -> bool:
        """Whether VAE `runs` ((vae, h, w) each: a decode or encode of an h x w latent canvas) may run beside the
        other call's next denoise: `overlap` on, the group's denoise `peak` measured, and each canvas's VAE tile
        chosen here before, alone (`vae_tile`) and not with the denoisers parked (`_vae_room`), its run and that peak
        within 80% of the free memory it was chosen in."""
        if not self.overlap or peak is None:
            return False
        for vae, h, w in runs:
            plan = self._vae_plans.get((spec.vae_tile, h, w))
            if plan is None or plan[2] or tile_bytes(vae, h, w, plan[0]) + peak > 0.8 * plan[1]:
                return False
        return True

    @contextmanager
    def _vae_room(self, runs, force: bool = False):
        """VAE `runs` ((vae, h, w) each: a decode or encode of an h x w latent canvas) done alone, holding the
        device lock: under the decode lock too, and where the least one of them can take (`tile_bytes` at the
        smallest tile: its latent-resolution stage over the whole canvas) is more than the share of free memory a
        VAE tile is chosen in (`vae_tile`), with every model's denoiser and text encoders on the CPU meanwhile
        (`Adapter.parked`): SDXL at 7680x4320 on a 12 GB card, whose VAE mid block over the 518,400 latent
        positions does not fit beside the resident UNet; `force`: parked whatever the estimate says. Yields whether
        they were parked."""
        with self._decoding, ExitStack() as parked:
            need = max((tile_bytes(vae, h, w, LADDER[-1]) for vae, h, w in runs), default=0)
            if self.parks and not self._parked and (force or need > 0.8 * free_memory(self.model.device, 1.0)):
                log.info("a VAE pass of %.1f GB at the least: the denoisers wait on the CPU", need / 1e9)
                for m in self.models():
                    parked.enter_context(m.parked())
                self._parked = True
                parked.callback(setattr, self, "_parked", False)
            yield self._parked

    def _alone(self, runs, fn):
        """`fn()`, VAE `runs`, in `_vae_room`; out of memory there with the denoisers resident (the estimate is
        not the allocator: fragmentation, convolution workspaces), once more with them parked and its tiles chosen
        again in the memory that leaves. Out of memory with them parked (or where they cannot be) is a RenderError:
        a smaller denoise tile batch, `render_group`'s retry, would not change the pass."""
        parked = False
        try:
            with self._vae_room(runs) as parked:
                return fn()
        except torch.OutOfMemoryError as e:
            if not self.parks or parked:
                raise RenderError(f"CUDA out of memory in a VAE pass ({_first_line(e)})") from e
        note = "CUDA out of memory in a VAE pass beside the resident denoisers: ran again with them parked"
        log.warning(note)
        notes = getattr(self._local, "notes", None)
        if notes is not None and note not in notes:
            notes.append(note)
        torch.cuda.empty_cache()
        try:
            with self._vae_room(runs, force=True):
                return fn()
        except torch.OutOfMemoryError as e:
            raise RenderError(f"CUDA out of memory in a VAE pass, the denoisers parked ({_first_line(e)})") from e

    def _planned_tile(self, spec: RenderSpec, h: int, w: int) -> int:
        """The VAE tile `vae_tile` chose last, alone, for an h x w canvas: what a pass beside a denoise runs with."""
        return self._vae_plans[(spec.vae_tile, h, w)][0]

    def _on_side_stream(self, fn):
        """`fn()` under the decode lock on this worker's own CUDA stream (a CPU: the caller's), after the work queued
        on the default stream so far, and finished when it returns."""
        with self._decoding, torch.cuda.stream(self._stream):  # no stream (a CPU): the caller's
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.default_stream(self._stream.device))  # the canvases done
            out = fn()
            if self._stream is not None:
                self._stream.synchronize()
            return out

    def _predict(self, batch: TileBatch, t, cond, guidance: float, pad_to: int = 0, model=None,
                 features: Optional[FeatureCanvas] = None) -> torch.Tensor:
        """`model` (the model's by default) on one batch, on its device. A compiled model sees one batch shape a
        step: a short batch is padded to the step's first (largest) with copies of its last tile (predictions
        dropped). Under DeepCache (`features`, the group's cache) a batch of tiles from the group's canvases
        runs the whole UNet on a full step, handing its features to the cache, and in between only its outer
        level on the cached features under the tiles (the whole UNet where the last full step left a gap)."""
        m = model or self.model
        x, tiles, n = batch.x, batch.tiles, batch.x.shape[0]
        deep = None
        if features is not None and batch.images:
            keys = [(k, batch.prompt) for k in batch.images]
            if features.full_step(batch.step):
                deep = DeepStep(None, lambda f: features.put(keys, batch.step, batch.canvas, batch.tiles, f[:n]))
            else:
                cached = features.take(keys, batch.canvas, batch.tiles, m.dtype)
                deep = DeepStep(cached, lambda f: None) if cached is not None else None
        if self.compiled and n < pad_to:
            x = torch.cat([x, x[-1:].expand(pad_to - n, -1, -1, -1)])
            tiles = tuple(tiles) + (tiles[-1],) * (pad_to - n)
            if deep is not None and deep.features is not None:
                deep = deep._replace(features=torch.cat([deep.features, deep.features[-1:].expand(
                    pad_to - n, *deep.features.shape[1:])]))
        if deep is None:
            return m.predict(x, t, cond, guidance, tiles, batch.canvas)[:n]
        return m.predict(x, t, cond, guidance, tiles, batch.canvas, deep=deep)[:n]

    def predict(self, batch: TileBatch, t, prompt: str, negative: str, guidance: float, pad_to: int = 0,
                refine: bool = False):
        """Tile-parallel mode: one batch from the driver (`refine`: of a stage that refines a reference); the
        prediction goes back on the CPU."""
        m = self.model_of(refine)
        with self._device, self._threads():
            return self._predict(batch, t, m.encode(prompt, negative), guidance, pad_to, m).cpu()

    def render(self, req: ImageRequest, progress=None) -> dict:
        """`render_group` of one image, its one row: a convenience for the benches (bench/coherence.py,
        dit_gpu.py, wrap_seam.py) and the tests; workers call `render_group`."""
        return self.render_group([req], progress)[0]

    def render_group(self, reqs: Sequence[ImageRequest], progress=None) -> List[dict]:
        """Images of one `group_key`, stepped together on this worker's device, decoded and written; one row
        each (a failure becomes a `failed` row, never an exception).

        Two faults are retried here, and said in the rows' `warnings`: CUDA out of memory while denoising halves
        the tile batch and starts the group again, down to one tile a call (then the rows fail); non-finite
        latents or decode (NaN, inf: an fp16/bf16 overflow) start the group again once with the model in fp32
        (then the rows fail: no black picture is ever marked ok). The decode runs beside the other call's next
        denoise where `_fits_beside` says the memory holds both (`_decode_beside`)."""
        notes: List[str] = []
        self._local.notes = notes  # what this thread's passes have to say (`_alone`), this group's only
        self._set_threads()
        try:
            return self._render_group(reqs, progress, notes)
        finally:
            self._local.notes = None

    def _render_group(self, reqs: Sequence[ImageRequest], progress, notes: List[str]) -> List[dict]:
        started = now()
        try:
            batch, fp32 = self.batch_size(reqs[0]), False
            tick = (lambda i, n: progress.add.remote(n)) if progress is not None else None
            with self._device:  # the tokenizer too: a fast tokenizer's padding state is not thread-safe
                notes += [n for n in (self._prompt_note(reqs[0].prompt),) if n]
            while True:
                try:
                    peak_key = (group_key(reqs[0]), len(reqs))  # what `_fits_beside` reads back
                    measure = self.overlap and peak_key not in self._peaks
                    with self._holding(fp32, measure):
                        base = self._peak_start() if measure else 0
                        t0 = time.perf_counter()
                        zs = self._denoise(reqs, batch, tick,
                                           None if measure or fp32 else self._peaks.get(peak_key))
                        seconds = (time.perf_counter() - t0) / len(reqs)
                        if measure:
                            self._peaks[peak_key] = self._peak_since(base)
                        finite = all(bool(torch.isfinite(z).all()) for z in zs)
                        final = self.final_model(reqs[0]).vae
                        beside = (finite and not fp32 and self._fits_beside(
                            reqs[0], [(final, *z.shape[-2:]) for z in zs], self._peaks.get(peak_key)))
                        decoded = self._decode_group(reqs, zs) if finite and not beside else None
                    if beside:
                        decoded = self._decode_beside(reqs, zs)
                except torch.OutOfMemoryError as e:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    if batch <= 1:
                        raise RenderError(f"CUDA out of memory at one tile a call ({_first_line(e)})") from e
                    notes.append(f"CUDA out of memory at tile batch {batch}: retried at {batch // 2}")
                    batch //= 2
                    continue
                if decoded is None and not fp32:
                    where = "latents" if not finite else "decode"
                    notes.append(f"non-finite {where} (NaN/inf): rendered again in fp32")
                    fp32 = True
                    continue
                if decoded is None:
                    raise RenderError(f"non-finite {'latents' if not finite else 'decode'} (NaN/inf) in fp32 too: "
                                      "no image written")
                break
        except Exception as e:  # noqa: BLE001 - recorded in the manifest, the job goes on
            return [failed_row(req, started, e, self.worker, notes) for req in reqs]
        return [failed_row(req, started, d, self.worker, notes) if isinstance(d, Exception)
                else self.write(req, d, started, seconds, notes) for req, d in zip(reqs, decoded)]

    @contextmanager
    def _holding(self, fp32: bool, measure: bool):
        """The device lock for a denoise; the decode lock too where no decode may run beside it (an fp32 retry
        changes the VAE's dtype, a `measure`d denoise's memory peak must be its own); the models in fp32 for a
        retry."""
        with ExitStack() as held:
            held.enter_context(self._device)
            if fp32 or measure:
                held.enter_context(self._decoding)
            held.enter_context(self._in_fp32(fp32))
            yield

    def _decode_group(self, reqs: Sequence[ImageRequest], zs, beside: bool = False) -> Optional[list]:
        """Each canvas of a group decoded (`_decode`), or the exception that stopped its decode, so that one
        image's failure fails that image alone; None where a decode was non-finite (the group is retried).
        `beside` a denoise, running out of memory is raised (`_decode_beside` decodes alone then)."""
        out = []
        with self._decoding:
            for req, z in zip(reqs, zs):
                try:
                    out.append(self._decode(req, z, self._planned_tile(req, *z.shape[-2:]))
                               if beside else self._decode(req, z))
                except DecodeError:
                    return None
                except Exception as e:  # noqa: BLE001 - that image's row says why
                    if beside and isinstance(e, torch.OutOfMemoryError):
                        raise
                    out.append(e)
        return out

    def _decode_beside(self, reqs: Sequence[ImageRequest], zs) -> Optional[list]:
        """`_decode_group` without the device lock, on this worker's own CUDA stream, beside the other call's next
        denoise; out of memory there, the group is decoded again alone (holding the device lock)."""
        try:
            return self._on_side_stream(lambda: self._decode_group(reqs, zs, beside=True))
        except torch.OutOfMemoryError:
            log.warning("CUDA out of memory decoding beside a denoise: decoded again alone")
            torch.cuda.empty_cache()
            with self._device:
                return self._decode_group(reqs, zs)

    def _peak_start(self) -> int:
        """Start measuring the device memory a block takes (on a GPU; 0 elsewhere): the memory allocated now."""
        device = self.model.device
        if device.type != "cuda":
            return 0
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)

    def _peak_since(self, base: int) -> int:
        device = self.model.device
        return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0

    def _denoise(self, reqs: Sequence[ImageRequest], batch: int, tick, peak: Optional[int] = None
                 ) -> List[torch.Tensor]:
        """The group's finished canvases, holding the device lock; `peak`, the group's denoise peak where it was
        measured before (`render_group`), lets the round trips between stages run beside the other call."""
        features = FeatureCanvas(reqs[0].deep_cache) if reqs[0].deep_cache > 1 else None  # DeepCache's

        def predict_of(m):
            conds = [m.encode(*pair) for pair in reqs[0].prompt_pairs()]  # TileBatch.prompt's
            return lambda bs, t: [self._predict(b, t, conds[b.prompt], reqs[0].guidance,
                                                max(len(c.tiles) for c in bs), m, features) for b in bs]

        stage_predict = predict_of(self.stage_model) if self.stage_model is not self.model else None
        return denoise_group(predict_of(self.model), self.info(), reqs, batch, self.model.device, tick,
                             lambda k, zs, stage, bases: self._reference(reqs, k, zs, stage, bases, peak),
                             stage_predict)

    @contextmanager
    def _in_fp32(self, on: bool):
        """With `on`, the models' modules in float32 for the block (a retry of a non-finite render), then back."""
        with ExitStack() as stack:
            for m in self.models():
                stack.enter_context(_in_fp32(m, on))
            yield

    def _prompt_note(self, prompt: str) -> Optional[str]:
        """A warning when the text encoder will cut `prompt` (CLIP: 77 tokens), once per prompt and worker: the
        model sees the first tokens only, as diffusers' pipelines do; the row's `warnings` says it. Call it holding
        the device lock: it sets the tokenizer's truncation, which a concurrent encode would see."""
        if prompt in self._notes:
            return self._notes[prompt]
        note, tok = None, getattr(self.model, "tokenizer", None)
        limit = getattr(tok, "model_max_length", None)
        if tok is not None and isinstance(limit, int) and limit < 100_000:
            try:
                n = len(tok(prompt, truncation=False, verbose=False).input_ids)
            except Exception:  # noqa: BLE001 - a tokenizer that cannot count: no note
                n = 0
            if n > limit:
                note = f"prompt truncated: the text encoder reads its first {limit} tokens of {n}"
                log.warning("%s (%r...)", note, prompt[:60])
        if len(self._notes) > 4096:
            self._notes.clear()
        self._notes[prompt] = note
        return note

    def reference(self, reqs: Sequence[ImageRequest], number: int, zs: Optional[List[torch.Tensor]],
                  stage: Stage, bases: Optional[List[torch.Tensor]] = None, lent: int = 1) -> List[torch.Tensor]:
        """Tile-parallel mode: `_reference` for the driver's loop (on `lent` workers' threads, `_set_threads`);
        the canvases go back on the CPU."""
        with self._device, self._threads(lent):
            return [z.cpu() for z in self._reference(reqs, number, zs, stage, bases)]

    def _reference(self, reqs: Sequence[ImageRequest], number: int, zs: Optional[List[torch.Tensor]], stage: Stage,
                   bases: Optional[List[torch.Tensor]] = None, peak: Optional[int] = None) -> List[torch.Tensor]:
        """Stage `number`'s starting canvases (`_round_trip`), called holding the device lock. Where the group's
        denoise `peak` is known and the round trip's decodes and encodes fit beside it with VAE tiles chosen alone
        before (`_fits_beside`), the device lock is let go meanwhile and the round trip runs on the side stream
        under the decode lock (`_on_side_stream`), so that the other call denoises; out of memory there, it runs
        again alone."""
        spec = reqs[0]
        if zs is not None and spec.upscale == "pixel":
            runs = self._trip_runs(spec, number, zs, stage)
            if self._fits_beside(spec, runs, peak):
                self._device.release()  # held by the caller (`_holding`): the other call's denoise may run
                try:
                    out = self._on_side_stream(lambda: self._round_trip(reqs, number, zs, stage, bases, planned=True))
                    for z in out:  # made on the side stream, read on the default one from here
                        if z.is_cuda:
                            z.record_stream(torch.cuda.current_stream(z.device))
                    return out
                except torch.OutOfMemoryError:
                    log.warning("CUDA out of memory in a round trip beside a denoise: run again alone")
                    torch.cuda.empty_cache()
                finally:
                    self._device.acquire()
        return self._round_trip(reqs, number, zs, stage, bases)

    def _trip_models(self, spec: RenderSpec, number: int, zs: Optional[List[torch.Tensor]], stage: Stage):
        """(the adapter whose VAE encodes stage `number`'s start, the one whose VAE decodes the stage before it:
        the same where there is none before, `zs` None)."""
        m = self.model_of(stage.refine)
        return m, self.model_of(stages_of(spec, self.info())[number - 1].refine) if zs is not None else m

    def _trip_runs(self, spec: RenderSpec, number: int, zs: Optional[List[torch.Tensor]], stage: Stage) -> list:
        """The VAE passes ((vae, h, w) each) of stage `number`'s round trip: the decode of each canvas `zs` before
        it (none for init pictures, nor for a latent upscale that keeps no stage pictures), the encode of each
        enlarged picture (none for a latent upscale)."""
        m, dec = self._trip_models(spec, number, zs, stage)
        latent = zs is not None and spec.upscale == "latent"
        decoded = zs is not None and (not latent or self.output.keep_stages)
        return [(dec.vae, *z.shape[-2:]) for z in zs or () if decoded] + ([] if latent else [(m.vae, stage.h, stage.w)])

    def _round_trip(self, reqs: Sequence[ImageRequest], number: int, zs: Optional[List[torch.Tensor]], stage: Stage,
                    bases: Optional[List[torch.Tensor]] = None, planned: bool = False) -> List[torch.Tensor]:
        """Stage `number`'s starting canvases: the finished canvases `zs` of the stage before, or (zs None) the
        requests' init pictures, enlarged to the stage. `job.upscale=pixel` decodes a canvas (tiled, shared
        statistics, always: `tiling.vae_passes=1`'s tone shift between tiles would be kept by every stage after),
        resizes the picture (bicubic) to the stage's size, edge-padded to its latent canvas, and encodes it (tiled);
        `latent` resizes the latents. Under `output.keep_stages` each decoded stage is
        written beside the image. The stage before is decoded by the VAE of the model that ran it, the picture
        encoded by this stage's (`model.stage_path`: the hires checkpoint's). `job.color_fix` holds each enlarged
        picture to the base at the base's resolution (`tiling.progressive.color_fix`): the init picture, the
        canvases decoded at stage 1, or `bases` (the base's canvases) decoded by the base's VAE. `planned`: with the
        VAE tiles chosen last (`_planned_tile`), as a pass beside a denoise runs; else alone (`_alone`)."""
        f, spec = self.model.vae_scale_factor, reqs[0]
        m, dec = self._trip_models(spec, number, zs, stage)
        latent = zs is not None and spec.upscale == "latent"
        tile_of = functools.partial(self._planned_tile if planned else self.vae_tile, spec)
        passes = max(3, spec.vae_passes)  # per-tile statistics would shift a tile's tone, and each stage keeps it
        first = self.model_of(False)  # the base's model, whose VAE decodes `bases`
        vaes = list({id(a): a for a in [m, dec] + ([first] if bases is not None else [])}.values())

        def trip():
            out = []
            for a in vaes:
                a.vae_on_device(True)
            try:
                for k, req in enumerate(reqs):
                    if zs is None:
                        picture = read_picture(req.init_image)
                    elif not latent or self.output.keep_stages:
                        picture = decode_tiled_shared(dec.vae, dec.unscale(zs[k]), tile_of(*zs[k].shape[-2:]),
                                                      spec.vae_overlap, passes=passes, **vae_options(spec))
                        if self.output.keep_stages:
                            h, w = zs[k].shape[-2:]
                            write_image(to_uint8(picture, w * f, h * f), self.output.dir, req.stage_path(number - 1),
                                        self.output.format, self.output.quality, req.parameters_text())
                    if latent:
                        out.append(resize(zs[k], (stage.h, stage.w), **wraps(spec)))
                        continue
                    (w, h), (H, W) = stage.size, (stage.h * f, stage.w * f)
                    before = picture.shape[-1]
                    if not spec.color_fix:
                        colors = None
                    elif zs is None or (bases is None and not req.init_image):  # the init picture or the base itself
                        colors = picture
                    elif req.init_image:  # a later stage of an img2img render
                        colors = read_picture(req.init_image)
                    else:
                        colors = decode_tiled_shared(first.vae, first.unscale(bases[k]), tile_of(*bases[k].shape[-2:]),
                                                     spec.vae_overlap, passes=passes, **vae_options(spec))
                    picture = resize(picture[None], (h, w), **wraps(spec))
                    if colors is not None:
                        picture = color_fix(picture, colors[None].to(picture.device), spec.color_fix, **wraps(spec))
                    picture = unsharp(picture, spec.sharpen, spec.sharpen_sigma * w / before, **wraps(spec))
                    picture = F.pad(picture, (0, W - w, 0, H - h), mode="replicate").clamp(-1, 1)
                    out.append(m.scale(encode_tiled(m.vae, picture.to(m.device, m.vae_dtype),
                                                    tile_of(stage.h, stage.w), spec.vae_overlap,
                                                    passes=passes, **vae_options(spec))))
            finally:
                for a in vaes:
                    a.vae_on_device(False)
            return out
        return trip() if planned else self._alone(self._trip_runs(spec, number, zs, stage), trip)

    def _decode(self, req: ImageRequest, z: torch.Tensor, tile: Optional[int] = None):
        """(uint8 pixels, seconds, the VAE tile side it ran with: `tile`, else `vae_tile`'s) of a finished canvas;
        raises what stops the decode (`tiling.vae.DecodeError` for a non-finite one). Without `tile`, alone
        (`_alone`: holding the device lock)."""
        m = self.final_model(req)
        t0 = time.perf_counter()

        def decode():
            m.vae_on_device(True)
            try:
                side = tile or self.vae_tile(req, *z.shape[-2:])
                img = decode_tiled_shared(m.vae, m.unscale(z), side, req.vae_overlap, passes=req.vae_passes,
                                          **vae_options(req))
                return to_uint8(img, req.width, req.height), time.perf_counter() - t0, side
            finally:
                m.vae_on_device(False)
        return decode() if tile else self._alone([(m.vae, *z.shape[-2:])], decode)

    def decode_begin(self, req: ImageRequest, z: torch.Tensor, tile: int, refined: bool = False,
                     lent: int = 1) -> list:
        """Tile-parallel decode, on every worker of it (worker 0 alone for one tile): `req`'s canvas `z` in VAE
        tiles of side `tile`, its latent-resolution stage run here (by the VAE of the model that ran its last
        stage: `refined`, a stage that refined a reference) and its tiles made ready to sweep (`decode_sweep`);
        returns the tiles' spans (for `tiling.vae.assemble`). The latent-resolution stage runs `_alone` (the
        denoisers parked where it does not fit beside them); the sweeps, called later, beside them. `lent`: on
        that many workers' threads (`_set_threads`)."""
        m = self.model_of(refined)
        with self._device, self._threads(lent):
            m.vae_on_device(True)
            try:
                key = req.image_id
                self._sweeps[key] = self._alone([(m.vae, *z.shape[-2:])], lambda: decoder_sweeps(
                    m.vae, m.unscale(z), tile, req.vae_overlap, **vae_options(req)))
                self._sweep_models[key] = m
            except BaseException:
                m.vae_on_device(False)
                raise
            return self._sweeps[key].spans

    def decode_sweep(self, key: str, indices: Sequence[int], applied, last: bool, number: int,
                     lent: int = 1) -> dict:
        """Sweep `number` over this worker's share of the tiles: tile index -> its owned moments (gathering,
        `applied` the statistics merged from the sweep before) or, in the `last` sweep, its float32 output; on
        the CPU (on `lent` workers' threads). The last sweep, or a failure, ends the decode here."""
        with self._device, self._threads(lent):
            try:
                out = {i: v.float().cpu() if last else {k: (n, m.cpu(), q.cpu()) for k, (n, m, q) in v.items()}
                       for i, v in self._sweeps[key].sweep(indices, applied, last, number)}
            except BaseException:
                self.decode_end(key)
                raise
            if last:
                self.decode_end(key)
            return out

    def decode_end(self, key: str) -> None:
        if self._sweeps.pop(key, None) is not None:
            self._sweep_models.pop(key).vae_on_device(False)

    def write(self, req: ImageRequest, decoded, started_at: datetime,
              seconds_denoise: float, notes: Optional[Sequence[str]] = None) -> dict:
        """Encode and write a decoded image's file (`decoded`: `_decode`'s pixels, seconds and VAE tile), score its
        seams, return its manifest row (CPU only). The seams are scored while the file is encoded (both release
        the GIL)."""
        try:
            pixels, seconds_decode, vae_tile = decoded
            stages = ">".join(f"{s.size[0]}x{s.size[1]}" for s in stages_of(req, self.info()))
            t0 = time.perf_counter()
            self._set_threads()
            with ThreadPoolExecutor(1, initializer=self._set_threads) as pool:
                scores = pool.submit(seam_scores, pixels, req, self.model.vae_scale_factor, vae_tile)
                sha, size = write_image(pixels, self.output.dir, req.path, self.output.format, self.output.quality,
                                        req.parameters_text(stages))
                seconds_write = time.perf_counter() - t0
                mtime = os.stat(os.path.join(self.output.dir, req.path)).st_mtime_ns
                scores = scores.result()
            return req.manifest_row(status="ok", error=None, sha256=sha, bytes=size, mtime_ns=mtime,
                                    started_at=started_at, stages=stages, finished_at=now(),
                                    seconds_denoise=seconds_denoise, seconds_decode=seconds_decode + seconds_write,
                                    worker=self.worker, warnings=_notes(notes), **scores)
        except Exception as e:  # noqa: BLE001
            return failed_row(req, started_at, e, self.worker, notes)


@torch.no_grad()
def auto_batch(model, tile: int, budget: float = 0.8, cap_px: int = 8 * 128 * 128) -> int:
    """Tiles per model call from the GPU's free memory: one call of 1 and of 2 tiles measure the fixed and
    the per-tile activation memory; at most `cap_px` latent pixels a call (8 SDXL tiles: past that a bigger
    call gains under 3%, measured by bench/unet_batches.py), 4 on a CPU."""
    if model.device.type != "cuda":
        return 4
    cond = model.encode("", "")
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.predict(torch.zeros(n, model.latent_channels, tile, tile), torch.tensor(999), cond, 2.0)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    per_tile = max(peaks[1] - peaks[0], 1)
    free = free_memory(model.device, 1.0)
    fits = int((budget * free - (peaks[0] - per_tile)) // per_tile)
    return max(1, min(fits, max(1, cap_px // (tile * tile))))
