"""A night that loses nothing: faults injected into a renderer (CUDA OOM, NaN), and chaos on whole runs (a worker
SIGKILLed mid-image, a torn manifest part, a full disk, two runs on one folder, the driver SIGKILLed mid-job then
run again). Each run ends with every image exactly once in the manifest, every file's sha256 its row's, and
nothing re-rendered that had finished. Processes are killed by their pid, never by name."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pds
import pytest
import torch

from cluster.renderer import Renderer
from conftest import SMALL, compose
from jobs import Manifest, OutputBusyError, OutputLock, TesseraError, plan, sha256_file
from run import render_job

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=demo_random", "job.width=64", "job.height=64", "job.steps=2", "tiling.tile=8", "tiling.overlap=2",
        "tiling.vae_tile=8", "tiling.vae_overlap=2", "job.strategy=direct"]
DATE = "2026-12-01"
PART = f"date={DATE}"


# --- faults inside one render, no Ray ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def renderer(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    cfg = compose(*SMALL, "job.strategy=direct", "tiling.batch=4", f"output.dir={out}")
    r = Renderer(cfg.model, cfg.output, 1)
    real = r.model.predict
    yield r, cfg, out, real
    r.model.predict = real


def _fault(r, real, fault):
    """The model's predict with `fault(x, out, call)` deciding each call's fate (a test double at the edge)."""
    calls = [0]

    def predict(x, *a, **k):
        calls[0] += 1
        return fault(x, lambda: real(x, *a, **k), calls[0])

    r.model.predict = predict
    return calls


def test_cuda_oom_halves_the_tile_batch_down_to_one_then_fails(renderer):
    r, cfg, out, real = renderer
    req = plan(cfg)[0]
    sizes = []

    def oom_above_one(x, run, call):
        sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return run()

    _fault(r, real, oom_above_one)
    row = r.render(req)
    assert row["status"] == "ok", row["error"]
    assert row["warnings"] == ("CUDA out of memory at tile batch 4: retried at 2; "
                               "CUDA out of memory at tile batch 2: retried at 1")
    assert sizes[0] == 4 and 2 in sizes and sizes[-1] == 1 and sha256_file(out / row["path"]) == row["sha256"]

    def always(x, run, call):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    (out / req.path).unlink()
    _fault(r, real, always)
    row = r.render(req)
    assert row["status"] == "failed" and row["error"].startswith("CUDA out of memory at one tile a call")
    assert not (out / req.path).exists()


def test_nan_latents_are_rendered_again_in_fp32_then_fail(renderer):
    r, cfg, out, real = renderer
    req = plan(compose(*SMALL, "job.strategy=direct", "tiling.batch=4", f"output.dir={out}", "job.seeds=[3]"))[0]
    _fault(r, real, lambda x, run, call: run() * float("nan") if call == 1 else run())
    row = r.render(req)
    assert row["status"] == "ok" and row["warnings"] == "non-finite latents (NaN/inf): rendered again in fp32"
    good = (out / row["path"]).read_bytes()
    r.model.predict = real
    assert r.render(req)["sha256"] == row["sha256"]  # the retry is the clean render
    (out / req.path).unlink()
    _fault(r, real, lambda x, run, call: run() * float("nan"))
    row = r.render(req)
    assert row["status"] == "failed" and "in fp32 too" in row["error"] and not (out / req.path).exists()
    assert len(good) > 0


def test_a_decode_that_fails_fails_its_own_image_alone(renderer, monkeypatch):
    """Seeds stepped together: the one whose decode raises gets a failed row saying why; the other is written."""
    r, cfg, out, real = renderer
    r.model.predict = real
    reqs = plan(compose(*SMALL, "job.strategy=direct", f"output.dir={out}", "job.seeds=[11,12]"))
    decode = r._decode

    def second_fails(req, z):
        if req.seed == 12:
            raise OSError("the VAE's weights are gone (injected)")
        return decode(req, z)

    monkeypatch.setattr(r, "_decode", second_fails)
    ok, bad = r.render_group(reqs)
    assert ok["status"] == "ok" and (out / ok["path"]).exists()
    assert bad["status"] == "failed" and "the VAE's weights are gone" in bad["error"]
    assert not (out / reqs[1].path).exists()


def test_a_worker_that_raises_is_told_from_one_that_died():
    import ray

    from cluster.scheduler import fault

    raised = ray.exceptions.RayTaskError("render_group", "Traceback ...", ValueError("no tiles\nmore"))
    assert fault(raised) == "worker error: ValueError: no tiles"
    assert fault(ray.exceptions.ActorDiedError()).startswith("worker lost: ActorDiedError")


def test_a_long_prompt_is_truncated_with_a_warning(renderer):
    r, cfg, out, real = renderer
    r.model.predict = real
    req = plan(compose(*SMALL, "job.strategy=direct", f"output.dir={out}",
                       f"job.prompts=['{'a very long prompt ' * 300}']"))[0]
    row = r.render(req)
    assert row["status"] == "ok" and "prompt truncated: the text encoder reads its first 77 tokens of" in row["warnings"]
    assert r.render(plan(cfg)[0])["warnings"] is None


def test_the_night_progress_line_counts_skipped_failed_and_dropped():
    import io

    from cluster.progress import Progress

    log = io.StringIO()
    p = Progress(10, enabled=True, label="images of 2026-12-01", interval=0, stream=log)
    p.skip(3)
    p.drop(1)
    p.image(True)
    p.image(False)
    p.close()
    last = log.getvalue().strip().splitlines()[-1]
    assert last.startswith("tessera: 5/9 images of 2026-12-01 (3 already done, 1 failed), ") and "ETA " in last
    assert not p.bars


# --- the lock --------------------------------------------------------------------------------------------

def test_the_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with OutputLock(tmp_path, "night"):
        with pytest.raises(OutputBusyError) as e:
            with OutputLock(tmp_path, "other"):
                pass
    msg = str(e.value)
    assert f"output.dir={str(tmp_path)!r}" in msg and f"pid {os.getpid()} on " in msg and "'night'" in msg
    with OutputLock(tmp_path, "again") as lock:  # released: free again, and nothing stale
        assert lock.stale is None


# --- whole runs on an embedded Ray ----------------------------------------------------------------------------

def night_cfg(out, source, workers=2):
    return compose("job=nightly", *TINY, f"job.prompt_file={source}", f"job.date={DATE}", f"output.dir={out}",
                   f"cluster.workers={workers}")


def prompts(tmp_path, n):
    f = tmp_path / "night.txt"
    f.write_text("# tonight\n" + "".join(f"a quiet harbour number {i}\n" for i in range(n)), encoding="utf-8")
    return f


def assert_exactly_once(out, n):
    """Every image once in the manifest (read as one Hive dataset), ok, its file's sha256 its row's."""
    table = pds.dataset(out / "manifest", format="parquet", partitioning="hive").to_table()
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert set(table["date"].to_pylist()) == {DATE}
    rows = table.to_pylist()
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert r["path"].startswith(f"images/{PART}/nightly/") and sha256_file(out / r["path"]) == r["sha256"]
    return {r["image_id"]: r for r in rows}


def mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in (out / "images" / PART / "nightly").glob("*.png")}


def test_a_worker_killed_mid_image_loses_nothing_and_a_torn_part_is_set_aside(ray_local, tmp_path, caplog):
    out, source = tmp_path / "out", prompts(tmp_path, 6)
    killed = []

    def kill_a_worker():  # once a row has landed, SIGKILL the worker that wrote it (its next image is in flight)
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            parts = list((out / "manifest" / PART).glob("part-*.parquet"))
            if parts:
                row = Manifest(out, PART).rows()[0]
                pid = int(row["worker"].rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, row["image_id"], (out / row["path"]).stat().st_mtime_ns))
            time.sleep(0.05)

    t = threading.Thread(target=kill_a_worker)
    t.start()
    s = render_job(night_cfg(out, source), show_progress=False)
    t.join()
    assert killed and (s["written"], s["failed"], s["skipped"]) == (6, 0, 0)
    rows = assert_exactly_once(out, 6)
    pid, first, mtime = killed[0]
    assert (out / rows[first]["path"]).stat().st_mtime_ns == mtime  # finished before the kill: not rendered again
    assert any(not r["worker"].endswith(f":{pid}") for r in rows.values())

    # A torn part (a copy cut short, a full disk): moved aside with a warning, its images found again in their files.
    (part,) = Manifest(out, PART).parts()
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    before = mtimes(out)
    with caplog.at_level(logging.WARNING, logger="tessera"):
        s = render_job(night_cfg(out, source), show_progress=False)
    assert (s["written"], s["recovered"], s["skipped"]) == (0, 6, 0) and "mode" not in s  # no worker started
    assert s["torn"] == [str(part.parent / "_torn" / part.name)] and Path(s["torn"][0]).is_file()
    assert any(str(part) in m and "unreadable" in m for m in caplog.messages)
    recovered = assert_exactly_once(out, 6)
    assert mtimes(out) == before and {i: r["sha256"] for i, r in recovered.items()} == {
        i: r["sha256"] for i, r in rows.items()}
    again = render_job(night_cfg(out, source), show_progress=False)  # O(1) resume: nothing hashed, all skipped
    assert (again["written"], again["skipped"], again["recovered"]) == (0, 6, 0)


def test_a_full_disk_stops_the_night_with_an_error_and_a_rerun_finishes_it(ray_local, tmp_path, monkeypatch):
    out, source = tmp_path / "out", prompts(tmp_path, 5)
    real, writes = Manifest._write, [0]

    def enospc_after_two(self, table):
        writes[0] += 1
        if writes[0] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, table)

    monkeypatch.setattr(Manifest, "_write", enospc_after_two)
    with pytest.raises(TesseraError, match="No space left on device.*2 image.*free space and run again"):
        render_job(night_cfg(out, source, workers=1), show_progress=False)
    monkeypatch.setattr(Manifest, "_write", real)
    assert len(Manifest(out, PART).rows()) == 2
    before = mtimes(out)  # finished images: two recorded, perhaps more written without their rows
    s = render_job(night_cfg(out, source, workers=1), show_progress=False)  # the lock was released by the error
    # a killed worker's last write may still land after the error (ray.kill is asynchronous): recovered, not redone
    assert s["skipped"] == 2 and s["recovered"] >= len(before) - 2 and s["recovered"] + s["written"] == 3, s
    assert_exactly_once(out, 5)
    assert {k: v for k, v in mtimes(out).items() if k in before} == before


def test_an_image_that_hits_a_full_disk_stops_the_night():
    from run import disk_full

    assert disk_full("OSError: [Errno 28] No space left on device: 'images/.x.png.1a2b.tmp'")
    assert disk_full("OSError: [Errno 122] Disk quota exceeded")
    assert not disk_full("worker lost: RayActorError") and not disk_full(None)


# --- whole runs of run.py, killed by pid ---------------------------------------------------------------------

def _start(out, source):
    return subprocess.Popen([sys.executable, "run.py", "job=nightly", *TINY, f"job.prompt_file={source}",
                             f"job.date={DATE}", f"output.dir={out}", "cluster.workers=1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def descendants(pid):
    """Pids of every process below `pid` (its embedded Ray: GCS, raylet, the workers), read from /proc."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_runs_on_one_folder_and_a_driver_killed_mid_job(tmp_path):
    out, source = tmp_path / "out", prompts(tmp_path, 8)
    a = _start(out, source)
    try:
        holder = out / ".tessera.lock.json"
        deadline = time.time() + 120
        while not holder.exists() and a.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert json.loads(holder.read_text())["pid"] == a.pid
        b = subprocess.run([sys.executable, "run.py", "job=nightly", *TINY, f"job.prompt_file={source}",
                            f"job.date={DATE}", f"output.dir={out}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert b.returncode == 2 and b.stderr.startswith(f"error: output.dir={str(out)!r} is being rendered by "
                                                         f"pid {a.pid} on "), b.stderr
        parts = out / "manifest" / PART
        while len(list(parts.glob("part-*.parquet"))) < 2 and a.poll() is None and time.time() < deadline + 120:
            time.sleep(0.05)
        below = descendants(a.pid)
        os.kill(a.pid, signal.SIGKILL)  # the driver, mid-job; then its Ray, as a lost machine loses it
        _kill(below)
        a.wait(30)
    finally:
        _kill([a.pid] + descendants(a.pid))
        a.communicate()
    recorded = {r["image_id"] for r in Manifest(out, PART).rows()}
    before = mtimes(out)
    assert 2 <= len(recorded) < 8 and len(before) >= len(recorded)
    c = subprocess.run(a.args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert c.returncode == 0, c.stderr[-3000:]
    assert "stale lock" in c.stdout + c.stderr and f"pid {a.pid}" in c.stdout + c.stderr
    new, found = 8 - len(before), len(before) - len(recorded)  # files written whose rows were not: recovered
    assert (f"Tessera: {new} image(s) written, 0 failed, {len(recorded)} already done"
            + (f", {found} recovered from their files" if found else " (of 8")) in c.stdout, c.stdout
    assert_exactly_once(out, 8)
    assert {k: v for k, v in mtimes(out).items() if k in before} == before  # nothing finished rendered again
