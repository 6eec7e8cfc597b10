"""Tiled VAE decodes against the full-frame decode of the same latent: quality and peak memory, CPU, fp32.

    python3 bench/vae_cpu.py --out vae_cpu.json
    python3 bench/vae_cpu.py --models demo --sizes 1024 2048 --out demo.json

Models: `demo` (the random demo's VAE, model=demo_random) and `sd` (a full-size SD 1.x VAE, random weights, seed 0).
The latent is random normal (seed 0), 1/8 of the image side. Variants:

- `full`: `vae.decode(z).sample`, the reference;
- `separate`: tiles decoded on their own with 8 latent pixels of context, feathered (Tessera before issue 3);
- `diffusers`: `vae.enable_tiling()` and `vae.decode` with diffusers' default tile sizes;
- `own-stats`: `decode_tiled_shared(..., passes=1)`: full receptive-field context, each tile's own GroupNorms;
- `shared`: `decode_tiled_shared` (passes=3): GroupNorm statistics shared across the canvas;
- `shared-ov0`: the same with no tile overlap (tiles agree, so nothing needs feathering).

Each variant runs in a fresh subprocess; its peak memory is the process's peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, model and latent included; `rss_before` is the RSS just before
decoding). With `--malloc fixed` (the default) the subprocess runs with MALLOC_MMAP_THRESHOLD_=65536, so that
glibc hands every freed tensor buffer back at once and peak RSS follows the live tensors; with `--malloc
default`, glibc raises its mmap threshold as buffers are freed and serves the next tiles from a fragmenting
heap, which adds hundreds of MiB that grow with the number of tiles. PSNR is on images clamped to [-1, 1]
(peak to peak 2), as they are written.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ["full", "separate", "diffusers", "own-stats", "shared", "shared-ov0"]


def build_vae(model: str):
    import torch
    from diffusers import AutoencoderKL

    if model == "demo":
        from models.demo import build_demo_pipeline
        return build_demo_pipeline().vae.eval()
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                         norm_num_groups=32, sample_size=512).eval()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args) -> None:
    """One variant in this process: decode, save the image, print a JSON line."""
    import torch

    from tiling.vae import decode_each, decode_tiled_shared

    vae = build_vae(args.model)
    n = args.size // 8
    z = torch.randn(1, 4, n, n, generator=torch.Generator().manual_seed(0))
    v, tile, ov = args.variant, args.tile, args.overlap
    before = rss_mib()
    t0 = time.perf_counter()
    with torch.no_grad():
        if v == "full":
            img = vae.decode(z).sample[0]
        elif v == "separate":
            img = decode_each(lambda t: vae.decode(t).sample, z, 8, tile, ov, context=8)
        elif v == "diffusers":
            vae.enable_tiling()
            img = vae.decode(z).sample[0]
        elif v == "own-stats":
            img = decode_tiled_shared(vae, z, tile, ov, passes=1)
        elif v == "shared":
            img = decode_tiled_shared(vae, z, tile, ov, passes=args.passes)
        elif v == "shared-ov0":
            img = decode_tiled_shared(vae, z, tile, 0, passes=args.passes)
        else:
            raise SystemExit(f"unknown variant {v}")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save(img.float().contiguous(), args.save)
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before}), flush=True)


def compare(img, ref) -> dict:
    import torch

    a, b = img.clamp(-1, 1), ref.clamp(-1, 1)
    mse = ((a - b) ** 2).mean().item()
    return {"psnr_db": 10 * torch.log10(torch.tensor(4 / max(mse, 1e-30))).item(),
            "max_abs_diff": (a - b).abs().max().item(), "max_abs_diff_raw": (img - ref).abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo", "sd"], choices=["demo", "sd"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048], help="image sides in pixels")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--tile", type=int, default=64, help="latent pixels (tiling.vae_tile)")
    ap.add_argument("--overlap", type=int, default=8, help="latent pixels (tiling.vae_overlap)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--malloc", default="fixed", choices=["fixed", "default"],
                    help="glibc mmap threshold in the subprocesses: fixed at 64 KiB, or glibc's dynamic default")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    rows, tmp = [], Path(tempfile.mkdtemp())
    variants = ["full"] + [v for v in args.variants if v != "full"]
    for model in args.models:
        for size in args.sizes:
            ref = None
            for v in variants:
                save = tmp / f"{model}-{size}-{v}.pt"
                cmd = [sys.executable, __file__, "--worker", "--model", model, "--size", str(size), "--variant", v,
                       "--tile", str(args.tile), "--overlap", str(args.overlap), "--passes", str(args.passes),
                       "--save", str(save)]
                env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if args.malloc == "fixed" else {}))
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                if done.returncode:
                    sys.stderr.write(done.stderr)
                    raise SystemExit(f"{model} {size} {v} failed")
                row = {"model": model, "size": size, "variant": v, "tile": args.tile,
                       "overlap": 0 if v == "shared-ov0" else args.overlap, "passes": args.passes,
                       "malloc": args.malloc, **json.loads(done.stdout.strip().splitlines()[-1])}
                img = torch.load(save)
                save.unlink()
                if v == "full":
                    ref = img
                else:
                    row.update(compare(img, ref))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\nCPU, fp32, {torch.get_num_threads()} threads, random normal latent (seed 0); "
          f"tiles {args.tile} latent px, overlap {args.overlap}, shared: {args.passes} passes; malloc {args.malloc}; "
          "PSNR on [-1, 1] against the full decode\n")
    print("| VAE | image | variant | PSNR dB | max abs diff | s | peak RSS MiB | RSS before MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        q = f"{r['psnr_db']:.1f} | {r['max_abs_diff']:.4f}" if "psnr_db" in r else "(reference) | "
        print(f"| {r['model']} | {r['size']}x{r['size']} | {r['variant']} | {q} | {r['seconds']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} |")


if __name__ == "__main__":
    main()
