"""GPU benchmark: Tessera against diffusers' MultiDiffusion panorama pipeline, side by side in one run.

Run on the device machine (random full-size weights; speed does not depend on their values):

    source .gpu/env.sh && python3 bench/gpu.py --preset full --out $OUT

Writes bench-<family>.json and .md under --out; `--only sd15|sdxl` runs one family (each fits one device call),
`--compile` adds the compiled denoiser. `--preset quick` runs a few steps of each, in under two minutes.
Per-step figures of the panorama pipeline at its defaults are timed over a few steps and multiplied out
to 30 (its steps all cost the same); every Tessera figure is a whole image, decode and PNG included.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cluster.renderer import Renderer  # noqa: E402
from jobs import plan  # noqa: E402
from jobs.spec import TesseraConfig  # noqa: E402
from tiling.render import groups_of, layouts_of  # noqa: E402

PEAK_BF16 = 790e12  # H100/H200 dense bf16 as measured by a large bf16 matmul on those GPUs; fp16 the same
W, H, STEPS, GUIDANCE = 3840, 2160, 30, 7.0
SMOKE = False
METHODS, LEAN = ("uniform", "gaussian", "shifted"), False  # --methods, --lean
DEEP_CACHE = ()  # --deep-cache: Tessera SD 1.5 rows with model.deep_cache=n
ROWS = None  # --out/rows-<family>.jsonl
DECODE_ONLY = False  # --decode-only
DECODES = [(64, 8, 3, "fp32"), (64, 8, 3, "bf16"), (64, 8, 2, "bf16"), (64, 8, 3, "bf16-cl"), (128, 8, 3, "bf16"),
           (128, 8, 2, "bf16"), (128, 0, 1, "bf16")]  # (vae_tile, vae_overlap, vae_passes, form)


class Stop(Exception):
    pass


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def psnr(a, b) -> float:
    """PSNR in dB of two 8-bit pictures (arrays of the same shape, any float or int dtype)."""
    import numpy as np

    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cfg_for(model: str, method: str, tile: int, overlap: int, batch: int, out: str, steps: int) -> TesseraConfig:
    cfg = TesseraConfig()
    cfg.model.name, cfg.model.dtype = model, "fp16" if model == "sd15" else "bf16"
    if model == "demo_random":  # --smoke on a CPU
        cfg.model.dtype = "fp32"
    else:
        cfg.model.weights = "random"
    cfg.job.width, cfg.job.height, cfg.job.steps, cfg.job.guidance = W, H, steps, GUIDANCE
    cfg.job.prompts, cfg.job.seeds = ["a vast mountain lake at dawn, wallpaper"], [1]
    cfg.job.strategy = "direct"  # the peers denoise the whole frame from noise; dit_gpu.py --strategies times both
    cfg.tiling.method, cfg.tiling.tile, cfg.tiling.overlap, cfg.tiling.batch = method, tile, overlap, batch
    cfg.output.dir = out
    return cfg


_FLOPS = {}


def tile_flops(renderer: Renderer, cfg: TesseraConfig) -> float:
    """FLOPs of one tile-step (both halves of guidance) at the tile shape of this config's first step, counted
    by torch on the eager model (once per shape)."""
    model = renderer.model
    tile = layouts_of(plan(cfg)[0], model.vae_scale_factor)[0][0]
    key = (id(model), tile.h, tile.w)
    if key not in _FLOPS:
        cond = model.encode("a", "b")
        with FlopCounterMode(display=False) as fc:
            model.predict(torch.randn(2, model.latent_channels, tile.h, tile.w), torch.tensor(500), cond, GUIDANCE)
        _FLOPS[key] = fc.get_total_flops() / 2
    return _FLOPS[key]


class _Ticks:
    """Stands in for the Ray progress counter a worker reports tile-steps to."""

    def __init__(self):
        self.n = 0
        self.add = self  # progress.add.remote(n)

    def remote(self, n: int) -> None:
        self.n += n


def tessera(renderer: Renderer, cfg: TesseraConfig, label: str) -> dict:
    """One whole image through the worker's own steps (denoise on the device, tiled VAE decode, PNG write),
    each timed and its peak memory taken."""
    req = plan(cfg)[0]
    batch = renderer.batch_size(req)
    ticks = _Ticks()
    reset_peak()
    sync()
    t0 = time.perf_counter()
    z = renderer._denoise([req], batch, lambda i, n: ticks.remote(n))[0]
    sync()
    t_denoise = time.perf_counter() - t0
    peak_denoise = peak_gib()
    reset_peak()
    decoded = renderer._decode(req, z)
    sync()
    peak_decode = peak_gib()
    t1 = time.perf_counter()
    row = renderer.write(req, decoded, None, t_denoise)
    t_write = time.perf_counter() - t1
    assert row["status"] == "ok", row["error"]
    keep = Path(cfg.output.dir) / f"reference-{time.monotonic_ns()}.png"  # later runs write the same image id
    shutil.copyfile(Path(cfg.output.dir) / row["path"], keep)
    total = t_denoise + decoded[1] + t_write
    tflops = tile_flops(renderer, cfg) * ticks.n / t_denoise if req.deep_cache <= 1 else float("nan")
    return {"contender": label, "seconds_per_image": total, "images_per_gpu_hour": 3600 / total,
            "seconds_denoise": t_denoise, "seconds_decode": decoded[1], "seconds_write": t_write,
            "seconds_decode_and_write": decoded[1] + t_write, "batch": batch,
            "tiles_per_image": ticks.n, "unet_tflops": tflops / 1e12, "fraction_of_peak": tflops / PEAK_BF16,
            "peak_gib_denoise": peak_denoise, "peak_gib_decode": peak_decode,
            "seam_score": row["seam_score"], "seam_score_vae": row["seam_score_vae"], "kept": str(keep)}


def bulk(renderer: Renderer, cfg: TesseraConfig, label: str, images: int, group: int, reference: dict = None) -> dict:
    """`images` seeds of one prompt as a bulk worker renders them: groups of `group` stepped together, two
    groups in flight (the Ray actor's two threads), so one group's PNGs are written while the next denoises.
    `reference`: a one-at-a-time row of seed 1 to compare pixels with (bf16 tolerance)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    cfg.job.seeds = list(range(1, images + 1))
    reqs = plan(cfg)
    ticks = _Ticks()
    reset_peak()
    sync()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        rows = [row for rows in pool.map(lambda g: renderer.render_group(g, ticks),
                                         groups_of(reqs, group)) for row in rows]
    sync()
    wall = time.perf_counter() - t0
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    out = {"contender": label, "seconds_per_image": wall / images, "images_per_gpu_hour": 3600 * images / wall,
           "images": images, "group": group, "tiles_per_image": ticks.n / images,
           "unet_tflops": tile_flops(renderer, cfg) * ticks.n / sum(r["seconds_denoise"] for r in rows) / 1e12,
           "peak_gib_denoise": peak_gib(), "note": f"{images} images, groups of {group}, 2 in flight"}
    out["fraction_of_peak"] = out["unet_tflops"] * 1e12 / PEAK_BF16
    if reference is not None:
        a, b = (np.asarray(Image.open(path)).astype(np.float64)
                for path in (reference["kept"], Path(cfg.output.dir) / rows[0]["path"]))
        out["psnr_vs_one_at_a_time_db"] = psnr(a, b)
        out["max_abs_diff_vs_one_at_a_time"] = float(np.abs(a - b).max())
    return out


def decode_variants(renderer: Renderer, cfg: TesseraConfig, variants) -> list:
    """The tiled VAE decode alone on one 3840x2160 latent: time, peak memory and PSNR against the whole-frame
    fp32 decode, per (vae_tile, overlap, passes, form); form is "fp32" (the VAE upcast, as before session 3),
    "bf16" (its own dtype) or "bf16-cl" (bf16, channels-last weights)."""
    vae = renderer.model.vae
    req = plan(cfg)[0]
    factor = renderer.model.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    z = torch.randn((1, renderer.model.latent_channels, H // factor, W // factor), generator=g)
    zu = renderer.model.unscale(z)
    out, ref = [], None
    dtypes = {"fp32": torch.float32, "bf16": renderer.model.dtype, "bf16-cl": renderer.model.dtype}
    for form in ("fp32", "bf16"):  # the whole frame, no tiling
        vae.to(dtypes[form])
        try:
            reset_peak()
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                img = vae.decode(zu.to(vae.dtype)).sample[0].float().clamp(-1, 1)
            sync()
            row = {"contender": f"VAE decode alone, whole frame in one piece, {form}",
                   "seconds_decode": time.perf_counter() - t0, "peak_gib_decode": peak_gib()}
            img = ((img + 1) * 127.5).round().cpu().numpy()
            if ref is not None:
                row["psnr_vs_whole_frame_fp32_db"] = psnr(img, ref)
            emit(out, row)
            ref = img if ref is None else ref
            del img
        except torch.OutOfMemoryError as e:
            emit(out, {"contender": f"VAE decode alone, whole frame, {form}", "note": f"out of memory: {e}"})
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for tile, overlap, passes, form in variants:
        vae.to(dtypes[form])
        if form.endswith("-cl"):
            vae.to(memory_format=torch.channels_last)
        req = dataclasses.replace(req, vae_tile=tile, vae_overlap=overlap, vae_passes=passes)
        renderer._decode(req, z[..., :64, :64])  # warm-up
        reset_peak()
        sync()
        t0 = time.perf_counter()
        decoded = renderer._decode(req, z)
        sync()
        row = {"contender": f"VAE decode alone, tile {tile} overlap {overlap}, {passes} sweeps, {form}",
               "seconds_decode": time.perf_counter() - t0, "peak_gib_decode": peak_gib()}
        if ref is not None:
            row["psnr_vs_whole_frame_fp32_db"] = psnr(decoded[0].transpose(2, 0, 1), ref)
        emit(out, row)
        vae.to(memory_format=torch.contiguous_format)
    vae.to(renderer.model.dtype)
    return out


def panorama(model, label: str, stride: int, view_batch: int, timed_steps: int, decode: bool = False) -> dict:
    """diffusers' StableDiffusionPanoramaPipeline on the same UNet: `timed_steps` steps, times 30 (`decode`: and
    its own decode of the whole frame and the PNG written, timed once)."""
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

    pipe = StableDiffusionPanoramaPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.get_views = functools.partial(StableDiffusionPanoramaPipeline.get_views, pipe, stride=stride)
    views = len(pipe.get_views(H, W))
    stamps = []

    def on_step(p, i, t, kw):
        sync()
        stamps.append(time.perf_counter())
        if len(stamps) > timed_steps:
            raise Stop
        return kw

    reset_peak()
    try:
        pipe("a vast mountain lake at dawn, wallpaper", height=H, width=W, num_inference_steps=STEPS,
             guidance_scale=GUIDANCE, view_batch_size=view_batch, output_type="latent", callback_on_step_end=on_step)
    except Stop:
        pass
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # the first step's warm-up left out
    row = {"contender": label, "views": views, "seconds_per_step": per_step, "seconds_denoise": per_step * STEPS,
           "seconds_per_image": per_step * STEPS, "images_per_gpu_hour": 3600 / (per_step * STEPS),
           "timed_steps": len(stamps) - 1, "peak_gib_denoise": peak_gib(),
           "note": f"{len(stamps) - 1} steps timed, x{STEPS}; decode not included"}
    if decode:  # what the pipeline does after its last step: its VAE on the whole frame, PIL, and a PNG written
        latents = torch.randn(1, 4, H // 8, W // 8, device=model.device, dtype=pipe.vae.dtype)  # fp32 if upcast
        with torch.no_grad():
            pipe.vae.decode(latents[..., :64, :64] / pipe.vae.config.scaling_factor)  # warm-up
            sync()
            t0 = time.perf_counter()
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            picture = pipe.image_processor.postprocess(image, output_type="pil")[0]
            sync()
            t1 = time.perf_counter()
        picture.save(Path(tempfile.mkdtemp()) / "panorama.png")
        t2 = time.perf_counter()
        row.update(seconds_decode=t1 - t0, seconds_write=t2 - t1, seconds_per_image=per_step * STEPS + t2 - t0,
                   images_per_gpu_hour=3600 / (per_step * STEPS + t2 - t0), peak_gib_decode=peak_gib(),
                   note=f"{len(stamps) - 1} steps timed, x{STEPS}; its whole-frame decode and PNG write included")
    return row


def plain_sdxl(model, label: str) -> dict:
    """The plain diffusers SDXL pipeline on the whole 3840x2160 frame in one piece, diffusers' VAE tiling."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
        scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    stamps = []

    def on_step(p, i, t, kw):
        sync()
        stamps.append(time.perf_counter())
        return kw

    reset_peak()
    sync()
    t0 = time.perf_counter()
    pipe("a vast mountain lake at dawn, wallpaper", height=H, width=W, num_inference_steps=STEPS,
         guidance_scale=GUIDANCE, output_type="np", callback_on_step_end=on_step)
    sync()
    total = time.perf_counter() - t0
    pipe.vae.disable_tiling()
    return {"contender": label, "seconds_per_image": total, "images_per_gpu_hour": 3600 / total,
            "seconds_denoise": stamps[-1] - t0, "seconds_decode_and_write": total - (stamps[-1] - t0),
            "peak_gib_denoise": peak_gib(), "note": "whole image; decode without PNG write"}


def emit(results: list, row: dict) -> dict:
    """Keep a result, print it, and append it to rows.jsonl under --out (kept if a later contender fails)."""
    results.append(row)
    print(json.dumps(row), flush=True)
    if ROWS is not None:
        with open(ROWS, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def run_sd15(steps: int, tmp: str, panoramas, env, compile_too: bool) -> list:
    """Tessera on SD 1.5 (64-latent tiles, 16 a call) against the panorama pipeline on the very same modules."""
    name = "demo_random" if SMOKE else "sd15"
    cfg = cfg_for(name, "gaussian", 64, 16, 16, tmp, steps)
    r = Renderer(cfg.model, cfg.output)
    results = []
    for method, ov in [(m, 0 if m == "shifted" else 16) for m in METHODS if m != "uniform"]:
        tessera(r, cfg_for(name, method, 64, ov, 16, tmp, 2), "warm-up")
        emit(results, tessera(r, cfg_for(name, method, 64, ov, 16, tmp, steps), f"Tessera {name} {method} 64/{ov}, "
                              "16 tiles/call"))
    for n in DEEP_CACHE:  # model.deep_cache: the whole UNet every n-th step
        emit(results, tessera(r, replace(cfg_for(name, "shifted", 64, 0, 16, tmp, steps), model=replace(
            cfg.model, deep_cache=n)), f"Tessera {name} shifted 64/0, 16 tiles/call, model.deep_cache={n}"))
    for k, (stride, vb, timed) in enumerate(panoramas):  # before compiling: the panorama pipeline shares this UNet
        emit(results, panorama(r.model, f"diffusers panorama {name} window 64 stride {stride}, view_batch_size {vb}"
                               + (", decode and PNG included" if k == 0 else ""), stride, vb, timed, decode=k == 0))
    if compile_too:
        compiled(r, results, env, name, [("shifted", 0, 16)], tmp, steps, 64)
        for stride, vb, k in panoramas[:1]:  # and its best tuning on the same compiled UNet
            emit(results, panorama(r.model, f"diffusers panorama {name} window 64 stride {stride}, view_batch_size "
                                   f"{vb}, compiled UNet", stride, vb, k))
    return results


def compiled(r: Renderer, results: list, env: dict, name: str, runs, tmp: str, steps: int,
             tile: int, bulk_images: int = 0, reference: dict = None) -> None:
    """The same renderer with model.compile: the compile time (first call of the fixed batch shape) apart,
    then whole images."""
    from models.loading import compile_denoiser

    compile_denoiser(r.model)
    r.compiled = True
    for method, ov, batch in runs:
        sync()
        t0 = time.perf_counter()
        tessera(r, cfg_for(name, method, tile, ov, batch, tmp, 1), "compile")
        env[f"{name}_compile_seconds_batch{batch}"] = time.perf_counter() - t0
        print(f"compile {name} batch {batch}: {env[f'{name}_compile_seconds_batch{batch}']:.1f} s", flush=True)
        row = emit(results, tessera(r, cfg_for(name, method, tile, ov, batch, tmp, steps),
                                    f"Tessera {name} {method} {tile}/{ov}, {batch} tiles/call, compiled"))
        if bulk_images:  # a group's batches have their own shape: compiled once before the timed run
            bulk(r, cfg_for(name, method, tile, ov, batch, tmp, 1), "compile", 2, 2)
            emit(results, bulk(r, cfg_for(name, method, tile, ov, batch, tmp, steps),
                               f"Tessera {name} {method} {tile}/{ov}, compiled, bulk", bulk_images, 2,
                               reference or row))


def run_sdxl(steps: int, tmp: str, env, compile_too: bool, quick: bool) -> list:
    """Tessera on SDXL (128-latent tiles): each method one image at a time, bulk, compiled, 8K memory, the VAE
    decode alone, and the plain diffusers pipeline on the whole frame."""
    name, T, O = ("demo_random", 32, 8) if SMOKE else ("sdxl", 128, 32)  # --smoke: the random demo, several tiles
    cfg = cfg_for(name, "gaussian", T, O, 8, tmp, steps)
    r = Renderer(cfg.model, cfg.output)
    if DECODE_ONLY:
        return decode_variants(r, cfg_for(name, "shifted", T, 0, 8, tmp, steps), DECODES)
    results = []
    one = {}
    for method, ov in [(m, 0 if m == "shifted" else O) for m in METHODS]:
        tessera(r, cfg_for(name, method, T, ov, 8, tmp, 2), "warm-up")
        one[method] = emit(results, tessera(r, cfg_for(name, method, T, ov, 8, tmp, steps),
                                            f"Tessera {name} {method} {T}/{ov}, 8 tiles/call"))
    emit(results, bulk(r, cfg_for(name, "shifted", T, 0, 8, tmp, steps), f"Tessera {name} shifted {T}, bulk",
                       2 if quick else 4, 2, one["shifted"]))
    auto = cfg_for(name, "shifted", T, 0, 0, tmp, steps)
    env[f"{name}_auto_batch"] = r.batch_size(plan(auto)[0])
    if LEAN:
        if compile_too:
            compiled(r, results, env, name, [("shifted", 0, 8)], tmp, steps, T, 2 if quick else 4,
                     one["shifted"])
        return results
    global W, H
    w, h = W, H
    W, H = 2 * w, 2 * h
    row = tessera(r, cfg_for(name, "shifted", T, 0, 8, tmp, 2), f"Tessera {name} shifted {T} at {W}x{H} (2 steps: memory)")
    W, H = w, h
    emit(results, dict(row, seconds_per_image=float("nan"), images_per_gpu_hour=float("nan")))
    results += decode_variants(r, cfg_for(name, "shifted", T, 0, 8, tmp, steps), DECODES)
    if not quick and not SMOKE:
        emit(results, plain_sdxl(r.model, "diffusers SDXL pipeline, whole frame, VAE tiling"))
    if compile_too:
        compiled(r, results, env, name, [("shifted", 0, 8)], tmp, steps, T, 2 if quick else 4,
                 one["shifted"])
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["quick", "full"], default="quick")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--smoke", action="store_true", help="the random demo model at 512x256 on any device: checks the script")
    ap.add_argument("--only", choices=["sd15", "sdxl"], help="one family (each fits in one device call)")
    ap.add_argument("--compile", action="store_true", help="also the compiled denoiser (adds its compile time)")
    ap.add_argument("--skip-panorama-defaults", action="store_true")
    ap.add_argument("--methods", nargs="*", default=["uniform", "gaussian", "shifted"], help="Tessera's methods")
    ap.add_argument("--lean", action="store_true", help="skip the 8K memory row, the decode variants, the plain "
                    "SDXL pipeline and the panorama stride-48 view_batch_size 1 row")
    ap.add_argument("--decode-only", action="store_true", help="SDXL's VAE decode variants alone")
    ap.add_argument("--deep-cache", nargs="*", type=int, default=[], help="SD 1.5: Tessera shifted rows with "
                    "model.deep_cache=n (the panorama pipeline's first row then counts its decode and PNG too)")
    args = ap.parse_args()
    global METHODS, LEAN, DECODE_ONLY, DEEP_CACHE
    METHODS, LEAN, DECODE_ONLY, DEEP_CACHE = args.methods, args.lean, args.decode_only, tuple(args.deep_cache)
    global W, H, SMOKE, ROWS
    SMOKE = args.smoke
    if args.smoke:
        W, H = 512, 256
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.preset == "quick"
    steps = 4 if quick else STEPS
    results, env = [], {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
        "driver": subprocess.run("nvidia-smi --query-gpu=driver_version --format=csv,noheader || true", shell=True,
                                 capture_output=True, text=True).stdout.strip(),
        "command": " ".join(sys.argv), "preset": args.preset, "steps": steps}
    tmp = tempfile.mkdtemp()
    torch.backends.cuda.matmul.allow_tf32 = True
    tag = args.only or "all"
    ROWS = out / f"rows-{tag}.jsonl"
    if args.only != "sdxl":
        pans = [(48, 16, 3), (48, 1, 2)] if quick else [(48, 16, 5), (48, 1, 3)] + (
            [] if args.skip_panorama_defaults else [(8, 16, 2), (8, 1, 1)])
        if args.lean:
            pans = [p for p in pans if p[:2] not in ((48, 1), (8, 16))]
        results += run_sd15(steps, tmp, pans, env, args.compile)
    if args.only != "sd15":
        results += run_sdxl(steps, tmp, env, args.compile, quick)
    (out / f"bench-{tag}.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    lines = [f"Device: {env['device']}, driver {env['driver']}, torch {env['torch']}, diffusers {env['diffusers']}; "
             f"`{env['command']}`", "",
             "| contender | s / image | images / GPU-hour | UNet TFLOP/s (of 790) | peak GiB denoise / decode | "
             "s decode / write | notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    nan = float("nan")
    for r in results:
        lines.append(f"| {r['contender']} | {r.get('seconds_per_image', nan):.2f} | "
                     f"{r.get('images_per_gpu_hour', nan):.0f} | "
                     f"{r.get('unet_tflops', nan):.0f} ({r.get('fraction_of_peak', nan):.0%}) | "
                     f"{r.get('peak_gib_denoise', nan):.1f} / {r.get('peak_gib_decode', nan):.1f} | "
                     f"{r.get('seconds_decode', nan):.2f} / {r.get('seconds_write', nan):.2f} | {r.get('note', '')} "
                     f"{('%d tile-steps' % r['tiles_per_image']) if 'tiles_per_image' in r else ''} "
                     f"{('PSNR %.1f dB vs one at a time' % r['psnr_vs_one_at_a_time_db']) if 'psnr_vs_one_at_a_time_db' in r else ''}"
                     f"{('PSNR %.1f dB vs whole frame fp32' % r['psnr_vs_whole_frame_fp32_db']) if 'psnr_vs_whole_frame_fp32_db' in r else ''} |")
    (out / f"bench-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(env))


if __name__ == "__main__":
    main()
