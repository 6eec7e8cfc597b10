"""Tiled VAE decode and encode against the full-frame pass, on small random-weight VAEs built here."""
import copy

import pytest
import torch
from diffusers import AutoencoderKL
from hypothesis import given, settings
from hypothesis import strategies as st

from tiling import DecodeError, assemble, decoder_sweeps, merged
from tiling.vae import (SharedGroupNorm, axis_spans, decode_each, decode_tiled_shared, decoder_needs, encode_tiled,
                        encoder_needs, window)
from tiling.vae.autoencoder import PooledAttention


def small_vae(seed=0, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    kw = dict(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
              sample_size=32)
    return AutoencoderKL(**{**kw, **config}).eval()


def latent(*shape, seed=5):
    return torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(seed))


def psnr(a, b):
    """On images in [-1, 1] (peak to peak 2), clamped as they are written."""
    return (10 * torch.log10(4 / ((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())).item()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    return small_vae()


@pytest.fixture(scope="module")
def z():
    return latent(24, 32)


@pytest.fixture(scope="module")
def full(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample[0]


@pytest.fixture(scope="module")
def shared(vae, z):
    return decode_tiled_shared(vae, z, tile=8, overlap=2)


# ------------------------------------------------------------------------------------------- geometry

@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 90), tile=st.integers(1, 40), overlap=st.integers(0, 39), wrap=st.booleans())
def test_axis_spans_cover_the_axis_and_their_owned_parts_partition_it(size, tile, overlap, wrap):
    overlap = min(overlap, tile - 1)
    spans = axis_spans(size, tile, overlap, wrap)
    owned, covered = [], set()
    for i, s in enumerate(spans):
        assert s.length == min(tile, size) and 0 <= s.lo <= s.hi <= s.length
        assert 0 <= s.start < size and (wrap or s.start + s.length <= size)
        owned += [(s.start + p) % size for p in range(s.lo, s.hi)]
        covered |= {(s.start + p) % size for p in range(s.length)}
        if i and len(spans) > 1:  # neighbours overlap by at least `overlap`
            assert spans[i - 1].start + s.length - s.start >= overlap
    assert sorted(owned) == list(range(size)) and covered == set(range(size))
    if wrap and len(spans) > 1:  # ... also across the edge
        assert spans[-1].start + spans[-1].length - size - spans[0].start >= overlap


def test_windows_wrap_modulo_or_clip_at_the_edge():
    s = axis_spans(20, 8, 2, wrap=True)[0]
    idx, off = window(s, 3, 20, wrap=True)
    assert idx.tolist() == [17, 18, 19] + list(range(11)) and off == 3
    idx, off = window(s, 3, 20, wrap=False)
    assert idx.tolist() == list(range(11)) and off == 0


def test_context_covers_the_receptive_field(vae):
    # small VAE, one resnet pair per up block: 4 convs at 1x, an upsampling conv at 2x, ... in latent pixels
    assert decoder_needs(vae) == [9, 4, 2, 1, 1]
    assert decoder_needs(vae, context=3) == [3, 3, 2, 1, 1]
    assert encoder_needs(vae) == [6, 6, 5, 4, 2]


# --------------------------------------------------------------------------------------------- decode

def test_shared_statistics_match_the_full_decode_and_beat_separate_tiles(vae, z, full, shared):
    assert shared.shape == (3, 24 * 8, 32 * 8) and shared.dtype == torch.float32
    separate = decode_each(lambda t: vae.decode(t).sample, z, 8, tile=8, overlap=2)
    own_stats = decode_tiled_shared(vae, z, tile=8, overlap=2, passes=1)
    assert psnr(shared, full) >= 45
    assert psnr(shared, full) >= psnr(separate, full) + 12
    assert psnr(shared, full) >= psnr(own_stats, full) + 12


def test_an_attention_free_vae_decodes_and_encodes_tiled_as_whole():
    """The light demo VAE's layout (bench/train_light_vae.py): no mid-block attention, so the latent-resolution
    stage is convolutions and GroupNorms only; the tiled decode and encode still match the whole-frame pass."""
    vae = small_vae(mid_block_add_attention=False)
    assert vae.decoder.mid_block.attentions[0] is None
    z = latent(24, 32)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1,
                                        scale_factor=4, mode="bilinear")
    with torch.no_grad():
        full, mean = vae.decode(z).sample[0], vae.encode(x).latent_dist.mean
    assert psnr(decode_tiled_shared(vae, z, tile=8, overlap=2), full) >= 45
    tiled = encode_tiled(vae, x, tile=8, overlap=2)
    assert (10 * torch.log10(mean.var() / ((tiled - mean) ** 2).mean())).item() >= 45
    torch.testing.assert_close(decode_tiled_shared(vae, z, tile=32, overlap=0), full, atol=1e-6, rtol=0)


