"""The progressive strategy: stage geometry, the img2img start, dilated views, and the stages on the random-weight
demo model."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tiling.progressive import (base_size, dilated_views, dilation_stride, first_step, gaussian_blur, resize, stage_sizes,
                                undilate)

sides = st.integers(64, 8192).map(lambda v: v // 8 * 8)


@given(w=sides, h=sides, native=st.sampled_from([256, 512, 1024]), factor=st.floats(1.1, 4.0),
       align=st.sampled_from([8, 16]))
@settings(max_examples=300, deadline=None)
def test_stages_end_at_the_exact_size_and_grow_by_at_most_the_factor(w, h, native, factor, align):
    sizes = stage_sizes(w, h, native, factor, align)
    assert sizes[-1] == (w, h)
    if w * h <= base_size(w, h, native, align)[0] * base_size(w, h, native, align)[1]:
        assert sizes == [(w, h)]  # no larger than the base: one stage, the direct render
        return
    assert sizes[0] == base_size(w, h, native, align)
    for (w0, h0), (w1, h1) in zip(sizes, sizes[1:]):
        assert w1 >= w0 - align and h1 >= h0 - align  # each side grows, but for rounding to `align`
        # each stage's ratio is at most the factor, up to the rounding of a side to `align`
        assert max(w1 / w0, h1 / h0) <= factor * (1 + align / min(w0, h0)) + 1e-9
    for sw, sh in sizes[:-1]:
        assert sw % align == 0 and sh % align == 0


@given(w=sides, h=sides, native=st.sampled_from([256, 512, 1024]))
def test_the_base_has_the_native_area_and_the_target_aspect(w, h, native):
    bw, bh = base_size(w, h, native)
    assert bw % 8 == 0 and bh % 8 == 0
    if min(bw, bh) >= 64:  # rounding to 8 px moves a small side by up to 4 px
        assert abs(bw * bh / native ** 2 - 1) < 0.15
        assert abs((bw / bh) / (w / h) - 1) < 0.15


def test_stage_sizes_of_the_issue():
    assert base_size(1920, 1080, 256) == (344, 192)
    assert stage_sizes(1920, 1080, 256, 2.0) == [(344, 192), (608, 344), (1080, 608), (1920, 1080)]
    assert stage_sizes(3840, 2160, 1024, 2.0) == [(1368, 768), (2288, 1288), (3840, 2160)]
    assert stage_sizes(256, 256, 256, 2.0) == [(256, 256)]
    # from an existing picture: its size first, then the stages up to the target (one stage if it is large)
    assert stage_sizes(1024, 576, 256, 2.0, start=(512, 288)) == [(512, 288), (1024, 576)]
    assert stage_sizes(512, 288, 256, 2.0, start=(1024, 576)) == [(1024, 576), (512, 288)]


def test_first_step_counts_as_diffusers_img2img():
    assert [first_step(25, s) for s in (1.0, 0.5, 0.3, 0.01)] == [0, 13, 18, 24]
    assert first_step(9, 0.5) == 5


@given(c=st.integers(1, 5), h=st.integers(1, 40), w=st.integers(1, 40), stride=st.integers(1, 5),
       multiple=st.sampled_from([1, 2]))
@settings(max_examples=200, deadline=None)
def test_dilated_views_put_back_give_the_canvas(c, h, w, stride, multiple):
    x = torch.randn(c, h, w)
    views = dilated_views(x, stride, multiple)
    assert len(views) == stride * stride and len({v.shape for v in views}) == 1
    assert views[0].shape[-1] % multiple == 0 and views[0].shape[-2] % multiple == 0
    assert torch.equal(undilate(views, stride, x), x)
    assert torch.equal(views[-1][:, 0, 0], x[:, min(stride - 1, h - 1), min(stride - 1, w - 1)]) or h < stride or w < stride


def test_dilation_stride_and_blur():
    assert dilation_stride(32, 32, 32) == 1 and dilation_stride(135, 240, 32) == 6
    x = torch.randn(1, 4, 20, 30)
    y = gaussian_blur(x, 0.8, 2)
    assert y.shape == x.shape and not torch.equal(x, y) and y.std() < x.std()  # smoother
    torch.testing.assert_close(y[..., 5:-5, 5:-5].mean(), x[..., 5:-5, 5:-5].mean(), atol=0.05, rtol=0)
    const = torch.full((1, 2, 9, 9), 0.7)
    torch.testing.assert_close(gaussian_blur(const, 1.0, 3), const)  # the weights sum to 1
    assert torch.equal(gaussian_blur(x, 0.0, 2), x)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.sampled_from(["x", "y", "both"]), st.sampled_from([0.5, 2, 3]))
def test_a_wrapped_axis_is_resized_and_blurred_as_the_periodic_signal_it_is(shift, wrap, factor):
    """Around a seamless panorama's seam: rolling the input along a wrapped axis rolls the enlarged (or
    shrunk) picture and the blurred one by the same amount, scaled, which zero, edge or reflect padding breaks."""
    x = torch.randn(1, 3, 16, 24)
    flags = {"wrap_y": wrap in ("y", "both"), "wrap_x": wrap in ("x", "both")}
    dims = [d for d, on in ((-2, flags["wrap_y"]), (-1, flags["wrap_x"])) if on]
    roll = lambda z, k: torch.roll(z, [k] * len(dims), dims)  # noqa: E731
    size = (int(16 * factor), int(24 * factor))
    k = shift * 2  # an even shift: whole output pixels at factor 0.5 too
    torch.testing.assert_close(resize(roll(x, k), size, **flags), roll(resize(x, size, **flags), int(k * factor)),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(gaussian_blur(roll(x, shift), 1.5, 4, **flags),
                               roll(gaussian_blur(x, 1.5, 4, **flags), shift), atol=1e-4, rtol=0)
    assert not torch.allclose(resize(roll(x, k), size), roll(resize(x, size), int(k * factor)), atol=1e-3)
    assert torch.equal(resize(x, (16, 24), **flags), x)


def test_cosine_weight_runs_from_one_to_zero():
    from tiling.progressive import cosine_weight

    assert cosine_weight(1000, 1000, 3) == pytest.approx(1.0)
    assert cosine_weight(0, 1000, 3) == pytest.approx(0.0)
    assert cosine_weight(500, 1000, 1) == pytest.approx(0.5)
    assert math.isclose(cosine_weight(500, 1000, 3), 0.125)
    # on a stage's own clock (job.guide_clock=stage) the weight is 1 at the stage's first timestep
    assert cosine_weight(300, 300, 0.5) == pytest.approx(1.0) and cosine_weight(150, 300, 1) == pytest.approx(0.5)


def _stages(*overrides, native=256):
    from jobs import plan
    from tiling.render import ModelInfo, stage_tile, stages_of

    req = plan(compose(*overrides))[0]
    info = ModelInfo({}, 4, 8, native)
    return [(s, stage_tile(req, s, info)) for s in stages_of(req, info)]


def test_the_base_is_drawn_whole_and_the_stages_in_tiles():
    """A progressive base is one tile (the model composes the frame at its native area); the enlarged stages
    are cut in `tiling.tile`; `direct` is cut in tiles from the start."""
    stages = _stages("job.width=1920", "job.height=1080", "job.steps=25", "tiling.tile=32")
    assert [(s.w, s.h, s.first, tile) for s, tile in stages] == [
        (43, 24, 0, 43), (76, 43, 18, 32), (135, 76, 18, 32), (240, 135, 18, 32)]
    assert [tile for _, tile in _stages("job.width=1920", "job.height=1080", "tiling.tile=32",
                                        "job.strategy=direct")] == [32]
    # an extreme aspect's base (more than twice the native side long) stays tiled, and so does a picture no
    # larger than the base (one stage, the direct render)
    assert _stages("job.width=8192", "job.height=256", "tiling.tile=32")[0][1] == 32
    one = _stages("job.width=320", "job.height=200", "tiling.tile=16", "tiling.overlap=4")
    assert [tile for _, tile in one] == [16]


def test_the_strength_decays_stage_by_stage():
    firsts = [s.first for s, _ in _stages("job.width=1920", "job.height=1080", "job.steps=20",
                                         "job.strength=0.4", "job.strength_decay=0.5")]
    assert firsts == [0, 20 - 8, 20 - 4, 20 - 2]  # int(20 * 0.4 * 0.5 ** k)


SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("kind", ["euler-epsilon", "euler-v_prediction", "ddim-epsilon", "flow"])
@pytest.mark.parametrize("index", [2, 11, 22])
def test_predicted_x0_is_the_schedulers_own_and_its_map_back_moves_it_exactly(kind, index):
    """`predicted_x0` reads the clean canvas as the scheduler's own step does (its `pred_original_sample`, or
    a flow step's x - sigma v), and the prediction `back(delta)` points the step at x0 + delta."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    from tiling.progressive import predicted_x0

    name, _, pt = kind.partition("-")
    s = {"euler": lambda: EulerDiscreteScheduler(**SD_BETAS, prediction_type=pt),
         "ddim": lambda: DDIMScheduler(**SD_BETAS, prediction_type=pt, clip_sample=False),
         "flow": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}[name]()
    s.set_timesteps(25)
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(index)
    t = s.timesteps[index]
    g = torch.Generator().manual_seed(index)
    x = torch.randn(1, 4, 8, 8, generator=g) * float(getattr(s, "init_noise_sigma", 1.0))
    x_in = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
    pred, delta = torch.randn(1, 4, 8, 8, generator=g), 0.1 * torch.randn(1, 4, 8, 8, generator=g)
    x0, back = predicted_x0(s, x_in, pred, t)
    if name == "flow":
        sigma = s.sigmas[index]
        assert torch.allclose(x0, x - sigma * pred, atol=1e-5)
        assert torch.allclose(x - sigma * back(delta), x0 + delta, atol=1e-5)
    else:
        assert torch.allclose(s.step(back(delta), t, x).pred_original_sample, x0 + delta, atol=1e-4)


