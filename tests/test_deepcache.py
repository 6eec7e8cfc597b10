"""DeepCache (model.deep_cache): the UNet's forward in two parts, the features kept in canvas coordinates, the
renders that use them, and the options' validation."""
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from conftest import SMALL, compose, render_first
from jobs import ConfigError, plan, read_parameters, validate
from models import deepcache
from tiling.features import FeatureCanvas
from tiling.fuse import crop
from tiling.grid import layout, step_layouts

pytestmark = pytest.mark.usefixtures("one_thread")
ASSETS = Path(__file__).resolve().parent / "assets"


def _sdxl_unet_inputs(n, h, w):
    from test_models import build_tiny_sdxl

    pipe = build_tiny_sdxl()
    unet = pipe.unet.eval()
    added = {"text_embeds": torch.randn(n, pipe.text_encoder_2.config.projection_dim), "time_ids": torch.randn(n, 6)}
    return unet, torch.randn(n, 4, h, w), torch.randn(n, 77, unet.config.cross_attention_dim), added


@pytest.mark.parametrize("family,hw", [("sd", (32, 32)), ("sd", (43, 24)), ("sdxl", (24, 40))])
def test_the_two_part_forward_is_the_unets_own_bit_for_bit(family, hw):
    """`full` is diffusers' UNet2DConditionModel.forward (this fails when a diffusers release changes it), and the
    shallow part on the deep feature of the same input and timestep gives the same prediction: the test-bed model's
    UNet (SD 1.x layout, a size that is no multiple of its upsampling) and a tiny SDXL one (text_time embedding)."""
    torch.manual_seed(0)
    if family == "sd":
        from jobs.spec import ModelConfig
        from models import load_model

        unet = load_model(ModelConfig(name="demo")).unet
        x, enc, added = torch.randn(2, 4, *hw), torch.randn(2, 77, unet.config.cross_attention_dim), None
    else:
        unet, x, enc, added = _sdxl_unet_inputs(2, *hw)
    assert deepcache.why_not(unet) is None
    ref = unet(x, 500, encoder_hidden_states=enc, added_cond_kwargs=added).sample
    out, deep = deepcache.full(unet, x, 500, enc, added)
    assert torch.equal(out, ref) and deep.shape[-2:] == x.shape[-2:]
    assert torch.equal(deepcache.shallow(unet, x, 500, enc, added, deep), ref)
    later = deepcache.shallow(unet, x, 400, enc, added, deep)  # another step on the cached feature: close, not equal
    assert not torch.equal(later, ref) and torch.isfinite(later).all()


@pytest.mark.parametrize("hw", [(32, 32), (22, 40)])
def test_z_images_two_part_forward_is_its_own(hw):
    """`dit_full` is diffusers' ZImageTransformer2DModel.forward bit for bit (the Z-Image test bed's transformer,
    captions of two lengths), its residual over 2x2 patches at the latent's size; the first block and the final
    layer on that residual give the same prediction (up to float rounding: the residual is a difference)."""
    from diffusers import ZImageTransformer2DModel

    tr = ZImageTransformer2DModel.from_pretrained(str(ASSETS / "scenes-zimage" / "transformer")).eval()
    assert deepcache.why_not(tr) is None
    torch.manual_seed(0)
    x = list(torch.randn(3, 16, 1, *hw).unbind(0))
    caps = [torch.randn(7, 64), torch.randn(7, 64), torch.randn(9, 64)]
    t = torch.full((3,), 0.3)
    with torch.no_grad():
        ref = tr(x, t, caps, return_dict=False)[0]
    out, deep = deepcache.dit_full(tr, x, t, caps)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)) and deep.shape == (3, 256, *hw)
    assert torch.equal(deep[..., ::2, ::2], deep[..., 1::2, 1::2])  # one token over its patch
    again = deepcache.dit_shallow(tr, x, t, caps, deep)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(again, ref))
    later = deepcache.dit_shallow(tr, x, t + 0.1, caps, deep)  # another step on the cached residual: not equal
    assert not any(torch.allclose(a, b, atol=1e-3) for a, b in zip(later, ref))


def test_features_per_tile_and_per_call_are_inverse():
    f = torch.randn(6, 5, 3, 2)  # guidance's two halves of 3 tiles
    tiles = deepcache.per_tile(f, 2)
    assert tiles.shape == (3, 10, 3, 2) and torch.equal(tiles[1, :5], f[1]) and torch.equal(tiles[1, 5:], f[4])
    assert torch.equal(deepcache.per_call(tiles, 2), f) and torch.equal(deepcache.per_tile(f, 1), f)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(8, 40), w=st.integers(8, 40), tile=st.integers(4, 16), overlap=st.integers(0, 3),
       wrap=st.sampled_from(["none", "x", "both"]), seed=st.integers(0, 100))
def test_features_of_any_layout_are_cropped_back_under_any_other(h, w, tile, overlap, wrap, seed):
    """A full step's features, each tile's window of one field, fused and cropped under the next steps' shifted
    windows (which move every step, wrapping where the canvas wraps) give that field's windows."""
    tile = min(tile, h, w)
    field = torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))
    wx, wy = wrap in ("x", "both"), wrap == "both"
    first = layout(h, w, tile, min(overlap, tile - 1), wrap_y=wy, wrap_x=wx)
    cache = FeatureCanvas(3)
    cache.put([0] * len(first), 0, (h, w), first, torch.stack([crop(field, t) for t in first]))
    for tiles in step_layouts(h, w, tile, 0, "shifted", 3, seed, wrap_y=wy, wrap_x=wx)[1:]:
        got = cache.take([0] * len(tiles), (h, w), tiles, torch.float32)
        assert torch.allclose(got, torch.stack([crop(field, t) for t in tiles]), atol=1e-5)
    assert [cache.full_step(i) for i in range(7)] == [True, False, False, True, False, False, True]


