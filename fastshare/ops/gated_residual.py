"""``fastshare::gated_residual`` and ``fastshare::gumbel_gate``: registered custom ops and functional API.

Layers (STYLE.md §2): kernels (``fastshare.kernels.gated_residual``, ``csrc/``) -> launchers (those
modules' ``gated_residual_fwd/bwd``) -> the ``fastshare::`` ops below (fake + autograd) -> the functional
:func:`gated_residual` and :class:`fastshare.model.GatedResidual`.

The backend is a string argument of the op, resolved before the call, so that ``torch.compile`` sees a
constant and each backend's kernels stay opaque to the compiler.
"""

from __future__ import annotations

import torch

from fastshare import reference
from fastshare._env import env_flag
from fastshare._validation import check_gate_args, check_residual_args
from fastshare.ops import backends
from fastshare.ops._constants import device_constant

__all__ = ["gated_residual", "gumbel_gate", "deterministic_reductions"]


def deterministic_reductions() -> bool:
    """Whether the gate-gradient reductions must be run-to-run deterministic.

    True under ``torch.use_deterministic_algorithms(True)`` or ``FASTSHARE_DETERMINISTIC=1``.
    """
    return torch.are_deterministic_algorithms_enabled() or env_flag("FASTSHARE_DETERMINISTIC", False)


# ----------------------------------------------------------------------------------------------------
# Backend implementations: (forward, backward) per concrete backend.

def _fwd_reference(f, r, alpha, u, tau, hard, seg):
    return reference.gated_residual_ref(f, r, alpha, u, tau, hard, seg)


def _bwd_reference(grad, f, r, alpha, u, tau, hard, seg, deterministic):
    return reference.gated_residual_backward_ref(grad, f, r, alpha, u, tau, hard, seg)


def _fwd_ext(f, r, alpha, u, tau, hard, seg):
    return torch.ops.fastshare_C.gated_residual_fwd(f, r, alpha, u, tau, hard, seg)


def _bwd_ext(grad, f, r, alpha, u, tau, hard, seg, deterministic):
    return tuple(torch.ops.fastshare_C.gated_residual_bwd(grad, f, r, alpha, u, tau, hard, seg, deterministic))


def _fwd_triton(f, r, alpha, u, tau, hard, seg):
    from fastshare.kernels import gated_residual as tk

    return tk.gated_residual_fwd(f, r, alpha, u, tau, hard, seg)


def _bwd_triton(grad, f, r, alpha, u, tau, hard, seg, deterministic):
    from fastshare.kernels import gated_residual as tk

    return tk.gated_residual_bwd(grad, f, r, alpha, u, tau, hard, seg, deterministic)


_IMPLS = {
    "reference": (_fwd_reference, _bwd_reference),
    "cpu": (_fwd_ext, _bwd_ext),
    "cuda": (_fwd_ext, _bwd_ext),
    "triton": (_fwd_triton, _bwd_triton),
}


# ----------------------------------------------------------------------------------------------------
# Registered ops.

@torch.library.custom_op("fastshare::gated_residual", mutates_args=())
def _gated_residual_op(f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor, tau: float,
                       hard: bool, seg: torch.Tensor, backend: str) -> torch.Tensor:
    return _IMPLS[backend][0](f, r, alpha, u, tau, hard, seg)


@_gated_residual_op.register_fake
def _(f, r, alpha, u, tau, hard, seg, backend):
    return torch.empty_like(f)


