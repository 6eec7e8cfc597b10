"""Tessera's entry point: compose the job with Hydra, plan it, hand it to the cluster, print a summary.

    python run.py                                    # the default job on the embedded defaults
    python run.py job.seeds=[1,2,3] tiling.method=uniform output.dir=/data/walls
    python run.py -m job.seeds=[1],[2] tiling.method=uniform,gaussian
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from jobs import ConfigError, Manifest, OutputLock, Plan, TesseraConfig, TesseraError, recover

ConfigStore.instance().store(name="tessera_schema", node=TesseraConfig)
log = logging.getLogger("tessera")
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


COMPACT_EVERY = 256  # parts of one row each this run writes before they are merged into one
SHOWN_FAILURES = 50  # failed images the summary lists (all are in the manifest)


def disk_full(error: str | None) -> bool:
    """Whether a failed row's error is a full disk or quota (ENOSPC, EDQUOT): the night stops there."""
    return bool(error) and any(s in error for s in ("[Errno 28]", "[Errno 122]", "No space left on device",
                                                     "Disk quota exceeded"))


class Tally:
    """What a run did, counted as rows land (the rows themselves go to the manifest, not into memory)."""

    def __init__(self):
        self.written = self.failed = self.skipped = self.recovered = self.warned = 0
        self.failures: list = []  # (image_id, error) of the first SHOWN_FAILURES failed images

    def row(self, row: dict) -> None:
        if row["status"] == "ok":
            self.written += 1
        else:
            self.failed += 1
            if len(self.failures) < SHOWN_FAILURES:
                self.failures.append((row["image_id"], row["error"]))
        self.warned += bool(row.get("warnings"))


def render_job(cfg: TesseraConfig, show_progress: bool = True) -> dict:
    """Validate, skip what the manifest already holds, render the rest, record every image.

    The plan is streamed (`jobs.Plan`): its source is checked whole before anything is written, then read again
    as workers take work. The output folder is locked for the run (`jobs.OutputLock`); unreadable manifest parts
    are moved aside, images whose rows were lost are recovered from their files, every row is written as its
    image lands (a killed driver loses none), and a manifest write that fails (a full disk) stops the run with
    an error, keeping what is recorded."""
    night = Plan(cfg)  # validates the config and every row of job.prompt_file
    out = cfg.output.dir
    check_output_dir(out)
    t0, tally = time.time(), Tally()
    with OutputLock(out, cfg.job.name):
        from cluster import run_job  # Ray and torch load only once the job is valid and the folder is ours
        from cluster.progress import Progress

        manifest = Manifest(out, night.partition)
        torn = manifest.repair()
        manifest.compact()
        done = manifest.done(verify=cfg.output.verify)
        start_s = time.time() - t0
        progress = Progress(night.images, enabled=show_progress,
                            label=f"images of {night.date}" if night.date else "images")

        def record(rows: list, what: str) -> None:
            try:
                manifest.append(rows)
                if len(manifest.mine) >= COMPACT_EVERY:
                    manifest.compact_mine()
            except OSError as e:
                raise TesseraError(f"output.dir={out!r}: cannot record {what} in {manifest.dir} "
                                   f"({e.strerror or e}); {tally.written + tally.recovered} image(s) of this run "
                                   "are recorded; free space and run again: finished images are kept") from e

        def todo():
            dropped = 0
            for req in night:
                if night.duplicates > dropped:
                    progress.drop(night.duplicates - dropped)
                    dropped = night.duplicates
                if req.image_id in done:
                    tally.skipped += 1
                    progress.skip()
                    continue
                row = None if req.image_id in manifest.changed else recover(req, out)
                if row is not None:
                    record([row], f"recovered image {req.image_id}")
                    tally.recovered += 1
                    progress.skip()
                    continue
                yield req
            if night.duplicates > dropped:
                progress.drop(night.duplicates - dropped)

        def on_row(row: dict) -> None:
            record([row], f"image {row['image_id']}")
            tally.row(row)
            if row["status"] == "failed" and disk_full(row["error"]):  # every later image would fail the same way
                raise TesseraError(f"output.dir={out!r}: no space left on device writing image {row['image_id']} "
                                   f"({row['error']}); {tally.written + tally.recovered} image(s) of this run are "
                                   "recorded; free space and run again: finished images are kept")

        info = {}
        try:
            info = run_job(cfg, todo(), on_row, show_progress, progress=progress)
        finally:
            progress.close()
            try:
                manifest.compact()
            except OSError as e:  # the parts are whole; the next run compacts them
                log.warning("manifest not compacted (%s); the next run will", e)
        gallery = write_gallery_of(cfg.output.dir)
    seconds = time.time() - t0
    return {"images": night.images - night.duplicates, "written": tally.written, "failed": tally.failed,
            "skipped": tally.skipped, "recovered": tally.recovered, "warnings": tally.warned,
            "failures": tally.failures, "torn": [str(p) for p in torn], "seconds": seconds,
            "start_seconds": start_s,
            "seconds_per_image": seconds / tally.written if tally.written else 0.0,
            "images_per_hour": tally.written / seconds * 3600 if tally.written else 0.0,
            "date": night.date, "manifest": str(manifest.dir), "gallery": gallery, "plan": night, **info}


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
        record_sweep_job(hc.runtime.output_dir, list(hc.overrides.task), cfg.output.dir, [r.image_id for r in summary["plan"]])
        summary["sweep_gallery"] = str(write_sweep_gallery(hc.sweep.dir))
    except Exception as e:  # noqa: BLE001
        print(f"warning: sweep gallery not written: {type(e).__name__}: {e}", file=sys.stderr)


def print_summary(s: dict) -> None:
    print(f"\nTessera: {s['written']} image(s) written, {s['failed']} failed, {s['skipped']} already done"
          + (f", {s['recovered']} recovered from their files" if s.get("recovered") else "")
          + f" (of {s['images']}{' for ' + s['date'] if s.get('date') else ''}) in {s['seconds']:.1f} s"
          + (f", {s['seconds_per_image']:.2f} s an image ({s['images_per_hour']:.1f} images/hour)"
             if s["written"] else "")
          + (f", {s['mode']} mode on {s['workers']} worker(s) ({s['device']})" if "mode" in s else "")
          + (f", the last {s['tile_parallel_tail']} tile-parallel" if s.get("tile_parallel_tail") else ""))
    for iid, error in s["failures"]:
        print(f"  failed {iid}: {error}", file=sys.stderr)
    if s["failed"] > len(s["failures"]):
        print(f"  ... and {s['failed'] - len(s['failures'])} more failed (status = 'failed' in the manifest)",
              file=sys.stderr)
    if s.get("warnings"):
        print(f"  {s['warnings']} image(s) with warnings (the manifest's warnings column: truncated prompts, "
              "retries)", file=sys.stderr)
    for p in s.get("torn", []):
        print(f"  an unreadable manifest part was moved aside: {p}", file=sys.stderr)
    print(f"manifest: {s['manifest']}")
    for key in ("gallery", "sweep_gallery"):
        if s.get(key):
            print(f"{key.replace('_', ' ')}: {s[key]}")


def _terminate(signum, frame):  # SIGTERM (a scheduler's stop) runs the finally blocks: rows compacted, lock freed
    raise SystemExit(128 + signum)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    signal.signal(signal.SIGTERM, _terminate)
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
