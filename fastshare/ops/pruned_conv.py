"""``fastshare::pruned_conv3x3``: a dilated 3x3 convolution that skips every product with zero padding.

The ASPP heads (DESIGN.md §1) open each branch with ``conv2d(x, W, b, stride 1, padding d, dilation d)``, a
3x3 kernel with rates ``d`` in 6, 12, 18, 24, on output-stride-8 features (41 x 41 for a 321 x 321 image).
Along one axis of length ``n``, output position ``i`` reads input positions ``i - d, i, i + d`` through kernel
taps 0, 1, 2; the outer ones fall in the zero padding when ``i < d`` or ``i >= n - d``. So each axis splits
into at most three **bands** of positions that read the same taps::

    d >= n:      [0, n) reads tap 1 only
    2 d <= n:    [0, d) taps 1-2,  [d, n - d) taps 0-2,  [n - d, n) taps 0-1
    d < n < 2d:  [0, n - d) taps 1-2,  [n - d, d) tap 1,  [d, n) taps 0-1

and the output into (row band) x (column band) regions. Each region is one matmul: its ``M = B h_r w_r``
pixels, each with the inputs of its ``T`` live taps side by side (an im2col of ``T`` shifted crops,
``(M, T C_in)``), times those taps' weights ``(T C_in, C_out)``. The result is the padded convolution exactly
(the same products, summed in another order) at a fraction of its FLOPs: :func:`live_tap_fraction`, 0.81,
0.65, 0.50, 0.37 for the four rates at 41 x 41, 0.56, 0.25, 1/9, 1/9 at 16 x 16. Backward: per region,
``grad_W_taps = G^T cols`` and ``grad_cols = G W_taps``, scatter-added back onto the taps' crops (each
only when that gradient is wanted).

Whether that is faster depends on the convolution library and the shape: up to 9 matmuls (the corner ones
small) plus the im2col copies, against one convolution kernel that may already skip some padding itself.
On this project's 2-core CPU (oneDNN; ``bench/bench_pruned_conv.py``, forward + backward, float32) the split
took 0.61x the padded convolution's time at 16 x 16, rate 12 and 0.73x at 41 x 41, rate 24, but 1.3-2.1x at
the other rates. So :func:`pruned_conv3x3` decides per call site:

- ``split=False``: one convolution; only axes with ``d >= n`` drop their outer taps (a single band, so still
  one convolution, always faster: the kernel shrinks to ``1x3``, ``3x1`` or ``1x1``);
- ``split=True``: the band regions above (one convolution where there is a single region);
- ``split=None`` (default): ``FASTSHARE_CONV_SPLIT`` = ``auto`` (default: the first call of each shape times
  both, forward and also backward when a gradient is wanted, best of 3 after a warm-up, and keeps the
  faster for that shape; a compiled graph or a CUDA-graph capture cannot time and reuses an eager call's
  choice, else does not split, and so does a call under a dispatch mode such as ``FlopCounterMode``),
  ``always`` or ``never``.

The split's output (and its input gradient) is channels_last whatever ``x``'s layout: the matmuls write
pixel rows, which is also the layout the fast heads read next. On CUDA its matmuls use TF32 exactly when
cuDNN's convolutions may (``torch.backends.cudnn.allow_tf32``), so that it rounds like the convolution it
replaces and the timing compares like with like.

Layers: the reference is ``F.conv2d`` with padding ``d`` (the spec); the ops ``fastshare::pruned_conv3x3``
(the split) and ``fastshare::pruned_conv3x3_backward`` (fake + autograd; ATen matmuls, so every device) ->
the functional :func:`pruned_conv3x3`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

__all__ = ["TapBand", "tap_bands", "live_tap_fraction", "pruned_conv3x3", "pruned_dilated_kernel",
           "split_choice_cache", "split_choices"]

SPLIT_MODES = ("auto", "always", "never")
_ENV = "FASTSHARE_CONV_SPLIT"


@dataclasses.dataclass(frozen=True)
class TapBand:
    """Output positions ``[start, stop)`` of one axis read kernel taps ``[first_tap, stop_tap)``; tap ``t``
    of output ``i`` reads input ``i + (t - 1) d``."""

    start: int
    stop: int
    first_tap: int
    stop_tap: int

    def input_span(self, dilation: int) -> tuple[int, int]:
        """``[lo, hi)``: the input positions the band reads (``lo < 0`` or ``hi > n``: zero padding)."""
        return self.start + (self.first_tap - 1) * dilation, self.stop + (self.stop_tap - 2) * dilation

    @property
    def taps(self) -> slice:
        return slice(self.first_tap, self.stop_tap)


def tap_bands(dilation: int, size: int, split: bool = True) -> tuple[TapBand, ...]:
    """The bands of an axis of length ``size`` (module docstring). ``split=False``: one band, the whole axis
    with all three taps (padding ``d``) or, if ``d >= size``, with the centre tap only."""
    _check_dilation(dilation)
    if size < 1:
        raise ValueError(f"pruned_conv3x3: spatial size must be >= 1, got {size}")
    d, n = dilation, size
    if d >= n:
        return (TapBand(0, n, 1, 2),)
    if not split:
        return (TapBand(0, n, 0, 3),)
    if 2 * d <= n:
        bands = (TapBand(0, d, 1, 3), TapBand(d, n - d, 0, 3), TapBand(n - d, n, 0, 2))
    else:
        bands = (TapBand(0, n - d, 1, 3), TapBand(n - d, d, 1, 2), TapBand(d, n, 0, 2))
    return tuple(b for b in bands if b.stop > b.start)


def _live_taps(dilation: int, size: int) -> int:
    """``sum_i (live taps of position i)`` along one axis (``3 n`` when nothing meets padding)."""
    return sum((b.stop - b.start) * (b.stop_tap - b.first_tap) for b in tap_bands(dilation, size))


def live_tap_fraction(dilation: int, height: int, width: int) -> float:
    """Share of the padded convolution's multiply-adds that the split computes (1.0: nothing to skip)."""
    return _live_taps(dilation, height) * _live_taps(dilation, width) / (9 * height * width)


