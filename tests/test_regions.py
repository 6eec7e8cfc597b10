"""Region prompts (tiling.regions, job.regions): the masks, the fusion against MultiDiffusion's formula, what it
costs, the config's errors and ids, and the test-bed model drawing each region's palette at a small size."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import SMALL, compose
from jobs import ConfigError, plan, validate
from tiling import TileBatch, fuse, layout, tile_weights, weight_sum
from tiling.fuse import crop
from tiling.regions import Region, box_profile, region_masks, region_predict

ROOT = Path(__file__).resolve().parents[1]
THIRDS = [Region((0.0, 0.0, 1 / 3, 1.0)), Region((2 / 3, 0.0, 1.0, 1.0))]


def test_masks_replace_the_background_inside_a_box_with_soft_edges_and_none_at_the_picture_border():
    m = region_masks(THIRDS, 10, 90)  # [3, h, w]: background, left, right
    assert m.shape == (3, 10, 90)
    assert torch.equal(m[:, :, 0], torch.tensor([[0.0], [1.0], [0.0]]).expand(3, 10))  # left edge: the box, no ramp
    assert torch.equal(m[:, :, 45], torch.tensor([[1.0], [0.0], [0.0]]).expand(3, 10))  # the middle: background
    assert torch.equal(m[:, :, 89], torch.tensor([[0.0], [0.0], [1.0]]).expand(3, 10))
    left = m[1, 0]
    ramp = left[26:35]  # feather 0.05 of 90 columns, 4.5 wide, centred on 30
    assert (ramp[1:] <= ramp[:-1]).all() and 0 < left[29] < 1 and 0 < left[30] < 1
    assert torch.allclose(m.sum(0), torch.ones(10, 90))  # weight 1 everywhere: a partition of unity
    hard = region_masks([Region((0.25, 0.0, 0.75, 1.0), feather=0.0)], 4, 8)[1, 0]
    assert hard.tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.9), st.floats(0, 0.9), st.floats(0.05, 1), st.floats(0.05, 1),
                          st.floats(0, 3), st.floats(0, 0.5)), min_size=1, max_size=3),
       st.integers(4, 40), st.integers(4, 40))
def test_contributions_are_never_negative_and_their_sum_never_zero(boxes, h, w):
    regions = [Region((x0, y0, min(1.0, x0 + dx), min(1.0, y0 + dy)), wt, f) for x0, y0, dx, dy, wt, f in boxes]
    m = region_masks(regions, h, w)
    assert (m >= 0).all() and (m.sum(0) > 0).all()
    assert box_profile(w, 0.0, 1.0, 0.3).eq(1).all()  # the whole picture: no edge anywhere


def fake_predict(calls: list):
    """A model whose prediction depends on the prompt, the tile's place and its input: it records every call."""
    def predict(batches, t):
        calls.append([(b.prompt, len(b.tiles)) for b in batches])
        return [torch.stack([x * (1 + b.prompt) + torch.sin(torch.arange(x.numel(), dtype=torch.float32)
                                                            .view_as(x) * (tile.y + 2 * tile.x + 3 * b.prompt + 1))
                             for x, tile in zip(b.x, b.tiles)]) for b in batches]
    return predict