def test_the_anchor_gives_the_clean_canvas_its_references_low_frequencies():
    """At weight 1 the corrected prediction's clean canvas is the prediction's detail (what the blur removes) on
    the reference's blurred canvas, at 0.5 half-way; at weight 0 nothing changes."""
    from diffusers import EulerDiscreteScheduler

    from tiling.progressive import low_pass_anchor, predicted_x0

    s = EulerDiscreteScheduler(**SD_BETAS)
    s.set_timesteps(20)
    t = s.timesteps[14]
    g = torch.Generator().manual_seed(3)
    ref, x_in, pred = (torch.randn(1, 4, 32, 48, generator=g) for _ in range(3))
    fixed = low_pass_anchor([s], [ref], 1.0, 2.0)(0, 0, t, x_in, pred)
    x0, y0 = predicted_x0(s, x_in, pred, t)[0], predicted_x0(s, x_in, fixed, t)[0]
    low = lambda z: gaussian_blur(z, 2.0, 6)  # noqa: E731
    assert torch.allclose(y0, x0 - low(x0) + low(ref), atol=1e-4)
    half = predicted_x0(s, x_in, low_pass_anchor([s], [ref], 0.5, 2.0)(0, 0, t, x_in, pred), t)[0]
    assert torch.allclose(half, x0 + 0.5 * (low(ref) - low(x0)), atol=1e-4)
    assert torch.equal(low_pass_anchor([s], [ref], 0.0, 2.0)(0, 0, t, x_in, pred), pred)


