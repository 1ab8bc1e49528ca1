"""``fastshare::segmented_batch_norm``: BatchNorm with statistics per (segment, channel) (DESIGN.md §2).

Layers (STYLE.md §2): per-segment ATen batch-norm kernels (the launcher :func:`_segmented_bn_fwd_impl`)
-> two registered ops: the functional ``fastshare::segmented_batch_norm`` (normalisation; fake +
autograd through ``fastshare::segmented_batch_norm_backward``) and the mutating
``fastshare::segmented_batch_norm_update_stats`` (running statistics; PyTorch registers autograd only
for functional ops, and the buffers need none) -> the functional :func:`segmented_batch_norm` ->
:class:`fastshare.model.norm.SegmentedBatchNorm2d`.

What runs where: each segment goes through ``aten::native_batch_norm`` (and
``aten::native_batch_norm_backward``) on its own rows, writing straight into its slice of one output
buffer (no concatenation). On CPU these are ATen's vectorised batch-norm kernels (contiguous and
channels_last); on CUDA the same calls reach ATen's CUDA batch-norm kernels (cuDNN is not used for the
per-segment calls because ATen's kernel takes the out= buffers). A segment is a contiguous block of rows,
so its slice of a contiguous or channels_last tensor is dense and the kernels run at full speed. Each
segment meets the kernel that ``nn.BatchNorm2d`` runs on it, so the output equals that of ``S`` separate
``F.batch_norm`` calls bitwise on CPU.

Running statistics: ``repeats = R`` says that each segment stands for ``R`` identical consecutive
segments (the shared prefix of the batched executor: ``B`` rows standing for ``K`` tasks). With ``T = S R``
momentum updates, update ``j`` (1-based) of segment ``s`` contributes ``m (1-m)^(T-j) mu_s``:
``rm <- (1-m)^T rm + sum_j m (1-m)^(T-j) mu_(s(j))``, the unbiased variance likewise, exactly ``T``
sequential BatchNorm calls (combined in float64 from the kernel's batch mean and unbiased variance). The
kernel writes that variance itself, as ``nn.BatchNorm2d``'s does (running buffers with momentum 1 receive
exactly the batch mean and unbiased variance): rebuilding it from the saved inverse std,
``1 / invstd^2 - eps``, cancels catastrophically for channels whose variance is near ``eps``.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastshare._validation import _data_checks_allowed, check_batch_norm_args
from fastshare.ops._constants import device_constant

__all__ = ["segmented_batch_norm"]


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bounds(seg: torch.Tensor) -> list[int]:
    return [int(v) for v in seg.tolist()]


def _kernel_affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The affine parameters handed to ATen's batch-norm kernels.

    For float16/bfloat16 ``x`` they are float32 (ones and zeros when absent): ATen's CPU kernels return the
    batch statistics in the parameters' dtype when it is ``x``'s (or when there are none), and only the
    mixed-precision path gives float32 statistics on every device, which the running-statistics update
    needs and this op's outputs promise.
    """
    if x.dtype not in (torch.float16, torch.bfloat16) or (weight is not None and weight.dtype == torch.float32
                                                            and (bias is None or bias.dtype == torch.float32)):
        return weight, bias
    channels = x.shape[1]
    w = x.new_ones(channels, dtype=torch.float32) if weight is None else weight.float()
    b = x.new_zeros(channels, dtype=torch.float32) if bias is None else bias.float()
    return w, b


def _segmented_bn_fwd_impl(x, weight, bias, running_mean, running_var, seg, eps, use_batch_stats):
    """Launcher: one ATen batch-norm per segment into the segment's slice of ``out``.

    Returns ``(out, save_mean, save_invstd, batch_var)``; with batch statistics the three statistics are
    ``(S, C)`` in float32 (float64 for float64 ``x``; ``batch_var`` unbiased), with running statistics they
    are empty ``(0,)`` tensors.
    """
    sdt = _stat_dtype(x)
    if not use_batch_stats:
        # Not the out= variant: with running statistics, torch 2.11's CUDA kernel asserts on its empty
        # save_mean buffer for channels_last inputs (seen on an H200).
        out = torch.ops.aten.native_batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
        empty = x.new_empty((0,), dtype=sdt)
        return out, empty, empty.clone(), empty.clone()
    out = torch.empty_like(x)
    bounds = _bounds(seg)
    n_seg, channels = len(bounds) - 1, x.shape[1]
    save_mean = x.new_empty((n_seg, channels), dtype=sdt)
    save_invstd = x.new_empty((n_seg, channels), dtype=sdt)
    # Fresh running buffers updated with momentum 1 receive the batch mean and the unbiased variance.
    batch_mean = x.new_zeros((n_seg, channels), dtype=sdt)
    batch_var = x.new_ones((n_seg, channels), dtype=sdt)
    weight, bias = _kernel_affine(x, weight, bias)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        torch.ops.aten.native_batch_norm.out(x[lo:hi], weight, bias, batch_mean[s], batch_var[s], True, 1.0, eps,
                                             out=out[lo:hi], save_mean=save_mean[s], save_invstd=save_invstd[s])
    return out, save_mean, save_invstd, batch_var


