"""The worker's predictor without Ray: whole images, determinism, and independence from the grouping."""
import os

import numpy as np
import torch
from PIL import Image

from cluster.renderer import Renderer
from conftest import SMALL, compose
from jobs import plan
from tiling.render import denoise_request, groups_of


def _renderer(cfg, threads=None):
    return Renderer(cfg.model, cfg.output, threads)


def test_render_writes_an_exact_size_image_twice_identically(tmp_path):
    cfg = compose(*SMALL, f"output.dir={tmp_path}")
    req = plan(cfg)[0]
    r = _renderer(cfg)
    row = r.render(req)
    assert row["status"] == "ok", row["error"]
    img = Image.open(tmp_path / row["path"])
    assert img.size == (196, 130) and img.text["parameters"].startswith(req.prompt)
    px = np.asarray(img)
    assert px.std() > 1.0  # not a constant picture
    first = (tmp_path / row["path"]).read_bytes()
    again = r.render(req)
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

    assert torch.equal(denoise_request(deal([a]), info, req),
                       denoise_request(deal([b, a]), info, req))


def test_a_failing_image_becomes_a_failed_row(tmp_path):
    cfg = compose(*SMALL, f"output.dir={tmp_path}")
    req = plan(cfg)[0]
    r = _renderer(cfg)

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    r.model.predict = broken
    row = r.render(req)
    assert row["status"] == "failed" and "out of memory" in row["error"]
    assert not (tmp_path / req.path).exists()


def test_each_scheduler_renders(tmp_path):
    for name in ["euler", "euler_a", "ddim", "dpmpp_2m_karras", "unipc"]:
        cfg = compose(*SMALL, f"output.dir={tmp_path}", f"job.scheduler={name}")
        row = _renderer(cfg).render(plan(cfg)[0])
        assert row["status"] == "ok", (name, row["error"])


def test_seeds_stepped_together_give_the_images_rendered_one_by_one(tmp_path):
    """Bulk grouping batches tiles of several canvases per call; each image stays what it is alone."""
    cfg = compose(*SMALL, f"output.dir={tmp_path}", "job.seeds=[1,2,3]")
    reqs = plan(cfg)
    r = _renderer(cfg, threads=1)
    alone = [np.asarray(Image.open(tmp_path / r.render(q)["path"])).astype(int) for q in reqs]
    rows = r.render_group(reqs)
    assert [row["status"] for row in rows] == ["ok"] * 3
    together = [np.asarray(Image.open(tmp_path / row["path"])).astype(int) for row in rows]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(alone, together))
    assert len({row["sha256"] for row in rows}) == 3  # three different seeds, three pictures
    assert r._local.notes is None  # a pass after the group cannot add to its rows' warnings


def test_groups_hold_consecutive_seeds_of_one_prompt():
    cfg = compose(*SMALL, "job.prompts=[a,b]", "job.seeds=[1,2,3]")
    groups = groups_of(plan(cfg), 2)
    assert [[(q.prompt, q.seed) for q in g] for g in groups] == [
        [("a", 1), ("a", 2)], [("a", 3)], [("b", 1), ("b", 2)], [("b", 3)]]
    assert [len(g) for g in groups_of(plan(cfg), 1)] == [1] * 6


def test_a_compiled_model_sees_one_batch_shape(tmp_path):
    """With model.compile a short batch is padded to the step's first and the padding's predictions dropped."""
    cfg = compose(*SMALL, f"output.dir={tmp_path}", "tiling.batch=3", "job.seeds=[1,2]")
    reqs = plan(cfg)  # two seeds stepped together: 8 tiles a step, batches of 3, 3 and 2
    r = _renderer(cfg, threads=1)
    plain = r.render_group(reqs)
    for row in plain:
        os.rename(tmp_path / row["path"], tmp_path / f"plain-{row['seed']}.png")
        row["path"] = f"plain-{row['seed']}.png"
    shapes = []
    predict = r.model.predict
    r.model.predict = lambda x, *a: shapes.append(x.shape[0]) or predict(x, *a)
    r.compiled = True
    padded = r.render_group(reqs)
    assert set(shapes) == {3} and [row["status"] for row in padded] == ["ok", "ok"]
    for p, q in zip(plain, padded):
        a, b = (np.asarray(Image.open(tmp_path / row["path"])).astype(int) for row in (p, q))
        assert np.abs(a - b).max() <= 1  # a batch of 3 and one of 2 round differently, nothing more