def test_the_detail_gate_keeps_the_stages_detail_only_where_the_reference_has_its_own():
    """A reference flat on its left half and busy on its right: the gated clean canvas has the reference's low
    frequencies everywhere, the prediction's detail on the busy half (gate 1) and none deep in the flat half (gate
    0); the gate lies in [0, 1] and reaches 1 on at least the quantile's share of the canvas."""
    from diffusers import EulerDiscreteScheduler

    from tiling.progressive import detail_gate, low_pass_anchor, predicted_x0

    s = EulerDiscreteScheduler(**SD_BETAS)
    s.set_timesteps(20)
    t = s.timesteps[14]
    g = torch.Generator().manual_seed(4)
    ref, x_in, pred = (torch.randn(1, 4, 32, 64, generator=g) for _ in range(3))
    ref[..., :32] = 0.5
    low = lambda z: gaussian_blur(z, 1.0, 3)  # noqa: E731
    gate = detail_gate(ref, low(ref), 0.5, 1.0, 3)
    assert gate.shape == (1, 1, 32, 64) and gate.min() >= 0 and gate.max() == 1
    assert gate[..., :24].max() < 1e-5 and (gate == 1).float().mean() >= 0.5
    y0 = predicted_x0(s, x_in, low_pass_anchor([s], [ref], 1.0, 1.0, 0.5)(0, 0, t, x_in, pred), t)[0]
    x0 = predicted_x0(s, x_in, pred, t)[0]
    assert torch.allclose(y0, low(ref) + gate * (x0 - low(x0)), atol=1e-4)
    assert torch.allclose(y0[..., :24], low(ref)[..., :24], atol=1e-4)