def test_a_window_the_last_full_step_left_uncovered_is_no_hit():
    cache = FeatureCanvas(2)
    tiles = layout(16, 32, 16, 0)  # two tiles side by side
    cache.put([0], 0, (16, 32), tiles[:1], torch.ones(1, 2, 16, 16))
    assert cache.take([0], (16, 32), tiles[:1], torch.float32) is not None
    assert cache.take([0], (16, 32), tiles[1:], torch.float32) is None  # never computed
    assert cache.take([1], (16, 32), tiles[:1], torch.float32) is None  # another canvas or prompt
    assert cache.take([0], (16, 24), tiles[:1], torch.float32) is None  # another stage's size
    cache.put([0], 2, (16, 32), tiles[1:], torch.ones(1, 2, 16, 16))  # a later full step starts the key afresh
    assert cache.take([0], (16, 32), tiles[:1], torch.float32) is None


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from cluster.renderer import Renderer

    out = tmp_path_factory.mktemp("deepcache")
    cfg = compose(*SMALL, f"output.dir={out}")
    return Renderer(cfg.model, cfg.output, threads=1), out


def _render(demo, *overrides):
    req, row = render_first(*demo, SMALL, *overrides)
    return req, row, np.asarray(Image.open(demo[1] / row["path"]), dtype=np.float64)


@pytest.mark.parametrize("strategy", ["direct", "progressive"])
def test_deep_cache_runs_the_whole_unet_every_nth_step_only(demo, strategy):
    """Counted at the UNet's middle block: the whole UNet on a third of the steps (each loop's first, fourth, ...),
    the outer level on the rest; the picture is another (its own id, recorded in the parameters and the manifest),
    close to the exact one; deep_cache=1 is the exact model, id and bytes."""
    renderer, out = demo
    calls = []
    hook = renderer.model.unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    extra = ["job.strategy=direct", "job.steps=6"] if strategy == "direct" else ["job.base_size=64", "job.steps=10"]
    try:
        _, exact, a = _render(demo, *extra)
        full = len(calls)
        req, row, b = _render(demo, *extra, "model.deep_cache=3")
        cached = len(calls) - full
        _, one, _ = _render(demo, *extra, "model.deep_cache=1")
    finally:
        hook.remove()
    if strategy == "direct":  # 6 steps, the same tiles each: steps 0 and 3 in full
        assert cached * 3 == full
    else:  # base 10 steps (0, 3, 6, 9 full), two stages of 3 steps (0 full): 6 of 16 steps' calls
        assert 0 < cached < full / 2
    assert row["image_id"] != exact["image_id"] and row["sha256"] != exact["sha256"]
    assert (one["image_id"], one["sha256"]) == (exact["image_id"], exact["sha256"])
    assert row["deep_cache"] == 3 and "DeepCache: every 3 steps" in read_parameters(out / row["path"])
    psnr = 10 * np.log10(255 ** 2 / ((a - b) ** 2).mean())
    assert psnr > 20, psnr


def test_regions_and_groups_keep_their_own_features(demo):
    """Each canvas of a group and each region's prompt caches its own features: a group of two seeds stepped
    together renders what each renders alone, and a render with regions completes."""
    renderer, out = demo
    cfg = compose(*SMALL, f"output.dir={out}", "job.strategy=direct", "job.steps=4", "model.deep_cache=2",
                  "job.seeds=[3,4]")
    reqs = plan(cfg)
    together = renderer.render_group(reqs)
    alone = [renderer.render(r) for r in reqs]
    assert all(r["status"] == "ok" for r in together + alone)
    for g, s in zip(together, alone):
        a, b = (np.asarray(Image.open(out / r["path"]), dtype=np.float64) for r in (g, s))
        assert 10 * np.log10(255 ** 2 / max(((a - b) ** 2).mean(), 1e-12)) > 60
    _render(demo, "job.strategy=direct", "job.steps=4", "model.deep_cache=2",
            "job.regions=[{box:[0,0,0.5,1],prompt:'a dusk landscape'}]")


def test_a_unet_that_cannot_be_split_is_refused_when_the_worker_loads_it(monkeypatch):
    import cluster.renderer as renderer_module
    from diffusers import UNet2DConditionModel

    classy = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, cross_attention_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, class_embed_type="timestep")
    assert "class embeddings" in deepcache.why_not(classy)
    assert "is neither a UNet nor Z-Image's" in deepcache.why_not(torch.nn.Linear(2, 2))
    monkeypatch.setattr(renderer_module, "why_not", lambda unet: "the UNet has class embeddings")
    cfg = compose(*SMALL, "model.deep_cache=2")
    with pytest.raises(ConfigError, match=r"^model.deep_cache=2: cannot split this model's denoiser: the UNet has class"):
        renderer_module.Renderer(cfg.model, cfg.output, threads=1)


@pytest.mark.parametrize("overrides,message", [
    (["model.deep_cache=11"], "model.deep_cache=11: must be an integer from 0"),
    (["model=lumina2", "model.weights=random", "model.deep_cache=3"],
     "model.deep_cache=3: caches the deep features of a UNet or of Z-Image's transformer; model=lumina2"),
    (["model.deep_cache=3", "cluster.mode=tile_parallel"], "model.deep_cache=3: needs cluster.mode bulk or auto"),
])
def test_a_bad_deep_cache_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        validate(compose(*overrides))
