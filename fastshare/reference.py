"""The pure-PyTorch specification of every fastshare op (DESIGN.md §2).

Nothing here uses a custom kernel: each function is written straight from the maths, computes in at
least float32 (float64 inputs stay float64) and casts back to the input dtype, so that every fast backend
can be tested against it. Autograd through these functions gives the gradients of the spec; the explicit
``*_backward_ref`` functions state the backward formulas the kernels implement.

Conventions (shapes first):

- ``f, r``: ``(N, C, H, W)`` (or any shape with rows along dim 0), the residual branch ``F(x)`` and the
  shortcut. Rows are grouped into ``S`` contiguous segments.
- ``seg``: int64 ``(S + 1,)`` row offsets, ``seg[0] = 0``, ``seg[S] = N``, non-decreasing; segment ``s``
  holds rows ``seg[s]:seg[s+1]`` (``cu_seqlens`` of flash-attn's varlen API).
- ``alpha, u``: ``(S, 2)``: a block's policy logits (column 0 = execute, column 1 = skip) and uniform noise
  in (0, 1) for each segment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastshare._validation import check_gate_args, check_residual_args, check_batch_norm_args

__all__ = [
    "gumbel_noise",
    "gumbel_gate_ref",
    "gumbel_gate_backward_ref",
    "gated_residual_ref",
    "gated_residual_backward_ref",
    "segmented_batch_norm_ref",
    "segment_ids",
]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gumbel_noise(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples from uniform samples: ``G = -log(-log u)``, ``u`` in (0, 1)."""
    return -torch.log(-torch.log(u))