def test_one_tile_with_its_own_statistics_is_the_full_decode(vae, z, full):
    assert torch.allclose(decode_tiled_shared(vae, z, tile=64, overlap=0, passes=1), full, atol=1e-5)


def test_a_whole_frame_tile_is_diffusers_own_decode_and_encode(vae, z, full):
    """The one place that calls diffusers' VAE blocks (tiling.vae.autoencoder) splits Decoder.forward and
    Encoder.forward: with one tile covering the frame it must give diffusers' own outputs (bit for bit today),
    so that a change in diffusers under it fails here."""
    x = torch.rand(1, 3, 8 * 24, 8 * 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(decode_tiled_shared(vae, z, tile=32, overlap=0), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(encode_tiled(vae, x, tile=32, overlap=0), mean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("h, w, tile, overlap", [(13, 21, 8, 3), (5, 9, 16, 4), (9, 3, 4, 0)])
def test_exact_output_size(vae, h, w, tile, overlap):
    z = latent(h, w)
    with torch.no_grad():
        full = vae.decode(z).sample[0]
    out = decode_tiled_shared(vae, z, tile, overlap)
    assert out.shape == (3, 8 * h, 8 * w) and psnr(out, full) >= 45


def test_the_callers_vae_is_left_as_it_was(vae, z, full):
    params = {k: v for k, v in vae.named_parameters()}
    decode_tiled_shared(vae, z[..., :8, :8], tile=4, overlap=0)
    encode_tiled(vae, torch.zeros(1, 3, 32, 32), tile=2, overlap=0)
    assert not any(isinstance(m, SharedGroupNorm) for m in vae.modules())
    assert all(p is params[k] for k, p in vae.named_parameters())
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample[0], full)


def test_wrapped_canvas_continues_across_the_edge(vae):
    b = latent(8, 16, seed=3)
    img = decode_tiled_shared(vae, b, tile=8, overlap=2, wrap_x=True)
    # rolling the latent rolls the picture: the edge is decoded like any inside boundary
    rolled = decode_tiled_shared(vae, b.roll(5, -1), tile=8, overlap=2, wrap_x=True)
    assert psnr(rolled, img.roll(40, -1)) >= 45
    jumps = (img[..., 1:] - img[..., :-1]).abs().mean((0, 1))[7::8]  # across latent pixel boundaries inside
    assert (img[..., 0] - img[..., -1]).abs().mean() <= 1.25 * jumps.mean()
    # a periodic latent: two periods decode to the picture twice
    twice = decode_tiled_shared(vae, torch.cat([b, b], -1), tile=8, overlap=2, wrap_x=True)
    assert psnr(twice, torch.cat([img, img], -1)) >= 60
    # without wrapping the edge is a seam
    flat = decode_tiled_shared(vae, b, tile=8, overlap=2)
    assert psnr(decode_tiled_shared(vae, b.roll(5, -1), tile=8, overlap=2), flat.roll(40, -1)) < 30


def test_wrapping_both_axes(vae):
    b = latent(12, 16, seed=4)
    img = decode_tiled_shared(vae, b, tile=8, overlap=2, wrap_x=True, wrap_y=True)
    rolled = decode_tiled_shared(vae, b.roll((3, 7), (-2, -1)), tile=8, overlap=2, wrap_x=True, wrap_y=True)
    assert psnr(rolled, img.roll((24, 56), (-2, -1))) >= 45


@pytest.mark.parametrize("wrap", [False, True])
def test_a_decode_swept_on_several_devices_equals_the_one_device_decode(wrap):
    """Tile-parallel decode: each "device" holds its own Sweeps of the canvas and sweeps every third tile; the
    moments are merged in tile order between sweeps and the outputs assembled: the very same picture."""
    vae, z = small_vae(), latent(13, 22)
    one = decode_tiled_shared(vae, z, tile=6, overlap=2, wrap_x=wrap)
    devices = [decoder_sweeps(vae, z, tile=6, overlap=2, wrap_x=wrap) for _ in range(3)]
    n = len(devices[0].spans)
    shares = [range(k, n, 3) for k in range(3)]
    applied = None
    for number in (1, 2, 3):
        parts = {i: v for d, share in zip(devices, shares) for i, v in d.sweep(share, applied, number == 3, number)}
        if number < 3:
            applied = merged([parts[i] for i in range(n)])
    assert n > 6 and torch.equal(assemble(devices[0].spans, parts, (13, 22), 8, 2), one)


# ------------------------------------------------------------------------------- precision and errors

def test_fp16_overflow_is_retried_in_fp32():
    vae = small_vae(force_upcast=False)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(3e5)  # outputs far beyond fp16's 65504
    z = latent(8, 12)
    with torch.no_grad():
        ref = vae.decode(z).sample[0]
    half = copy.deepcopy(vae).half()
    with torch.no_grad():
        assert not torch.isfinite(half.decode(z.half()).sample).all()
    out = decode_tiled_shared(half, z, tile=4, overlap=1)
    assert torch.isfinite(out).all() and out.abs().max() > 1e5
    assert ((out - ref).abs().mean() / ref.abs().mean()).item() < 0.02  # fp16 weights, fp32 arithmetic
    assert next(half.parameters()).dtype == torch.float16


def test_force_upcast_decodes_in_fp32():
    vae = small_vae(force_upcast=True)
    half = copy.deepcopy(vae).half()
    z = latent(8, 12)
    with torch.no_grad():
        ref = copy.deepcopy(half).float().decode(z).sample[0]
    assert psnr(decode_tiled_shared(half, z, tile=4, overlap=1), ref) >= 45


def test_bf16_is_not_upcast():
    """As diffusers does: force_upcast is for fp16's range; a bf16 VAE decodes in bf16 (twice as fast)."""
    seen = []
    vae = copy.deepcopy(small_vae(force_upcast=True)).to(torch.bfloat16)
    vae.decoder.conv_out.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    z = latent(8, 12)
    with torch.no_grad():
        ref = copy.deepcopy(vae).float().decode(z).sample[0]
    seen.clear()
    out = decode_tiled_shared(vae, z, tile=4, overlap=1)
    assert seen and set(seen) == {torch.bfloat16}
    assert out.dtype == torch.float32 and psnr(out, ref) >= 30  # bf16 arithmetic against fp32


def test_non_finite_tiles_raise_a_decode_error_naming_the_tile():
    vae = small_vae()
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("inf"))
    with pytest.raises(DecodeError, match=r"tile at latent \(0, 0\), sweep 1, also in fp32"):
        decode_tiled_shared(vae, latent(8, 8), tile=4, overlap=0)
    with pytest.raises(DecodeError, match=r"tile at latent \(0, 0\)"):
        decode_each(lambda t: vae.decode(t).sample, latent(8, 8), 8, tile=4, overlap=0)


def test_a_non_finite_mid_block_raises_a_decode_error():
    vae = small_vae()
    with torch.no_grad():
        vae.decoder.conv_in.bias.fill_(float("nan"))
    with pytest.raises(DecodeError, match="latent-resolution stage"):
        decode_tiled_shared(vae, latent(8, 8), tile=4, overlap=0)


def test_bad_shapes_are_refused(vae):
    with pytest.raises(ValueError, match=r"\[1, C, H, W\]"):
        decode_tiled_shared(vae, torch.zeros(2, 4, 8, 8), tile=4, overlap=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_tiled(vae, torch.zeros(1, 3, 60, 64), tile=4, overlap=0)
    with pytest.raises(ValueError, match="passes=0"):
        decode_tiled_shared(vae, torch.zeros(1, 4, 8, 8), tile=4, overlap=0, passes=0)


# --------------------------------------------------------------------------------------------- encode

def test_tiled_encode_matches_the_full_encode(vae):
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 48, 64, generator=g) * 2 - 1, scale_factor=4,
                                        mode="bilinear")
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.mean

    def snr(m):
        return (10 * torch.log10(ref.var() / ((m - ref) ** 2).mean())).item()

    tiled = encode_tiled(vae, x, tile=8, overlap=2)
    assert tiled.shape == ref.shape == (1, 4, 24, 32)
    assert snr(tiled) >= 45
    assert snr(tiled) >= snr(encode_tiled(vae, x, tile=8, overlap=2, passes=1)) + 12


