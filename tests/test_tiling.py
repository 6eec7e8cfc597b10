"""Geometry, blend weights and fusion: pure math, property-based where it is geometry."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiling import (axis_starts, batches_of, crop, decode_each, denoise_canvas, fuse, layout, padded_size,
                    step_layouts, tile_weights, to_uint8, weight_sum)

sizes = st.integers(1, 300)


@settings(max_examples=300, deadline=None)
@given(h=sizes, w=sizes, tile=st.integers(1, 128), data=st.data())
def test_grid_covers_every_pixel_with_tiles_inside(h, w, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    tiles = layout(h, w, tile, overlap)
    cover = torch.zeros(h, w, dtype=torch.int32)
    for t in tiles:
        assert 0 <= t.y and t.y + t.h <= h and 0 <= t.x and t.x + t.w <= w
        assert (t.h, t.w) == (min(tile, h), min(tile, w))  # one shape: tiles stack into a batch
        cover[t.slices] += 1
    assert cover.min() >= 1
    assert len(set(tiles)) == len(tiles)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(1, 2000), tile=st.integers(1, 256), data=st.data())
def test_axis_starts_step_at_most_the_stride_and_end_on_the_edge(length, tile, data):
    overlap = data.draw(st.integers(0, tile - 1))
    starts = axis_starts(length, min(tile, length), min(overlap, min(tile, length) - 1))
    t = min(tile, length)
    assert starts[0] == 0 and starts[-1] == length - t
    assert all(0 < b - a <= t - min(overlap, t - 1) for a, b in zip(starts, starts[1:]))


def test_the_last_columns_are_denoised_unlike_multidiffusion():
    # 2160 px = 270 latents: MultiDiffusion's 64/8 grid stops at 264 and drops the last 6 rows (48 px)
    starts = axis_starts(270, 64, 16)
    assert starts == [0, 48, 96, 144, 192, 206]


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 20000), h=st.integers(1, 20000))
def test_padded_size_is_the_next_multiple_of_eight(w, h):
    pw, ph = padded_size(w, h, 8)
    assert pw % 8 == 0 and ph % 8 == 0 and 0 <= pw - w < 8 and 0 <= ph - h < 8


def test_to_uint8_crops_to_the_exact_size():
    img = torch.linspace(-1, 1, 3 * 16 * 24).reshape(3, 16, 24)
    px = to_uint8(img, width=21, height=13)
    assert px.shape == (13, 21, 3) and px.dtype.name == "uint8"
    assert px[0, 0, 0] == 0 and to_uint8(torch.ones(3, 8, 8), 8, 8).min() == 255


def test_gaussian_weights_peak_in_the_middle_and_stay_positive():
    w = tile_weights(64, 64, "gaussian")
    assert w.min() > 0 and w.argmax() in (31 * 64 + 31, 31 * 64 + 32, 32 * 64 + 31, 32 * 64 + 32)
    assert torch.equal(tile_weights(8, 8, "uniform"), torch.ones(8, 8))


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 90), w=st.integers(1, 90), tile=st.integers(2, 40),
       method=st.sampled_from(["uniform", "gaussian"]), data=st.data())
def test_normalised_weights_sum_to_one_everywhere(h, w, tile, method, data):
    overlap = data.draw(st.integers(0, tile - 1))
    tiles = layout(h, w, tile, overlap)
    weights = tile_weights(tiles[0].h, tiles[0].w, method)
    total = weight_sum(tiles, weights, h, w)
    acc = torch.zeros(h, w, dtype=torch.float64)
    for t in tiles:
        acc[t.slices] += weights.double() / total[t.slices].double()
    assert torch.allclose(acc, torch.ones(h, w, dtype=torch.float64), atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(4, 70), w=st.integers(4, 70), tile=st.integers(4, 32),
       method=st.sampled_from(["uniform", "gaussian"]), data=st.data())
def test_fusing_a_pixelwise_denoiser_equals_applying_it_to_the_whole_canvas(h, w, tile, method, data):
    overlap = data.draw(st.integers(0, tile - 1))
    x = torch.randn(3, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    f = lambda v: torch.tanh(v) * 0.5 + v ** 2  # noqa: E731  acts pixel by pixel
    tiles = layout(h, w, tile, overlap)
    weights = tile_weights(tiles[0].h, tiles[0].w, method)
    preds = torch.stack([f(x[(slice(None),) + t.slices]) for t in tiles])
    fused = fuse(preds, tiles, weights, weight_sum(tiles, weights, h, w))
    assert torch.allclose(fused, f(x), atol=1e-5, rtol=1e-5)


def test_batches_follow_the_tile_index():
    tiles = layout(100, 100, 32, 8)  # 16 tiles
    groups = batches_of(tiles, 3)
    assert [t for g in groups for t in g] == tiles and [len(g) for g in groups] == [3] * 4 + [2] * 2
    assert [len(g) for g in batches_of(list(range(12)), 8)] == [6, 6]  # as few calls, as equal as can be
    assert [len(g) for g in batches_of(list(range(15)), 8)] == [8, 7] and batches_of([], 4) == []


class _Sched:
    """A stand-in scheduler: x <- x - 0.5 * eps, three steps; records what the loop passed."""

    timesteps = torch.tensor([3, 2, 1])

    def scale_model_input(self, x, t):
        return x * 2

    def step(self, eps, t, x):
        class Out:
            prev_sample = x - 0.5 * eps
        return Out


def test_denoise_canvas_equals_the_untiled_loop_for_a_pixelwise_model():
    x = torch.randn(1, 4, 37, 53, generator=torch.Generator().manual_seed(0))
    calls = []

    def predict(batches, t):
        calls.append([len(b.tiles) for b in batches])
        assert all(b.canvas == (37, 53) and b.x.shape[0] == len(b.tiles) for b in batches)
        return [torch.sin(b.x) + t for b in batches]

    out = denoise_canvas(predict, x, _Sched(), [layout(37, 53, 16, 4)] * 3, "gaussian", batch=5)
    ref = x
    for t in _Sched.timesteps:
        ref = ref - 0.5 * (torch.sin(ref * 2) + t)
    assert torch.allclose(out, ref, atol=1e-5)
    n = len(layout(37, 53, 16, 4))
    assert len(calls) == 3 and sum(calls[0]) == n and max(calls[0]) == 5


def test_tiled_decode_of_a_local_decoder_equals_the_full_decode():
    # a decoder that upsamples pixel by pixel: tiles with context must reproduce it exactly
    dec = lambda z: torch.tanh(z[:, :3]).repeat_interleave(8, -1).repeat_interleave(8, -2)  # noqa: E731
    z = torch.randn(1, 4, 29, 41, generator=torch.Generator().manual_seed(1))
    tiled = decode_each(dec, z, 8, tile=12, overlap=4)
    assert tiled.shape == (3, 29 * 8, 41 * 8)
    assert torch.allclose(tiled, dec(z)[0], atol=1e-6)


def _coverage(tiles, h, w):
    cover = torch.zeros(h, w, dtype=torch.int32)
    for t in tiles:
        cover[t.index(h, w)] += 1
    return cover


@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 120), w=st.integers(1, 120), tile=st.integers(2, 64), wrap_y=st.booleans(),
       wrap_x=st.booleans(), data=st.data())
def test_wrapped_layouts_cover_everything_and_stay_one_shape(h, w, tile, wrap_y, wrap_x, data):
    overlap = data.draw(st.integers(0, tile - 1))
    tiles = layout(h, w, tile, overlap, wrap_y, wrap_x)
    assert _coverage(tiles, h, w).min() >= 1
    assert {(t.h, t.w) for t in tiles} == {(min(tile, h), min(tile, w))}
    assert all(0 <= t.y < h and 0 <= t.x < w for t in tiles)
    if not wrap_x:
        assert all(t.x + t.w <= w for t in tiles)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(8, 100), w=st.integers(8, 100), tile=st.integers(4, 40), seed=st.integers(0, 2**32),
       wrap=st.sampled_from([(False, False), (True, True), (False, True)]))
def test_shifted_tiles_cover_every_step_move_and_repeat_with_the_seed(h, w, tile, seed, wrap):
    steps = step_layouts(h, w, tile, 0, "shifted", 12, seed, *wrap)
    for tiles in steps:
        cover = _coverage(tiles, h, w)
        assert cover.min() >= 1
        assert len(tiles) == (-(-h // tile)) * (-(-w // tile))  # the fewest tiles of at most `tile`
        assert all(t.h <= tile and t.w <= tile for t in tiles)
        ny, nx = -(-h // tile), -(-w // tile)
        assert tiles[0].h * ny - h < 9 * ny and tiles[0].w * nx - w < 9 * nx  # overlap only from rounding
    assert steps == step_layouts(h, w, tile, 0, "shifted", 12, seed, *wrap)
    if min(tile, h, w) > 1 and tile < min(h, w):
        assert len({tuple(t) for t in steps}) > 1  # the grid moves


def test_fusion_on_a_wrapped_canvas_equals_the_whole_canvas():
    x = torch.randn(2, 30, 44, generator=torch.Generator().manual_seed(3))
    f = lambda v: v * 3 - v ** 3  # noqa: E731
    for tiles in [layout(30, 44, 16, 6, True, True), step_layouts(30, 44, 16, 0, "shifted", 1, 5, True, False)[0]]:
        w = tile_weights(tiles[0].h, tiles[0].w, "gaussian")
        fused = fuse(torch.stack([f(crop(x, t)) for t in tiles]), tiles, w, weight_sum(tiles, w, 30, 44))
        assert torch.allclose(fused, f(x), atol=1e-5)


def test_a_wrapped_tile_takes_its_pixels_from_the_other_side():
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 5, 7)
    t = layout(5, 7, 4, 1, True, True)[-1]
    assert t.y + t.h > 5 and t.x + t.w > 7
    ref = torch.roll(x, shifts=(-t.y, -t.x), dims=(1, 2))[:, :4, :4]
    assert torch.equal(crop(x, t), ref)


@given(n=st.integers(0, 200), size=st.integers(1, 40))
def test_batches_are_as_few_and_as_equal_as_can_be(n, size):
    groups = batches_of(list(range(n)), size)
    assert [t for g in groups for t in g] == list(range(n))
    assert len(groups) == -(-n // size) and all(0 < len(g) <= size for g in groups)
    assert not groups or max(map(len, groups)) - min(map(len, groups)) <= 1
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)  # the largest first
