"""The sweeps of a tiled pass: each tile cut from the source with its window of context and run through a copy
of the tiled blocks whose GroupNorms share statistics (`stats`), in the working dtype and again in fp32 when
that gives non-finite values; and tiles decoded independently, for comparison."""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import Canvas, Grid, crop, shrink
from .stats import Current, Stats, TileStats, merged, shared_norms

Decode = Callable[[torch.Tensor], torch.Tensor]  # [1, C, h, w] latents -> [1, 3, h*f, w*f] in [-1, 1]


class DecodeError(RuntimeError):
    """The VAE produced non-finite values even in fp32 (broken weights, overflow): no image is written."""


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


# ------------------------------------------------------------------------------ copies of the module tree

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


def periodic(wrap_y: bool, wrap_x: bool):
    """For `rebuilt`: zero-padded convs swapped for PeriodicConvs along the periodic axes."""
    def swap(name, m):
        pads = isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        return PeriodicConv(m, wrap_y, wrap_x) if pads and (wrap_x or wrap_y) and any(m.padding) else None
    return swap


class PointwiseConv(nn.Module):
    """Stands in for a 1x1 nn.Conv2d on a CPU: the same sums as one matrix product (`torch.addmm`, the bias
    first, as oneDNN adds it: the same bytes on one thread). oneDNN's 1x1 convolution rounds differently with
    the thread count (by ~1e-6), the matrix product and the VAE's other layers do not, so a pass gives the same
    picture on one thread as on several (tile-parallel mode lends an idle worker's threads to the one pass)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, (n, _, h, w) = self.conv, x.shape
        weight = c.weight.view(c.out_channels, -1)
        bias = c.bias if c.bias is not None else weight.new_zeros(c.out_channels)
        return torch.stack([torch.addmm(bias[:, None], weight, x[k].reshape(-1, h * w)) for k in range(n)]
                           ).view(n, -1, h, w)


def pointwise(module: nn.Module):
    """For `rebuilt`: on a CPU, the 1x1 convs swapped for PointwiseConvs (a GPU's convolutions stay)."""
    cpu = next(module.parameters()).device.type == "cpu"

    def swap(name, m):
        plain = (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
                 and m.padding in ((0, 0), "valid") and m.dilation == (1, 1))
        return PointwiseConv(m) if cpu and plain else None
    return swap


def either(*swaps: Callable[[str, nn.Module], Optional[nn.Module]]):
    """For `rebuilt`: the first of `swaps` that swaps a module."""
    def swap(name, m):
        return next((r for r in (s(name, m) for s in swaps) if r is not None), None)
    return swap


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


class Precisions:
    """Runs a stage in the working dtype, and again in fp32 (on an fp32 copy, made once) if that gave
    non-finite values (`ok` false); fp32 that fails too is a DecodeError naming the stage."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, build: Callable[[nn.Module], nn.Module]):
        self.module, self.dtype, self.build = module, dtype, build
        self.nets = {dtype: build(module) if dtype == next(module.parameters()).dtype
                     else build(copy.deepcopy(module).to(dtype))}

    def net(self, dtype):
        if dtype not in self.nets:
            self.nets[dtype] = self.build(copy.deepcopy(self.module).float())
        return self.nets[dtype]

    def run(self, fn, x: torch.Tensor, where: str, ok: Callable[[object], bool] = _finite):
        for dtype in dict.fromkeys((self.dtype, torch.float32)):
            y = fn(self.net(dtype), x.to(dtype))
            if ok(y):
                return y
        raise DecodeError(f"VAE gave non-finite values in {where}, also in fp32")


# ----------------------------------------------------------------------------------------------- sweeps

TileFn = Callable[[nn.Module, torch.Tensor, TileStats], torch.Tensor]  # (net, window of src, tile) -> [1, C, h, w]


class Sweeps:
    """The tiles of one tiled pass over `src` (the latent canvas of `grid`, at any pixels per latent pixel)
    through `blocks` (run in `dtype`, as `run_tile` says), and the statistics its sweeps leave.

    `sweep` runs the tiles it is given: gathering (every sweep but the last) yields each tile's owned moments,
    the last yields each tile's output. Between sweeps the moments of all tiles are `merged` in tile order into
    the statistics the next sweep applies, so the tiles of one pass may be swept on several devices, each
    holding a `Sweeps` of the same pass (as tile-parallel rendering does), or all on one (`run_sweeps`)."""

    def __init__(self, blocks: nn.Module, dtype: torch.dtype, run_tile: TileFn, src: torch.Tensor, grid: Grid):
        self.run_tile, self.src, self.grid, self.spans = run_tile, src, grid, grid.spans()
        self.current = current = Current()  # the nets' norms hold it, not this: no cycle keeps `src` alive
        self.nets = Precisions(blocks, dtype, lambda m: rebuilt(m, either(shared_norms(current), pointwise(m))))
        self.ref = {}  # tile index -> its window's statistics in its last gathering sweep

    @torch.no_grad()
    def sweep(self, indices: Iterable[int], applied: Optional[Stats], last: bool,
              number: int) -> Iterator[Tuple[int, object]]:
        """Sweep `number` (1-based) over tiles `indices`, normalising with `applied` (None: each tile its own
        statistics): yields (index, owned moments) while gathering, (index, [C, h, w] output) when `last`."""
        dev, s = self.src.device, self.src.shape[-1] // self.grid.size[1]
        applied = None if applied is None else {k: (m.to(dev), v.to(dev)) for k, (m, v) in applied.items()}
        for i in indices:
            sy, sx = self.spans[i]
            rows, cols, win = self.grid.window(sy, sx)

            def run(net, x):
                self.current.tile = t = TileStats(win, (sy.lo, sy.hi, sx.lo, sx.hi), not last, applied,
                                                  self.ref.get(i))
                return self.run_tile(net, x, t), t

            y, t = self.nets.run(run, crop(self.src, rows, cols, s),
                                 f"the tile at latent ({sy.start}, {sx.start}), sweep {number}",
                                 ok=lambda out: _finite(out[0]) and out[1].finite())
            if not last:
                self.ref[i] = t.windows
            yield i, (y[0] if last else t.owned)


def run_sweeps(sweeps: Sweeps, passes: int, canvas: Canvas) -> torch.Tensor:
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


def decode_each(decode: Decode, z: torch.Tensor, factor: int, tile: int, overlap: int, context: int = 8,
                wrap_x: bool = False, wrap_y: bool = False) -> torch.Tensor:
    """Each tile decoded on its own with `context` latent pixels of true neighbours, feathered together."""
    grid = Grid(tuple(z.shape[-2:]), tile, overlap, context, (wrap_y, wrap_x))
    canvas = Canvas(3, *grid.size, factor, overlap)
    for sy, sx in grid.spans():
        rows, cols, win = grid.window(sy, sx)
        img = decode(crop(z, rows, cols, 1))[0].float().cpu()
        if not _finite(img):
            raise DecodeError(f"VAE decode gave non-finite values in the tile at latent ({sy.start}, {sx.start})")
        canvas.add(shrink(img, win, 0)[0], sy, sx)
    return canvas.result()
