"""FP8 matmuls for the SDXL UNet on Hopper, measured before anything is built on them (issue: cheaper model calls).

One tile batch as Tessera's SDXL default feeds it (4 tiles of 128x128 latents, both halves of guidance: a batch
of 8), random full-size weights, bf16: milliseconds per UNet call eager and compiled, with and without torchao's
float8 dynamic quantization of every nn.Linear (activations and weights in float8_e4m3, one scale per row), and
the output's PSNR against the bf16 eager call. Compile time is reported apart. The whole UNet's compile takes
more than 4 minutes on that machine, so `--block` times, compiled, only the UNet's deepest transformer stack
(`down_blocks[2].attentions[0]`: 10 transformer layers over the 1,024 positions of a tile's 32x32 level, where
most of the linears' FLOPs are).

    python3 bench/fp8_probe.py --out fp8.json        # a GPU of compute capability >= 8.9; torchao importable

Each compile of even the block takes minutes on the H200, so two processes can share the work: each warms
(compiles) its `--rows`, touches `--ready`, waits for every `--after` file, then times its rows and touches
`--done`, so that no timing runs beside another process's compile or timing:

    python3 bench/fp8_probe.py --block --rows bf16,fp8,bf16c --ready /tmp/ra --after /tmp/rb --done /tmp/da &
    python3 bench/fp8_probe.py --block --rows fp8c --ready /tmp/rb --after /tmp/ra /tmp/da --out fp8c.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.gpu import peak_gib  # noqa: E402
from jobs.spec import ModelConfig  # noqa: E402
from models.loading import load_model  # noqa: E402


def timed(fn, n: int) -> float:
    """Mean milliseconds of `n` calls after the first (the compile or the kernels' choice) and one more warm-up."""
    fn(), fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """dB over the reference's own peak-to-peak range."""
    mse = torch.mean((a.float() - ref.float()) ** 2).item()
    span = (ref.float().max() - ref.float().min()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(span * span / mse)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--block", action="store_true", help="the deepest transformer stack alone (quick to compile)")
    ap.add_argument("--out", default="fp8.json")
    ap.add_argument("--rows", default="bf16,fp8,bf16c,fp8c", help="which calls: bf16 / fp8, c for compiled")
    ap.add_argument("--ready", help="a file to touch once every row is warmed (compiled)")
    ap.add_argument("--after", nargs="*", default=[], help="files to wait for before timing")
    ap.add_argument("--done", help="a file to touch once every row is timed")
    a = ap.parse_args()
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    m = load_model(ModelConfig(name="sdxl", weights="random", dtype="bf16"))
    unet = m.unet.eval()
    dev, dt = m.device, torch.bfloat16
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(a.batch, 4, a.latent, a.latent, device=dev, dtype=dt, generator=g)
    ctx = torch.randn(a.batch, 77, 2048, device=dev, dtype=dt, generator=g)
    added = {"text_embeds": torch.randn(a.batch, 1280, device=dev, dtype=dt, generator=g),
             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * a.batch, device=dev, dtype=dt)}
    t = torch.full((a.batch,), 500.0, device=dev)

    if a.block:  # the deepest level's transformer stack on its own input: a tile's 32x32 level, 1280 channels
        unet = unet.down_blocks[2].attentions[0]
        x = torch.randn(a.batch, 1280, a.latent // 4, a.latent // 4, device=dev, dtype=dt, generator=g)

    def call(net):
        with torch.inference_mode():
            if a.block:
                return net(x, encoder_hidden_states=ctx, return_dict=False)[0]
            return net(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added, return_dict=False)[0]

    rows, ref = [], call(unet)
    q = copy.deepcopy(unet)
    quantize_(q, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    linears = sum(isinstance(mod, torch.nn.Linear) for mod in unet.modules())
    wanted = a.rows.split(",")
    if a.no_compile:
        wanted = [r for r in wanted if not r.endswith("c")]
    warm = []
    for row in wanted:
        name, compiled = row.rstrip("c"), row.endswith("c")
        net = {"bf16": unet, "fp8": q}[name]
        f = torch.compile(net, dynamic=False) if compiled else net
        t0 = time.perf_counter()
        out = call(f)
        torch.cuda.synchronize()
        warm.append((name, compiled, f, time.perf_counter() - t0, psnr(out, ref)))
        print(f"warmed {row} in {warm[-1][3]:.1f} s", flush=True)
    touch(a.ready)
    while not all(os.path.exists(p) for p in a.after):
        time.sleep(1)
    for name, compiled, f, first, db in warm:
        rows.append({"weights": name, "compiled": compiled, "ms_per_call": round(timed(lambda: call(f), a.calls), 2),
                     "first_call_s": round(first, 1), "psnr_db_vs_bf16_eager": round(db, 2),
                     "peak_gib": round(peak_gib(), 2)})
        print(json.dumps(rows[-1]), flush=True)
        with open(a.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "torchao": __import__("torchao").__version__, "batch": a.batch, "latent": a.latent,
                       "block": a.block, "linears": linears, "command": " ".join(sys.argv), "rows": rows}, fh, indent=1)
    touch(a.done)


def touch(path: str | None) -> None:
    if path:
        open(path, "w").close()

if __name__ == "__main__":
    main()
