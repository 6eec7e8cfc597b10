"""Tessera's entry point: compose the job with Hydra, plan it, hand it to the cluster, print a summary.

    python run.py                                    # the default job on the embedded defaults
    python run.py job.seeds=[1,2,3] tiling.method=uniform output.dir=/data/walls
    python run.py -m job.seeds=[1],[2] tiling.method=uniform,gaussian
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub, ever

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from jobs import ConfigError, Manifest, TesseraConfig, TesseraError, plan  # noqa: E402

ConfigStore.instance().store(name="tessera_schema", node=TesseraConfig)
CONF = Path(__file__).resolve().parent / "conf"


def size_presets() -> list:
    """The `size=` presets: the files of conf/size/."""
    return sorted(p.stem for p in (CONF / "size").glob("*.yaml"))


def check_size_overrides(args) -> None:
    """Every `size=NAME` (or a sweep's `size=a,b`) on the command line names a preset, or one ConfigError naming
    it, before Hydra composes anything (Hydra's own message is clear too, but exits 1 like a failed render)."""
    known = size_presets()
    for arg in args:
        m = re.fullmatch(r"\+{0,2}size=([\w.,-]*)", arg)
        for value in m.group(1).split(",") if m else ():
            if value not in known and value != "null":
                raise ConfigError("size", value, f"no such size preset; one of {', '.join(known)} (conf/size/), "
                                  "or job.width / job.height")


def check_output_dir(path: str) -> None:
    """Create the output folder and prove it writable, or fail naming `output.dir`."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        raise ConfigError("output.dir", path, f"not writable ({e.strerror or e})") from e


def render_job(cfg: TesseraConfig, show_progress: bool = True) -> dict:
    """Validate, skip what the manifest already holds, render the rest, record every image."""
    requests = plan(cfg)  # validates
    check_output_dir(cfg.output.dir)
    from cluster import run_job  # Ray and torch load only once the job is known to be valid

    manifest = Manifest(cfg.output.dir)
    manifest.compact()
    done = manifest.done_ids()
    todo = [r for r in requests if r.image_id not in done]
    t0, rows, pending, last_flush = time.time(), [], [], time.time()

    def on_row(row: dict) -> None:
        nonlocal last_flush
        rows.append(row)
        pending.append(row)
        if len(pending) >= 16 or time.time() - last_flush > 10:
            manifest.append(pending)
            pending.clear()
            last_flush = time.time()

    info = {}
    try:
        if todo:
            info = run_job(cfg, todo, on_row, show_progress)
    finally:
        if pending:
            manifest.append(pending)
        manifest.compact()
        gallery = write_gallery_of(cfg.output.dir)
    seconds = time.time() - t0
    ok = sum(r["status"] == "ok" for r in rows)
    return {"images": len(requests), "written": ok, "failed": len(rows) - ok, "skipped": len(requests) - len(todo),
            "seconds": seconds, "images_per_hour": ok / seconds * 3600 if ok else 0.0,
            "manifest": os.path.join(cfg.output.dir, "manifest"), "gallery": gallery, "rows": rows,
            "image_ids": [r.image_id for r in requests], **info}


def write_gallery_of(output_dir: str):
    """`<output.dir>/gallery.html` (jobs.gallery); a failure to write it is reported, never fatal to the job."""
    from jobs.gallery import write_gallery

    try:
        return str(write_gallery(output_dir))
    except Exception as e:  # noqa: BLE001 - the images and the manifest are written; say what the page lacks
        print(f"warning: gallery not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def record_sweep(summary: dict, cfg: TesseraConfig) -> None:
    """Under `-m`, this job's overrides, output folder and ids into its Hydra job folder, and the sweep's one
    gallery over all its jobs so far (`<sweep dir>/gallery.html`, the swept values as columns)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from jobs.gallery import record_sweep_job, write_sweep_gallery

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    try:
        record_sweep_job(hc.runtime.output_dir, list(hc.overrides.task), cfg.output.dir, summary["image_ids"])
        summary["sweep_gallery"] = str(write_sweep_gallery(hc.sweep.dir))
    except Exception as e:  # noqa: BLE001
        print(f"warning: sweep gallery not written: {type(e).__name__}: {e}", file=sys.stderr)


def print_summary(s: dict) -> None:
    print(f"\nTessera: {s['written']} image(s) written, {s['failed']} failed, {s['skipped']} already done"
          f" (of {s['images']}) in {s['seconds']:.1f} s, {s['images_per_hour']:.1f} images/hour"
          + (f", {s['mode']} mode on {s['workers']} worker(s) ({s['device']})" if "mode" in s else ""))
    for r in s["rows"]:
        if r["status"] != "ok":
            print(f"  failed {r['image_id']}: {r['error']}", file=sys.stderr)
    print(f"manifest: {s['manifest']}")
    for key in ("gallery", "sweep_gallery"):
        if s.get(key):
            print(f"{key.replace('_', ' ')}: {s[key]}")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = OmegaConf.to_object(dcfg)
        summary = render_job(cfg)
    except TesseraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    record_sweep(summary, cfg)
    print_summary(summary)
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    try:
        check_size_overrides(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
