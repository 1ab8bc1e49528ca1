"""``fastshare::pruned_conv3x3``: a dilated 3x3 convolution that skips every product with zero padding.

The ASPP heads (DESIGN.md §1) open each branch with ``conv2d(x, W, b, stride 1, padding d, dilation d)``, a
3x3 kernel with rates ``d`` in 6, 12, 18, 24, on output-stride-8 features (41 x 41 for a 321 x 321 image).
Along one axis of length ``n``, output position ``i`` reads input positions ``i - d, i, i + d`` through kernel
taps 0, 1, 2; the outer ones fall in the zero padding when ``i < d`` or ``i >= n - d``. So each axis splits
into at most three **bands** of positions that read the same taps::

    d >= n:      [0, n) reads tap 1 only
    2 d <= n:    [0, d) taps 1-2,  [d, n - d) taps 0-2,  [n - d, n) taps 0-1
    d < n < 2d:  [0, n - d) taps 1-2,  [n - d, d) tap 1,  [d, n) taps 0-1

and the output into (row band) x (column band) regions, each an ordinary unpadded convolution of an input crop
with the matching sub-kernel ``W[:, :, taps_r, taps_c]``. The result is the padded convolution exactly (the
same products, summed in another order) at a fraction of its FLOPs: :func:`live_tap_fraction`, 0.81, 0.65,
0.50, 0.37 for the four rates at 41 x 41, 0.56, 0.25, 1/9, 1/9 at 16 x 16.

Whether that is faster depends on the convolution library: the regions are smaller convolutions (up to 9 of
them, the corner ones tiny), each of whose input crops is copied. On this project's 2-core CPU (oneDNN) the
split ran 1.3-2.9x *slower* than the one padded convolution for every multi-region case measured (16 x 16
and 41 x 41, ``bench/bench_pruned_conv.py``), so :func:`pruned_conv3x3` decides per call site:

- ``split=False``: one convolution; only axes with ``d >= n`` drop their outer taps (a single band, so still
  one convolution, always faster: the kernel shrinks to ``1x3``, ``3x1`` or ``1x1``);
- ``split=True``: the band regions above;
- ``split=None`` (default): ``FASTSHARE_CONV_SPLIT`` = ``auto`` (default: CUDA tensors are timed once per
  shape, both ways, forward and backward, and the faster kept; CPU tensors do not split), ``tune`` (time on any
  device), ``always`` or ``never``.

Layers: the reference is ``F.conv2d`` with padding ``d`` (the spec); the op ``fastshare::pruned_conv3x3`` and
its backward ``fastshare::pruned_conv3x3_backward`` (fake + autograd; they run ATen convolutions, so they
serve every device) -> the functional :func:`pruned_conv3x3`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["TapBand", "tap_bands", "live_tap_fraction", "pruned_conv3x3", "split_choice_cache"]

SPLIT_MODES = ("auto", "tune", "always", "never")
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


def live_tap_fraction(dilation: int, height: int, width: int) -> float:
    """Share of the padded convolution's multiply-adds that the split computes (1.0: nothing to skip)."""
    def axis(n: int) -> float:
        return sum((b.stop - b.start) * (b.stop_tap - b.first_tap) for b in tap_bands(dilation, n)) / (3 * n)
    return axis(height) * axis(width)


def _check_dilation(dilation: int) -> None:
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"pruned_conv3x3: dilation must be an int >= 1, got {dilation!r}")


