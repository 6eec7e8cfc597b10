"""End to end on an embedded Ray: Hydra composition, rendering, manifest, resume, worker independence."""
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import RANDOM, SMALL, compose
from jobs import SCHEMA, Manifest, sha256_file
from run import render_job

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ["image_id", "job", "prompt", "negative_prompt", "seed", "model", "width", "height", "steps",
            "guidance", "scheduler", "tiling_method", "tile", "overlap", "status", "error", "path", "sha256",
            "bytes", "started_at", "finished_at", "seconds_denoise", "seconds_decode", "worker"]


def test_a_job_renders_every_image_records_it_and_resumes(ray_local, tmp_path):
    cfg = compose(*SMALL, f"output.dir={tmp_path}", "job.seeds=[1,2,3]", "cluster.workers=2")
    s = render_job(cfg, show_progress=False)
    # a round of one image a worker in bulk, then the last image on both workers
    assert (s["written"], s["failed"], s["skipped"], s["mode"], s["workers"]) == (3, 0, 0, "bulk", 2)
    assert s["tile_parallel_tail"] == 1
    rows = Manifest(tmp_path).rows()
    assert sorted(r["seed"] for r in rows) == [1, 2, 3] and all(r["status"] == "ok" for r in rows)
    assert set(CONTRACT) <= set(SCHEMA.names)
    for r in rows:
        assert Image.open(tmp_path / r["path"]).size == (196, 130)
        assert sha256_file(tmp_path / r["path"]) == r["sha256"] and r["finished_at"] > r["started_at"]
    assert len({r["worker"] for r in rows}) == 2  # both workers were kept busy
    assert s["gallery"] == str(tmp_path / "gallery.html") and len(list((tmp_path / "thumbs").glob("*.webp"))) == 3

    again = render_job(cfg, show_progress=False)
    assert (again["written"], again["skipped"]) == (0, 3)
    parts = list((tmp_path / "manifest").glob("*.parquet"))
    assert len(parts) == 1 and pq.read_table(parts[0]).num_rows == 3  # no duplicate rows


def test_a_changed_or_missing_image_is_rendered_again(ray_local, tmp_path):
    cfg = compose(*SMALL, f"output.dir={tmp_path}", "job.seeds=[5,6]", "cluster.workers=1")
    render_job(cfg, show_progress=False)
    a, b = Manifest(tmp_path).rows()
    (tmp_path / a["path"]).unlink()
    (tmp_path / b["path"]).write_bytes(b"not a png")
    s = render_job(cfg, show_progress=False)
    assert (s["written"], s["skipped"]) == (2, 0)
    assert {r["sha256"] for r in Manifest(tmp_path).rows()} == {a["sha256"], b["sha256"]}
    assert len(Manifest(tmp_path).rows()) == 2


@pytest.mark.parametrize("strategy", [[], ["job.base_size=64"]], ids=["one-stage", "progressive-3-stages"])
def test_images_are_byte_identical_whatever_the_worker_count_and_mode(ray_local, tmp_path, strategy):
    """Also for a progressive render of three stages (base 80x56, 128x88, 196x130): each stage's VAE round trip
    runs on one worker, the stage's tiles on all of them. Seeds stepped together share model calls: where a
    canvas's tiles do not fill whole batches (the one-tile stages here, batch 2), a call holds tiles of both, and
    the batch's composition changes float rounding only (70 dB measured); elsewhere the bytes are the same."""
    import numpy as np

    pixels = {}
    for workers, mode, group in [(1, "bulk", 1), (2, "tile_parallel", 1), (2, "bulk", 1), (1, "bulk", 2)]:
        out = tmp_path / f"{workers}-{mode}-{group}"
        s = render_job(compose(*SMALL, *strategy, f"output.dir={out}", "job.seeds=[7,8]",
                               f"cluster.workers={workers}", f"cluster.mode={mode}", f"cluster.group={group}"),
                       show_progress=False)
        assert s["written"] == 2 and s["mode"] == mode
        rows = sorted(Manifest(out).rows(), key=lambda r: r["seed"])
        assert {r["stages"] for r in rows} == {"80x56>128x88>196x130" if strategy else "196x130"}
        if (workers, mode, group) == (2, "bulk", 1):  # one image a worker, not both on the first
            assert len({r["worker"] for r in rows}) == 2
        pixels[(workers, mode, group)] = [np.asarray(Image.open(out / r["path"]), dtype=np.float64) for r in rows]
    one = pixels.pop((1, "bulk", 1))
    for key, images in pixels.items():
        for a, b in zip(one, images):
            if strategy and key[2] > 1:
                assert 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12)) > 60, key
            else:
                assert np.array_equal(a, b), key