@torch.library.custom_op("fastshare::segmented_batch_norm", mutates_args=())
def _segmented_bn_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                     running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], seg: torch.Tensor,
                     eps: float, use_batch_stats: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _segmented_bn_fwd_impl(x, weight, bias, running_mean, running_var, seg, eps, use_batch_stats)


@_segmented_bn_op.register_fake
def _(x, weight, bias, running_mean, running_var, seg, eps, use_batch_stats):
    sdt = _stat_dtype(x)
    shape = (seg.shape[0] - 1, x.shape[1]) if use_batch_stats else (0,)
    return (torch.empty_like(x), x.new_empty(shape, dtype=sdt), x.new_empty(shape, dtype=sdt),
            x.new_empty(shape, dtype=sdt))


@torch.library.custom_op("fastshare::segmented_batch_norm_update_stats",
                         mutates_args=("running_mean", "running_var"))
def _update_stats_op(running_mean: torch.Tensor, running_var: torch.Tensor, batch_mean: torch.Tensor,
                     batch_var: torch.Tensor, seg: torch.Tensor, momentum: float, repeats: int) -> None:
    """``S R`` sequential momentum updates of the running statistics, in closed form, in float64.

    Segment ``s`` has mean ``mu_s = batch_mean[s]`` and unbiased variance ``v_s = batch_var[s]`` (``(S, C)``
    each). With ``T = S R`` updates, update ``j`` (1-based) contributes with weight ``m (1-m)^(T-j)``:
    ``rm <- (1-m)^T rm + sum_s c_s mu_s``, ``rv`` likewise with ``v_s``, ``c_s`` = the sum of the weights of
    the ``R`` updates of segment ``s``.
    """
    n_seg = seg.shape[0] - 1
    total = n_seg * repeats
    m = momentum
    coef = [sum(m * (1 - m) ** (total - (s * repeats + r + 1)) for r in range(repeats)) for s in range(n_seg)]
    c = device_constant(tuple(coef), torch.float64, batch_mean.device)
    decay = (1 - m) ** total
    running_mean.copy_(running_mean.double() * decay + c @ batch_mean.double())
    running_var.copy_(running_var.double() * decay + c @ batch_var.double())


@_update_stats_op.register_fake
def _(running_mean, running_var, batch_mean, batch_var, seg, momentum, repeats):
    return None