def test_automatic_batch_on_a_cpu_is_four(tmp_path):
    cfg = compose(*SMALL, f"output.dir={tmp_path}", "tiling.batch=0")
    r = _renderer(cfg, threads=1)
    assert r.batch_size(plan(cfg)[0]) == 4 and r.render(plan(cfg)[0])["status"] == "ok"


def test_a_pass_the_other_workers_wait_on_runs_on_their_threads_and_each_call_on_its_own(tmp_path):
    """Tile-parallel mode lends the waiting workers' threads to worker 0's round trips and one-tile decodes
    (`lent`); a thread that starts meanwhile starts from that count (OpenMP's), and a call sets the worker's own."""
    import threading

    old = torch.get_num_threads()
    r, seen, lent = _renderer(compose(*SMALL, f"output.dir={tmp_path}"), threads=1), {}, min(2, os.cpu_count())

    def fresh():
        seen["fresh"] = torch.get_num_threads()
        r._set_threads()
        seen["own"] = torch.get_num_threads()
    try:
        with r._threads(lent=2):
            seen["lent"] = torch.get_num_threads()
            t = threading.Thread(target=fresh)
            t.start()
            t.join()
        seen["after"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    assert seen == {"lent": lent, "fresh": lent, "own": 1, "after": 1}


def test_an_automatic_vae_tile_decodes_the_whole_frame_when_it_fits(tmp_path, monkeypatch):
    """`tiling.vae_tile=0`: the whole frame (one sweep, the exact full-frame decode: the bytes of a tile that
    covers the canvas) where memory allows, the ladder's tiles where it does not (the bytes of that tile)."""
    import cluster.renderer as renderer

    def rendered(*overrides):
        cfg = compose(*SMALL, f"output.dir={tmp_path}", "job.strategy=direct", *overrides)
        row = r.render(plan(cfg)[0])
        assert row["status"] == "ok", row["error"]
        return row, np.asarray(Image.open(tmp_path / row["path"]))  # the files differ: the id is in them

    r = _renderer(compose(*SMALL, f"output.dir={tmp_path}"), threads=1)
    (auto, a), (_, whole) = rendered("tiling.vae_tile=0"), rendered("tiling.vae_tile=32")  # 32 covers 25x17
    assert np.array_equal(a, whole) and np.isnan(auto["seam_score_vae"])
    monkeypatch.setattr(renderer, "free_memory", lambda device, share: 1.0)  # nothing fits: the smallest tile
    (tight, t), (tiled, t16) = rendered("tiling.vae_tile=0"), rendered("tiling.vae_tile=16")
    assert np.array_equal(t, t16) and not np.array_equal(t, whole)
    assert tight["seam_score_vae"] == tiled["seam_score_vae"] and not np.isnan(tight["seam_score_vae"])


def test_a_decode_beside_the_next_denoise_gives_the_same_pictures(tmp_path, monkeypatch):
    """`Renderer.overlap` (on for a GPU without offload; forced here on the CPU, where it runs without a stream):
    from the second image on, the decode runs under the decode lock alone while the other call denoises, with
    the VAE tile chosen alone: the same bytes as one call at a time. Out of memory beside a denoise, the group is
    decoded again alone and the row is ok."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = compose(*SMALL, f"output.dir={tmp_path / 'serial'}", "job.seeds=[1,2,3,4]", "tiling.vae_tile=0")
    reqs = plan(cfg)
    serial = _renderer(cfg, threads=1)
    assert not serial.overlap  # a CPU: off by default
    expected = [serial.render(req)["sha256"] for req in reqs]

    cfg.output.dir = str(tmp_path / "beside")
    r = _renderer(cfg, threads=1)
    r.overlap, calls, inner = True, [], r._decode

    def decode(req, z, tile=None):
        calls.append(tile)
        if tile is not None and calls.count(None) == 1 and len(calls) == 2:  # the first decode beside
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return inner(req, z, tile)

    monkeypatch.setattr(r, "_decode", decode)
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda req: r.render_group([req])[0], reqs))
    assert [row["status"] for row in rows] == ["ok"] * 4, [row["error"] for row in rows]
    assert [row["sha256"] for row in rows] == expected
    # the first alone (its VAE tile chosen: the whole 25x17 frame), the second beside (out of memory), then in
    # either order that one again alone and the last two beside
    assert calls[:2] == [None, 25] and sorted(calls[2:], key=lambda t: t is None) == [25, 25, None]


def test_a_round_trip_between_stages_beside_the_other_call_gives_the_same_pictures(tmp_path, monkeypatch):
    """A progressive render's round trip (decode, resize, encode that start the next stage) lets the device lock go
    once the group's denoise peak is known and its VAE tiles were chosen alone: it runs under the decode lock while
    the other call denoises, with those tiles, and the pictures are the bytes of one call at a time. Out of memory
    there, the round trip runs again alone and the row is ok (`overlap` forced on the CPU, which has no stream)."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = compose(*SMALL, "job.base_size=64", f"output.dir={tmp_path / 'serial'}", "job.seeds=[1,2,3,4]",
                  "tiling.vae_tile=0")
    reqs = plan(cfg)
    serial = _renderer(cfg, threads=1)
    expected = [serial.render(req)["sha256"] for req in reqs]

    cfg.output.dir = str(tmp_path / "beside")
    r = _renderer(cfg, threads=1)
    r.overlap, trips, inner = True, [], r._round_trip

    def round_trip(reqs, number, zs, stage, bases=None, planned=False):
        trips.append(planned)
        if planned and trips.count(True) == 1:  # the first beside a denoise
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return inner(reqs, number, zs, stage, bases, planned=planned)

    monkeypatch.setattr(r, "_round_trip", round_trip)
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda req: r.render_group([req])[0], reqs))
    assert [row["status"] for row in rows] == ["ok"] * 4, [row["error"] for row in rows]
    assert [row["stages"] for row in rows] == ["80x56>128x88>196x130"] * 4
    assert [row["sha256"] for row in rows] == expected
    # two round trips an image: the first image's alone (its peak measured, its tiles chosen; the second image's
    # too where it began before that peak was known), the later ones beside but for the one that ran out of
    # memory, which ran again alone
    assert len(trips) == 9 and trips[:2] == [False, False] and trips.count(True) in (4, 6), trips