@torch.library.custom_op("fastshare::gated_residual_backward", mutates_args=())
def _gated_residual_backward_op(grad: torch.Tensor, f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor,
                                u: torch.Tensor, tau: float, hard: bool, seg: torch.Tensor, backend: str,
                                deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _IMPLS[backend][1](grad, f, r, alpha, u, tau, hard, seg, deterministic)


@_gated_residual_backward_op.register_fake
def _(grad, f, r, alpha, u, tau, hard, seg, backend, deterministic):
    # dalpha is a fresh contiguous (S, 2) tensor in every backend, whatever alpha's strides.
    return torch.empty_like(f), torch.empty_like(r), alpha.new_empty(alpha.shape)


def _match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (the kernels read ``grad``, ``f`` and ``r`` as one flat layout)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _gated_residual_setup(ctx, inputs, output):
    f, r, alpha, u, tau, hard, seg, backend = inputs
    ctx.save_for_backward(f, r, alpha, u, seg)
    ctx.tau, ctx.hard, ctx.backend = tau, hard, backend


def _gated_residual_backward(ctx, grad):
    f, r, alpha, u, seg = ctx.saved_tensors
    df, dr, dalpha = _gated_residual_backward_op(_match_layout(grad, f), f, r, alpha, u, ctx.tau, ctx.hard,
                                                 seg, ctx.backend, deterministic_reductions())
    return df, dr, dalpha, None, None, None, None, None


_gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


@torch.library.custom_op("fastshare::gumbel_gate", mutates_args=())
def _gumbel_gate_op(alpha: torch.Tensor, u: torch.Tensor, tau: float, hard: bool) -> torch.Tensor:
    with torch.no_grad():
        return reference.gumbel_gate_ref(alpha, u, tau, hard)


@_gumbel_gate_op.register_fake
def _(alpha, u, tau, hard):
    return torch.empty_like(alpha)


def _gumbel_gate_setup(ctx, inputs, output):
    alpha, u, tau, hard = inputs
    ctx.save_for_backward(alpha, u)
    ctx.tau, ctx.hard = tau, hard


def _gumbel_gate_backward(ctx, grad):
    alpha, u = ctx.saved_tensors
    return reference.gumbel_gate_backward_ref(grad, alpha, u, ctx.tau, ctx.hard), None, None, None


_gumbel_gate_op.register_autograd(_gumbel_gate_backward, setup_context=_gumbel_gate_setup)


# ----------------------------------------------------------------------------------------------------
# Functional API.

def _resolve_backend(explicit: str | None, device: torch.device, dtype: torch.dtype) -> str:
    # The request (call site, use_backend context, FASTSHARE_BACKEND) is traced, so a compiled graph is
    # guarded on it and recompiles when it changes; what it resolves to is a constant.
    return _resolve_request(backends.requested_backend(explicit), device, dtype)


@torch.compiler.assume_constant_result
def _resolve_request(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    # A constant for torch.compile: dynamo runs this eagerly instead of tracing the availability probes
    # (importlib, extension import), which some torch versions refuse to trace.
    return backends.resolve(requested, device, dtype, "gated_residual_fwd")


def _dense_rows(t: torch.Tensor) -> bool:
    """Dense memory with dim 0 outermost: contiguous, or channels_last for 4-D tensors."""
    if t.is_contiguous():
        return True
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _seg_on(seg: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``seg`` on ``device``; a host ``seg`` for a CUDA op becomes a cached device constant (see
    :mod:`fastshare.ops._constants`: no host-to-device copy per call, CUDA-graph safe)."""
    if seg.device == device or seg.device.type != "cpu" or torch.compiler.is_compiling():
        return seg.to(device, non_blocking=True)
    return device_constant(tuple(int(v) for v in seg.tolist()), torch.int64, device)


def gated_residual(f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor, tau: float,
                   hard: bool, seg: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Fused Gumbel-gated residual: ``out = y[s,0] * relu(r + f) + y[s,1] * r`` on segment ``s``.

    Args:
        f: ``(N, C, H, W)`` (or any ``(N, ...)``) residual branch ``F(x)``; float32, bfloat16 or float16
            (float64 on the reference and cpu backends).
        r: shortcut, same shape, dtype and device as ``f``.
        alpha: ``(S, 2)`` logits per segment (column 0 = execute, column 1 = skip).
        u: ``(S, 2)`` uniform noise in (0, 1).
        tau: temperature, > 0.
        hard: straight-through one-hot gate (forward one-hot, backward soft).
        seg: int64 ``(S + 1,)`` row offsets (any device; moved to ``f``'s).
        backend: ``auto``, ``reference``, ``cpu``, ``cuda`` or ``triton``; None: the context's choice.

    The gate ``y = softmax((alpha + G) / tau)``, ``G = -log(-log u)``, is computed inside the kernel.
    ``f`` and ``r`` must share one layout: contiguous or channels_last; any other layout (a slice, a
    transpose) is copied to contiguous memory first. Gradients flow to ``f``, ``r`` and ``alpha``.

    Example:
        >>> out = gated_residual(f, r, alpha, torch.rand(3, 2).clamp_(1e-6, 1 - 1e-6), 5.0, False,
        ...                      torch.tensor([0, 4, 8, 12]))
    """
    check_residual_args(f, r, alpha, u, tau, seg)
    if not _dense_rows(f) or f.stride() != r.stride():
        # Documented copy: the kernels stream f and r as one flat row-major layout.
        f, r = f.contiguous(), r.contiguous()
    seg = _seg_on(seg, f.device)
    alpha_k = alpha if alpha.dtype in (torch.float32, torch.float64) else alpha.float()
    u_k = u.to(alpha_k.dtype)
    name = _resolve_backend(backend, f.device, f.dtype)
    out = _gated_residual_op(f, r, alpha_k, u_k, float(tau), bool(hard), seg, name)
    return out


def gumbel_gate(alpha: torch.Tensor, u: torch.Tensor, tau: float, hard: bool) -> torch.Tensor:
    """Gumbel-Softmax gate as a custom op: ``softmax((alpha + G) / tau)`` over the last axis.

    Args:
        alpha: ``(..., 2)`` logits; u: uniform noise of the same shape; tau > 0; hard: straight-through.

    Returns:
        ``y`` with ``alpha``'s shape and dtype.
    """
    check_gate_args(alpha, u, tau)
    # u keeps at least float32 (a bf16 alpha must not round u = 0.999 to 1); the gate is computed in
    # float32 or float64 either way (reference.gumbel_gate_ref).
    return _gumbel_gate_op(alpha, u.to(torch.promote_types(u.dtype, torch.float32)), float(tau), bool(hard))