def test_wrapped_encode_rolls_with_the_image(vae):
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(8)) * 2 - 1
    e = encode_tiled(vae, x, tile=8, overlap=2, wrap_x=True)
    rolled = encode_tiled(vae, x.roll(40, -1), tile=8, overlap=2, wrap_x=True)
    assert (rolled - e.roll(5, -1)).abs().max() < 0.01 * e.abs().max()


# ------------------------------------------------------------------------------------ memory-fitted tiles

def test_the_tile_fits_the_memory_the_whole_frame_when_it_can(vae):
    from tiling.vae import LADDER, activation_bytes, fitting_tile, stage_bytes, tile_bytes

    per_px = activation_bytes(vae, 4)
    assert per_px == 3 * 4 * (2 * 16 * 8 ** 2)  # the decoder's last upsample: 16 channels at 8x, in and out, fp32
    assert fitting_tile(vae, 24, 32, tile_bytes(vae, 24, 32, 32)) == 32  # the whole frame: one exact sweep
    frees = (1e6, 1e7, 1e8, 1e9, 1e12)
    sides = [fitting_tile(vae, 300, 400, free) for free in frees]
    assert sides == sorted(sides) and sides[-1] == 400 and sides[0] == LADDER[-1]
    assert all(s in LADDER for s in sides[:-1])
    for free, side in zip(frees[:-1], sides):  # what it picks fits, the next side up would not
        bigger = [s for s in LADDER if s > side]
        assert side == LADDER[-1] or tile_bytes(vae, 300, 400, side) <= free
        assert not bigger or tile_bytes(vae, 300, 400, bigger[-1]) > free
    # however small the tile, the latent-resolution stage runs over the whole canvas
    assert tile_bytes(vae, 300, 400, LADDER[-1]) >= stage_bytes(vae, 300, 400) > 300 * 400 * 16 * 4 * 8


class LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The bytes of the tensor storages that ops made and that are still alive, and their peak: what a device's
    allocator would hold for a block (on the CPU, where no allocator counts it)."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                self.live[key] = n
                self.now += n
                self.peak = max(self.peak, self.now)
                weakref.finalize(st, self._gone, key)
        return out

    def _gone(self, key):
        self.now -= self.live.pop(key, 0)


def test_the_memory_estimate_holds_what_the_passes_take():
    """`tile_bytes` bounds the live bytes a tiled decode and encode make (their tiles, the canvases, the
    latent-resolution stage over the whole canvas), here for a VAE whose wide mid block (256 channels, as SDXL's
    512 at 7680x4320 are its largest part) outweighs its tiles; and the stage's part is no gross overestimate."""
    from tiling.vae import stage_bytes, tile_bytes

    v = small_vae(block_out_channels=(8, 16, 32, 256), norm_num_groups=8)
    z, x = latent(40, 48), torch.rand(1, 3, 320, 384, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for tile in (16, 48):
        for fn in (lambda: decode_tiled_shared(v, z, tile, 2), lambda: encode_tiled(v, x, tile, 2)):
            live = LiveBytes()
            with torch.no_grad(), live:
                fn()
            assert 0.6 * stage_bytes(v, 40, 48) < live.peak <= tile_bytes(v, 40, 48, tile)


def test_a_vae_pass_frees_what_it_made_when_it_returns():
    """Nothing a tiled decode or encode made outlives it but its result, freed by reference counts alone: a cycle
    (the sweeps' nets once held the sweeps) kept each pass's canvas on the device until the garbage collector ran,
    for SDXL at 7680x4320 0.53 GB a decode, 0.2 GB an encode."""
    import gc

    v, z, x = small_vae(), latent(24, 32), torch.rand(1, 3, 192, 256, generator=torch.Generator().manual_seed(3))
    gc.disable()
    try:
        for fn in (lambda: decode_tiled_shared(v, z, 8, 2), lambda: encode_tiled(v, x * 2 - 1, 8, 2)):
            live = LiveBytes()
            with torch.no_grad(), live:
                fn()  # the result dropped at once
            assert live.now < 0.01 * live.peak
    finally:
        gc.enable()


def test_the_sd_vae_at_4k_is_estimated_as_measured():
    """SD's VAE layout (random weights, built on the meta device: only the module tree is read): the whole
    3840x2160 frame in bf16 is ~24 GiB by the estimate, as the speed issue measured (19 to 25 GiB); a 16 GB
    card's 12 GiB gets 256-latent tiles."""
    from tiling.vae import activation_bytes, fitting_tile

    with torch.device("meta"):
        sd = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2).to(torch.bfloat16)
    assert 19 < 270 * 480 * activation_bytes(sd, 2) / 2**30 < 25
    assert fitting_tile(sd, 270, 480, 140 * 2**30) == 480 and fitting_tile(sd, 270, 480, 12 * 2**30) == 192


