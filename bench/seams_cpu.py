"""Seam scores of the tiling methods on the demo model, CPU, next to a naive baseline.

    python3 bench/seams_cpu.py --width 3840 --height 2160 --steps 20 --out seams.json

The baseline is `uniform` with no overlap: tiles denoised side by side with nothing shared (the last
row and column, aligned to the far edge, overlap their neighbours). `wrap=both` is scored across its
wrapped edges too, laid side by side with itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cluster.renderer import Renderer  # noqa: E402
from jobs import plan  # noqa: E402
from jobs.spec import TesseraConfig  # noqa: E402
from tiling import wrap_seam_score  # noqa: E402

CASES = [("naive: uniform, no overlap", "uniform", 0, "none"), ("uniform", "uniform", 16, "none"),
         ("gaussian", "gaussian", 16, "none"), ("shifted", "shifted", 0, "none"),
         ("gaussian, wrap=both", "gaussian", 16, "both")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=3840)
    ap.add_argument("--height", type=int, default=2160)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_dir = tempfile.mkdtemp()
    renderer, rows = None, []
    for label, method, overlap, wrap in CASES:
        cfg = TesseraConfig()
        cfg.job.width, cfg.job.height, cfg.job.steps, cfg.job.seeds = args.width, args.height, args.steps, [args.seed]
        cfg.tiling.method, cfg.tiling.overlap, cfg.tiling.wrap, cfg.output.dir = method, overlap, wrap, out_dir
        renderer = renderer or Renderer(cfg.model, cfg.output, threads=None)
        t0 = time.perf_counter()
        row = renderer.render(plan(cfg)[0], cfg.tiling)
        assert row["status"] == "ok", row["error"]
        px = np.asarray(Image.open(Path(out_dir) / row["path"]))
        r = {"case": label, "seam_score": row["seam_score"], "seam_score_vae": row["seam_score_vae"],
             "seconds": time.perf_counter() - t0}
        if wrap != "none":
            r["wrap_x"], r["wrap_y"] = wrap_seam_score(px, "x", 8), wrap_seam_score(px, "y", 8)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"\n{args.width}x{args.height}, {args.steps} steps, demo model, seed {args.seed}\n")
    print("| case | seam score (denoise tiles) | seam score (VAE tiles) | wrapped edge x / y | s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        wrapped = f"{r['wrap_x']:.3f} / {r['wrap_y']:.3f}" if "wrap_x" in r else ""
        print(f"| {r['case']} | {r['seam_score']:.3f} | {r['seam_score_vae']:.3f} | {wrapped} | {r['seconds']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
