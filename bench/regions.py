"""Region prompts on the test bed (`model=demo`, models/scenes-sd, whose palettes follow the prompt's word).

Background "a day landscape", a "dusk" box over the left third and a "night" box over the right third, through
the renderer's own path (`cluster.renderer.Renderer.render`, no Ray; the default progressive strategy). Each
picture is scored: each third's mean colour against the mean colour of the test bed's training scenes of every
palette (`scenes.scenes`, 64 of each): the nearest should be the third's own; suns per third (`count_suns` on the
third); the seam score (`tiling.seams.seam_score`, period 8) across the two box edges at x = W/3 and 2W/3, and,
to compare, across the columns a third of a box's width away. The same palette and sun measures are taken of
the final latent's thirds decoded apart (each third through the VAE on its own): the test bed's VAE, trained on
scenes of one palette each, repaints a latent of three palettes in one when its GroupNorm statistics are those of
the whole picture (the tiled decode's default, as a full-frame decode), so this separates what the denoiser drew
from what the decode makes of it. A variant without regions is rendered beside as
the control. Rows go to a JSON file; the pictures to --images.

    OMP_NUM_THREADS=1 python3 bench/regions.py --seeds 1 2 --out bench/results/regions-cpu-1536x512.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "assets"))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from cluster.renderer import Renderer  # noqa: E402
from jobs import Manifest, plan  # noqa: E402
from jobs.spec import TesseraConfig  # noqa: E402
from scenes import PALETTES, count_suns, scenes  # noqa: E402
from tiling.seams import seam_score  # noqa: E402

# the default job and tiling for a test-bed model (the demo's own are for 3840x2160 on a CPU); `--model` picks it
TESTBED = ["job=default", "tiling=default", "model.dtype=fp32", "tiling.tile=32", "tiling.overlap=8",
           "tiling.batch=8", "tiling.vae_tile=128", "tiling.vae_passes=1", "job.guidance=4", "job.steps=25"]
THIRDS = ("dusk", "day", "night")  # what each third of the picture should be


def regions_override(feather: float) -> str:
    return ("job.regions=[{box:[0,0,0.3333333333,1],prompt:'a dusk landscape',feather:%g},"
            "{box:[0.6666666667,0,1,1],prompt:'a night landscape',feather:%g}]" % (feather, feather))


def palette_means() -> dict:
    """The mean colour (0-255) of 64 training scenes of each palette."""
    g = torch.Generator().manual_seed(0)
    return {w: ((scenes(64, 128, [w] * 64, g).mean(dim=(0, 2, 3)) + 1) * 127.5).numpy() for w in PALETTES}


def score(pixels: np.ndarray, means: dict) -> dict:
    h, w, _ = pixels.shape
    cuts = [0, w // 3, 2 * w // 3, w]
    thirds = []
    for k, want in enumerate(THIRDS):
        part = pixels[:, cuts[k]:cuts[k + 1]]
        mean = part.reshape(-1, 3).mean(0)
        dist = {p: float(np.linalg.norm(mean - m)) for p, m in means.items()}
        thirds.append({"want": want, "nearest": min(dist, key=dist.get), "mean_rgb": [round(float(v), 1) for v in mean],
                       "distance": {p: round(d, 1) for p, d in dist.items()}, "suns": count_suns(part)})
    off = w // 9  # a third of a box's width inside it: columns with no edge, the reference band
    return {"thirds": thirds, "all_nearest_own": all(t["nearest"] == t["want"] for t in thirds),
            "max_suns_per_third": max(t["suns"] for t in thirds), "suns": count_suns(pixels),
            "seam_box_edges": seam_score(pixels, cols=[cuts[1], cuts[2]], period=8),
            "seam_inside_boxes": seam_score(pixels, cols=[cuts[1] - off - (cuts[1] - off) % 8,
                                                          cuts[2] + off - (cuts[2] + off) % 8], period=8)}


def render(renderer, req):
    """`Renderer.render_group` for one image, returning its final latent canvas too."""
    from cluster.renderer import now
    from tiling.render import denoise_group

    started = now()
    conds = [renderer.model.encode(*pair) for pair in req.prompt_pairs()]
    t0 = time.perf_counter()
    z = denoise_group(lambda bs, t: [renderer._predict(b, t, conds[b.prompt], req.guidance) for b in bs],
                      renderer.info(), [req], renderer.batch_size(req), renderer.model.device, None,
                      lambda k, zs, stage, bases: renderer._reference([req], k, zs, stage, bases))[0]
    seconds = time.perf_counter() - t0
    return z, renderer.write(req, renderer._decode(req, z), started, seconds)


@torch.no_grad()
def thirds_decoded_apart(renderer, z, w: int, h: int) -> np.ndarray:
    """The final latent's three thirds each decoded on its own (the VAE's statistics of that third only), side by
    side: what the denoiser drew in each third, whatever the VAE's statistics over the whole picture make of it."""
    from tiling import to_uint8

    cols = z.shape[-1]
    cuts = [0, cols // 3, 2 * cols // 3, cols]
    f = renderer.model.vae_scale_factor
    return np.concatenate([to_uint8(renderer.model.decode(z[..., a:b])[0], (b - a) * f, h)
                           for a, b in zip(cuts, cuts[1:])], axis=1)[:, :w]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1536x512")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--variants", nargs="+", default=["regions", "none"],
                    help="regions (feather 0.05), regions-f<feather> (e.g. regions-f0), none (background only); "
                         "-direct: job.strategy=direct; a suffix -latent: job.upscale=latent, tiling.vae_passes=1, "
                         "tiling.vae_tile=32")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every render, e.g. job.base_size=512")
    ap.add_argument("--model", default=None,
                    help="another test-bed folder of scenes-sd's layout (model=sd15 model.path=...), e.g. "
                         "tests/assets/scenes-sd-zoom; default: the shipped demo model")
    ap.add_argument("--images", default="outputs/bench-regions")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    ConfigStore.instance().store(name="tessera_schema", node=TesseraConfig)
    means = palette_means()
    rows, renderer = [], None
    path = [f"model.path={args.model}"] if args.model else []  # recorded in each row's overrides
    model = ["model=sd15", *path] if args.model else ["model=demo"]
    for variant in args.variants:
        extra = [] if variant.startswith("none") else \
            [regions_override(float(variant.split("-f")[1].split("-")[0]) if "-f" in variant else 0.05)]
        if "-direct" in variant:  # every tile from noise at full size (one scene per tile)
            extra += ["job.strategy=direct"]
        if variant.endswith("-latent"):  # no VAE round trip between stages; the final decode per-tile statistics
            extra += ["job.upscale=latent", "tiling.vae_passes=1", "tiling.vae_tile=32"]
        for seed in args.seeds:
            overrides = model + TESTBED + [f"job.width={w}", f"job.height={h}", f"job.seeds=[{seed}]",
                                   "job.prompts=['a day landscape']", f"output.dir={args.images}"] + extra + args.set
            with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
                cfg = OmegaConf.to_object(compose("config", overrides=overrides))
            if renderer is None:
                renderer = Renderer(cfg.model, cfg.output, threads=1)
            req = plan(cfg)[0]
            t0 = time.perf_counter()
            z, row = render(renderer, req)  # what Renderer.render does, keeping the latent
            seconds = time.perf_counter() - t0
            assert row["status"] == "ok", row["error"]
            Manifest(args.images).append([row])
            pixels = np.asarray(Image.open(os.path.join(args.images, row["path"])).convert("RGB"))
            s = score(pixels, means)
            apart = thirds_decoded_apart(renderer, z, w, h)
            Image.fromarray(apart).save(os.path.join(args.images, row["path"][:-4] + ".thirds.png"))
            s_apart = score(apart, means)
            rows.append({"variant": variant, "seed": seed, "size": args.size, "image_id": row["image_id"],
                         "path": row["path"], "stages": row["stages"], "seconds": round(seconds, 1),
                         "seam_score": row["seam_score"], "overrides": path + extra + args.set, **s,
                         "latent_thirds_decoded_apart": {k: s_apart[k] for k in ("thirds", "all_nearest_own",
                                                                                  "max_suns_per_third")}})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "thirds"}),
                  [(t["want"], t["nearest"], t["suns"]) for t in s["thirds"]], flush=True)
            save(args.out, means, rows)  # after every picture: a long run stopped keeps what it measured


def save(out: str, means: dict, rows: list) -> None:
    """The results file: rows of earlier runs into the same file (their commands kept) and this run's."""
    old = json.load(open(out)) if os.path.isfile(out) else {}
    runs = [r for r in old.get("runs", []) if r["command"] != " ".join(sys.argv)]
    runs.append({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"bench": "regions", "machine": platform.platform(), "threads": torch.get_num_threads(),
                   "palette_means": {k: [round(float(x), 1) for x in v] for k, v in means.items()}, "runs": runs},
                  f, indent=1)


if __name__ == "__main__":
    main()