def _layout(x: torch.Tensor) -> torch.memory_format:
    """The output layout: channels_last for a channels_last ``x`` (as ``F.conv2d`` does), else NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _regions(x: torch.Tensor, dilation: int, split: bool):
    """``(out_rows, out_cols, in_rows, in_cols, taps_r, taps_c, pad)`` per output region."""
    height, width = x.shape[2:]
    for rb in tap_bands(dilation, height, split):
        r_lo, r_hi = rb.input_span(dilation)
        for cb in tap_bands(dilation, width, split):
            c_lo, c_hi = cb.input_span(dilation)
            # A padded band (split=False, d < n) reads [-d, n + d): padding d, the whole axis.
            pad = (max(0, -r_lo), max(0, -c_lo))
            yield (slice(rb.start, rb.stop), slice(cb.start, cb.stop), slice(max(r_lo, 0), min(r_hi, height)),
                   slice(max(c_lo, 0), min(c_hi, width)), rb.taps, cb.taps, pad)


# ----------------------------------------------------------------------------------------------------
# Registered ops (multi-region plans; a one-region plan is a plain F.conv2d, differentiated by ATen).

def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


@torch.library.custom_op("fastshare::pruned_conv3x3", mutates_args=())
def _pruned_conv3x3_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int,
                       split: bool) -> torch.Tensor:
    bsz, _, height, width = x.shape
    out = torch.empty((bsz, weight.shape[0], height, width), dtype=x.dtype, device=x.device,
                      memory_format=_layout(x))
    with _no_autocast(x.device):
        for out_r, out_c, in_r, in_c, taps_r, taps_c, pad in _regions(x, dilation, split):
            out[:, :, out_r, out_c] = F.conv2d(x[:, :, in_r, in_c], weight[:, :, taps_r, taps_c], bias, 1, pad,
                                               dilation)
    return out


@_pruned_conv3x3_op.register_fake
def _(x, weight, bias, dilation, split):
    bsz, _, height, width = x.shape
    return torch.empty((bsz, weight.shape[0], height, width), dtype=x.dtype, device=x.device,
                       memory_format=_layout(x))


@torch.library.custom_op("fastshare::pruned_conv3x3_backward", mutates_args=())
def _pruned_conv3x3_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dilation: int,
                                split: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x = torch.zeros_like(x, memory_format=_layout(x))
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    with _no_autocast(x.device):
        for out_r, out_c, in_r, in_c, taps_r, taps_c, pad in _regions(x, dilation, split):
            g_x, g_w, _ = torch.ops.aten.convolution_backward(
                grad[:, :, out_r, out_c], x[:, :, in_r, in_c], weight[:, :, taps_r, taps_c], None, [1, 1],
                list(pad), [dilation, dilation], False, [0, 0], 1, [True, True, False])
            grad_x[:, :, in_r, in_c] += g_x
            grad_w[:, :, taps_r, taps_c] += g_w
    return grad_x, grad_w, grad.sum(dim=(0, 2, 3))


@_pruned_conv3x3_backward_op.register_fake
def _(grad, x, weight, dilation, split):
    return (torch.empty_like(x, memory_format=_layout(x)), torch.empty_like(weight, memory_format=torch.contiguous_format),
            grad.new_empty((grad.shape[1],)))


def _setup(ctx, inputs, output):
    x, weight, bias, dilation, split = inputs
    ctx.save_for_backward(x, weight)
    ctx.dilation, ctx.split, ctx.has_bias = dilation, split, bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = _pruned_conv3x3_backward_op(grad, x, weight, ctx.dilation, ctx.split)
    return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None


_pruned_conv3x3_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------
# Choosing split per call site.

#: ``key -> split`` for every shape timed so far (``FASTSHARE_CONV_SPLIT`` = auto or tune).
split_choice_cache: dict[tuple, bool] = {}


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
                  timer: Callable[..., dict[bool, float]] = _time_split) -> bool:
    mode = _split_mode()
    if mode in ("always", "never"):
        return mode == "always"
    if mode == "auto" and x.device.type != "cuda":
        return False
    backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    key = (str(x.device), x.dtype, tuple(x.shape), _layout(x) == torch.channels_last, tuple(weight.shape),
           bias is not None, dilation, backward)
    capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing or key in split_choice_cache:
        return _cached_choice(key)
    xs, ws = x.detach().requires_grad_(x.requires_grad), weight.detach().requires_grad_(weight.requires_grad)
    bs = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
    leaves = [t for t in (xs, ws, bs) if t is not None and t.requires_grad]

    def run(split: bool) -> None:
        out = _conv(xs, ws, bs, dilation, split)
        if backward:
            torch.autograd.grad(out, leaves, out)

    times = timer(run, x.device)
    split_choice_cache[key] = times[True] < times[False]
    return split_choice_cache[key]


# ----------------------------------------------------------------------------------------------------
# Functional API.

def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, split: bool
          ) -> torch.Tensor:
    regions = list(_regions(x, dilation, split))
    if len(regions) == 1:
        _, _, _, _, taps_r, taps_c, pad = regions[0]
        return F.conv2d(x, weight[:, :, taps_r, taps_c], bias, 1, pad, dilation)
    return _pruned_conv3x3_op(x, weight, bias, dilation, split)


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
        split: True: one convolution per band region; False: one convolution, outer taps dropped only on
            axes with ``d >= n``; None: ``FASTSHARE_CONV_SPLIT`` decides (default ``auto``: timed on CUDA).

    Returns:
        ``(B, C_out, h, w)``, channels_last when ``x`` is, equal to the padded convolution up to float
        rounding; differentiable in ``x``, ``weight`` and ``bias``. Under autocast, the inputs are cast to
        the autocast dtype first, as ``F.conv2d``'s are.
    """
    _check_dilation(dilation)
    _check_inputs(x, weight, bias)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if split is None:
        split = _choose_split(x, weight, bias, dilation)
    return _conv(x, weight, bias, dilation, split)