def test_unsharp_adds_what_the_blur_removes_and_keeps_a_flat_picture():
    from tiling.progressive import unsharp

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 24, 40, generator=g)
    assert torch.equal(unsharp(x, 0.0, 2.0), x)
    assert torch.allclose(unsharp(x, 1.5, 2.0), x + 1.5 * (x - gaussian_blur(x, 2.0, 6)), atol=1e-6)
    flat = torch.full((1, 3, 24, 40), 0.25)
    assert torch.allclose(unsharp(flat, 3.0, 2.0), flat, atol=1e-6)
    edge = (torch.arange(40) >= 20).float().expand(1, 1, 24, 40)  # a step: overshoot on both sides of it
    s = unsharp(edge, 1.0, 2.0)
    assert s[..., 19].max() < 0 and s[..., 20].min() > 1 and torch.allclose(s[..., :8], edge[..., :8])


def test_the_color_fix_gives_back_the_bases_colours_and_keeps_the_detail():
    from tiling.progressive import color_fix, resize

    g = torch.Generator().manual_seed(6)
    base = gaussian_blur(torch.rand(1, 3, 12, 20, generator=g) * 2 - 1, 1.5, 4)  # smooth at its own pixels
    detail = 0.2 * torch.sign(torch.randn(1, 3, 48, 80, generator=g))  # finer than a base pixel: the stages' own
    enlarged = resize(base, (48, 80))
    shifted = enlarged + detail + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)  # round trips' colour shift
    for sigma in (0.0, 1.0):
        fixed = color_fix(shifted, base, sigma)
        assert fixed.shape == shifted.shape
        assert (fixed.mean((2, 3)) - base.mean((2, 3))).abs().max() < 0.01  # the shift is gone
        kept = torch.corrcoef(torch.stack([(fixed - enlarged).flatten(), detail.flatten()]))[0, 1]
        assert kept > 0.9  # the detail finer than a base pixel is the stages', and stays
    assert torch.allclose(color_fix(enlarged, base, 0.0), enlarged, atol=0.05)  # nothing to fix: left as it is


# ------------------------------------------------------------------------------------- through the renderer

from conftest import SMALL, compose, render_first  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One random-demo renderer for the module, writing under one folder, keeping every stage's picture."""
    from cluster.renderer import Renderer

    out = tmp_path_factory.mktemp("progressive")
    cfg = compose(*SMALL, f"output.dir={out}", "output.keep_stages=true")
    return Renderer(cfg.model, cfg.output, threads=1), out


def _render(demo, *overrides):
    return render_first(*demo, SMALL, "output.keep_stages=true", *overrides)