def pruned_dilated_kernel(weight: torch.Tensor, dilation: int, height: int, width: int
                          ) -> tuple[torch.Tensor, tuple[int, int]]:
    """The exact smaller kernel of a 3x3 convolution with padding = dilation = ``d`` on ``h x w`` inputs.

    Args:
        weight: ``(C_out, C_in, 3, 3)``.
        dilation: ``d`` (the convolution's padding too).
        height, width: input ``h, w`` (stride 1, so also the output size).

    Returns:
        ``(kernel, padding)``: ``kernel`` is ``weight`` without the rows (if ``d >= h``) and the columns
        (if ``d >= w``) that only ever meet zero padding, a view of ``weight`` of shape
        ``(C_out, C_in, 1 or 3, 1 or 3)``; ``padding`` the matching ``(pad_h, pad_w)`` (0 where pruned).
        :func:`pruned_conv3x3` with ``split=False`` is ``F.conv2d`` with this kernel and padding.
    """
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"expected a (C_out, C_in, 3, 3) kernel, got {tuple(weight.shape)}")
    (rows,), (cols,) = tap_bands(dilation, height, split=False), tap_bands(dilation, width, split=False)
    pad = (dilation if rows.first_tap == 0 else 0, dilation if cols.first_tap == 0 else 0)
    return weight[:, :, rows.taps, cols.taps], pad


def _check_dilation(dilation: int) -> None:
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"pruned_conv3x3: dilation must be an int >= 1, got {dilation!r}")


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The layout of the one-convolution path's output, as ``F.conv2d`` gives it (used in the tuning key)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@dataclasses.dataclass(frozen=True)
class _Region:
    """One output region ``[rows, cols]`` of the split and its taps ``(ty, tx, input rows, input cols)``."""

    rows: slice
    cols: slice
    taps: tuple[tuple[int, int, slice, slice], ...]

    @property
    def size(self) -> tuple[int, int]:
        """``(h_r, w_r)``."""
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start