@pytest.mark.parametrize("method", ["uniform", "gaussian"])
def test_fusion_is_multidiffusions_region_formula(method):
    """sum_{t,p} W_t C_p eps_{t,p} / sum_{t,p} W_t C_p, computed here directly, against the wrapped predict fused
    as the denoise loop fuses it."""
    h, w, batch = 24, 70, 3
    x = torch.randn(4, h, w, generator=torch.Generator().manual_seed(0))
    tiles = layout(h, w, 16, 6)
    regions = [Region((0.0, 0.0, 0.4, 1.0), 1.0, 0.1), Region((0.6, 0.2, 1.0, 0.9), 0.7, 0.05)]
    calls = []
    wrapped = region_predict(fake_predict(calls), regions, batch)
    cuts = [crop(x, t) for t in tiles]
    batches = [TileBatch(torch.stack(cuts[i:i + batch]), tuple(tiles[i:i + batch]), (h, w))
               for i in range(0, len(tiles), batch)]
    preds = torch.cat(wrapped(batches, torch.tensor(500)))
    W = tile_weights(16, 16, method)
    got = fuse(preds, tiles, W, weight_sum(tiles, W, h, w))

    C = region_masks(regions, h, w)
    plain = fake_predict([])
    num, den = torch.zeros(4, h, w), torch.zeros(h, w)
    for tile in tiles:
        for p in range(3):
            eps = plain([TileBatch(crop(x, tile)[None], (tile,), (h, w), p)], 0)[0][0]
            cw = crop(C[p:p + 1], tile)[0] * W
            num[(slice(None),) + tile.slices] += eps * cw
            den[tile.slices] += cw
    assert torch.allclose(got, num / den, atol=1e-5)

    # each call is one prompt's tiles, at most `batch`; a tile is predicted under the prompts it touches only
    flat = [c for step in calls for c in step]
    assert all(n <= batch for _, n in flat)
    touching = sum(int((crop(C, t)[p] > 0).any()) for t in tiles for p in range(3))
    assert sum(n for _, n in flat) == touching < 3 * len(tiles)


def test_a_tile_under_one_prompt_costs_one_prediction_and_is_returned_as_is():
    calls = []
    x = torch.randn(2, 4, 8, 8)
    tiles = (layout(8, 64, 8, 0)[0], layout(8, 64, 8, 0)[4])  # in the left box; in the middle
    wrapped = region_predict(fake_predict(calls), [Region((0.0, 0.0, 0.3, 1.0), feather=0.0)], 4)
    out = wrapped([TileBatch(x, tiles, (8, 64))], 0)[0]
    assert sorted(calls[0]) == [(0, 1), (1, 1)]
    plain = fake_predict([])
    assert torch.equal(out[0], plain([TileBatch(x[:1], tiles[:1], (8, 64), 1)], 0)[0][0])
    assert torch.equal(out[1], plain([TileBatch(x[1:], tiles[1:], (8, 64), 0)], 0)[0][0])


BAD = [("[{box:[0,0,1.2,1],prompt:a}]", "job.regions[0].box", "[0, 1]"),
       ("[{box:[-0.1,0,1,1],prompt:a}]", "job.regions[0].box", "[0, 1]"),
       ("[{box:[0.5,0,0.5,1],prompt:a}]", "job.regions[0].box", "x0 must be less than x1"),
       ("[{box:[0,0.6,1,0.2],prompt:a}]", "job.regions[0].box", "y0 must be less than y1"),
       ("[{box:[0,0,1],prompt:a}]", "job.regions[0].box", "four numbers"),
       ("[{box:[0,0,1,1],prompt:a},{box:[0,0,1,1],prompt:a,weight:-1}]", "job.regions[1].weight", "from 0"),
       ("[{box:[0,0,1,1],prompt:a,feather:0.7}]", "job.regions[0].feather", "0.5"),
       ("[{box:[0,0,1,1],prompt:''}]", "job.regions[0].prompt", "non-empty")]


@pytest.mark.parametrize("value,field,why", BAD)
def test_bad_regions_are_one_config_error_naming_the_field(value, field, why):
    with pytest.raises(ConfigError) as e:
        validate(compose(f"job.regions={value}"))
    assert e.value.field_name == field and why in str(e.value)


def test_a_bad_box_stops_run_py_with_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "run.py", "job.regions=[{box:[0,0,1.5,1],prompt:a}]", f"output.dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: job.regions[0].box=[0.0, 0.0, 1.5, 1.0]: must lie in [0, 1]" in r.stderr
    assert not out.exists()