def test_a_progressive_render_runs_its_stages_and_keeps_them(demo):
    from PIL import Image

    from jobs import read_parameters

    renderer, out = demo
    req, row = _render(demo, "job.base_size=64")
    assert row["stages"] == "80x56>128x88>196x130" and row["strategy"] == "progressive" and row["strength"] == 0.3
    assert Image.open(out / row["path"]).size == (196, 130)
    assert [Image.open(out / req.stage_path(k)).size for k in (0, 1)] == [(80, 56), (128, 88)]
    assert not (out / req.stage_path(2)).exists()
    assert "Strategy: progressive x2 from 64, Anchor: 1, Anchor sigma: 1, Denoising strength: 0.3, " \
        "Stages: 80x56>128x88>196x130, " \
        in read_parameters(out / row["path"])
    again = renderer.render(req)
    assert again["sha256"] == row["sha256"]
    direct = _render(demo, "job.strategy=direct")[1]
    assert direct["stages"] == "196x130" and direct["sha256"] != row["sha256"]


@pytest.mark.parametrize("extra", [["job.upscale=latent"], ["job.skip_residual=3"], ["job.dilation=0.5"],
                                   ["job.skip_residual=3", "job.dilation=1", "tiling.method=shifted"],
                                   ["job.guide_clock=schedule", "job.dilation=0.5"], ["job.strength_decay=0.5", "job.steps=10"],
                                   ["job.anchor=0"], ["job.anchor_sigma=2"], ["job.anchor_detail=0.9"],
                                   ["job.sharpen=2"], ["job.color_fix=1"]],
                         ids=["latent", "skip", "dilation", "skip-dilation-shifted", "schedule-clock", "decay",
                              "no-anchor", "anchor-sigma", "detail-gate", "sharpen", "color-fix"])
def test_each_option_of_the_stages_renders_its_own_picture(demo, extra):
    base = _render(demo, "job.base_size=64", *[e for e in extra if e.startswith("job.steps")])[1]
    req, row = _render(demo, "job.base_size=64", *extra)
    assert row["stages"] == base["stages"] and row["sha256"] != base["sha256"] and row["image_id"] != base["image_id"]


def _picture(path, w, h, seed=0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).resize((w, h)).save(path)
    return path


def test_an_init_image_is_enlarged_and_recorded(demo, tmp_path):
    from PIL import Image

    from jobs import plan, sha256_file

    renderer, out = demo
    pic = _picture(tmp_path / "small.png", 98, 65)
    req, row = _render(demo, f"job.init_image={pic}")
    assert row["stages"] == "196x130" and row["init_sha256"] == sha256_file(pic) and row["init_image"] == str(pic)
    assert Image.open(out / row["path"]).size == (196, 130)
    fixed = _render(demo, f"job.init_image={pic}", "job.color_fix=1")[1]  # its colours held to the init picture's
    assert fixed["status"] == "ok" and fixed["sha256"] != row["sha256"]
    # another picture at the same path is another image; a folder renders each of its pictures
    _picture(tmp_path / "small.png", 98, 65, seed=1)
    assert plan(compose(*SMALL, f"job.init_image={pic}"))[0].image_id != req.image_id
    _picture(tmp_path / "b.png", 196, 130)
    reqs = plan(compose(*SMALL, f"job.init_image={tmp_path}", "job.seeds=[1,2]"))
    assert [(r.init_image, r.seed) for r in reqs] == [(str(tmp_path / n), s) for n in ("b.png", "small.png")
                                                     for s in (1, 2)]
    # a Parquet list of paths, relative to its own folder
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"init_image": ["b.png"]}), tmp_path / "list.parquet")
    assert [r.init_image for r in plan(compose(*SMALL, f"job.init_image={tmp_path / 'list.parquet'}"))] == [
        str(tmp_path / "b.png")]


@pytest.mark.parametrize("content,size,message", [
    (b"not a picture", None, "not a readable picture"),
    (None, (120, 130), "its aspect 120x130 differs"),
])
def test_a_bad_init_image_is_one_clear_error(tmp_path, content, size, message):
    from jobs import ConfigError, plan

    path = tmp_path / "init.png"
    if content is not None:
        path.write_bytes(content)
    else:
        _picture(path, *size)
    with pytest.raises(ConfigError, match=message) as e:
        plan(compose(*SMALL, f"job.init_image={path}"))
    assert e.value.field_name == "job.init_image"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no picture"):
        plan(compose(*SMALL, f"job.init_image={tmp_path / 'empty'}"))
