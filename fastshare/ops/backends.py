"""Backend selection for fastshare's custom ops.

Backends: ``reference`` (pure PyTorch, any device), ``cpu`` (C++ extension, CPU tensors), ``cuda`` (CUDA
extension, CUDA tensors), ``triton`` (Triton kernels: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), and ``auto``: CUDA tensor -> ``cuda``, else ``triton``, else ``reference``;
CPU tensor -> ``cpu``, else ``reference``. ``auto`` records why it skipped a backend
(:func:`last_fallback_reasons`); an explicitly requested backend that cannot run raises with its reasons.

The request comes, in order of precedence, from the call site (``backend=...``), the innermost
:func:`use_backend` context, the ``FASTSHARE_BACKEND`` environment variable, and finally ``auto``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from typing import Iterator

import torch

from fastshare import _ext

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
CONCRETE_BACKENDS = BACKENDS[1:]

_state = threading.local()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on the given inputs."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ops called inside use backend ``name`` unless the call site names one."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(_check_name(name))
    try:
        yield
    finally:
        stack.pop()


def requested_backend(explicit: str | None = None) -> str:
    """The backend asked for: call site, then context, then ``FASTSHARE_BACKEND``, then ``auto``."""
    if explicit is not None:
        return _check_name(explicit)
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("FASTSHARE_BACKEND", "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"FASTSHARE_BACKEND={env!r} is not a backend; choose one of {', '.join(BACKENDS)}")
        return env
    return "auto"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> list[str]:
    """Why ``backend`` cannot run ``op`` on tensors of ``device``/``dtype`` (empty list: it can)."""
    reasons: list[str] = []
    if backend == "reference":
        return reasons
    if backend == "cpu":
        if device.type != "cpu":
            reasons.append(f"the cpu backend runs on CPU tensors, got {device.type}")
        if dtype not in (torch.float32, torch.float64, torch.bfloat16):
            reasons.append(f"the cpu backend supports float32, float64 and bfloat16, got {dtype}")
        module, why = _ext.load()
        if module is None:
            reasons.append(why)
        elif not _ext.has_kernel(op, "cpu"):
            reasons.append(f"fastshare._C has no CPU kernel for {op}; {_ext.REBUILD_HINT}")
    elif backend == "cuda":
        if device.type != "cuda":
            reasons.append(f"the cuda backend runs on CUDA tensors, got {device.type}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"the cuda backend supports float32, float16 and bfloat16, got {dtype}")
        module, why = _ext.load()
        if module is None:
            reasons.append(why)
        elif not _ext.has_kernel(op, "cuda"):
            reasons.append("fastshare._C was built without CUDA kernels (CPU-only torch or no nvcc at build "
                           f"time); {_ext.REBUILD_HINT}")
    elif backend == "triton":
        if importlib.util.find_spec("triton") is None:
            reasons.append("triton is not installed (pip install triton)")
        if device.type == "cpu" and not triton_interpret():
            reasons.append("triton runs CPU tensors only under TRITON_INTERPRET=1")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"triton runs on CUDA tensors, got {device.type}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            reasons.append(f"the triton backend supports float32, float16 and bfloat16, got {dtype}")
    return reasons


def resolve(requested: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """Turn a request into a concrete backend for these inputs, or raise :class:`BackendUnavailableError`."""
    if requested != "auto":
        reasons = not_supported_reasons(requested, device, dtype, op)
        if reasons:
            raise BackendUnavailableError(f"backend {requested!r} cannot run {op}: " + "; ".join(reasons))
        return requested
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    skipped: dict[str, list[str]] = {}
    for candidate in order:
        reasons = not_supported_reasons(candidate, device, dtype, op)
        if not reasons:
            _state.fallbacks = skipped
            return candidate
        skipped[candidate] = reasons
    raise AssertionError("the reference backend always runs")  # pragma: no cover


def last_fallback_reasons() -> dict[str, list[str]]:
    """For the last ``auto`` resolution in this thread: each backend it skipped and why."""
    return dict(getattr(_state, "fallbacks", {}))


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       op: str = "gated_residual_fwd") -> dict[str, list[str]]:
    """Every concrete backend with the reasons it cannot run here (an empty list means it can)."""
    device = torch.device(device)
    return {b: not_supported_reasons(b, device, dtype, op) for b in CONCRETE_BACKENDS}