def _split_regions(height: int, width: int, dilation: int) -> list[_Region]:
    def shifted(band: TapBand, tap: int) -> slice:
        return slice(band.start + (tap - 1) * dilation, band.stop + (tap - 1) * dilation)

    return [_Region(slice(rb.start, rb.stop), slice(cb.start, cb.stop),
                    tuple((ty, tx, shifted(rb, ty), shifted(cb, tx))
                          for ty in range(rb.first_tap, rb.stop_tap) for tx in range(cb.first_tap, cb.stop_tap)))
            for rb in tap_bands(dilation, height) for cb in tap_bands(dilation, width)]


def _pixel_rows(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B, h, w, C)``, contiguous (a view when ``t`` is channels_last)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _empty_nhwc(like: torch.Tensor, bsz: int, channels: int, height: int, width: int, zero: bool = False,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels_last ``(B, C, h, w)`` tensor (not a view: the ops return it) and its ``(B, h, w, C)`` view;
    ``like``'s dtype unless ``dtype`` is given."""
    t = torch.empty((bsz, channels, height, width), dtype=dtype or like.dtype, device=like.device,
                    memory_format=torch.channels_last)
    if zero:
        t.zero_()
    return t, t.permute(0, 2, 3, 1)


def _im2col(x_rows: torch.Tensor, region: _Region) -> torch.Tensor:
    """``(M, T C_in)``: the region's pixels (``M = B h_r w_r``), each with the ``T`` live taps' inputs."""
    cols = torch.cat([x_rows[:, r, c, :] for _, _, r, c in region.taps], dim=-1)
    return cols.reshape(-1, cols.shape[-1])


def _tap_matrix(weight: torch.Tensor, region: _Region) -> torch.Tensor:
    """``(C_out, T C_in)``: the live taps' weights, in :func:`_im2col`'s order."""
    return torch.cat([weight[:, :, ty, tx] for ty, tx, _, _ in region.taps], dim=1)


@contextlib.contextmanager
def _convolution_math(device: torch.device) -> Iterator[None]:
    """Autocast off (the functional casts first: here the inputs' dtype is the output's), and on CUDA the
    matmuls under cuDNN's TF32 setting instead of cuBLAS's: the op stands in for a convolution, so it
    rounds like one (PyTorch's defaults allow TF32 in convolutions, not in matmuls)."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------------------------------
# Registered ops: the split, each region one matmul over its live taps (im2col of a few shifted crops).

@torch.library.custom_op("fastshare::pruned_conv3x3", mutates_args=())
def _pruned_conv3x3_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dilation: int
                       ) -> torch.Tensor:
    bsz, _, height, width = x.shape
    out, out_rows = _empty_nhwc(x, bsz, weight.shape[0], height, width)
    x_rows = _pixel_rows(x)
    with _convolution_math(x.device):
        for region in _split_regions(height, width, dilation):
            cols, w_taps = _im2col(x_rows, region), _tap_matrix(weight, region)
            res = torch.mm(cols, w_taps.t()) if bias is None else torch.addmm(bias, cols, w_taps.t())
            out_rows[:, region.rows, region.cols, :] = res.view(bsz, *region.size, weight.shape[0])
    return out


@_pruned_conv3x3_op.register_fake
def _(x, weight, bias, dilation):
    return _empty_nhwc(x, x.shape[0], weight.shape[0], x.shape[2], x.shape[3])[0]


@torch.library.custom_op("fastshare::pruned_conv3x3_backward", mutates_args=())
def _pruned_conv3x3_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int,
                                input_grad: bool, weight_grad: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias)``; a gradient not asked for is an empty ``(0,)`` tensor.

    Each input pixel and weight tap sums contributions of several regions: float16/bfloat16 gradients are
    summed in float32 and rounded once, as a convolution's backward does."""
    bsz, c_in, height, width = x.shape
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    grad_x, grad_x_rows = x.new_empty(0), None
    if input_grad:
        grad_x, grad_x_rows = _empty_nhwc(x, bsz, c_in, height, width, zero=True, dtype=acc)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight_grad else (
        weight.new_empty(0))
    x_rows, grad_rows = _pixel_rows(x), _pixel_rows(grad)
    with _convolution_math(x.device):
        for region in _split_regions(height, width, dilation) if input_grad or weight_grad else ():
            g = grad_rows[:, region.rows, region.cols, :].reshape(-1, grad.shape[1])  # (M, C_out)
            if weight_grad:
                g_w = torch.mm(g.t(), _im2col(x_rows, region))  # (C_out, T C_in); im2col recomputed, not saved
                for i, (ty, tx, _, _) in enumerate(region.taps):
                    grad_w[:, :, ty, tx] += g_w[:, i * c_in:(i + 1) * c_in]
            if input_grad:
                g_cols = torch.mm(g, _tap_matrix(weight, region)).view(bsz, *region.size, len(region.taps), c_in)
                for i, (_, _, r, c) in enumerate(region.taps):
                    grad_x_rows[:, r, c, :] += g_cols[:, :, :, i, :]
    # .to() keeps grad_x channels_last and returns the buffer itself when no rounding is needed.
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad.sum(dim=(0, 2, 3))


@_pruned_conv3x3_backward_op.register_fake
def _(grad, x, weight, dilation, input_grad, weight_grad):
    grad_x = _empty_nhwc(x, *x.shape)[0] if input_grad else x.new_empty(0)
    grad_w = weight.new_empty(weight.shape) if weight_grad else weight.new_empty(0)
    return grad_x, grad_w, grad.new_empty((grad.shape[1],))


def _setup(ctx, inputs, output):
    x, weight, bias, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilation, ctx.has_bias = dilation, bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_w, grad_b = _pruned_conv3x3_backward_op(grad, x, weight, ctx.dilation, need_x, need_w)
    return (grad_x if need_x else None, grad_w if need_w else None,
            grad_b if ctx.has_bias and ctx.needs_input_grad[2] else None, None)


_pruned_conv3x3_op.register_autograd(_backward, setup_context=_setup)


def _split_flops(x_shape, weight_shape, dilation: int) -> int:
    """Multiply-adds x 2 of the split: the padded convolution's, times :func:`live_tap_fraction`."""
    bsz, c_in, height, width = x_shape
    return 2 * bsz * weight_shape[0] * c_in * _live_taps(dilation, height) * _live_taps(dilation, width)


# FlopCounterMode (fastshare.profile, the benchmarks) sees the ops, not the matmuls inside them.
@register_flop_formula(torch.ops.fastshare.pruned_conv3x3)
def _(x_shape, weight_shape, bias_shape, dilation, *args, out_shape=None, **kwargs) -> int:
    return _split_flops(x_shape, weight_shape, dilation)


@register_flop_formula(torch.ops.fastshare.pruned_conv3x3_backward)
def _(grad_shape, x_shape, weight_shape, dilation, input_grad, weight_grad, *args, out_shape=None,
      **kwargs) -> int:
    return (int(input_grad) + int(weight_grad)) * _split_flops(x_shape, weight_shape, dilation)


# ----------------------------------------------------------------------------------------------------
# Choosing split per call site.

#: ``key -> split`` for every shape timed so far (``FASTSHARE_CONV_SPLIT=auto``).
split_choice_cache: dict[tuple, bool] = {}


def split_choices() -> list[dict[str, object]]:
    """The choices made so far, JSON-ready (for benchmark result files): one dict per timed shape."""
    names = ("device", "dtype", "x_shape", "channels_last", "weight_shape", "bias", "dilation", "backward", "tf32",
             "cudnn_benchmark")
    return [{**{n: (str(v) if n == "dtype" else v) for n, v in zip(names, key)}, "split": split}
            for key, split in split_choice_cache.items()]


def _tuning_key(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, backward: bool
                ) -> tuple:
    """What the timing depends on: device, dtype, shapes, layout, bias, rate, whether a backward follows,
    for CUDA float32 whether TF32 is allowed (both forms follow cuDNN's flag, and TF32 changes which is
    faster), and on CUDA whether cuDNN searches its algorithms (``torch.backends.cudnn.benchmark``: it
    changes the padded form's speed)."""
    tf32 = x.is_cuda and x.dtype == torch.float32 and bool(torch.backends.cudnn.allow_tf32)
    searched = x.is_cuda and bool(torch.backends.cudnn.benchmark)
    return (str(x.device), x.dtype, tuple(x.shape), _layout(x) == torch.channels_last, tuple(weight.shape),
            bias is not None, dilation, backward, tf32, searched)


def _split_mode() -> str:
    mode = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if mode not in SPLIT_MODES:
        raise ValueError(f"{_ENV}={mode!r}: expected one of {', '.join(SPLIT_MODES)}")
    return mode


@torch.compiler.assume_constant_result
def _cached_choice(key: tuple) -> bool:
    """A compiled graph or a CUDA graph capture cannot time: it reuses an eager call's choice, else no split."""
    return split_choice_cache.get(key, False)


def _time_split(run: Callable[[bool], None], device: torch.device, repeats: int = 3) -> dict[bool, float]:
    """Best-of-``repeats`` seconds of ``run(split)`` for both values, after one warm-up call each."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = {}
    for split in (False, True):
        run(split)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(split)
            sync()
            times.append(time.perf_counter() - start)
        best[split] = min(times)
    return best


def _choose_split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int,
                  timer: Callable[..., dict[bool, float]] | None = None) -> bool:
    mode = _split_mode()
    if mode != "auto":
        return mode == "always"
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    key = _tuning_key(x, weight, bias, dilation, backward)
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing or key in split_choice_cache:
        return _cached_choice(key)
    if _get_current_dispatch_mode() is not None:
        # Under a dispatch mode (FlopCounterMode, a profiler's op counter, fake tensors) the timing runs
        # would be counted as the caller's work, or cannot run at all.
        return False
    xs, ws = x.detach().requires_grad_(x.requires_grad), weight.detach().requires_grad_(weight.requires_grad)
    bs = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
    leaves = [t for t in (xs, ws, bs) if t is not None and t.requires_grad]

    def run(split: bool) -> None:
        out = _conv(xs, ws, bs, dilation, split)
        if backward:
            torch.autograd.grad(out, leaves, out)

    times = (timer or _time_split)(run, x.device)
    split_choice_cache[key] = times[True] < times[False]
    return split_choice_cache[key]


# ----------------------------------------------------------------------------------------------------
# Functional API.

def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, split: bool
          ) -> torch.Tensor:
    kernel, pad = pruned_dilated_kernel(weight, dilation, *x.shape[2:])
    if split and any(pad):  # an axis with padding left has more than one band
        return _pruned_conv3x3_op(x, weight, bias, dilation)
    return F.conv2d(x, kernel, bias, 1, pad, dilation)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.ndim != 4:
        raise ValueError(f"pruned_conv3x3: x must be (B, C_in, h, w), got shape {tuple(x.shape)}")
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"pruned_conv3x3: weight must be (C_out, {x.shape[1]}, 3, 3) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"pruned_conv3x3: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.device != x.device or t.dtype != x.dtype):
            raise ValueError(f"pruned_conv3x3: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
    if not x.is_floating_point():
        raise TypeError(f"pruned_conv3x3: x must be floating point, got {x.dtype}")


def pruned_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, *,
                   split: bool | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=1, padding=dilation, dilation=dilation)`` without the products
    with zero padding (module docstring).

    Args:
        x: ``(B, C_in, h, w)``, floating point, any layout.
        weight: ``(C_out, C_in, 3, 3)``; bias: ``(C_out,)`` or None; same dtype and device as ``x``.
        dilation: ``d >= 1`` (the padding too).
        split: True: one matmul per band region (one convolution where there is one region); False: one
            convolution, outer taps dropped only on axes with ``d >= n``; None: ``FASTSHARE_CONV_SPLIT``
            decides (default ``auto``: both timed on the first call of each shape, the faster kept).

    Returns:
        ``(B, C_out, h, w)`` equal to the padded convolution up to float rounding, differentiable in ``x``,
        ``weight`` and ``bias``; channels_last from the split, ``F.conv2d``'s layout from one convolution.
        Under autocast, the inputs are cast to the autocast dtype first, as ``F.conv2d``'s are.

    Example:
        >>> a = pruned_conv3x3(x, conv.weight, conv.bias, 12)   # == conv(x) for Conv2d(..., 3, padding=12, dilation=12)
    """
    _check_dilation(dilation)
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        # Cast before the dtype checks: under autocast, F.conv2d takes a bf16 x with float32 parameters.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = (t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, weight, bias))
    _check_inputs(x, weight, bias)
    if split is None:
        split = _choose_split(x, weight, bias, dilation)
    return _conv(x, weight, bias, dilation, split)
