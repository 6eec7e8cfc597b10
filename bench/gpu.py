"""GPU benchmark: Tessera against diffusers' MultiDiffusion panorama pipeline, side by side in one run.

Run on the device machine (random full-size weights; speed does not depend on their values):

    source .gpu/env.sh && python3 bench/gpu.py --preset full --out $OUT

Writes bench.json and bench.md under --out. `--preset quick` runs a few steps of each, in under two minutes.
Per-step figures of the panorama pipeline at its defaults are timed over a few steps and multiplied out
to 30 (its steps all cost the same); every Tessera figure is a whole image, decode and PNG included.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cluster.renderer import Renderer, denoise_request  # noqa: E402
from jobs import plan  # noqa: E402
from jobs.spec import TesseraConfig  # noqa: E402

PEAK_BF16 = 790e12  # H100/H200 dense bf16 as measured by a large matmul here (DESIGN.md); fp16 the same
W, H, STEPS, GUIDANCE = 3840, 2160, 30, 7.0


class Stop(Exception):
    pass


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cfg_for(model: str, method: str, tile: int, overlap: int, batch: int, out: str, steps: int) -> TesseraConfig:
    cfg = TesseraConfig()
    cfg.model.name, cfg.model.dtype = model, "fp16" if model == "sd15" else "bf16"
    if model == "demo":  # --smoke on a CPU
        cfg.model.dtype = "fp32"
    else:
        cfg.model.weights = "random"
    cfg.job.width, cfg.job.height, cfg.job.steps, cfg.job.guidance = W, H, steps, GUIDANCE
    cfg.job.prompts = ["a vast mountain lake at dawn, wallpaper"]
    cfg.tiling.method, cfg.tiling.tile, cfg.tiling.overlap, cfg.tiling.batch = method, tile, overlap, batch
    cfg.output.dir = out
    return cfg


def unet_flops(model, batch: int, tile: int) -> float:
    """FLOPs of one UNet call on `batch` tiles (both halves of guidance), counted by torch."""
    req_x = torch.randn(batch, model.latent_channels, tile, tile)
    cond = model.encode("a", "b")
    with FlopCounterMode(display=False) as fc:
        model.predict(req_x, torch.tensor(500), cond, GUIDANCE)
    return float(fc.get_total_flops())


def tessera(renderer: Renderer, cfg: TesseraConfig, label: str, flops_per_tile: float) -> dict:
    """One whole image through the worker's own path: denoise, tiled decode, PNG write."""
    req = plan(cfg)[0]
    reset_peak()
    calls = {"tiles": 0}

    def predict(batches, t):
        calls["tiles"] += sum(len(b.tiles) for b in batches)
        return [renderer.predict(b, t, req.prompt, req.negative_prompt, req.guidance) for b in batches]

    sync()
    t0 = time.perf_counter()
    z = denoise_request(predict, renderer.info(), req, cfg.tiling)
    sync()
    t_denoise = time.perf_counter() - t0
    peak_denoise = peak_gib()
    reset_peak()
    t1 = time.perf_counter()
    row = renderer.finish(req, cfg.tiling, z, None, t_denoise)
    sync()
    t_finish = time.perf_counter() - t1
    assert row["status"] == "ok", row["error"]
    total = t_denoise + t_finish
    tflops = flops_per_tile * calls["tiles"] / t_denoise
    return {"contender": label, "seconds_per_image": total, "images_per_gpu_hour": 3600 / total,
            "seconds_denoise": t_denoise, "seconds_decode_and_write": t_finish,
            "tiles_per_image": calls["tiles"], "unet_tflops": tflops / 1e12, "fraction_of_peak": tflops / PEAK_BF16,
            "peak_gib_denoise": peak_denoise, "peak_gib_decode": peak_gib()}


def panorama(model, label: str, stride: int, view_batch: int, timed_steps: int) -> dict:
    """diffusers' StableDiffusionPanoramaPipeline on the same UNet: `timed_steps` steps, times 30."""
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
    return {"contender": label, "views": views, "seconds_per_step": per_step,
            "seconds_per_image": per_step * STEPS, "images_per_gpu_hour": 3600 / (per_step * STEPS),
            "timed_steps": len(stamps) - 1, "peak_gib_denoise": peak_gib(),
            "note": f"{len(stamps) - 1} steps timed, x{STEPS}; decode not included"}


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


def run_family(name: str, tile: int, overlap: int, batch: int, steps: int, tmp: str, panoramas, env) -> list:
    """Tessera in each method on one model, then the diffusers contenders on the very same modules."""
    cfg = cfg_for(name, "gaussian", tile, overlap, batch, tmp, steps)
    r = Renderer(cfg.model, cfg.output)
    flops = unet_flops(r.model, batch, tile) / batch
    env[f"{name}_flops_per_tile_step"] = flops
    results = []
    for method, ov in [("uniform", overlap), ("gaussian", overlap), ("shifted", 0)]:
        tessera(r, cfg_for(name, method, tile, ov, batch, tmp, 2), "warm-up", flops)
        results.append(tessera(r, cfg_for(name, method, tile, ov, batch, tmp, steps),
                               f"Tessera {name} {method} {tile}/{ov}, {batch} tiles/call", flops))
        print(json.dumps(results[-1]), flush=True)
    for stride, vb, k in panoramas:
        results.append(panorama(r.model, f"diffusers panorama {name} window 64 stride {stride}, view_batch_size {vb}",
                                stride, vb, k))
        print(json.dumps(results[-1]), flush=True)
    if name == "sdxl":
        results.append(plain_sdxl(r.model, "diffusers SDXL pipeline, whole frame, VAE tiling"))
        print(json.dumps(results[-1]), flush=True)
    del r
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["quick", "full"], default="quick")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--smoke", action="store_true", help="the demo model at 512x256 on any device: checks the script")
    ap.add_argument("--skip-panorama-defaults", action="store_true")
    args = ap.parse_args()
    global W, H
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

    sd_name = "demo" if args.smoke else "sd15"
    results += run_family(sd_name, 64, 16, 16, steps, tmp, [(48, 16, 3), (48, 1, 2)] if quick else
                          [(48, 16, 5), (48, 1, 3)] + ([] if args.skip_panorama_defaults else [(8, 16, 2), (8, 1, 1)]),
                          env)
    if not args.smoke:
        results += run_family("sdxl", 128, 32, 8, steps, tmp, [], env)
    (out / "bench.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    lines = [f"Device: {env['device']}, driver {env['driver']}, torch {env['torch']}, diffusers {env['diffusers']}; "
             f"`{env['command']}`", "",
             "| contender | s / image | images / GPU-hour | UNet TFLOP/s (of 790) | peak GiB denoise / decode | "
             "s decode+write | notes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['contender']} | {r['seconds_per_image']:.2f} | {r['images_per_gpu_hour']:.0f} | "
                     f"{r.get('unet_tflops', float('nan')):.0f} ({r.get('fraction_of_peak', float('nan')):.0%}) | "
                     f"{r['peak_gib_denoise']:.1f} / {r.get('peak_gib_decode', float('nan')):.1f} | "
                     f"{r.get('seconds_decode_and_write', float('nan')):.2f} | {r.get('note', '')} "
                     f"{('%d tile-steps' % r['tiles_per_image']) if 'tiles_per_image' in r else ''} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