def _soft_gate(alpha: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    dt = _compute_dtype(alpha)
    z = alpha.to(dt) + gumbel_noise(u.to(dt))
    return torch.softmax(z / tau, dim=-1)


def _soft_gate_backward(dy: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Gradient through ``y = softmax(z / tau)`` over two columns: ``dz = (dy - <y, dy>) * y / tau``,
    evaluated as ``dz0 = y0 * y1 * (dy0 - dy1) / tau = -dz1`` (the same value: ``y0 + y1 = 1``).

    The textbook form subtracts two nearly equal numbers when the gate saturates: at ``y1 = 1e-6`` in
    float32 it loses all but a few bits of ``dz``, and Adam, which rescales each logit's gradient, turns
    those bits into full-size steps of either sign."""
    dz0 = y[..., 0] * y[..., 1] * (dy[..., 0] - dy[..., 1]) / tau
    return torch.stack((dz0, -dz0), dim=-1)


def _one_hot_argmax(y: torch.Tensor) -> torch.Tensor:
    # Ties go to column 0 (execute), as torch.argmax picks the first maximum.
    select = (y[..., 0] >= y[..., 1]).to(y.dtype)
    return torch.stack((select, 1 - select), dim=-1)


def gumbel_gate_ref(alpha: torch.Tensor, u: torch.Tensor, tau: float, hard: bool) -> torch.Tensor:
    """Gumbel-Softmax gate.

    Args:
        alpha: ``(..., 2)`` logits (column 0 = execute, column 1 = skip).
        u: uniform noise of the same shape, in (0, 1).
        tau: temperature, > 0.
        hard: straight-through: the forward value is the one-hot argmax of the soft gate (ties to
            column 0), the gradient is the soft gate's.

    Returns:
        ``y`` of ``alpha``'s shape and dtype: ``softmax((alpha + G) / tau)`` with ``G = -log(-log u)``.
    """
    check_gate_args(alpha, u, tau)
    y = _soft_gate(alpha, u, tau)
    if hard:
        y = _one_hot_argmax(y.detach()) - y.detach() + y
    return y.to(alpha.dtype)


def gumbel_gate_backward_ref(grad_y: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor, tau: float,
                             hard: bool) -> torch.Tensor:
    """Gradient of :func:`gumbel_gate_ref` w.r.t. ``alpha``: ``dz = (dy - <y, dy>) * y / tau``
    (in the cancellation-free form of :func:`_soft_gate_backward`).

    ``y`` is the soft gate in both modes (straight-through in hard mode). Shapes as ``alpha``.
    """
    y = _soft_gate(alpha, u, tau)
    return _soft_gate_backward(grad_y.to(y.dtype), y, tau).to(alpha.dtype)


def segment_ids(seg: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Segment index of each row: int64 ``(n_rows,)`` with ``ids[i] = s`` for ``seg[s] <= i < seg[s+1]``."""
    lengths = (seg[1:] - seg[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=seg.device), lengths,
                                   output_size=n_rows)


def _row_view(gate_col: torch.Tensor, ndim: int) -> torch.Tensor:
    return gate_col.reshape((-1,) + (1,) * (ndim - 1))


def gated_residual_ref(f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor, tau: float,
                       hard: bool, seg: torch.Tensor) -> torch.Tensor:
    """The fused op's specification: ``out = y[s,0] * relu(r + f) + y[s,1] * r`` on segment ``s``.

    Args:
        f: ``(N, ...)`` residual branch output ``F(x)``.
        r: ``(N, ...)`` shortcut ``shortcut(x)``, same shape and dtype as ``f``.
        alpha, u: ``(S, 2)`` logits and uniform noise per segment.
        tau: temperature, > 0.
        hard: straight-through one-hot gate.
        seg: int64 ``(S + 1,)`` row offsets.

    Returns:
        ``out`` of ``f``'s shape and dtype, computed in float32 (float64 for float64 inputs).
    """
    check_residual_args(f, r, alpha, u, tau, seg)
    y = gumbel_gate_ref(alpha, u, tau, hard)
    dt = _compute_dtype(f)
    ids = segment_ids(seg.to(f.device), f.shape[0])
    y_rows = y.to(device=f.device, dtype=dt)[ids]  # (N, 2)
    f32, r32 = f.to(dt), r.to(dt)
    out = _row_view(y_rows[:, 0], f.ndim) * torch.relu(r32 + f32) + _row_view(y_rows[:, 1], f.ndim) * r32
    return out.to(f.dtype)


def gated_residual_backward_ref(grad: torch.Tensor, f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor,
                                u: torch.Tensor, tau: float, hard: bool, seg: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit backward of :func:`gated_residual_ref` (DESIGN.md §2).

    With ``m = [r + f > 0]``, the forward gate ``g`` (one-hot in hard mode) and upstream gradient ``d``:
    ``df = g0 * m * d``; ``dr = (g0 * m + g1) * d``; ``dg0[s] = sum_s d * relu(r + f)``,
    ``dg1[s] = sum_s d * r``; ``dalpha = (dg - <y, dg>) * y / tau`` with the soft gate ``y``, evaluated
    as ``dalpha0 = y0 * y1 * (dg0 - dg1) / tau = -dalpha1`` (no cancellation at saturated gates).

    Returns:
        ``(df, dr, dalpha)`` in the dtypes of ``f``, ``r`` and ``alpha``.
    """
    check_residual_args(f, r, alpha, u, tau, seg)
    dt = _compute_dtype(f)
    y_soft = _soft_gate(alpha, u, tau)
    g = _one_hot_argmax(y_soft) if hard else y_soft
    ids = segment_ids(seg.to(f.device), f.shape[0])
    g_rows = g.to(device=f.device, dtype=dt)[ids]
    f32, r32, d32 = f.to(dt), r.to(dt), grad.to(dt)
    s = r32 + f32
    m = (s > 0).to(dt)
    g0, g1 = _row_view(g_rows[:, 0], f.ndim), _row_view(g_rows[:, 1], f.ndim)
    df = g0 * m * d32
    dr = (g0 * m + g1) * d32
    n_seg = alpha.shape[0]
    row_len = math.prod(f.shape[1:])  # explicit: reshape(N, -1) cannot infer -1 when N = 0
    per_row0 = (d32 * torch.relu(s)).reshape(f.shape[0], row_len).sum(1)
    per_row1 = (d32 * r32).reshape(f.shape[0], row_len).sum(1)
    dg = torch.zeros(n_seg, 2, dtype=dt, device=f.device)
    dg[:, 0].index_add_(0, ids, per_row0)
    dg[:, 1].index_add_(0, ids, per_row1)
    dalpha = _soft_gate_backward(dg, y_soft.to(device=f.device, dtype=dt), tau)
    return df.to(f.dtype), dr.to(r.dtype), dalpha.to(device=alpha.device, dtype=alpha.dtype)


def segmented_batch_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                             running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                             seg: torch.Tensor, momentum: float, eps: float, training: bool) -> torch.Tensor:
    """BatchNorm with statistics per (segment, channel), as if each segment went through BN on its own.

    Args:
        x: ``(N, C, ...)``.
        weight, bias: ``(C,)`` affine parameters or ``None``.
        running_mean, running_var: ``(C,)`` buffers (updated in place in training) or ``None``.
        seg: int64 ``(S + 1,)`` row offsets.
        momentum: running-statistics momentum ``m``.
        eps: variance epsilon.
        training: batch statistics per segment (and running-statistics update) if True, running
            statistics for all rows otherwise (batch statistics per segment when there are none).

    In training, the running statistics are updated once per segment in segment order, exactly as ``S``
    sequential ``F.batch_norm`` calls: ``rm <- (1-m)^S rm + sum_k m (1-m)^(S-k) mean_k``, with the
    unbiased variance for ``running_var``. The caller adds ``S`` to ``num_batches_tracked``.
    """
    use_batch_stats = training or running_mean is None
    check_batch_norm_args(x, weight, bias, running_mean, running_var, seg, use_batch_stats)
    if not use_batch_stats:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    bounds = seg.tolist()
    parts = [F.batch_norm(x[lo:hi], running_mean, running_var, weight, bias, True, momentum, eps)
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=0)
