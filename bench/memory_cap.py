"""Peak GPU memory of SDXL renders on a small card, stood in for by `torch.cuda.set_per_process_memory_fraction`:
the job's defaults as `python3 run.py model=sdxl` resolves them (the memory-aware ones: `tiling.vae_tile=0`, and
`tiling.batch=0` where asked), random full-size weights, each size one image alone and then two through two calls
at once as a bulk worker runs them (the stages' round trips and the decode beside the other call's denoise); with
`--unparked`, sizes again with the denoisers never sent to the CPU for a VAE pass (`Renderer.parks` off).

    python3 bench/memory_cap.py --cap-gb 12 --sizes 7680x4320 3840x2160 --unparked 3840x2160 --steps 10 \
        --out $OUT/mem.json
"""
import argparse
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import run  # noqa: E402,F401  registers the schema
from cluster.renderer import Renderer  # noqa: E402
from jobs import plan  # noqa: E402
from tiling import free_memory  # noqa: E402


def config(*overrides):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def counted(parked, seconds: list):
    """`Adapter.parked` that adds to `seconds` what sending the modules to the CPU and back took."""
    @contextmanager
    def timed():
        t0 = time.perf_counter()
        with parked():
            seconds.append(time.perf_counter() - t0)
            yield
            t0 = time.perf_counter()
        seconds[-1] += time.perf_counter() - t0
    return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap-gb", type=float, default=12.0, help="the card's memory, in 1e9 bytes")
    ap.add_argument("--sizes", nargs="+", default=["3840x2160", "7680x4320"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--set", nargs="*", default=[], help="more overrides, e.g. tiling.batch=0")
    ap.add_argument("--unparked", nargs="*", default=[],
                    help="sizes run again (alone, then bulk) with the denoisers never parked (Renderer.parks off)")
    ap.add_argument("--out", default="mem.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out, rows, parks = tempfile.mkdtemp(), [], []
    base = ["model=sdxl", "model.weights=random", f"job.steps={args.steps}", f"output.dir={out}", *args.set]
    r = None

    def two_at_once(reqs):
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(lambda q: r.render_group([q])[0], reqs))

    alone, bulk = ("one image alone", lambda reqs: [r.render(reqs[0])]), ("two calls at once (bulk)", two_at_once)
    cases = [(case, size, True) for case in (alone, bulk) for size in args.sizes]  # every size alone first
    cases += [(case, size, False) for case in (alone, bulk) for size in args.unparked]
    for (label, run_them), size, parking in cases:
        w, h = size.split("x")
        cfg = config(*base, f"job.width={w}", f"job.height={h}", "job.seeds=[1,2]")
        if r is None:  # random weights are drawn in fp32 (a pretrained bf16 load peaks at its size): capped after
            r = Renderer(cfg.model, cfg.output)
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.cap_gb * 1e9 / total, 0)
            for m in r.models():
                m.parked = counted(m.parked, parks)
        reqs = plan(cfg)
        r.parks = parking
        r._vae_plans.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        parks.clear()
        t0 = time.perf_counter()
        try:
            done = run_them(reqs)
            status = [d["status"] if d["status"] == "ok" else d["error"] for d in done]
            stages, warnings = done[0].get("stages"), [d.get("warnings") for d in done]
        except torch.OutOfMemoryError as e:
            status, stages, warnings = [f"OOM: {e}"[:300]], None, None
        seconds = time.perf_counter() - t0
        row = {"size": size, "case": label, "parks": parking, "status": status, "warnings": warnings, "stages": stages,
               "batch": r.batch_size(reqs[0]), "seconds": seconds,
               # latent canvas -> the VAE tile its last pass chose, and whether the denoisers were parked then
               "vae_plans": {f"{pw}x{ph}": [tile, parked] for (_, ph, pw), (tile, _, parked) in r._vae_plans.items()},
               "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
               "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
               "free_seen_gb": free_memory("cuda", 1.0) / 1e9,
               "parked_passes": len(parks), "park_seconds": sum(parks)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    env = {"device": torch.cuda.get_device_name(), "cap_gb": args.cap_gb, "command": " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump({"env": env, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
