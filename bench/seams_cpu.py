"""Seam scores of the tiling methods on the random-weight demo model (model=demo_random), CPU, next to a naive baseline.

    python3 bench/seams_cpu.py --width 3840 --height 2160 --steps 20 --images /tmp/seams4k-img \
        --out bench/results/seams-cpu-4k.json        # ~15 min on 2 idle cores; BENCHMARKS.md "Seams"

Every image is denoised through `tiling.render.denoise_request` (the renderer's own loop, tiles 64/16
latent unless told) and decoded in one or more ways; each row is one (denoise, decode) pair:

- `naive`: what a plain tiler does in both stages. Denoise: `uniform` with no overlap, tiles side by side
  with nothing shared (only the last row and column, aligned to the far edge, overlap their neighbours).
  Decode: every VAE tile (64 latent px, no overlap) through `vae.decode` on its own: no context, its own
  GroupNorm statistics (`tiling.vae.decode_each` with context 0);
- `naive denoise, full-frame decode`: the same latent decoded in one piece (isolates the denoise stage;
  Tessera's tiled decode matches the full one to 70+ dB, and this is far cheaper);
- `uniform`, `gaussian`, `shifted`: Tessera's methods and its decode (`Renderer._decode` and `write`, as
  `render_group` runs them, so the scores are the manifest's);
- `gaussian, naive decode` and `gaussian, full-frame decode`: the gaussian latent decoded naively, and in
  one piece with `vae.decode` (no VAE tiles at all: the floor the measure reads on this picture);
- `gaussian, wrap=both`: scored inside at the wrapped grids' borders (tiles that cross an edge end inside
  the image on the other side).

Every row also has `wrap_x`/`wrap_y`, `wrap_seam_score` of the image laid beside itself (about 1 only for a
`wrap=both` image; the others show what an edge that does not wrap scores), and `line_sd_cols`/`_rows`, the
spread of the score of one line taken alone: the noise band of a single-line score such as the wrapped edge.

`seam_score` is read at the borders of the denoise grid (for `shifted`: the unshifted grid a plain tiler
would use), `seam_score_vae` at those of the VAE grid (no overlap for the naive decode), both with the VAE's
8-pixel period, as the manifest does. Raw rows go to --out as JSON; the table is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cluster.renderer import Renderer, now  # noqa: E402
from jobs import plan  # noqa: E402
from jobs.spec import TesseraConfig  # noqa: E402
from tiling import to_uint8, wrap_seam_score  # noqa: E402
from tiling.render import denoise_request, seam_scores  # noqa: E402
from tiling.seams import gradients  # noqa: E402
from tiling.vae import decode_each  # noqa: E402

# label, method, overlap, wrap, decodes of that latent: (row label, decode)
RUNS = [("naive", "uniform", 0, "none", [("naive", "naive"), ("naive denoise, full-frame decode", "full")]),
        ("uniform", "uniform", 16, "none", [("uniform", "shared")]),
        ("gaussian", "gaussian", 16, "none", [("gaussian", "shared"), ("gaussian, naive decode", "naive"),
                                              ("gaussian, full-frame decode", "full")]),
        ("shifted", "shifted", 0, "none", [("shifted", "shared")]),
        ("gaussian, wrap=both", "gaussian", 16, "both", [("gaussian, wrap=both", "shared")])]


def line_spread(pixels, period: int) -> dict:
    """The measure's own noise on this picture: the standard deviation of the score of one column (one row)
    taken alone, over every interior column (row) at phase 0 of `period`, tile border or not."""
    g_x, g_y = gradients(pixels)
    out = {}
    for key, m in (("line_sd_cols", g_x.mean(axis=0)), ("line_sd_rows", g_y.mean(axis=1))):
        at = m[period - 1::period]  # across the boundaries at multiples of period
        out[key] = float((at / at.mean()).std())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=3840)
    ap.add_argument("--height", type=int, default=2160)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--vae-tile", type=int, default=64)
    ap.add_argument("--runs", nargs="*", default=[r[0] for r in RUNS], help="labels of RUNS to do")
    ap.add_argument("--images", default=None, help="folder for the decoded images (default: a temp folder)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_dir = Path(args.images or tempfile.mkdtemp(prefix="seams-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    renderer, rows = None, []
    for label, method, overlap, wrap, decodes in (r for r in RUNS if r[0] in args.runs):
        cfg = TesseraConfig()
        cfg.model.name = "demo_random"  # what BENCHMARKS.md "Seams" measured (textured pictures)
        cfg.job.strategy = "direct"  # the seams of one denoise over the full canvas
        cfg.job.width, cfg.job.height, cfg.job.steps, cfg.job.seeds = args.width, args.height, args.steps, [args.seed]
        cfg.tiling.method, cfg.tiling.overlap, cfg.tiling.wrap = method, overlap * args.tile // 64, wrap
        cfg.tiling.tile, cfg.tiling.vae_tile, cfg.output.dir = args.tile, args.vae_tile, str(out_dir)
        renderer = renderer or Renderer(cfg.model, cfg.output, threads=None)
        req, f = plan(cfg)[0], renderer.model.vae_scale_factor
        started, t0 = now(), time.perf_counter()
        z = denoise_request(lambda bs, t: [renderer.predict(b, t, req.prompt, req.negative_prompt, req.guidance)
                                           for b in bs], renderer.info(), req)
        seconds_denoise = time.perf_counter() - t0
        for row_label, decode in decodes:
            t0 = time.perf_counter()
            spec = req
            if decode == "shared":
                row = renderer.write(req, renderer._decode(req, z), started, seconds_denoise)
                assert row["status"] == "ok", row["error"]
                pixels = np.asarray(Image.open(out_dir / row["path"]))
                manifest = {"manifest_seam_score": row["seam_score"], "manifest_seam_score_vae": row["seam_score_vae"]}
            else:
                vae, zu = renderer.model.vae, renderer.model.unscale(z)
                with torch.no_grad():
                    if decode == "naive":
                        spec = replace(req, vae_overlap=0)
                        img = decode_each(lambda t: vae.decode(t).sample, zu, f, spec.vae_tile, 0, context=0)
                    else:
                        img = vae.decode(zu).sample[0].float()
                pixels = to_uint8(img, req.width, req.height)
                Image.fromarray(pixels).save(out_dir / f"{req.image_id}-{decode}.png")
                manifest = {}
            seconds_decode = time.perf_counter() - t0
            scores = seam_scores(pixels, spec, f)
            scores.update(wrap_x=wrap_seam_score(pixels, "x", f), wrap_y=wrap_seam_score(pixels, "y", f),
                          **line_spread(pixels, f))
            r = {"case": row_label, "method": method, "overlap": spec.overlap, "wrap": wrap, "decode": decode,
                 "vae_tile": spec.vae_tile, "vae_overlap": spec.vae_overlap, **scores, **manifest,
                 "seconds_denoise": seconds_denoise, "seconds_decode": seconds_decode}
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{args.width}x{args.height}, {args.steps} steps, random demo model, seed {args.seed}, "
          f"tile {args.tile}, VAE tile {args.vae_tile}\n")
    print("| case | seam score (denoise tiles) | seam score (VAE tiles) | edge laid beside itself x / y "
          "| one line's sd, cols / rows |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['seam_score']:.3f} | {r['seam_score_vae']:.3f} | {r['wrap_x']:.3f} / "
              f"{r['wrap_y']:.3f} | {r['line_sd_cols']:.3f} / {r['line_sd_rows']:.3f} |")
    if args.out:
        env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "loadavg_at_end": os.getloadavg(), "argv": sys.argv,
               "width": args.width, "height": args.height, "steps": args.steps, "seed": args.seed,
               "tile": args.tile, "vae_tile": args.vae_tile}
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
