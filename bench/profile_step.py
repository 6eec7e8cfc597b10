"""Where a tiled step's time goes on the GPU: the model call alone against the whole loop, and a profile.

    source .gpu/env.sh && python3 bench/profile_step.py [--model sd15|sdxl]     # device tool

Prints the per-tile time of (a) the adapter's predict on a fixed batch, (b) the bare UNet on the same
batch, (c) whole denoise steps of a 3840x2160 canvas, and the top ops of (c) by CUDA and by CPU time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.gpu import cfg_for  # noqa: E402
from cluster.renderer import Renderer  # noqa: E402
from jobs import plan  # noqa: E402
from tiling.render import denoise_group  # noqa: E402


def per_call(fn, n: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    tile, batch = (64, 16) if args.model == "sd15" else (128, 8)
    cfg = cfg_for(args.model, "shifted", tile, 0, batch, "/tmp/prof", args.steps)
    r = Renderer(cfg.model, cfg.output)
    m = r.model
    req = plan(cfg)[0]
    cond = m.encode(req.prompt, req.negative_prompt)
    x = torch.randn(batch, m.latent_channels, tile, tile, device=m.device)
    t = torch.tensor(500.0)
    a = per_call(lambda: m.predict(x, t, cond, 7.0))
    xx, emb = torch.cat([x, x]).to(m.dtype), cond.repeat_interleave(batch, dim=0) if torch.is_tensor(cond) else None
    b = per_call(lambda: m.unet(xx, t, encoder_hidden_states=emb).sample) if emb is not None else float("nan")
    print(f"{args.model}: predict {a / batch * 1e3:.2f} ms/tile, bare unet {b / batch * 1e3:.2f} ms/tile", flush=True)

    def steps():
        return denoise_group(lambda bs, t: [r._predict(bb, t, cond, 7.0, batch) for bb in bs], r.info(), [req],
                             batch, m.device)

    steps()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tiles = {"n": 0}
    denoise_group(lambda bs, t: tiles.__setitem__("n", tiles["n"] + sum(len(bb.tiles) for bb in bs)) or
                  [r._predict(bb, t, cond, 7.0, batch) for bb in bs], r.info(), [req], batch, m.device)
    torch.cuda.synchronize()
    c = time.perf_counter() - t0
    print(f"loop: {c / tiles['n'] * 1e3:.2f} ms/tile over {tiles['n']} tile-steps ({c:.2f} s)", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        steps()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