def test_a_gpu_limited_to_a_fraction_offers_no_more_than_it(monkeypatch):
    """`torch.cuda.set_per_process_memory_fraction` (a 16 GB card stood in for on an H200) bounds what a decode may
    take: the fraction of the card less what this process holds, however much the card has free; without one, the
    card's free memory plus what the caching allocator holds unused (the GPU's calls faked: this runs on a CPU)."""
    from tiling.vae import free_memory

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (120 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 5 * gib)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0 if d.index == 0 else None)
    assert free_memory("cuda", 1.0) == 122 * gib
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 0.1)
    assert free_memory("cuda", 0.5) == 0.5 * (14 * gib - 3 * gib)


# ------------------------------------------------------------------------- the mid block's pooled attention

@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), keys=st.integers(1, 5000))
def test_the_pooling_factor_is_the_smallest_that_leaves_at_most_keys_positions(h, w, keys):
    attn = PooledAttention(small_vae().decoder.mid_block.attentions[0], keys)
    p = attn.factor(h, w)
    cells = lambda q: -(-h // q) * -(-w // q)  # noqa: E731
    assert cells(p) <= keys and (p == 1 or cells(p - 1) > keys)


def test_pooled_attention_attends_to_the_averaged_keys_and_values(vae, z):
    """The mid block with `attention_keys` is the softmax attention of every position over the average-pooled
    normalised input's keys and values, written out here; a canvas within `keys` positions is decoded exactly."""
    import torch.nn.functional as F

    attn = vae.decoder.mid_block.attentions[0]
    x = torch.randn(1, attn.to_q.in_features, 9, 14, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pooled = PooledAttention(attn, 16)
        got = pooled(x)
        assert pooled.factor(9, 14) == 3  # 126 positions pooled by 3 into 3x5 = 15
        n = attn.group_norm(x)
        kv = F.avg_pool2d(n, 3, ceil_mode=True, count_include_pad=False).flatten(2).transpose(1, 2)
        q, k, v = attn.to_q(n.flatten(2).transpose(1, 2)), attn.to_k(kv), attn.to_v(kv)
        o = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ v  # one head: the VAE's
        want = x + attn.to_out[0](o).transpose(1, 2).reshape(x.shape)
        assert torch.allclose(got, want / attn.rescale_output_factor, atol=1e-5)
        assert torch.equal(PooledAttention(attn, 126)(x), attn(x))
    exact = decode_tiled_shared(vae, z, 32, 0)
    assert torch.equal(decode_tiled_shared(vae, z, 32, 0, attention_keys=24 * 32), exact)
    assert not torch.equal(decode_tiled_shared(vae, z, 32, 0, attention_keys=64), exact)
    x = exact[None].clamp(-1, 1)
    assert torch.equal(encode_tiled(vae, x, 32, 0, attention_keys=24 * 32), encode_tiled(vae, x, 32, 0))


def test_pooled_attention_tiles_and_wraps_as_the_exact_one_does(vae, z):
    """The tiled decode with pooled attention is its whole-frame decode, as the exact one is; the caller's VAE
    keeps its own attention."""
    whole = decode_tiled_shared(vae, z, 32, 0, attention_keys=64)
    assert psnr(decode_tiled_shared(vae, z, 8, 2, attention_keys=64), whole) > 40
    assert type(vae.decoder.mid_block.attentions[0]).__name__ == "Attention"
    assert decode_tiled_shared(vae, z, 8, 2, wrap_x=True, attention_keys=64).shape == whole.shape


def test_the_passes_give_the_same_bytes_on_any_thread_count():
    """Tile-parallel mode lends the waiting workers' threads to the one worker that runs a VAE pass
    (`Renderer._set_threads`), so bulk and tile-parallel pictures agree only if a pass's bytes do not depend on the
    thread count. On the demo VAE oneDNN's 1x1 convolutions round differently on two threads (by ~1e-6 on a
    2-core AVX2 EPYC, 2026-12-08); as matrix products (`PointwiseConv`) they do not."""
    from pathlib import Path

    vae = AutoencoderKL.from_pretrained(Path(__file__).parents[1] / "models" / "scenes-sd" / "vae").eval()
    z = latent(24, 40)  # differs at this size too with the 1x1 convs left to oneDNN
    out = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            img = decode_tiled_shared(vae, z, tile=64, overlap=0, attention_keys=1024)
            tiled = decode_tiled_shared(vae, z, tile=16, overlap=4)
            out.append((img, tiled, encode_tiled(vae, img[None].clamp(-1, 1), tile=64, overlap=0)))
        finally:
            torch.set_num_threads(1)
    for a, b in zip(*out):
        assert torch.equal(a, b)
