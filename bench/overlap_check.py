"""The GPU's overlap paths on the demo model: four 1920x1080 progressive images through two `render_group` calls at
once, as the Ray actor runs them (the stages' round trips and the final decodes beside the other call's denoise),
against the same images one call at a time with the overlap off: the same bytes; then the free memory, automatic
batch and VAE tile a decode sees under `torch.cuda.set_per_process_memory_fraction(0.1)`.

    python3 bench/overlap_check.py        # a CUDA GPU; prints its findings
"""
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from cluster.renderer import Renderer, auto_batch  # noqa: E402
from jobs import TesseraConfig, plan  # noqa: E402
from tiling import free_memory  # noqa: E402


def main() -> None:
    cfg = TesseraConfig()
    j, t = cfg.job, cfg.tiling
    cfg.model.name, j.prompts, j.seeds, j.steps, j.guidance = "demo", ["a dusk landscape"], [1, 2, 3, 4], 10, 4.0
    j.width, j.height, cfg.output.dir = 1920, 1080, tempfile.mkdtemp()
    t.method, t.tile, t.overlap, t.batch, t.vae_tile = "shifted", 32, 0, 0, 0
    reqs = plan(cfg)
    r = Renderer(cfg.model, cfg.output)
    print("device", torch.cuda.get_device_name(), "overlap", r.overlap, flush=True)
    print("auto batch", r.batch_size(reqs[0]), "free GiB", round(free_memory("cuda", 1.0) / 2**30, 1), flush=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda q: r.render_group([q])[0], reqs))
    print("two at once", round(time.perf_counter() - t0, 1), "s", [x["status"] for x in rows],
          [x["error"] for x in rows], flush=True)
    r.overlap = False
    alone = [r.render_group([q])[0] for q in reqs]
    print("same bytes as one at a time:", [a["sha256"] == b["sha256"] for a, b in zip(rows, alone)], flush=True)
    torch.cuda.set_per_process_memory_fraction(0.1)
    print("fraction 0.1: free GiB", round(free_memory("cuda", 1.0) / 2**30, 1), "auto batch", auto_batch(r.model, 32),
          "vae tile", r.vae_tile(reqs[0], 135, 240), flush=True)


if __name__ == "__main__":
    main()