def test_a_vae_pass_that_does_not_fit_beside_the_denoiser_sends_it_to_the_cpu(tmp_path, monkeypatch):
    """Where even the smallest VAE tile does not fit (the latent-resolution stage runs over the whole canvas: SDXL at
    7680x4320 on a 12 GB card), a round trip or decode done alone parks the denoisers and text encoders
    (`Adapter.parked`) and chooses its tile in the memory that leaves; a plan made so never runs beside a denoise.
    The same bytes as a renderer with memory to spare (`parks` and `overlap` forced: this runs on a CPU, where
    parking moves nothing; the free memory is faked)."""
    from contextlib import contextmanager

    import cluster.renderer as renderer

    cfg = compose(*SMALL, "job.base_size=64", f"output.dir={tmp_path / 'roomy'}", "job.seeds=[1,2]",
                  "tiling.vae_tile=0")
    reqs = plan(cfg)
    expected = [row["sha256"] for row in map(_renderer(cfg, threads=1).render, reqs)]

    cfg.output.dir = str(tmp_path / "tight")
    r = _renderer(cfg, threads=1)
    r.parks = r.overlap = True
    parked = []

    @contextmanager
    def park():
        parked.append(len(parked))
        yield

    monkeypatch.setattr(r.model, "parked", park)
    monkeypatch.setattr(renderer, "free_memory", lambda device, share: share * (1e12 if r._parked else 1.0))
    trips, inner = [], r._round_trip
    monkeypatch.setattr(r, "_round_trip", lambda *a, planned=False: trips.append(planned) or inner(*a, planned))
    rows = [r.render_group([req])[0] for req in reqs]
    assert [row["status"] for row in rows] == ["ok"] * 2, [row["error"] for row in rows]
    assert [row["sha256"] for row in rows] == expected
    assert trips == [False] * 4 and len(parked) == 6  # two round trips and a decode an image, each parked
    assert all(plan_[2] for plan_ in r._vae_plans.values()) and not r._parked