def test_regions_enter_the_id_the_row_and_the_parameters_and_no_regions_keeps_the_id():
    base = plan(compose(*SMALL))[0]
    assert base.regions == () and base.manifest_row()["regions"] is None
    one = "job.regions=[{box:[0,0,0.5,1],prompt:'a dusk landscape'}]"
    req = plan(compose(*SMALL, one))[0]
    assert req.image_id != base.image_id
    assert req.prompt_pairs() == ((base.prompt, ""), ("a dusk landscape", ""))
    assert '"prompt": "a dusk landscape"' in req.manifest_row()["regions"] and "Regions: [" in req.parameters_text()
    others = ["job.regions=[{box:[0,0,0.6,1],prompt:'a dusk landscape'}]",
              "job.regions=[{box:[0,0,0.5,1],prompt:'a night landscape'}]",
              "job.regions=[{box:[0,0,0.5,1],prompt:'a dusk landscape',weight:0.5}]",
              "job.regions=[{box:[0,0,0.5,1],prompt:'a dusk landscape',feather:0.1}]",
              "job.regions=[{box:[0,0,0.5,1],prompt:'a dusk landscape',negative_prompt:sun}]"]
    ids = {plan(compose(*SMALL, o))[0].image_id for o in others}
    assert len(ids) == len(others) and req.image_id not in ids
    templated = plan(compose(*SMALL, one, "job.prompt_template='{prompt}, wallpaper'",
                             "job.negative_prompt=blurry"))[0]
    assert templated.regions[0].prompt == "a dusk landscape, wallpaper"  # the template wraps region prompts too
    assert templated.regions[0].negative_prompt == "blurry"  # unset: the job's


# --- the test-bed model: each third in its own palette, through the progressive strategy's base and stage --------

ASSETS = Path(__file__).resolve().parent / "assets"
# the shipped demo model under the default job and tiling (the demo's own are for 3840x2160 on a CPU)
TESTBED = ["model=demo", "job=default", "tiling=default", "model.dtype=fp32", "tiling.tile=32", "tiling.overlap=8",
           "tiling.batch=8", "tiling.vae_tile=128", "tiling.vae_passes=1", "job.guidance=4", "job.steps=25",
           "job.seeds=[1]", "job.prompts=['a day landscape']"]
REGIONS = ("job.regions=[{box:[0,0,0.3333333333,1],prompt:'a dusk landscape'},"
           "{box:[0.6666666667,0,1,1],prompt:'a night landscape'}]")


