"""Tiled VAE decode and encode whose tiles agree with the full-frame pass.

A VAE's convolutions are local but its GroupNorms are global: decoded on its own, each tile normalises with
its own statistics and comes out in its own tone. Here each tile runs with as much latent context as its
convolutions look across (cut down block by block as it is used up), and the GroupNorms of the tiled part
share statistics of the whole canvas, gathered over the part of the canvas each tile owns and merged. Each
GroupNorm's input depends on the normalisations before it, so the tiles are swept three times: the first
sweep lets each tile normalise with its own statistics and gathers; the second normalises with the merged
statistics tracked to the tile (so that errors do not compound through the layers) and gathers again; the
third applies those to every tile and writes the picture. The global parts (decoder: conv_in and the mid
block with its attention; encoder: the mid block and after) run on the whole canvas at latent resolution.
Nothing is patched: the tiled part runs on a copy of the module tree that shares the caller's parameters.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .blend import ramp_profile
from .grid import axis_starts, wrap_starts

Decode = Callable[[torch.Tensor], torch.Tensor]  # [1, C, h, w] latents -> [1, 3, h*f, w*f] in [-1, 1]


class DecodeError(RuntimeError):
    """The VAE produced non-finite values even in fp32 (broken weights, overflow): no image is written."""


# ---------------------------------------------------------------------------------------------- geometry

class Span(NamedTuple):
    """A tile along one axis: `length` positions from `start` (modulo the axis when it wraps); the tile
    owns positions start+lo .. start+hi-1, and the owned parts of all spans partition the axis."""

    start: int
    length: int
    lo: int
    hi: int


def axis_spans(size: int, tile: int, overlap: int, wrap: bool = False) -> List[Span]:
    """Tiles along one axis; on a periodic axis they are spread evenly round the circle and the last one
    overlaps the first across the edge, otherwise the last one is aligned to the far edge."""
    if size <= tile:
        return [Span(0, size, 0, size)]
    if wrap:
        starts = wrap_starts(size, tile, overlap)
        prev_end = [starts[-1] - size + tile] + [s + tile for s in starts[:-1]]
    else:
        starts = axis_starts(size, tile, overlap)
        prev_end = [0] + [s + tile for s in starts[:-1]]
    bounds = [(s + e) // 2 for s, e in zip(starts, prev_end)]
    bounds.append(bounds[0] + size)
    return [Span(s, tile, bounds[i] - s, bounds[i + 1] - s) for i, s in enumerate(starts)]


def window(span: Span, context: int, size: int, wrap: bool) -> Tuple[torch.Tensor, int]:
    """Canvas indices of a span widened by `context` (modulo `size` on a periodic axis, clipped at the
    canvas edge otherwise), and the offset of the span inside that window."""
    if wrap:
        return torch.arange(span.start - context, span.start + span.length + context) % size, context
    a, b = max(span.start - context, 0), min(span.start + span.length + context, size)
    return torch.arange(a, b), span.start - a


def _fine(idx: torch.Tensor, s: int) -> torch.Tensor:
    """Indices of a coarse axis mapped to an axis `s` times finer."""
    return (idx[:, None] * s + torch.arange(s)).reshape(-1)


def _crop(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, s: int) -> torch.Tensor:
    rows, cols = _fine(rows, s).to(x.device), _fine(cols, s).to(x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


class _Canvas:
    """Feathered accumulation of tiles at `s` canvas pixels per latent pixel, placed modulo the canvas."""

    def __init__(self, channels: int, h: int, w: int, s: int, overlap: int, device=None):
        self.s, self.overlap = s, overlap
        self.sum = torch.zeros(channels, h * s, w * s, device=device)
        self.weight = torch.zeros(h * s, w * s, device=device)

    def add(self, img: torch.Tensor, sy: Span, sx: Span):
        s, ov = self.s, self.overlap * self.s
        H, W = self.weight.shape
        ys = (sy.start * s + torch.arange(sy.length * s)) % H
        xs = (sx.start * s + torch.arange(sx.length * s)) % W
        w = torch.outer(ramp_profile(sy.length * s, ov), ramp_profile(sx.length * s, ov)).float().to(self.sum.device)
        ys, xs = ys.to(self.sum.device), xs.to(self.sum.device)
        self.sum[:, ys[:, None], xs] += img.float().to(self.sum.device) * w
        self.weight[ys[:, None], xs] += w

    def result(self) -> torch.Tensor:
        return self.sum / self.weight


def _grid(h: int, w: int, tile: int, overlap: int, wrap_y: bool, wrap_x: bool):
    return [(sy, sx) for sy in axis_spans(h, tile, overlap, wrap_y) for sx in axis_spans(w, tile, overlap, wrap_x)]


# --------------------------------------------------------------------------- tiles decoded independently

def decode_each(decode: Decode, z: torch.Tensor, factor: int, tile: int, overlap: int, context: int = 8,
                wrap_x: bool = False, wrap_y: bool = False) -> torch.Tensor:
    """Each tile decoded on its own with `context` latent pixels of true neighbours, feathered together."""
    H, W = z.shape[-2:]
    canvas = _Canvas(3, H, W, factor, overlap)
    for sy, sx in _grid(H, W, tile, overlap, wrap_y, wrap_x):
        (rows, oy), (cols, ox) = window(sy, context, H, wrap_y), window(sx, context, W, wrap_x)
        img = decode(_crop(z, rows, cols, 1))[0].float().cpu()
        if not torch.isfinite(img).all():
            raise DecodeError(f"VAE decode gave non-finite values in the tile at latent ({sy.start}, {sx.start})")
        canvas.add(img[:, oy * factor:(oy + sy.length) * factor, ox * factor:(ox + sx.length) * factor], sy, sx)
    return canvas.result()


# ---------------------------------------------------------------------------------- shared GroupNorms

Moments = Tuple[float, torch.Tensor, torch.Tensor]  # count, mean per group, sum of squared deviations
Stats = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # GroupNorm name -> mean, var per group


def _merge(a: Optional[Moments], b: Moments) -> Moments:
    """Chan et al.'s parallel update of (count, mean, M2)."""
    if a is None:
        return b
    (na, ma, qa), (nb, mb, qb) = a, b
    n, d = na + nb, mb - ma
    return n, ma + d * (nb / n), qa + qb + d * d * (na * nb / n)


