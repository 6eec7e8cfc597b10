"""Coherence at large sizes on a model that was really trained (models/scenes-sd, the demo model; tests/assets:
its zoom-aware sibling).

Each variant renders every prompt x seed through the renderer's own path (`cluster.renderer.Renderer.render`,
no Ray) and is scored with the test bed's measures (`scenes.py`): `count_suns` (1 as trained), `horizon_jumps`
(below 0.05: one continuous horizon) and `sun_edge_width` (the rim in pixels; the model's own at its native size,
and a bicubic enlargement of the base, are measured beside). Rows go to a JSON file (each with its picture's path
under --workdir); every picture, small and labelled, to a contact sheet (--sheet, a PNG or JPEG).

    python3 bench/coherence.py --model models/scenes-sd --sizes 1920x1080 --seeds 1 2 \
        --variants direct p0.5 p0.5s3 --out bench/results/coherence.json

A variant is `direct`, or `p<strength>` with optional suffixes `s<skip residual power>`, `f<stage factor>`,
`d<dilated sampling power>`, `k<strength decay>`, `c` / `a` (the cosine weights on the stage's clock, the default,
or on the whole schedule's, DemoFusion's), `t<tile>` (latent tiles, overlap a quarter), `n<anchor weight>`,
`g<anchor sigma>`, `q<anchor detail gate>`, `u<sharpen amount>`, `r<sharpen sigma>`, `x<colour fix sigma>`,
`L` (latent upscale), `S` (shifted tiles), `U` (uniform tiles), `D<interval>` (DeepCache, `model.deep_cache`),
e.g. `p0.4s3d1f1.5`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cluster.renderer import Renderer, read_picture  # noqa: E402
from jobs import plan  # noqa: E402
from jobs.spec import TesseraConfig  # noqa: E402
from tiling.progressive import base_size, resize  # noqa: E402

PROMPTS = ("a dusk landscape", "a day landscape", "a night landscape")


def compose_cfg(overrides):
    ConfigStore.instance().store(name="tessera_schema", node=TesseraConfig)
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def variant_overrides(name: str) -> list:
    """The job and tiling overrides a variant name stands for (see the module docstring)."""
    if name == "direct":
        return ["job.strategy=direct"]
    m = re.fullmatch(r"p([\d.]+)((?:[sdfktngqurxD][\d.]+|[LSUca])*)", name)
    if not m:
        raise SystemExit(f"unknown variant {name!r}")
    out = ["job.strategy=progressive", f"job.strength={m.group(1)}"]
    for key, value in re.findall(r"([sdfktngqurxDLSUca])([\d.]*)", m.group(2)):
        out += {"s": [f"job.skip_residual={value}"], "d": [f"job.dilation={value}"], "f": [f"job.stage_factor={value}"],
                "k": [f"job.strength_decay={value}"], "n": [f"job.anchor={value}"],
                "g": [f"job.anchor_sigma={value}"], "q": [f"job.anchor_detail={value}"],
                "u": [f"job.sharpen={value}"], "r": [f"job.sharpen_sigma={value}"],
                "x": [f"job.color_fix={value}"],
                "D": [f"model.deep_cache={value}"], "c": ["job.guide_clock=stage"], "a": ["job.guide_clock=schedule"],
                "t": [f"tiling.tile={value}", f"tiling.overlap={int(float(value or 0)) // 4}"],
                "L": ["job.upscale=latent"],
                "S": ["tiling.method=shifted"], "U": ["tiling.method=uniform"]}[key]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a test-bed diffusers folder (repeatable)")
    ap.add_argument("--family", default="sd15", help="model=<family> (sd15; z_image for a Z-Image test bed)")
    ap.add_argument("--sizes", nargs="+", default=["1920x1080"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    ap.add_argument("--variants", nargs="+", default=["direct", "p0.5"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", default="coherence.json")
    ap.add_argument("--sheet", default=None, help="a contact sheet (.png or .jpg) of every picture: a row per model, "
                    "size and variant, a column per prompt and seed, each labelled with its sun count")
    ap.add_argument("--workdir", default="/tmp/coherence")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every render, e.g. tiling.vae_passes=1")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "tests", "assets"))
    from scenes import count_suns, horizon_jumps, sun_edge_width  # noqa: E402

    def measures(pixels) -> dict:
        return {"suns": count_suns(pixels), "horizon_jumps": round(horizon_jumps(pixels), 4),
                "rim_px": round(sun_edge_width(pixels), 2)}

    rows, sheet = [], []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for model_path in a.model:
        common = [f"model={a.family}", f"model.path={model_path}", f"model.dtype={a.dtype}", f"tiling.tile={a.tile}",
                  f"tiling.overlap={a.overlap}", f"tiling.batch={a.batch}", f"job.guidance={a.guidance}",
                  f"job.steps={a.steps}", f"job.seeds=[{','.join(map(str, a.seeds))}]",
                  "job.prompts=[" + ",".join(json.dumps(p) for p in a.prompts) + "]", f"output.dir={a.workdir}",
                  "output.keep_stages=true"] + a.set
        renderer = None
        for size in ["native"] + a.sizes:
            for variant in (["direct"] if size == "native" else a.variants):
                cfg = compose_cfg(common + variant_overrides(variant))
                if renderer is None:
                    renderer = Renderer(cfg.model, cfg.output)
                native = cfg.job.base_size or renderer.model.native_size  # a DiT test bed's: job.base_size
                w, h = (native, native) if size == "native" else map(int, size.split("x"))
                cfg.job.width, cfg.job.height = w, h
                for req in plan(cfg):
                    t0 = time.perf_counter()
                    row = renderer.render(req)
                    wall = time.perf_counter() - t0
                    if row["status"] != "ok":
                        print("FAILED", variant, size, row["error"], flush=True)
                        continue
                    pixels = np.array(Image.open(os.path.join(a.workdir, row["path"])))
                    out = {"model": os.path.basename(os.path.normpath(model_path)), "size": f"{w}x{h}",
                           "variant": variant, "prompt": req.prompt, "seed": req.seed, "stages": row["stages"],
                           "image_id": row["image_id"], "path": row["path"],
                           "seconds": round(wall, 2), "seam_score": round(row["seam_score"], 4),
                           "seam_score_vae": round(row["seam_score_vae"], 4), "device": device, **measures(pixels)}
                    if variant != "direct":  # the base enlarged by bicubic alone: what the stages must beat
                        base = read_picture(os.path.join(a.workdir, req.stage_path(0)))
                        plain = resize(base[None], (h, w))[0].clamp(-1, 1)
                        out["resized_base"] = measures(plain)
                        out["base_drift"] = drift(torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1, base)
                    rows.append(out)
                    print(json.dumps(out), flush=True)
                    save(a, rows, device)
                    if a.sheet:
                        sheet.append((out, ImageOps.pad(Image.fromarray(pixels), SHEET_CELL, Image.LANCZOS)))
    if a.sheet and sheet:
        contact_sheet(sheet, a.sheet)
    print(summary(rows))


SHEET_CELL = (320, 180)


def drift(picture: torch.Tensor, base: torch.Tensor) -> float:
    """How far a picture's colours moved from its base's ([3, H, W] each, in [-1, 1]): the mean absolute difference,
    in 0-255 steps, of their 32x18 grids of cell means (the composition, none of the detail the stages add)."""
    cells = [F.adaptive_avg_pool2d(x[None].float(), (18, 32)) for x in (picture, base)]
    return round(float((cells[0] - cells[1]).abs().mean()) * 127.5, 2)


def contact_sheet(sheet, path: str) -> None:
    """Every picture `sheet` holds ((row, thumbnail) each) in a grid: a row per model, size and variant, a column per
    prompt and seed, in the order rendered, each labelled with what it is and its sun count."""
    lines = list(dict.fromkeys((r["model"], r["size"], r["variant"]) for r, _ in sheet))
    columns = list(dict.fromkeys((r["prompt"], r["seed"]) for r, _ in sheet))
    w, h = SHEET_CELL
    grid = Image.new("RGB", (w * len(columns), h * len(lines)))
    draw = ImageDraw.Draw(grid)
    for r, im in sheet:
        x, y = w * columns.index((r["prompt"], r["seed"])), h * lines.index((r["model"], r["size"], r["variant"]))
        grid.paste(im, (x, y))
        label = f"{r['size']} {r['variant']} | {r['prompt']} {r['seed']} | suns {r['suns']}"
        draw.rectangle((x, y + h - 14, x + w, y + h), fill=(0, 0, 0))
        draw.text((x + 3, y + h - 13), label, fill=(255, 255, 255))
    grid.save(path, quality=85) if path.lower().endswith((".jpg", ".jpeg")) else grid.save(path)
    print("sheet:", path, f"{len(lines)} rows x {len(columns)} columns")


def save(a, rows, device) -> None:
    """The rows so far, as one JSON file (rewritten after each image, so a run cut short keeps what it measured)."""
    with open(a.out, "w") as f:
        json.dump({"steps": a.steps, "guidance": a.guidance, "tile": a.tile, "overlap": a.overlap,
                   "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows}, f, indent=1)


def summary(rows) -> str:
    """Per model, size and variant: mean suns, share of pictures with exactly one, mean horizon jump and rim."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["size"], r["variant"]), []).append(r)
    lines = ["model size variant: suns(mean) one-sun% horizon rim_px [resized-base rim] seconds drift-from-base"]
    for (m, s, v), rs in groups.items():
        rims = [r["rim_px"] for r in rs if r["rim_px"] == r["rim_px"]]
        base = [r["resized_base"]["rim_px"] for r in rs if "resized_base" in r and r["resized_base"]["rim_px"] == r["resized_base"]["rim_px"]]
        lines.append(f"{m} {s} {v}: {np.mean([r['suns'] for r in rs]):.2f} "
                     f"{100 * np.mean([r['suns'] == 1 for r in rs]):.0f}% {np.mean([r['horizon_jumps'] for r in rs]):.3f} "
                     f"{np.median(rims) if rims else float('nan'):.1f} [{np.median(base) if base else float('nan'):.1f}] "
                     f"{np.mean([r['seconds'] for r in rs]):.1f}s "
                     f"{np.mean([r.get('base_drift', np.nan) for r in rs]):.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
