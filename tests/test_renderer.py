"""The worker's predictor without Ray: whole images, determinism, and independence from the grouping."""
import numpy as np
import torch
from PIL import Image

from cluster.renderer import Renderer, denoise_request
from conftest import SMALL, compose
from jobs import plan


def _renderer(cfg, threads=None):
    return Renderer(cfg.model, cfg.output, threads)


def test_render_writes_an_exact_size_image_twice_identically(tmp_path):
    cfg = compose(*SMALL, f"output.dir={tmp_path}")
    req = plan(cfg)[0]
    r = _renderer(cfg)
    row = r.render(req, cfg.tiling)
    assert row["status"] == "ok", row["error"]
    img = Image.open(tmp_path / row["path"])
    assert img.size == (196, 130) and img.text["parameters"].startswith(req.prompt)
    px = np.asarray(img)
    assert px.std() > 1.0  # not a constant picture
    first = (tmp_path / row["path"]).read_bytes()
    again = r.render(req, cfg.tiling)
    assert again["sha256"] == row["sha256"] and (tmp_path / row["path"]).read_bytes() == first
    assert row["seconds_denoise"] > 0 and row["seconds_decode"] > 0 and row["bytes"] == len(first)


def test_the_canvas_does_not_depend_on_which_worker_answers(tmp_path):
    """Batches dealt round-robin to two predictors give exactly the canvas of one."""
    cfg = compose(*SMALL, f"output.dir={tmp_path}")
    req = plan(cfg)[0]
    a, b = _renderer(cfg, threads=1), _renderer(cfg, threads=1)
    info = a.info()

    def deal(workers):
        return lambda bs, t: [workers[k % len(workers)].predict(x, t, req.prompt, req.negative_prompt, req.guidance)
                              for k, x in enumerate(bs)]

    assert torch.equal(denoise_request(deal([a]), info, req, cfg.tiling),
                       denoise_request(deal([b, a]), info, req, cfg.tiling))


def test_a_failing_image_becomes_a_failed_row(tmp_path):
    cfg = compose(*SMALL, f"output.dir={tmp_path}")
    req = plan(cfg)[0]
    r = _renderer(cfg)

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    r.model.predict = broken
    row = r.render(req, cfg.tiling)
    assert row["status"] == "failed" and "out of memory" in row["error"]
    assert not (tmp_path / req.path).exists()


def test_each_scheduler_renders(tmp_path):
    for name in ["euler", "euler_a", "ddim", "dpmpp_2m_karras", "unipc"]:
        cfg = compose(*SMALL, f"output.dir={tmp_path}", f"job.scheduler={name}")
        row = _renderer(cfg).render(plan(cfg)[0], cfg.tiling)
        assert row["status"] == "ok", (name, row["error"])