def _group_moments(x: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Variance and mean per channel group of a [C, h, w] activation, in fp32, without copying it."""
    return torch.var_mean(x.unflatten(0, (groups, -1)).float(), dim=(1, 2, 3), correction=0)


class Win(NamedTuple):
    """A tile at (y, x), h x w, inside an H x W window of its neighbours; latent pixels."""

    y: int
    x: int
    h: int
    w: int
    H: int
    W: int


def shrink(t: torch.Tensor, win: Win, context: int) -> Tuple[torch.Tensor, Win]:
    """Cut an activation of a window down to the tile and at most `context` latent pixels round it."""
    s = t.shape[-1] // win.W
    y0, y1 = max(win.y - context, 0), min(win.y + win.h + context, win.H)
    x0, x1 = max(win.x - context, 0), min(win.x + win.w + context, win.W)
    return t[..., y0 * s:y1 * s, x0 * s:x1 * s], Win(win.y - y0, win.x - x0, win.h, win.w, y1 - y0, x1 - x0)


class GroupStats:
    """The GroupNorm statistics of one tiled pass, shared by all its SharedGroupNorms.

    A sweep with nothing `applied` lets each tile normalise with its own statistics; a gathering sweep
    with statistics applied uses them tracked to the tile (its window's statistics now, scaled as they
    moved since the last sweep, so that errors do not compound through the layers); the last sweep
    applies the same merged statistics to every tile. Gathering sweeps merge, per GroupNorm, the moments
    of the part of the canvas each tile owns, so every pixel counts once.
    """

    def __init__(self):
        self.applied: Optional[Stats] = None
        self.ref: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}  # (tile, name) -> window's
        self.key, self.own, self.gather, self.win = 0, (0, 0, 0, 0), False, None
        self.owned: Dict[str, Moments] = {}  # this tile's, kept once it ran finitely
        self.windows: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def begin(self, key: int, own: Tuple[int, int, int, int], gather: bool):
        """Tile `key`, owning rows own[0]:own[1] and columns own[2]:own[3] of itself."""
        self.key, self.own, self.gather = key, own, gather
        self.owned, self.windows = {}, {}

    def normalizer(self, name: str, x: torch.Tensor, groups: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Record x's statistics; the mean and var to normalise it with per group (None: its own)."""
        if not self.gather:
            return None if self.applied is None else self.applied[name]
        win, (ly, hy, lx, hx) = self.win, self.own
        s = x.shape[-1] // win.W
        if x.shape[-2] != win.H * s or x.shape[-1] != win.W * s:
            raise ValueError(f"GroupNorm {name} sees {tuple(x.shape)}, no multiple of the {win.H}x{win.W} window")
        var, mean = _group_moments(x[0], groups)
        self.windows[name] = m, v = mean.double(), var.double()
        part = x[0, :, (win.y + ly) * s:(win.y + hy) * s, (win.x + lx) * s:(win.x + hx) * s]
        pv, pm = _group_moments(part, groups)
        n = part[0].numel() * (part.shape[0] // groups)
        self.owned[name] = (n, pm.double(), pv.double() * n)
        if self.applied is None:
            return None
        (M, V), (m0, v0) = self.applied[name], self.ref[self.key, name]
        r2 = (v + 1e-12) / (v0 + 1e-12)
        return m + (M - m0) * r2.sqrt(), V * r2

    def tile_finite(self) -> bool:
        return all(bool(torch.isfinite(q).all()) for _, _, q in self.owned.values())

    def commit(self) -> Dict[str, Moments]:
        """The tile ran finitely: keep its windows' statistics, hand over the moments of the part it owns."""
        for name, mv in self.windows.items():
            self.ref[self.key, name] = mv
        owned, self.owned, self.windows = self.owned, {}, {}
        return owned


def merged(parts: Sequence[Dict[str, Moments]]) -> Stats:
    """The statistics of the whole canvas, per GroupNorm, from the moments of the parts its tiles own, merged
    in the order given (tile order: the same sums wherever the tiles ran)."""
    total: Dict[str, Moments] = {}
    for owned in parts:
        for name, m in owned.items():
            total[name] = _merge(total.get(name), m)
    return {name: (m, q / n) for name, (n, m, q) in total.items()}


class SharedGroupNorm(nn.Module):
    """Stands in for one nn.GroupNorm of a tiled pass: normalises with the statistics GroupStats gives."""

    def __init__(self, name: str, norm: nn.GroupNorm, stats: GroupStats):
        super().__init__()
        self.name, self.norm, self.stats = name, norm, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.norm.num_groups
        stats = self.stats.normalizer(self.name, x, g)
        if stats is None:
            return self.norm(x)
        mean, var = stats
        c = x.shape[1] // g
        scale = (var + self.norm.eps).rsqrt().float().repeat_interleave(c)
        shift = -mean.float().repeat_interleave(c) * scale
        if self.norm.affine:
            scale, shift = scale * self.norm.weight.float(), shift * self.norm.weight.float() + self.norm.bias.float()
        return x * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None]


class PeriodicConv(nn.Module):
    """Stands in for a zero-padded nn.Conv2d: pads circularly along the periodic axes."""

    def __init__(self, conv: nn.Conv2d, wrap_y: bool, wrap_x: bool):
        super().__init__()
        self.conv, self.wrap_y, self.wrap_x = conv, wrap_y, wrap_x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        ph, pw = c.padding
        x = F.pad(x, (pw if self.wrap_x else 0,) * 2 + (ph if self.wrap_y else 0,) * 2, mode="circular")
        return F.conv2d(x, c.weight, c.bias, c.stride, (0 if self.wrap_y else ph, 0 if self.wrap_x else pw),
                        c.dilation, c.groups)


def rebuilt(module: nn.Module, replace: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """A copy of `module` that shares its parameters and buffers, with submodules swapped by `replace`
    (the caller's module is never changed)."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    new = copy.deepcopy(module, memo)
    for pname, parent in list(new.named_modules()):
        for cname, child in list(parent.named_children()):
            r = replace(f"{pname}.{cname}" if pname else cname, child)
            if r is not None:
                setattr(parent, cname, r)
    return new


def _cutter(stats: GroupStats):
    """`shrink` that tells the shared GroupNorms where the tile now lies."""
    def cut(x: torch.Tensor, win: Win, context: int) -> Tuple[torch.Tensor, Win]:
        x, stats.win = shrink(x, win, context)
        return x, stats.win
    return cut


def _norms(stats: GroupStats):
    return lambda name, m: SharedGroupNorm(name, m, stats) if isinstance(m, nn.GroupNorm) else None


def _periodic(wrap_y: bool, wrap_x: bool):
    def swap(name, m):
        pads = isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        return PeriodicConv(m, wrap_y, wrap_x) if pads and (wrap_x or wrap_y) and any(m.padding) else None
    return swap


# --------------------------------------------------------------------------------- precision and sweeps

def _work_dtype(vae) -> torch.dtype:
    """fp32 for an fp16 VAE that asks for `force_upcast` (SDXL's overflows fp16's range), else its own dtype.
    As diffusers' pipelines do, bf16 is not upcast: it has fp32's range (SDXL at 4K on an H100: 1.4x faster)."""
    dtype = next(vae.parameters()).dtype
    return torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype


def _or_identity(vae, name: str) -> nn.Module:
    """vae.quant_conv / post_quant_conv, or an identity where the config leaves it out."""
    conv = getattr(vae, name, None)
    return conv if conv is not None else nn.Identity()


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


class _Precisions:
    """Runs a stage in the working dtype, and again in fp32 (on an fp32 copy, made once) if that gave
    non-finite values; fp32 that fails too is a DecodeError naming the stage."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, build: Callable[[nn.Module], nn.Module]):
        self.module, self.dtype, self.build = module, dtype, build
        self.nets = {dtype: build(module) if dtype == next(module.parameters()).dtype
                     else build(copy.deepcopy(module).to(dtype))}

    def net(self, dtype):
        if dtype not in self.nets:
            self.nets[dtype] = self.build(copy.deepcopy(self.module).float())
        return self.nets[dtype]

    def run(self, fn, x: torch.Tensor, where: str, stats: Optional[GroupStats] = None) -> torch.Tensor:
        for dtype in dict.fromkeys((self.dtype, torch.float32)):
            if stats is not None:
                stats.begin(stats.key, stats.own, stats.gather)
            y = fn(self.net(dtype), x.to(dtype))
            if _finite(y) and (stats is None or stats.tile_finite()):
                return y
        raise DecodeError(f"VAE gave non-finite values in {where}, also in fp32")


class Sweeps:
    """The tiles of one tiled pass over `src` (s_in pixels per latent pixel) and their GroupNorm statistics.

    `sweep` runs the tiles it is given: gathering (every sweep but the last) yields each tile's owned moments,
    the last yields each tile's output. Between sweeps the moments of all tiles are `merged` in tile order into
    the statistics the next sweep applies, so the tiles of one pass may be swept on several devices, each
    holding a `Sweeps` of the same pass (as tile-parallel rendering does), or all on one (`run_sweeps`)."""

    def __init__(self, run: Callable, src: torch.Tensor, s_in: int, size: Tuple[int, int], tile: int,
                 overlap: int, context: int, wrap: Tuple[bool, bool], stats: GroupStats):
        self.run, self.src, self.s_in, self.size, self.context, self.wrap, self.stats = (
            run, src, s_in, size, context, wrap, stats)
        self.spans = _grid(*size, tile, overlap, *wrap)

    @torch.no_grad()
    def sweep(self, indices: Iterable[int], applied: Optional[Stats], last: bool,
              number: int) -> Iterator[Tuple[int, object]]:
        """Sweep `number` (1-based) over tiles `indices`, normalising with `applied` (None: each tile its own
        statistics): yields (index, owned moments) while gathering, (index, [C, h, w] output) when `last`."""
        (H, W), stats = self.size, self.stats
        stats.applied = None if applied is None else {
            k: (m.to(self.src.device), v.to(self.src.device)) for k, (m, v) in applied.items()}
        for i in indices:
            sy, sx = self.spans[i]
            (rows, oy), (cols, ox) = (window(sy, self.context, H, self.wrap[0]),
                                      window(sx, self.context, W, self.wrap[1]))
            stats.begin(i, (sy.lo, sy.hi, sx.lo, sx.hi), gather=not last)
            win = Win(oy, ox, sy.length, sx.length, len(rows), len(cols))
            y = self.run(_crop(self.src, rows, cols, self.s_in), win,
                         f"the tile at latent ({sy.start}, {sx.start}), sweep {number}")
            owned = stats.commit()
            yield i, (y[0] if last else owned)


def run_sweeps(sweeps: Sweeps, passes: int, canvas: _Canvas) -> torch.Tensor:
    """`passes` sweeps over all the tiles on this device: all but the last gather statistics, the last writes
    each tile onto `canvas`. A canvas of one tile is swept once: its own statistics are the whole canvas's."""
    if passes < 1:
        raise ValueError(f"passes={passes}: must be at least 1")
    if len(sweeps.spans) == 1:
        passes = 1
    applied, every = None, range(len(sweeps.spans))
    for p in range(passes - 1):
        applied = merged([owned for _, owned in sweeps.sweep(every, applied, False, p + 1)])
    for i, y in sweeps.sweep(every, applied, True, passes):
        canvas.add(y, *sweeps.spans[i])
    return canvas.result()


def assemble(spans: Sequence[Tuple[Span, Span]], tiles: Dict[int, torch.Tensor], size: Tuple[int, int], s: int,
             overlap: int) -> torch.Tensor:
    """The feathered canvas of a last sweep's outputs gathered from several devices (tile index -> [C, h, w]),
    added in tile order as `run_sweeps` adds them; float32, CPU."""
    canvas = _Canvas(tiles[0].shape[0], *size, s, overlap)
    for i in range(len(spans)):
        canvas.add(tiles[i], *spans[i])
    return canvas.result()


# ------------------------------------------------------------------------------------------ architecture

def _reach(conv: nn.Module) -> int:
    """How far a conv looks to one side, in its input's pixels (both sides for unpadded, strided ones)."""
    if not isinstance(conv, nn.Conv2d):
        return 0
    ext = max(d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
    same = not isinstance(conv.padding, str) and 2 * max(conv.padding) == ext and max(conv.stride) == 1
    return ext // 2 if same else ext


def _convs(module: nn.Module) -> int:
    return sum(_reach(m) for m in module.modules())


def _needs(reaches: List[float], context: Optional[int]) -> List[int]:
    """Context (latent pixels) to keep before each stage: what the stages from there on look across."""
    needs = [math.ceil(sum(reaches[i:]) - 1e-9) for i in range(len(reaches))]
    return needs if context is None else [min(n, context) for n in needs]


def _no_attention(blocks, what):
    if any(type(m).__name__ == "Attention" for m in blocks.modules()):
        raise ValueError(f"{what} hold attention, which tiles cannot reproduce")


def vae_factor(vae) -> int:
    """Image pixels per latent pixel: 2 per down block that downsamples."""
    return 2 ** sum(1 for b in vae.encoder.down_blocks if getattr(b, "downsamplers", None))


def decoder_needs(vae, context: Optional[int] = None) -> List[int]:
    """Latent pixels of context before each up block and before conv_norm_out that make a tile see
    exactly what the full decode sees (at most `context`)."""
    dec, reaches, s = vae.decoder, [], 1
    for up in dec.up_blocks:
        r = _convs(up.resnets) / s
        for u in up.upsamplers or []:
            s *= 2
            r += _convs(u) / s
        reaches.append(r)
    return _needs(reaches + [_reach(dec.conv_out) / s], context)


def encoder_needs(vae, context: Optional[int] = None) -> List[int]:
    """Latent pixels of context before conv_in and before each down block that make a tile see exactly
    what the full encode sees (at most `context`)."""
    enc, f, s = vae.encoder, vae_factor(vae), 1
    reaches = [_reach(enc.conv_in) / f]
    for down in enc.down_blocks:
        r = _convs(down.resnets) * s
        for d in down.downsamplers or []:
            r += _convs(d) * s
            s *= 2
        reaches.append(r / f)
    return _needs(reaches, context)


# ------------------------------------------------------------------------------------ memory-fitted tiles

def activation_bytes(vae, dtype_bytes: int, slack: float = 3.0) -> float:
    """Bytes per latent pixel that the largest activation of the VAE's decoder or encoder takes, times `slack`
    (a resnet holds its input, its output and a normalised copy at once): the decode or encode of an h x w
    latent window peaks at about h * w times this. Counted from the module tree (channels x the square of the
    resolution over the latent's), so it holds for any AutoencoderKL layout."""
    dec, enc, f = vae.decoder, vae.encoder, vae_factor(vae)
    peak, r = dec.conv_in.out_channels, 1
    for up in dec.up_blocks:
        for res in up.resnets:
            peak = max(peak, (res.in_channels + res.out_channels) * r * r)
        if getattr(up, "upsamplers", None):
            r *= 2
            peak = max(peak, 2 * up.upsamplers[0].channels * r * r)  # the nearest-2x copy and the conv's output
    r = f
    peak = max(peak, (enc.conv_in.in_channels + enc.conv_in.out_channels) * r * r)
    for down in enc.down_blocks:
        for res in down.resnets:
            peak = max(peak, (res.in_channels + res.out_channels) * r * r)
        if getattr(down, "downsamplers", None):
            r //= 2
    return peak * dtype_bytes * slack


LADDER = (256, 192, 128, 96, 64, 48, 32, 16)  # tile sides tried below the whole frame, latent pixels


def tile_bytes(vae, h: int, w: int, tile: int) -> float:
    """What the tiled decode or encode of an h x w latent canvas in `tile`-sided tiles takes at its peak (in the
    dtype the tiled decode runs the VAE in): the whole frame's activations when the tile covers it, else one
    tile's window (the tile and the context its convolutions need on each side)."""
    per_px = activation_bytes(vae, _work_dtype(vae).itemsize)
    if tile >= max(h, w):
        return h * w * per_px
    context = max(decoder_needs(vae) + encoder_needs(vae))
    return (min(tile, h) + 2 * context) * (min(tile, w) + 2 * context) * per_px


def fitting_tile(vae, h: int, w: int, free_bytes: float) -> int:
    """The VAE tile side (latent pixels) that costs what memory forces and no more for an h x w canvas:
    max(h, w), the whole frame in one sweep (the exact full-frame pass), when it fits in `free_bytes`
    (`tile_bytes`); else the largest side of `LADDER` that fits; at least the ladder's smallest."""
    for side in (max(h, w),) + tuple(s for s in LADDER if s < max(h, w)):
        if tile_bytes(vae, h, w, side) <= free_bytes:
            return side
    return LADDER[-1]


def free_memory(device, share: float) -> float:
    """`share` of the memory a decode on `device` may take: the GPU's free memory plus what the caching
    allocator holds unused, or the machine's available memory for a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return share * free


# ----------------------------------------------------------------------------------- decode and encode

def decode_tiled_shared(vae, z: torch.Tensor, tile: int, overlap: int, context: Optional[int] = None,
                        wrap_x: bool = False, wrap_y: bool = False, passes: int = 3) -> torch.Tensor:
    """Decode unscaled latents [1, C, H, W] with an AutoencoderKL into a [3, H*f, W*f] float32 CPU image
    that matches `vae.decode(z).sample`; peak memory follows the tile (plus the latent-resolution mid block).

    `tile`, `overlap`, `context` are latent pixels (context defaults to the up blocks' receptive field, and
    is cut down block by block as it is used up); `wrap_x`/`wrap_y` make that axis periodic, so that the
    picture tiles seamlessly. `passes` sweeps over the tiles: 1 normalises each tile with its own statistics
    (one sweep, tiles differ in tone); 3 (the default) and more gather, refine and apply shared statistics as
    the module says; 2 applies the first sweep's, biased by the per-tile normalisation before each layer.
    """
    return run_sweeps(decoder_sweeps(vae, z, tile, overlap, context, wrap_x, wrap_y), passes,
                      _Canvas(3, *z.shape[-2:], vae_factor(vae), overlap))


@torch.no_grad()
def decoder_sweeps(vae, z: torch.Tensor, tile: int, overlap: int, context: Optional[int] = None,
                   wrap_x: bool = False, wrap_y: bool = False) -> Sweeps:
    """The tiled decode of `decode_tiled_shared` up to its sweeps: the latent-resolution stage run on the whole
    canvas, the up blocks' tiles ready to sweep (output: [3, h*f, w*f] each)."""
    if z.dim() != 4 or z.shape[0] != 1:
        raise ValueError(f"z must be [1, C, H, W], got {tuple(z.shape)}")
    dec = vae.decoder
    if not isinstance(dec.conv_norm_out, nn.GroupNorm):
        raise ValueError(f"decode_tiled_shared needs a GroupNorm decoder, got {type(dec.conv_norm_out).__name__}")
    _no_attention(dec.up_blocks, "the decoder's up blocks")
    needs = decoder_needs(vae, context)
    device, dtype = next(vae.parameters()).device, _work_dtype(vae)
    parts = nn.ModuleDict({"dec": dec, "quant": _or_identity(vae, "post_quant_conv")})

    def head(m, z):  # the latent-resolution part, on the whole canvas
        return m.dec.mid_block(m.dec.conv_in(m.quant(z)), None)

    h = _Precisions(parts, dtype, lambda m: rebuilt(m, _periodic(wrap_y, wrap_x))).run(
        head, z.to(device), "the latent-resolution stage (conv_in, mid block)")
    stats = GroupStats()

    cut = _cutter(stats)

    def tail(d, x, win):  # the up blocks on one tile, its context cut down as it is used up
        for up, c in zip(d.up_blocks, needs):
            x, win = cut(x, win, c)
            x = up(x, None)
        x, win = cut(x, win, needs[-1])
        return shrink(d.conv_out(d.conv_act(d.conv_norm_out(x))), win, 0)[0]

    tails = _Precisions(dec, dtype, lambda d: rebuilt(d, _norms(stats)))
    H, W = z.shape[-2:]
    return Sweeps(lambda x, win, where: tails.run(lambda d, x: tail(d, x, win), x, where, stats), h, 1, (H, W),
                  tile, overlap, needs[0], (wrap_y, wrap_x), stats)


@torch.no_grad()
def encode_tiled(vae, image: torch.Tensor, tile: int, overlap: int, context: Optional[int] = None,
                 wrap_x: bool = False, wrap_y: bool = False, passes: int = 3) -> torch.Tensor:
    """Encode an image [1, 3, H, W] in [-1, 1] (H, W multiples of the VAE factor) into the latent mean
    [1, C, H/f, W/f] (float32, CPU, before scaling) that matches `vae.encode(x).latent_dist.mean`.

    The down blocks run tile by tile with shared GroupNorm statistics, the mid block on the whole latent;
    `tile`, `overlap`, `context` are latent pixels, the rest as in `decode_tiled_shared`.
    """
    f = vae_factor(vae)
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[-2] % f or image.shape[-1] % f:
        raise ValueError(f"image must be [1, 3, H, W] with H and W multiples of {f}, got {tuple(image.shape)}")
    enc = vae.encoder
    _no_attention(enc.down_blocks, "the encoder's down blocks")
    needs = encoder_needs(vae, context)
    device, dtype = next(vae.parameters()).device, _work_dtype(vae)
    H, W = image.shape[-2] // f, image.shape[-1] // f
    stats = GroupStats()

    cut = _cutter(stats)

    def front(d, x, win):  # conv_in and the down blocks on one tile, its context cut down as it is used up
        x, win = cut(x, win, needs[0])
        x = d.conv_in(x)
        for down, c in zip(d.down_blocks, needs[1:]):
            x, win = cut(x, win, c)
            x = down(x)
        return shrink(x, win, 0)[0]

    fronts = _Precisions(enc, dtype, lambda d: rebuilt(d, _norms(stats)))
    feats = run_sweeps(Sweeps(lambda x, win, where: fronts.run(lambda d, x: front(d, x, win), x, where, stats),
                              image.to(device), f, (H, W), tile, overlap, needs[0], (wrap_y, wrap_x), stats),
                       passes, _Canvas(enc.conv_norm_out.num_channels, H, W, 1, overlap, device))
    parts = nn.ModuleDict({"enc": enc, "quant": _or_identity(vae, "quant_conv")})

    def back(m, x):  # the latent-resolution part, on the whole canvas
        return m.quant(m.enc.conv_out(m.enc.conv_act(m.enc.conv_norm_out(m.enc.mid_block(x)))))

    moments = _Precisions(parts, dtype, lambda m: rebuilt(m, _periodic(wrap_y, wrap_x))).run(
        back, feats[None], "the latent-resolution stage (mid block, conv_out)")
    return moments[:, :moments.shape[1] // 2].float().cpu()


def to_uint8(img: torch.Tensor, width: int, height: int) -> "numpy.ndarray":
    """A [3, H, W] image in [-1, 1] cropped to width x height, as an H x W x 3 uint8 array."""
    img = img[:, :height, :width]
    return ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
