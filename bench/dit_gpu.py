"""The flow-matching DiTs at full size on the GPU: one 3840x2160 image each through the worker's own path.

    source .gpu/env.sh && python3 bench/dit_gpu.py --out $OUT          # device tool, nvidia-h100-x1

Random full-size weights (Z-Image-Turbo: 6.2 B transformer + Qwen3-4B; Lumina-Image-2.0: 2.6 B + Gemma2-2B;
NewBie-image Exp0.1: 3.5 B + Gemma3-4B + a stand-in of Jina CLIP v2's size), bf16, gaussian 128/32 tiles, 4 a
call; Z-Image at guidance 0 and 9 steps (as Turbo runs), Lumina2 at guidance 4 and NewBie at guidance 5, 8 steps
each (a timing sample). NewBie guides only while the normalised time is below 0.25 (6 of these 8 steps), so its
TFLOP/s (counted on a guided call) is left out. A check that the adapters run on a GPU at full size, and what a
tile-step costs; writes dit.json. `--strategies direct progressive` times both strategies on the same image
(seconds per whole image, decode and write included, and the tile-steps each took). `--peer hires` (SDXL) adds
what a user would script with diffusers alone for a coherent 4K picture, on the very same modules:
`StableDiffusionXLPipeline` at 1344x768, a Lanczos upscale, `StableDiffusionXLImg2ImgPipeline` on the whole frame at
the job's strength, VAE tiling on, the PNG written (after a warm-up of the same shapes). `--bulk N` also renders N
images of each strategy as a bulk worker does (two calls at once, as the Ray actor runs them: one image's PNG
written, and where memory allows its decode run, while the next denoises): seconds per image in steady bulk;
`--bulk-serial` again with `Renderer.overlap` off (each decode under the device lock), `--bulk-trips-alone` with
only the final decode beside (each round trip between stages under the device lock, as before session 13).
`--overlap-probe` times one denoise and one decode apart and then at once (the decode on a second CUDA stream), for
what overlapping them would save.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.gpu import sync  # noqa: E402
from cluster.renderer import Renderer  # noqa: E402
from jobs import plan  # noqa: E402
from jobs.spec import TesseraConfig  # noqa: E402
from tiling.render import tile_steps  # noqa: E402

RUNS = {"z_image": (9, 0.0), "lumina2": (8, 4.0), "newbie": (8, 5.0),
        "sdxl": (8, 7.0), "sd15": (30, 7.0)}  # the UNets: not DiTs; sdxl here for its memory under --offload model


def time_round_trips(r: Renderer) -> list:
    """Wraps the renderer's stage references (decode, resize, encode between stages) with a timer: their
    seconds accumulate in the returned one-element list (inside `seconds_denoise`)."""
    inner, total = r._reference, [0.0]

    def timed(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        total[0] += time.perf_counter() - t0
        return out

    r._reference = timed
    return total


def bulk(r: Renderer, reqs) -> dict:
    """`reqs` rendered as a bulk worker renders them: two `render_group` calls at once (the Ray actor's
    max_concurrency=2; the device lock serialises denoise and decode, the PNG is written outside it). Seconds
    per image over the whole run, and in steady state (between the first and the last image finished)."""
    done = []

    def one(req):
        row = r.render_group([req])[0]
        done.append(time.perf_counter())
        return row

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(one, reqs))
    wall = time.perf_counter() - t0
    bad = [row["error"] for row in rows if row["status"] != "ok"]
    assert not bad, bad
    done.sort()
    return {"bulk_images": len(reqs), "seconds_per_image_bulk": wall / len(reqs),
            "seconds_per_image_steady": (done[-1] - done[0]) / (len(reqs) - 1) if len(reqs) > 1 else None,
            "seconds_denoise_bulk": sum(row["seconds_denoise"] for row in rows) / len(rows),
            "seconds_decode_and_write_bulk": sum(row["seconds_decode"] for row in rows) / len(rows)}


def overlap_probe(r: Renderer, req) -> dict:
    """One image's denoise, and the decode of a finished canvas, timed apart and then at once (the decode in a
    second thread on its own CUDA stream, the VAE tile fixed to the one chosen alone): what a decode overlapped
    with the next image's denoise would save on this GPU."""
    batch = r.batch_size(req)
    z = r._denoise([req], batch, None)[0]
    sync()
    _, _, tile = r._decode(req, z)
    side = torch.cuda.Stream()

    def denoise():
        t0 = time.perf_counter()
        r._denoise([req], batch, None)
        sync()
        return time.perf_counter() - t0

    def decode():
        t0 = time.perf_counter()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            r._decode(req, z, tile)
        side.synchronize()
        return time.perf_counter() - t0

    alone = (denoise(), decode())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        late = pool.submit(decode)
        first = denoise()
        second = late.result()
    both = time.perf_counter() - t0
    return {"probe": "overlap", "vae_tile": tile, "seconds_denoise_alone": alone[0], "seconds_decode_alone": alone[1],
            "seconds_both_at_once": both, "seconds_denoise_beside": first, "seconds_decode_beside": second,
            "seconds_saved": sum(alone) - both}


