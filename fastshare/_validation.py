"""Input checks shared by the reference, the custom ops and the modules.

Every check raises ``ValueError`` (bad values or shapes) or ``TypeError`` (bad dtypes) with a message that
names the argument. Value checks that need the data (finite logits, monotonic offsets) read device memory
only where that is cheap and legal: they are skipped while ``torch.compile`` traces and while a CUDA graph
is being captured, and when ``FASTSHARE_DATA_CHECKS=0``.
"""

from __future__ import annotations

import math

import torch

from fastshare._env import env_flag

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _data_checks_allowed(t: torch.Tensor) -> bool:
    # FASTSHARE_DATA_CHECKS=0 drops the checks that read tensor values (each one a host-device sync on a
    # GPU); shape, dtype and device checks always run.
    if torch.compiler.is_compiling():
        return False
    if not env_flag("FASTSHARE_DATA_CHECKS", True):
        return False
    if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_tau(tau: float) -> None:
    if not isinstance(tau, (int, float)) or isinstance(tau, bool):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or Inf (skipped under tracing and graph capture)."""
    if _data_checks_allowed(t) and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"{name} holds NaN or Inf (first at index {bad}); refusing to compute a gate from it")


def check_gate_args(alpha: torch.Tensor, u: torch.Tensor, tau: float) -> None:
    """Checks for a Gumbel gate: ``alpha`` and ``u`` floating, same shape ``(..., 2)``, same device."""
    check_tau(tau)
    for name, t in (("alpha", alpha), ("u", u)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if alpha.ndim < 1 or alpha.shape[-1] != 2:
        raise ValueError(f"alpha must have shape (..., 2) (execute, skip), got {tuple(alpha.shape)}")
    if u.shape != alpha.shape:
        raise ValueError(f"u must have alpha's shape {tuple(alpha.shape)}, got {tuple(u.shape)}")
    if u.device != alpha.device:
        raise ValueError(f"alpha is on {alpha.device} but u is on {u.device}")
    check_finite("alpha", alpha)
    if _data_checks_allowed(u) and u.numel() and not bool(((u > 0) & (u < 1)).all()):
        raise ValueError("u must lie strictly inside (0, 1) (uniform noise for -log(-log u))")


def check_seg(seg: torch.Tensor, n_rows: int, n_seg: int, allow_empty: bool = True) -> None:
    """``seg``: int64 ``(n_seg + 1,)`` non-decreasing row offsets from 0 to ``n_rows``."""
    if not isinstance(seg, torch.Tensor):
        raise TypeError(f"seg must be an int64 tensor of row offsets, got {type(seg).__name__}")
    if seg.dtype != torch.int64:
        raise TypeError(f"seg must be int64, got {seg.dtype}")
    if seg.ndim != 1 or seg.numel() != n_seg + 1:
        raise ValueError(f"seg must have shape ({n_seg + 1},) for {n_seg} segments, got {tuple(seg.shape)}")
    if not _data_checks_allowed(seg):
        return
    vals = seg.tolist()
    if vals[0] != 0 or vals[-1] != n_rows:
        raise ValueError(f"seg must start at 0 and end at the number of rows {n_rows}, got {vals}")
    lengths = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"seg must be non-decreasing, got {vals}")
    if not allow_empty and any(n == 0 for n in lengths):
        raise ValueError(f"every segment needs at least one row here, got offsets {vals}")


def check_residual_args(f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor, tau: float,
                        seg: torch.Tensor) -> None:
    """Checks for ``gated_residual``: ``f``/``r`` same shape, dtype, device; ``alpha``/``u`` ``(S, 2)``."""
    for name, t in (("f", f), ("r", r)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if f.ndim < 1:
        raise ValueError("f must have at least one dimension (rows)")
    if f.shape != r.shape:
        raise ValueError(f"f and r must have the same shape, got {tuple(f.shape)} and {tuple(r.shape)}")
    if f.dtype != r.dtype:
        raise TypeError(f"f and r must have the same dtype, got {f.dtype} and {r.dtype}")
    if f.device != r.device:
        raise ValueError(f"f is on {f.device} but r is on {r.device}")
    check_gate_args(alpha, u, tau)
    if alpha.ndim != 2:
        raise ValueError(f"alpha must have shape (S, 2) for S segments, got {tuple(alpha.shape)}")
    if alpha.device != f.device:
        raise ValueError(f"alpha is on {alpha.device} but f is on {f.device}")
    check_seg(seg, f.shape[0], alpha.shape[0])


def check_batch_norm_args(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                          seg: torch.Tensor, use_batch_stats: bool = True) -> None:
    """Checks for ``segmented_batch_norm``: ``x`` ``(N, C, ...)``, per-channel tensors ``(C,)``; every
    segment non-empty when its batch statistics are used (``use_batch_stats``)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, ...), got {tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if t.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    check_seg(seg, x.shape[0], seg.numel() - 1 if isinstance(seg, torch.Tensor) else 0,
              allow_empty=not use_batch_stats)