@pytest.mark.parametrize("n, workers, rendered, tail", [(5, 2, 4, 1), (4, 2, 4, 0), (7, 4, 7, 0), (6, 4, 4, 2),
                                                        (3, 1, 3, 0), (9, 8, 8, 1)])
def test_a_last_round_of_at_most_half_the_workers_is_left_to_tile_parallel(n, workers, rendered, tail):
    from cluster.scheduler import whole_rounds

    left = []
    assert list(whole_rounds(iter(range(n)), workers, left)) == list(range(rendered))
    assert left == list(range(rendered, rendered + tail))


def test_too_many_cpu_workers_is_a_clear_error(ray_local, tmp_path):
    from cluster import ClusterError

    with pytest.raises(ClusterError, match="cluster.workers=5"):
        render_job(compose(*SMALL, f"output.dir={tmp_path}", "cluster.workers=5"), show_progress=False)


def run_py(*args, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_run_py_renders_and_sweeps_with_multirun(tmp_path):
    p = run_py("-m", RANDOM, *SMALL, f"output.dir={tmp_path}", "job.seeds=[1],[2]", "tiling.method=uniform,gaussian",
               "cluster.workers=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("1 image(s) written, 0 failed") == 4
    rows = Manifest(tmp_path).rows()
    assert sorted((r["seed"], r["tiling_method"]) for r in rows) == [
        (1, "gaussian"), (1, "uniform"), (2, "gaussian"), (2, "uniform")]
    assert len(list(tmp_path.glob("sweeps/*/multirun.yaml"))) == 1
    page = next(tmp_path.glob("sweeps/*/gallery.html")).read_text()  # one gallery over the sweep's four jobs
    assert page.count('<tr class="item ok"') == 4 and (tmp_path / "gallery.html").is_file()
    assert re.findall(r"<th>([^<]*)</th>", page)[:3] == ["job", "job.seeds", "tiling.method"]
    assert 'data-swept-1="[2]" data-swept-2="gaussian"' in page


def test_regions_render_the_same_bytes_in_bulk_and_tile_parallel(ray_local, tmp_path):
    """The region prompts reach every worker: tile-parallel's driver sends each batch's own prompt."""
    regions = "job.regions=[{box:[0,0,0.4,1],prompt:'a red sky'},{box:[0.5,0.2,1,1],prompt:'blue',weight:0.8}]"
    images = {}
    for name, extra in (("bulk", ["cluster.workers=1"]), ("tile_parallel", ["cluster.workers=2"]),
                        ("none", ["cluster.workers=1"])):
        out = tmp_path / name
        cfg = compose(*SMALL, f"output.dir={out}", *extra, *([] if name == "none" else [regions]))
        s = render_job(cfg, show_progress=False)
        assert s["written"] == 1 and s["mode"] == ("bulk" if name == "none" else name)
        (row,) = Manifest(out).rows()
        assert (row["regions"] is None) == (name == "none")
        images[name] = (out / row["path"]).read_bytes()
    assert images["bulk"] == images["tile_parallel"] != images["none"]


def test_the_color_fix_renders_the_same_bytes_in_bulk_and_tile_parallel(ray_local, tmp_path):
    """`job.color_fix` through three stages: the base's canvases reach the round trips of every later stage, on the
    worker that runs them in either mode."""
    images = {}
    for name, extra in (("bulk", ["cluster.workers=1"]), ("tile_parallel", ["cluster.workers=2"]),
                        ("none", ["cluster.workers=1"])):
        out = tmp_path / name
        cfg = compose(*SMALL, "job.base_size=64", f"output.dir={out}", *extra,
                      *([] if name == "none" else ["job.color_fix=1"]))
        s = render_job(cfg, show_progress=False)
        assert s["written"] == 1 and s["mode"] == ("bulk" if name == "none" else name)
        (row,) = Manifest(out).rows()
        assert row["stages"].count(">") == 2
        images[name] = (out / row["path"]).read_bytes()
    assert images["bulk"] == images["tile_parallel"] != images["none"]


def test_the_default_job_draws_one_landscape_with_the_shipped_demo(ray_local, tmp_path):
    """`python3 run.py`'s job (model=demo: the trained model with its own job and tiling) at 512x288 instead of
    3840x2160: the demo's prompt and seed, a base at the model's own area and one enlarged stage, one sun and one
    horizon (at 3840x2160: BENCHMARKS.md "CPU: the default job")."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests" / "assets"))
    from scenes import count_suns, horizon_jumps

    s = render_job(compose("model=demo", "job.width=512", "job.height=288", f"output.dir={tmp_path}"),
                   show_progress=False)
    assert (s["written"], s["failed"]) == (1, 0)
    (row,) = Manifest(tmp_path).rows()
    assert (row["model"], row["job"], row["prompt"], row["seed"], row["guidance"], row["tiling_method"], row["tile"]) \
        == ("demo", "demo", "a dusk landscape", 1, 4.0, "shifted", 32)
    assert row["stages"] == "344x192>512x288" and row["path"] == f"images/demo/{row['image_id']}.png"
    pixels = np.asarray(Image.open(tmp_path / row["path"]).convert("RGB"))
    assert pixels.shape == (288, 512, 3) and count_suns(pixels) == 1 and horizon_jumps(pixels) < 0.05


def test_run_py_cfg_job_shows_the_resolved_job():
    p = run_py("--cfg", "job", "job.width=1920", "model.dtype=fp16", timeout=60)
    assert p.returncode == 0 and "width: 1920" in p.stdout and "dtype: fp16" in p.stdout


BAD = [
    (["job.width=0"], "job.width=0"),
    (["job.width=-5"], "job.width=-5"),
    (["job.height=100000"], "job.height=100000"),
    (["job.steps=0"], "job.steps=0"),
    (["job.guidance=-1"], "job.guidance=-1"),
    (["job.prompts=[]"], "job.prompts=[]"),
    (["job.scheduler=magic"], "job.scheduler='magic'"),
    (["model.name=nope"], "model.name='nope'"),
    (["model=sd15", "model.path=/no/such/weights"], "model.path='/no/such/weights'"),
    (["tiling.overlap=64"], "tiling.overlap=64"),
    (["job.strength=0"], "job.strength=0"),
    (["job.strength=1.5"], "job.strength=1.5"),
    (["job.stage_factor=1.05"], "job.stage_factor=1.05"),
    (["job.strategy=sideways"], "job.strategy='sideways'"),
    (["job.strength_decay=0"], "job.strength_decay=0"),
    (["job.guide_clock=sundial"], "job.guide_clock='sundial'"),
    (["job.init_image=/no/such/picture.png"], "job.init_image='/no/such/picture.png'"),
    (["model.deep_cache=-1"], "model.deep_cache=-1"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_input_is_one_clear_error_and_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    p = run_py(*args, f"output.dir={out}", timeout=60)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {message}" + p.stderr.strip().split(message, 1)[1]]
    assert not out.exists()


def test_an_unknown_model_config_is_refused_by_name(tmp_path):
    p = run_py("model=nope", f"output.dir={tmp_path / 'out'}", timeout=60)
    assert p.returncode != 0 and "model/nope" in p.stderr and not (tmp_path / "out").exists()


def test_an_unwritable_output_folder_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    p = run_py(f"output.dir={tmp_path / 'file' / 'out'}", timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: output.dir=") and "not writable" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_a_hires_checkpoint_runs_the_stages_alike_in_bulk_and_tile_parallel(ray_local, tmp_path):
    """`model.stage_path`: the base from the model, the enlarged stage from the other weights (the shipped demo's
    folder under the random demo), the same bytes whichever mode ran it; the base is the model's own either way."""
    stage = ["job.base_size=128", "output.keep_stages=true"]
    images, bases = {}, {}
    for name, extra in (("bulk", ["cluster.workers=1"]), ("tile_parallel", ["cluster.workers=2"]),
                        ("none", ["cluster.workers=1"])):
        out = tmp_path / name
        cfg = compose(*SMALL, *stage, f"output.dir={out}", *extra,
                      *([] if name == "none" else [f"model.stage_path={ROOT / 'models' / 'scenes-sd'}"]))
        s = render_job(cfg, show_progress=False)
        assert s["written"] == 1 and s["mode"] == ("bulk" if name == "none" else name)
        (row,) = Manifest(out).rows()
        assert row["stages"].count(">") == 1
        images[name] = (out / row["path"]).read_bytes()
        bases[name] = Image.open(out / row["path"].replace(".png", ".stage0.png")).tobytes()
        assert ("Hires checkpoint: scenes-sd" in Image.open(out / row["path"]).info["parameters"]) == (name != "none")
    assert images["bulk"] == images["tile_parallel"] != images["none"]
    assert bases["bulk"] == bases["tile_parallel"] == bases["none"]