def test_parked_weights_come_back_from_one_host_copy(tmp_path):
    """`Adapter.parked` on the CPU (where the renderer never calls it: its host copies are CPU tensors too): inside
    and after, the denoiser's and text encoder's weights hold their values; a second park reuses the host copies the
    first made (the weights do not change); the VAE is not touched."""
    r = _renderer(compose(*SMALL, f"output.dir={tmp_path}"), threads=1)
    m = r.model
    weights = {name: t.clone() for name, t in m.unet.state_dict().items()}
    vae = [t.data_ptr() for t in m.vae.parameters()]
    parks = []
    for _ in range(2):
        with m.parked():
            parks.append({id(t): m._host[id(t)] for t in (*m.unet.parameters(), *m.text_encoder.parameters())})
            assert all(t.data_ptr() == parks[-1][id(t)].data_ptr() for t in m.unet.parameters())
        assert all(torch.equal(t, weights[name]) for name, t in m.unet.state_dict().items())
        assert [t.data_ptr() for t in m.vae.parameters()] == vae
    assert parks[0].keys() == parks[1].keys() and all(parks[1][k] is v for k, v in parks[0].items())
    assert r.render(plan(compose(*SMALL, f"output.dir={tmp_path}"))[0])["status"] == "ok"


def test_a_vae_pass_out_of_memory_beside_the_resident_denoiser_runs_again_parked(tmp_path, monkeypatch):
    """The estimate said the pass fits beside the denoisers, the allocator disagreed: each decode or encode alone
    that runs out of memory so runs once more with them parked, and the rows are ok, their bytes those of a
    renderer that never ran short, and their warnings say it once (`parks` forced; the first try of each pass fails
    here)."""
    from contextlib import contextmanager

    import cluster.renderer as renderer

    cfg = compose(*SMALL, "job.base_size=64", f"output.dir={tmp_path / 'roomy'}", "job.seeds=[1]")
    req = plan(cfg)[0]
    expected = _renderer(cfg, threads=1).render(req)["sha256"]

    cfg.output.dir = str(tmp_path / "short")
    r = _renderer(cfg, threads=1)
    r.parks, parked, tries = True, [], []

    @contextmanager
    def park():
        parked.append(1)
        yield

    def short(inner):
        def run(*a, **k):
            tries.append(r._parked)
            if not r._parked:
                raise torch.OutOfMemoryError("CUDA out of memory (test)")
            return inner(*a, **k)
        return run

    monkeypatch.setattr(r.model, "parked", park)
    monkeypatch.setattr(renderer, "decode_tiled_shared", short(renderer.decode_tiled_shared))
    monkeypatch.setattr(renderer, "encode_tiled", short(renderer.encode_tiled))
    row = r.render(req)
    assert row["status"] == "ok", row["error"]
    assert row["sha256"] == expected and row["warnings"] == ("CUDA out of memory in a VAE pass beside the resident "
                                                             "denoisers: ran again with them parked")
    assert len(parked) == 3 and not r._parked  # two round trips and the final decode, each parked on its retry
    assert tries == [False, True, True, False, True, True, False, True]  # a trip's encode runs parked with its decode


def test_a_vae_pass_out_of_memory_even_parked_fails_its_row_without_denoising_again(tmp_path, monkeypatch):
    """Out of memory in a VAE pass with the denoisers parked: the row fails at once, saying where; the group is not
    started again at smaller denoise tile batches (which would not change the pass)."""
    from contextlib import nullcontext

    import cluster.renderer as renderer

    cfg = compose(*SMALL, "job.base_size=64", f"output.dir={tmp_path}", "job.seeds=[1]")
    r = _renderer(cfg, threads=1)
    r.parks, denoises = True, []
    monkeypatch.setattr(r.model, "parked", nullcontext)  # nothing to move on a CPU

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    inner = r._denoise
    monkeypatch.setattr(r, "_denoise", lambda *a: denoises.append(a[1]) or inner(*a))
    monkeypatch.setattr(renderer, "encode_tiled", oom)
    row = r.render(plan(cfg)[0])
    assert row["status"] == "failed" and denoises == [2]
    assert row["error"].startswith("CUDA out of memory in a VAE pass, the denoisers parked")
    assert row["warnings"].endswith("in a VAE pass beside the resident denoisers: ran again with them parked")