def hires_peer(m, size, steps: int, guidance: float, strength: float, out: Path, base_size=(1344, 768)) -> dict:
    """diffusers' hires fix on the same modules: a 1344x768 base, Lanczos to `size`, img2img of the whole frame at
    `strength` (VAE tiling on), the PNG written; whole picture timed, the base's share apart. Eager, as a user
    scripts it: a UNet that `model.compile` wrapped is unwrapped for it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from PIL import Image

    parts = dict(vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoder_2,
                 tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizer_2, unet=getattr(m.unet, "_orig_mod", m.unet))
    base = StableDiffusionXLPipeline(**parts, scheduler=EulerDiscreteScheduler.from_config(m.scheduler_config))
    refine = StableDiffusionXLImg2ImgPipeline(**parts, scheduler=EulerDiscreteScheduler.from_config(m.scheduler_config))
    for p in (base, refine):
        p.set_progress_bar_config(disable=True)
    m.vae.enable_tiling()
    prompt = "a vast mountain lake at dawn, wallpaper"

    def once(n: int) -> dict:
        sync()
        t0 = time.perf_counter()
        small = base(prompt, height=base_size[1], width=base_size[0], num_inference_steps=n, guidance_scale=guidance,
                     generator=torch.Generator(m.device).manual_seed(1)).images[0]
        sync()
        t_base = time.perf_counter() - t0
        big = refine(prompt, image=small.resize(tuple(size), Image.LANCZOS), strength=strength,
                     num_inference_steps=n, guidance_scale=guidance,
                     generator=torch.Generator(m.device).manual_seed(1)).images[0]
        big.save(out / "peer-hires.png")
        sync()
        return {"seconds_image": time.perf_counter() - t0, "seconds_base": t_base}

    once(max(2, round(2 / strength)))  # a warm-up of the same shapes: kernels chosen, allocator grown
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    row = once(steps)
    m.vae.disable_tiling()
    return dict(row, model="sdxl", strategy=f"peer: diffusers SDXL {base_size[0]}x{base_size[1]} + Lanczos + img2img whole frame, VAE tiling",
                stages=f"{base_size[0]}x{base_size[1]}>{size[0]}x{size[1]}", steps=steps, guidance=guidance,
                strength=strength, refine_steps=int(steps * strength),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="dit-out")
    ap.add_argument("--size", type=int, nargs=2, default=[3840, 2160])
    ap.add_argument("--models", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--steps", type=int, help="instead of each model's own")
    ap.add_argument("--offload", default="none", choices=["none", "model", "sequential"], help="model.offload")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"], help="model.attention")
    ap.add_argument("--compile", action="store_true", help="model.compile (compile time counted in the denoise)")
    ap.add_argument("--strategies", nargs="+", default=["direct"],
                    help="job.strategy, each optionally with job fields (and model.deep_cache): direct, progressive, "
                         "progressive:anchor=1,dilation=0, progressive:upscale=latent; each renders the same image, after a warm-up of the first")
    ap.add_argument("--peer", choices=["hires"], help="sdxl: diffusers' hires fix on the same modules, after the strategies")
    ap.add_argument("--peer-first", action="store_true", help="the peer before the strategies (a compile cannot starve it)")
    ap.add_argument("--method", default="gaussian", choices=["uniform", "gaussian", "shifted"])
    ap.add_argument("--tile", type=int, nargs=3, default=[128, 32, 4], metavar=("TILE", "OVERLAP", "BATCH"),
                    help="tiling.tile, tiling.overlap, tiling.batch (SD 1.5 as bench/gpu.py runs it: 64 0 16)")
    ap.add_argument("--dtype", default="bf16", help="model.dtype (bench/gpu.py runs SD 1.5 in fp16)")
    ap.add_argument("--bulk", type=int, default=0, help="also N images of each strategy as a bulk worker renders them")
    ap.add_argument("--bulk-serial", action="store_true",
                    help="with --bulk, also each strategy's bulk with Renderer.overlap off (every decode under the device lock)")
    ap.add_argument("--bulk-trips-alone", action="store_true",
                    help="with --bulk, also each strategy's bulk with the stages' round trips under the device lock")
    ap.add_argument("--overlap-probe", action="store_true", help="time a denoise and a decode apart and at once")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        steps, guidance = RUNS[name]
        steps = args.steps or steps
        cfg = TesseraConfig()
        cfg.model.name, cfg.model.weights, cfg.model.dtype = name, "random", args.dtype
        cfg.model.offload, cfg.model.attention, cfg.model.compile = args.offload, args.attention, args.compile
        cfg.job.width, cfg.job.height = args.size
        cfg.job.steps, cfg.job.guidance = steps, guidance
        cfg.tiling.tile, cfg.tiling.overlap, cfg.tiling.batch = args.tile
        cfg.tiling.method = args.method
        cfg.output.dir = tempfile.mkdtemp()
        t0 = time.perf_counter()
        r = Renderer(cfg.model, cfg.output)
        load = time.perf_counter() - t0
        m = r.model
        round_trips = time_round_trips(r)
        cond = m.encode("a vast mountain lake at dawn, wallpaper", "")
        flops = float("nan")
        if not args.compile:  # counted on the eager model (a compiled one would compile in here)
            with FlopCounterMode(display=False) as fc:
                m.predict(torch.zeros(4, m.latent_channels, args.tile[0], args.tile[0]), torch.tensor(999.0), cond,
                          guidance)
            flops = fc.get_total_flops() / 4
        def peer(model):
            if args.peer == "hires" and name == "sdxl":
                results.append(hires_peer(model, args.size, steps, guidance, cfg.job.strength, out))
                print(json.dumps(results[-1]), flush=True)

        if args.peer_first:
            peer(m)
        for k, strategy in enumerate(args.strategies):
            fields = dict(kv.partition("=")[::2] for kv in strategy.partition(":")[2].split(",") if kv)
            model = dataclasses.replace(cfg.model, deep_cache=int(fields.pop("deep_cache", 0)))
            job = dataclasses.replace(cfg.job, strategy=strategy.partition(":")[0],
                                      **{k: v if k == "upscale" else float(v) for k, v in fields.items()})
            req = plan(dataclasses.replace(cfg, model=model, job=job))[0]
            # warm-up: kernels chosen, allocator grown; compiled, each variant's own shapes and calls compiled
            if len(args.strategies) > 1 and (k == 0 or args.compile and strategy not in args.strategies[:k]):
                r.render(req)
            torch.cuda.reset_peak_memory_stats()
            round_trips[0] = 0.0
            t0 = time.perf_counter()
            row = r.render(req)
            wall = time.perf_counter() - t0
            assert row["status"] == "ok", row["error"]
            n = tile_steps(req, r.info())
            results.append({"model": name, "strategy": strategy, "stages": row["stages"], "method": args.method,
                            "offload": args.offload, "attention": args.attention,
                            "compile": args.compile, "steps": steps, "guidance": guidance, "seconds_load": load,
                            "seconds_image": wall, "seconds_denoise": row["seconds_denoise"],
                            "seconds_decode_and_write": row["seconds_decode"],
                            "seconds_round_trips": round_trips[0],
                            "tile_steps": n, "ms_per_tile_step": 1e3 * row["seconds_denoise"] / n,
                            "tflops": flops * n / row["seconds_denoise"] / 1e12
                            if getattr(m, "cfg_trunc", 1.0) >= 1 and strategy == "direct" else None,
                            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                            "seam_score": row["seam_score"], "seam_score_vae": row["seam_score_vae"]})
            print(json.dumps(results[-1]), flush=True)
            if args.bulk:
                job = dataclasses.replace(job, seeds=list(range(1, args.bulk + 1)))
                reqs = plan(dataclasses.replace(cfg, model=model, job=job))
                results[-1].update(bulk(r, reqs), overlap=r.overlap)
                print(json.dumps(results[-1]), flush=True)
                if args.bulk_serial:
                    r.overlap = False
                    results.append(dict(results[-1], **bulk(r, reqs), overlap=False))
                    r.overlap = True
                    print(json.dumps(results[-1]), flush=True)
                if args.bulk_trips_alone:  # `Renderer._reference` without the group's peak: never beside
                    reference = r._reference
                    r._reference = lambda reqs, number, zs, stage, peak=None: reference(reqs, number, zs, stage)
                    results.append(dict(results[-1], **bulk(r, reqs), overlap="final decode only"))
                    del r._reference
                    print(json.dumps(results[-1]), flush=True)
            if args.overlap_probe and k == 0:
                results.append(dict(overlap_probe(r, req), model=name, strategy=strategy))
                print(json.dumps(results[-1]), flush=True)
        if not args.peer_first:
            peer(m)
        del r, m, cond
        torch.cuda.empty_cache()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    (out / "dit.json").write_text(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
