"""Soak of the nightly path on the CPU: a night of small images on 2 CPU workers, then the same night again.

    OMP_NUM_THREADS=1 python3 bench/soak_nightly.py --images 1000 [--plan-rows 1000000] [--out /tmp/soak]

Measures, into bench/results/soak-cpu-<date>.json:
  - driver RSS (this process: the planner, the manifest writer, the scheduler) before the night, its peak while
    rendering (sampled every 0.2 s), and after;
  - images/s of the night, and rows/s of the manifest alone (one part an image, as the night writes them);
  - the rerun of the finished night: wall seconds until it knows there is nothing to do (target < 5 s for 1,000);
  - with --plan-rows: a jsonl source of that many rows planned without rendering: seconds of the checking pass,
    seconds to the first request, seconds to stream them all, and RSS before and after.
The images are 64x64, 2 steps, one tile: the figures are of the bookkeeping, not of the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TINY = ["model=demo_random", "job.width=64", "job.height=64", "job.steps=2", "tiling.tile=8", "tiling.overlap=2",
        "tiling.vae_tile=8", "tiling.vae_overlap=2", "job.strategy=direct"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Peak(threading.Thread):
    """RSS sampled every 0.2 s: the peak, and (seconds, MiB) samples."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop, self.samples, self.t0 = rss_mib(), False, [], time.perf_counter()

    def run(self):
        while not self.stop:
            now = rss_mib()
            self.peak = max(self.peak, now)
            self.samples.append((time.perf_counter() - self.t0, now))
            time.sleep(0.2)

    def at(self, share: float) -> float:
        """The RSS sampled at `share` of the run's time."""
        end = self.samples[-1][0]
        return next(m for t, m in self.samples if t >= share * end)


def manifest_rows_per_s(n: int) -> float:
    from jobs import Manifest

    with tempfile.TemporaryDirectory() as d:
        m = Manifest(d, "date=2026-12-01")
        row = {"image_id": "0" * 16, "status": "ok", "path": "images/x.png", "sha256": "0" * 64, "bytes": 1}
        t = time.perf_counter()
        for i in range(n):
            m.append([dict(row, image_id=f"{i:016x}")])
        return n / (time.perf_counter() - t)


def plan_rows(n: int, folder: Path) -> dict:
    from conftest import compose
    from jobs import Plan

    source = folder / "million.jsonl"
    with open(source, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"a wallpaper of place number {i}, golden hour", "seeds": [i % 7]}) + "\n")
    cfg = compose("job=nightly", *TINY, f"job.prompt_file={source}", f"output.dir={folder / 'plan-out'}")
    before, peak = rss_mib(), Peak()
    peak.start()
    t = time.perf_counter()
    night = Plan(cfg)
    checked = time.perf_counter() - t
    it = iter(night)
    next(it)
    first = time.perf_counter() - t
    rest = sum(1 for _ in it) + 1
    peak.stop = True
    return {"plan_rows": n, "plan_check_s": round(checked, 2), "plan_first_request_s": round(first, 2),
            "plan_stream_all_s": round(time.perf_counter() - t, 2), "plan_requests": rest,
            "plan_rss_before_mib": round(before, 1), "plan_rss_peak_mib": round(peak.peak, 1),
            "source_mib": round(source.stat().st_size / 2**20, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--plan-rows", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    args = ap.parse_args()

    import ray

    import cluster.scheduler  # noqa: F401  torch, diffusers and Ray loaded: the start RSS is the driver's floor
    from conftest import compose
    from run import render_job

    folder = Path(args.out or tempfile.mkdtemp(prefix="tessera-soak-"))
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "night.txt"
    source.write_text("".join(f"a quiet harbour at night, number {i}\n" for i in range(args.images)))
    out = folder / "out"
    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    cfg = compose("job=nightly", *TINY, f"job.prompt_file={source}", "job.date=2026-12-01", f"output.dir={out}",
                  f"cluster.workers={args.workers}")
    result = {"what": "nightly soak, random demo model, 64x64, 2 steps", "date": date.today().isoformat(),
              "images": args.images, "workers": args.workers, "cpus": os.cpu_count()}
    result["rss_start_mib"] = round(rss_mib(), 1)
    peak = Peak()
    peak.start()
    t = time.perf_counter()
    s = render_job(cfg, show_progress=False)
    wall = time.perf_counter() - t
    peak.stop = True
    result.update(night_s=round(wall, 1), written=s["written"], failed=s["failed"],
                  images_per_s=round(s["written"] / wall, 2), rss_peak_mib=round(peak.peak, 1),
                  rss_at_10pct_mib=round(peak.at(0.1), 1), rss_at_50pct_mib=round(peak.at(0.5), 1),
                  rss_at_90pct_mib=round(peak.at(0.9), 1), failures=s["failures"],
                  rss_end_mib=round(rss_mib(), 1))
    for _ in range(2):  # a second rerun when the first had failed images to render
        t = time.perf_counter()
        again = render_job(cfg, show_progress=False)
        result.update(rerun_s=round(time.perf_counter() - t, 2), rerun_start_s=round(again["start_seconds"], 2),
                      rerun_skipped=again["skipped"], rerun_written=again["written"])
        if not again["written"] and not again["failed"]:
            break
    result["manifest_rows_per_s"] = round(manifest_rows_per_s(1000), 1)
    ray.shutdown()
    if args.plan_rows:
        result.update(plan_rows(args.plan_rows, folder))
    print(json.dumps(result, indent=1))
    dest = ROOT / "bench" / "results" / f"soak-cpu-{result['date']}{args.tag}.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {dest}")


if __name__ == "__main__":
    main()
