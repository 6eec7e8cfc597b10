"""GPU scaling through the real Ray path: bulk throughput on N workers, one image's latency tile-parallel on N.

Run on a machine of several GPUs (device tool, e.g. nvidia-h200-x4):

    source .gpu/env.sh && python3 bench/scaling.py --out $OUT

SDXL architecture with random weights, 3840x2160, 30 steps, guidance 7, `shifted` 128-latent tiles. One
worker per GPU is started once (model load timed apart) and warmed up; then for each N: `run_bulk` over the
first N workers (`--images-per-gpu` images each, wall clock from the first submit to the last row) and
`run_tile_parallel` of one image over N workers (tiles per call: ceil(tiles per step / N), at most 8, so
that every worker gets a call each step). Writes scaling.json and scaling.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from cluster.progress import Progress  # noqa: E402
from cluster.scheduler import connect, run_bulk, run_tile_parallel, start_workers  # noqa: E402
from jobs import plan  # noqa: E402
from jobs.spec import TesseraConfig  # noqa: E402
from tiling.render import layouts_of  # noqa: E402


SMOKE = False  # --smoke: the random-weight demo model at 512x256 on CPU workers, to check the script


def config(out: str, steps: int, seeds, batch: int = 8) -> TesseraConfig:
    cfg = TesseraConfig()
    cfg.job.strategy = "direct"  # one loop a step over the full canvas: what the workers share
    if SMOKE:
        cfg.model.name = "demo_random"
        cfg.job.width, cfg.job.height, cfg.tiling.tile, cfg.cluster.cpus_per_worker = 512, 256, 32, 1
    else:
        cfg.model.name, cfg.model.weights, cfg.model.dtype = "sdxl", "random", "bf16"
        cfg.job.width, cfg.job.height, cfg.tiling.tile = 3840, 2160, 128
    cfg.job.steps, cfg.job.guidance, cfg.job.seeds = steps, 7.0, list(seeds)
    cfg.tiling.method, cfg.tiling.overlap, cfg.tiling.batch = "shifted", 0, batch
    cfg.output.dir = out
    return cfg


def timed(run, workers, reqs, cfg) -> tuple:
    rows = []
    t0 = time.perf_counter()
    with Progress(len(reqs), 1, enabled=False) as progress:
        run(workers, reqs, cfg, rows.append, progress)
    wall = time.perf_counter() - t0
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    return wall, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="scaling-out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--images-per-gpu", type=int, default=2)
    ap.add_argument("--gpus", type=int, nargs="*", help="worker counts to measure (default 1, 2, 4, ... up to all)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    global SMOKE
    SMOKE = args.smoke
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp()
    gpus = torch.cuda.device_count()
    ns = args.gpus or [n for n in (1, 2, 4, 8) if n <= max(gpus, 2 if SMOKE else 1)]
    env = {"device": torch.cuda.get_device_name() if gpus else "cpu", "gpus": gpus, "torch": torch.__version__,
           "ray": ray.__version__, "command": " ".join(sys.argv), "steps": args.steps}
    connect(None)
    cfg = config(tmp, args.steps, [0])
    cfg.cluster.workers = max(ns)
    t0 = time.perf_counter()
    workers = start_workers(cfg)
    env["seconds_start_workers"] = time.perf_counter() - t0
    timed(run_bulk, workers, plan(config(tmp, 2, range(100, 100 + len(workers))))[:len(workers)], cfg)  # warm-up
    per_step = len(layouts_of(plan(cfg)[0], 8)[0])
    results = []
    for n in ns:
        k = args.images_per_gpu * n
        bulk_cfg = config(tmp, args.steps, range(1, k + 1))
        wall, rows = timed(run_bulk, workers[:n], plan(bulk_cfg), bulk_cfg)
        results.append({"mode": "bulk", "gpus": n, "images": k, "seconds": wall,
                        "images_per_hour": 3600 * k / wall})
        print(json.dumps(results[-1]), flush=True)
        batch = min(8, math.ceil(per_step / n))
        tp_cfg = config(tmp, args.steps, [1], batch)
        wall, rows = timed(run_tile_parallel, workers[:n], plan(tp_cfg), tp_cfg)
        results.append({"mode": "tile_parallel", "gpus": n, "batch": batch, "seconds": wall,
                        "seconds_denoise": rows[0]["seconds_denoise"], "seconds_decode": rows[0]["seconds_decode"]})
        print(json.dumps(results[-1]), flush=True)
    base = {m: next(r for r in results if r["mode"] == m and r["gpus"] == ns[0]) for m in ("bulk", "tile_parallel")}
    lines = [f"{env['device']} x{gpus}, torch {env['torch']}, ray {env['ray']}; `{env['command']}`", "",
             "| mode | GPUs | s | images / hour | speed-up | denoise s (speed-up) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        b = base[r["mode"]]
        if r["mode"] == "bulk":
            lines.append(f"| bulk, {r['images']} images | {r['gpus']} | {r['seconds']:.1f} | {r['images_per_hour']:.0f} | "
                         f"{r['images_per_hour'] / b['images_per_hour']:.2f}x | |")
        else:
            lines.append(f"| tile_parallel, 1 image, {r['batch']} tiles/call | {r['gpus']} | {r['seconds']:.1f} | | "
                         f"{b['seconds'] / r['seconds']:.2f}x | {r['seconds_denoise']:.1f} "
                         f"({b['seconds_denoise'] / r['seconds_denoise']:.2f}x) |")
    (out / "scaling.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(env))


if __name__ == "__main__":
    main()