@torch.library.custom_op("fastshare::segmented_batch_norm_backward", mutates_args=())
def _segmented_bn_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                              running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                              save_mean: torch.Tensor, save_invstd: torch.Tensor, seg: torch.Tensor, eps: float,
                              use_batch_stats: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard BatchNorm backward per segment; ``dweight`` and ``dbias`` summed over segments.

    With ``xhat = (x - mu_s) * istd_s`` and upstream ``d`` on segment ``s`` (``n_s`` values per channel):
    ``dx = w * istd_s * (d - mean_s(d) - xhat * mean_s(d * xhat))``, ``dw = sum_s sum d * xhat``,
    ``db = sum d``; with running statistics (eval): ``dx = w * d / sqrt(rv + eps)``.
    """
    channels = x.shape[1]
    pdt = weight.dtype if weight is not None else _stat_dtype(x)
    dx = torch.empty_like(x)
    if not use_batch_stats:
        # The closed form, not native_batch_norm_backward: with running statistics, torch 2.11's CUDA
        # kernel asserts on the absent save_mean for channels_last inputs (seen on an H200).
        cdt = _stat_dtype(x)
        view = (1, channels) + (1,) * (x.ndim - 2)
        istd = (running_var.to(cdt) + eps).rsqrt()
        scale = istd if weight is None else istd * weight.to(cdt)
        g = grad.to(cdt)
        dx.copy_(g * scale.reshape(view))
        dims = [0] + list(range(2, x.ndim))
        dw = (g * (x.to(cdt) - running_mean.to(cdt).reshape(view))).sum(dims) * istd
        return dx, dw.to(pdt), g.sum(dims).to(pdt)
    kernel_weight, _ = _kernel_affine(x, weight, None)
    # Summed over segments in the kernels' parameter dtype (float32 for low-precision x), then cast.
    acc = kernel_weight.dtype if kernel_weight is not None else pdt
    dw = x.new_zeros((channels,), dtype=acc)
    db = x.new_zeros((channels,), dtype=acc)
    bounds = _bounds(seg)
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad[lo:hi], x[lo:hi], kernel_weight, None, None,
                                                               save_mean[s], save_invstd[s], True, eps,
                                                               [True, True, True])
        dx[lo:hi].copy_(gx)
        dw.add_(gw)
        db.add_(gb)
    return dx, dw.to(pdt), db.to(pdt)


@_segmented_bn_backward_op.register_fake
def _(grad, x, weight, running_mean, running_var, save_mean, save_invstd, seg, eps, use_batch_stats):
    pdt = weight.dtype if weight is not None else _stat_dtype(x)
    return torch.empty_like(x), x.new_empty((x.shape[1],), dtype=pdt), x.new_empty((x.shape[1],), dtype=pdt)


def _setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, seg, eps, use_batch_stats = inputs
    _, save_mean, save_invstd, _ = output
    ctx.use_batch_stats = use_batch_stats
    ctx.eps = eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    if ctx.use_batch_stats:
        # Backward needs only the batch statistics (the running buffers may be updated before it runs).
        ctx.save_for_backward(x, weight, save_mean, save_invstd, seg)
    else:
        # Running statistics are not updated in this mode, so saving the buffers is safe.
        ctx.save_for_backward(x, weight, running_mean, running_var, seg)


def _backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_var):
    if ctx.use_batch_stats:
        x, weight, save_mean, save_invstd, seg = ctx.saved_tensors
        running_mean = running_var = None
    else:
        x, weight, running_mean, running_var, seg = ctx.saved_tensors
        save_mean = save_invstd = x.new_empty((0,))
    grad = grad_out.contiguous(memory_format=_memory_format(x))
    dx, dw, db = _segmented_bn_backward_op(grad, x, weight, running_mean, running_var, save_mean, save_invstd,
                                           seg, ctx.eps, ctx.use_batch_stats)
    return dx, dw if ctx.has_weight else None, db if ctx.has_bias else None, None, None, None, None, None


_segmented_bn_op.register_autograd(_backward, setup_context=_setup)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def segmented_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         running_mean: torch.Tensor | None, running_var: torch.Tensor | None, seg: torch.Tensor,
                         momentum: float = 0.1, eps: float = 1e-5, training: bool = True,
                         repeats: int = 1) -> torch.Tensor:
    """BatchNorm whose training statistics are per (segment, channel), as ``S`` separate BatchNorm calls.

    Args:
        x: ``(N, C, ...)``; contiguous or channels_last (other layouts are copied to contiguous).
        weight, bias: ``(C,)`` affine parameters or ``None``.
        running_mean, running_var: ``(C,)`` buffers, updated in place in training, or ``None``.
        seg: int64 ``(S + 1,)`` row offsets, every segment non-empty when batch statistics are used; keep
            it on the CPU (it is read on the host to slice the rows).
        momentum: running-statistics momentum ``m`` (a float; PyTorch's cumulative ``None`` is not
            supported here).
        eps: variance epsilon.
        training: per-segment batch statistics and running-statistics update; else the running
            statistics normalise every row (batch statistics per segment if there are none).
        repeats: ``R >= 1``: each segment stands for ``R`` identical consecutive segments in the
            running-statistics update (``S R`` momentum updates in all); the output does not depend on it.

    Returns:
        ``(N, C, ...)`` in ``x``'s dtype and layout: on segment ``s``,
        ``(x - mu_s) / sqrt(var_s + eps) * weight + bias`` with the biased per-segment variance.

    The caller adds ``S * R`` to ``num_batches_tracked`` (see :class:`~fastshare.model.norm.SegmentedBatchNorm2d`).

    Example:
        >>> y = segmented_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
        ...                          torch.tensor([0, 4, 8, 12]), 0.1, 1e-5, True)
    """
    use_batch_stats = bool(training) or running_mean is None
    check_batch_norm_args(x, weight, bias, running_mean, running_var, seg, use_batch_stats)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if momentum is None or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    if seg.device.type != "cpu":
        seg = seg.cpu()
    fmt = _memory_format(x)
    if not x.is_contiguous(memory_format=fmt):
        x = x.contiguous()
    values_per_row = 1
    for d in x.shape[2:]:
        values_per_row *= int(d)
    bounds = _bounds(seg) if use_batch_stats and _data_checks_allowed(seg) else None
    if bounds is not None and any((hi - lo) * values_per_row < 2 for lo, hi in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"expected more than 1 value per channel in every segment when training, got "
                         f"segments {bounds} of {tuple(x.shape)}")
    out, save_mean, _, batch_var = _segmented_bn_op(x, weight, bias, running_mean, running_var, seg,
                                                    float(eps), use_batch_stats)
    if training and running_mean is not None:
        _update_stats_op(running_mean, running_var, save_mean.detach(), batch_var.detach(), seg, float(momentum),
                         int(repeats))
    return out
