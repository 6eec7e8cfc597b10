"""The denoiser alone, eager against torch.compile, per batch size at one tile shape: where compile pays.

    source .gpu/env.sh && python3 bench/unet_batches.py --model sdxl --tile 96 120 --batches 6 8 --out $OUT

Times the adapter's `predict` (both halves of guidance in one call) on random tiles, per tile; each compiled
batch size is compiled on its first call (timed apart), as `model.compile` does for a job's fixed shape.
Writes unet_batches.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.gpu import cfg_for  # noqa: E402
from bench.profile_step import per_call  # noqa: E402
from cluster.renderer import Renderer  # noqa: E402
from models.loading import compile_denoiser  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sdxl")
    ap.add_argument("--tile", type=int, nargs=2, default=[96, 120], help="latent rows, columns")
    ap.add_argument("--batches", type=int, nargs="+", default=[6, 8])
    ap.add_argument("--out", default="unet-batches-out")
    args = ap.parse_args()
    cfg = cfg_for(args.model, "shifted", max(args.tile), 0, max(args.batches), "/tmp/unet_batches", 1)
    m = Renderer(cfg.model, cfg.output).model
    cond = m.encode("a wallpaper", "")
    t = torch.tensor(500.0)
    xs = {b: torch.randn(b, m.latent_channels, *args.tile, device=m.device) for b in args.batches}
    rows = [{"batch": b, "mode": "eager", "ms_per_tile": 1e3 * per_call(lambda: m.predict(x, t, cond, 7.0)) / b}
            for b, x in xs.items()]
    compile_denoiser(m)
    for b, x in xs.items():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.predict(x, t, cond, 7.0)
        torch.cuda.synchronize()
        rows.append({"batch": b, "mode": "compiled", "seconds_compile": time.perf_counter() - t0,
                     "ms_per_tile": 1e3 * per_call(lambda: m.predict(x, t, cond, 7.0)) / b})
    for r in rows:
        print(json.dumps(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    (out / "unet_batches.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