@pytest.mark.usefixtures("one_thread")
def test_the_test_bed_draws_each_region_in_its_palette(tmp_path):
    """768x256 rendered directly (each third about one tile of the model's 256 px): the final latent's thirds, each
    decoded on its own, are nearest their own palettes (the mean colours of the test bed's training scenes), one
    sun a third at most; every prompt is encoded once. (Decoded as one picture, the test bed's VAE repaints three
    palettes in one: its GroupNorm statistics over a whole picture always meant one palette. BENCHMARKS.md
    "Region prompts" measures the progressive strategy at 1536x512.)"""
    sys.path.insert(0, str(ASSETS))
    from scenes import count_suns, scenes

    from cluster.renderer import Renderer
    from tiling import to_uint8
    from tiling.render import denoise_request

    cfg = compose(*TESTBED, "job.width=768", "job.height=256", "job.strategy=direct", REGIONS, f"output.dir={tmp_path}")
    renderer = Renderer(cfg.model, cfg.output)
    req = plan(cfg)[0]
    conds = [renderer.model.encode(*pair) for pair in req.prompt_pairs()]
    z = denoise_request(lambda bs, t: [renderer._predict(b, t, conds[b.prompt], req.guidance) for b in bs],
                        renderer.info(), req)
    assert len(renderer.model._cache) == 3  # background, dusk, night: each encoded once
    g = torch.Generator().manual_seed(0)
    means = {w: ((scenes(32, 64, [w] * 32, g).mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()
             for w in ("dusk", "day", "night")}
    for k, want in enumerate(("dusk", "day", "night")):
        with torch.no_grad():
            third = to_uint8(renderer.model.decode(z[..., 32 * k:32 * (k + 1)])[0], 256, 256)
        mean = third.reshape(-1, 3).mean(0)
        nearest = min(means, key=lambda p: np.linalg.norm(mean - means[p]))
        assert nearest == want, (k, mean.round(1).tolist(), {p: m.round(1).tolist() for p, m in means.items()})
        assert count_suns(third) <= 1


def test_regions_hold_through_the_base_every_stage_and_the_dilated_views(tmp_path):
    """A progressive render of three stages (the demo model): every denoise loop, and the dilated views of the
    enlarged stages (batches the size of a view, not of a tile), predict under all three prompts."""
    from cluster.renderer import Renderer

    cfg = compose(*SMALL, "job.base_size=64", "job.dilation=1", "job.steps=6", "job.strength=0.5",
                  f"output.dir={tmp_path}",
                  "job.regions=[{box:[0,0,0.3,1],prompt:'a red sky'},{box:[0.6,0,1,1],prompt:'blue'}]")
    renderer = Renderer(cfg.model, cfg.output, threads=1)
    seen, plain = set(), renderer._predict

    def spy(b, t, cond, guidance, pad_to=0, model=None, features=None):
        seen.add((b.canvas, b.prompt, b.tiles[0].h))
        return plain(b, t, cond, guidance, pad_to, model, features)

    renderer._predict = spy
    row = renderer.render(plan(cfg)[0])
    assert row["status"] == "ok", row["error"]
    assert row["stages"] == "80x56>128x88>196x130"
    canvases = {c for c, _, _ in seen}
    assert {(7, 10), (11, 16), (17, 25)} <= canvases  # the base and both stages' latent canvases
    assert len(canvases) > 3  # and the dilated views' own sizes
    for c in canvases:
        assert {p for cc, p, _ in seen if cc == c} == {0, 1, 2}, c


def test_bootstrapping_predicts_each_prompt_on_its_own_part_early_and_never_a_lone_prompts_tile():
    """MultiDiffusion's bootstrapping: while t >= until, a tile under several prompts is predicted under each with
    the rest of the tile replaced by noise at the step's level; later, and for a tile under one prompt, the input
    as it is."""
    from tiling.regions import Bootstrap

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = layout(8, 64, 8, 0)
    tiles = (grid[0], grid[2])  # inside the box; across its (hard) edge at 0.3 (pixel centres: columns 0..18 inside)
    seen = []

    def record(batches, t):
        seen.extend((b.prompt, tile, xi.clone()) for b in batches for tile, xi in zip(b.tiles, b.x))
        return [b.x.clone() for b in batches]

    wrapped = region_predict(record, [Region((0.0, 0.0, 0.3, 1.0), feather=0.0)], 4,
                             Bootstrap(until=500, levels=lambda t: (0.6, 0.8)))
    wrapped([TileBatch(x, tiles, (8, 64))], torch.tensor(700))
    inputs = {(p, tile): xi for p, tile, xi in seen}
    assert torch.equal(inputs[(1, grid[0])], x[0])  # one prompt: untouched
    edge = grid[2]  # columns 16..23: 16..18 in the box (prompt 1), 19..23 outside (prompt 0)
    inside, outside = (..., slice(0, 3)), (..., slice(3, 8))
    assert torch.equal(inputs[(1, edge)][inside], x[1][inside]) and not torch.equal(inputs[(1, edge)][outside],
                                                                                    x[1][outside])
    assert torch.equal(inputs[(0, edge)][outside], x[1][outside]) and not torch.equal(inputs[(0, edge)][inside],
                                                                                      x[1][inside])
    assert 0.5 < inputs[(0, edge)][inside].std() < 1.1  # noise at the level's 0.8
    seen.clear()
    wrapped([TileBatch(x, tiles, (8, 64))], torch.tensor(400))
    assert all(torch.equal(xi, x[list(tiles).index(tile)]) for _, tile, xi in seen)  # after: inputs as they are


def test_noise_levels_follow_the_schedulers():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from tiling.regions import noise_levels

    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    a, s = noise_levels(ddim)(999)
    assert abs(a * a + s * s - 1) < 1e-9 and s > 0.99
    assert noise_levels(FlowMatchEulerDiscreteScheduler())(250) == (0.75, 0.25)
