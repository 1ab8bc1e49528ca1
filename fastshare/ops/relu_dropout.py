"""``fastshare::relu_dropout``: ReLU and dropout in one pass, with a counter-based dropout mask.

The ASPP heads apply ``Dropout(ReLU(t))`` twice per branch (DESIGN.md §1). Done with ``torch.relu_`` and
``F.dropout`` that is two passes over ``t`` plus a random mask of ``t``'s size from torch's generator; here it
is one pass that writes the output and a one-byte mask, the mask bits coming from a cheap integer hash.

Maths, for ``x`` of any shape read in row-major order (element ``i``), ``p`` in ``[0, 1)``, a 32-bit ``seed``
and an ``offset >= 0`` (all integer arithmetic mod ``2^32``; ``fmix32`` is MurmurHash3's 32-bit finaliser
``h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16``)::

    c    = offset + i                       (64-bit counter; hi = c >> 32, lo = c mod 2^32)
    key  = fmix32(seed + 0x9E3779B9 * (hi + 1))
    h    = fmix32(fmix32(lo ^ key) + key)
    keep = h >= floor(p * 2^32)             (P(keep) = 1 - floor(p 2^32) / 2^32, within 2^-32 of 1 - p)
    out  = keep ? relu(x) * scale : 0       (scale = 1 / (1 - p); relu keeps NaN, as torch.relu)
    mask = keep and x > 0                   (bool, saved for backward)
    dx   = mask ? grad * scale : 0

``keep`` depends on ``(seed, offset + i)`` only, so every backend draws the same mask, the C++ kernel is
tested bit for bit against :func:`relu_dropout_ref`, and ``offset`` places a call in a longer stream
(``keep(seed, offset)[i] == keep(seed, 0)[offset + i]``). Products are computed in float32 for
float32/bfloat16/float16 data (float64 for float64) and rounded once, so outputs match bitwise too.

Layers (STYLE.md §2): the kernels ``csrc/cpu/relu_dropout_cpu.cpp`` (``torch.ops.fastshare_C.relu_dropout_fwd``
and ``_bwd``) and ``kernels/relu_dropout.py`` (Triton: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``) and the pure-PyTorch reference below -> the ops ``fastshare::relu_dropout`` and
``fastshare::relu_dropout_backward`` (fake + autograd) -> the functional :func:`relu_dropout`.

Why the op differs from the issue's sketch ``relu_dropout(x, p, int seed, int offset, bool training)``: the
seed is a one-element int64 tensor, so that drawing it (``torch.randint`` on the default CPU generator) stays
inside a ``torch.compile(fullgraph=True)`` graph instead of forcing a ``.item()``; and eval mode / ``p == 0``
never reach the op (they are plain ``torch.relu``, with no mask), so the op always returns a real mask.
"""

from __future__ import annotations

import math

import torch

from fastshare.ops import backends

__all__ = ["relu_dropout", "relu_dropout_ref", "relu_dropout_backward_ref", "dropout_keep_ref"]

_OP = "relu_dropout_fwd"
_KERNELS = ("reference", "cpu", "triton")  # backends that have a relu_dropout kernel
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


# ----------------------------------------------------------------------------------------------------
# Reference (the specification; pure PyTorch, any device).

def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``a * c mod 2^32`` for int64 ``a`` in ``[0, 2^32)`` and a 32-bit constant ``c``, without int64 overflow
    (``c`` is split into 16-bit halves; every partial product is below ``2^48``)."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 ``h`` in ``[0, 2^32)``."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _threshold(p: float) -> int:
    """``floor(p 2^32)``: an element is kept when its hash is at least this (exact: 2^32 is a power of two)."""
    return math.floor(p * 4294967296.0)


def _check_offset(offset: int, numel: int) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"relu_dropout: offset must be an int >= 0, got {offset!r}")
    if offset + numel - 1 >= 1 << 63:
        raise ValueError(f"relu_dropout: the last counter offset + numel - 1 must be < 2^63, got offset {offset} "
                         f"for {numel} elements")


def _check_seed_value(seed: torch.Tensor) -> None:
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"relu_dropout: seed must be a one-element int64 tensor, got {seed.dtype} of shape "
                         f"{tuple(seed.shape)}")
    value = int(seed)
    if not 0 <= value <= _M32:
        raise ValueError(f"relu_dropout: seed must be in [0, 2^32), got {value}")


def dropout_keep_ref(numel: int, seed: torch.Tensor | int, offset: int, p: float,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep bits of elements ``0 .. numel-1``: ``(numel,)`` bool, ``hash(seed, offset + i) >= floor(p 2^32)``.

    Args:
        numel: number of elements.
        seed: integer in ``[0, 2^32)`` (or a one-element int64 tensor holding it).
        offset: first counter, ``>= 0``.
        p: drop probability in ``[0, 1)``.
        device: where to compute.
    """
    seed_t = torch.as_tensor(seed, dtype=torch.int64).reshape(()).to(device)
    c = offset + torch.arange(numel, dtype=torch.int64, device=device)
    key = _fmix32((seed_t + _mul32((c >> 32) + 1, _GOLDEN)) & _M32)
    h = _fmix32((_fmix32((c & _M32) ^ key) + key) & _M32)
    return h >= _threshold(p)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def relu_dropout_ref(x: torch.Tensor, seed: torch.Tensor | int, offset: int, p: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``fastshare::relu_dropout``: ``(out, mask)``, both contiguous with ``x``'s shape.

    Args:
        x: any shape, floating point; read in row-major order (element ``i``).
        seed: integer in ``[0, 2^32)`` or a one-element int64 tensor holding it.
        offset: first counter of the stream, ``>= 0``.
        p: drop probability in ``[0, 1)``.

    Returns:
        ``out = keep ? relu(x) / (1 - p) : 0`` with ``relu(x) = x < 0 ? 0 : x`` (NaN and -0.0 kept) in
        ``x``'s dtype (computed in float32, float64 for float64 ``x``, and rounded once) and
        ``mask = keep & (x > 0)`` (bool). Differentiable in ``x``: its autograd
        gradient is ``mask ? grad / (1 - p) : 0`` (torch.relu's gradient is 0 at 0).
    """
    _check_p(p)
    seed_t = torch.as_tensor(seed, dtype=torch.int64)
    _check_seed_value(seed_t)
    _check_offset(offset, x.numel())
    cdt = _compute_dtype(x.dtype)
    xc = x.reshape(-1).to(cdt)
    keep = dropout_keep_ref(xc.numel(), seed_t, offset, p, x.device)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=cdt, device=x.device)
    # relu(x) = x < 0 ? 0 : x (keeps NaN and -0.0), as the kernels, not torch.relu, whose sign of zero is
    # the device's (CUDA's max may return +0.0 for -0.0); its gradient, as torch.relu's, is 1 only for x > 0.
    relu = torch.where(xc > 0, xc, torch.where(xc < 0, 0.0, xc).detach())
    out = torch.where(keep, relu * scale, 0.0).to(x.dtype)
    mask = keep & (xc > 0)
    return out.reshape(x.shape), mask.reshape(x.shape)


def relu_dropout_backward_ref(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Reference of ``fastshare::relu_dropout_backward``: ``mask ? grad / (1 - p) : 0``, contiguous.

    Args:
        grad: upstream gradient of ``out``, any shape; mask: bool, same shape; p: the forward's ``p``.
    """
    cdt = _compute_dtype(grad.dtype)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=cdt, device=grad.device)
    return torch.where(mask, grad.to(cdt) * scale, 0.0).to(grad.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------
# Backend implementations: (forward, backward) per concrete backend.

def _fwd_reference(x, seed, offset, p):
    return relu_dropout_ref(x, seed, offset, p)


def _bwd_reference(grad, mask, p):
    return relu_dropout_backward_ref(grad, mask, p)


def _fwd_cpu(x, seed, offset, p):
    return tuple(torch.ops.fastshare_C.relu_dropout_fwd(x, seed, offset, p))


def _bwd_cpu(grad, mask, p):
    return torch.ops.fastshare_C.relu_dropout_bwd(grad, mask, p)


def _fwd_triton(x, seed, offset, p):
    from fastshare.kernels.relu_dropout import relu_dropout_fwd

    _check_seed_value(seed)  # as the reference and the C++ kernel do (the launcher takes a Python int)
    return relu_dropout_fwd(x, int(seed), offset, p)  # seed: a CPU tensor, so no device sync


def _bwd_triton(grad, mask, p):
    from fastshare.kernels.relu_dropout import relu_dropout_bwd

    return relu_dropout_bwd(grad, mask, p)


_IMPLS = {"reference": (_fwd_reference, _bwd_reference), "cpu": (_fwd_cpu, _bwd_cpu),
          "triton": (_fwd_triton, _bwd_triton)}


# ----------------------------------------------------------------------------------------------------
# Registered ops.

@torch.library.custom_op("fastshare::relu_dropout", mutates_args=())
def _relu_dropout_op(x: torch.Tensor, seed: torch.Tensor, offset: int, p: float, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return _IMPLS[backend][0](x, seed, offset, p)


@_relu_dropout_op.register_fake
def _(x, seed, offset, p, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.bool)


@torch.library.custom_op("fastshare::relu_dropout_backward", mutates_args=())
def _relu_dropout_backward_op(grad: torch.Tensor, mask: torch.Tensor, p: float, backend: str) -> torch.Tensor:
    return _IMPLS[backend][1](grad, mask, p)


@_relu_dropout_backward_op.register_fake
def _(grad, mask, p, backend):
    return grad.new_empty(grad.shape)


def _relu_dropout_setup(ctx, inputs, output):
    _, _, _, p, backend = inputs
    ctx.save_for_backward(output[1])
    ctx.p, ctx.backend = p, backend


def _relu_dropout_backward(ctx, grad_out, grad_mask):
    (mask,) = ctx.saved_tensors
    return _relu_dropout_backward_op(grad_out, mask, ctx.p, ctx.backend), None, None, None, None


_relu_dropout_op.register_autograd(_relu_dropout_backward, setup_context=_relu_dropout_setup)


# ----------------------------------------------------------------------------------------------------
# Functional API.

def _check_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"relu_dropout: p must be a number in [0, 1), got {p!r}"
                         + (" (p = 1 drops every element; use torch.zeros_like)" if p == 1 else ""))


def _resolve_backend(explicit: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """``reference``, ``cpu`` or ``triton``. ``auto``: CPU tensors -> ``cpu`` (else ``reference``), CUDA
    tensors -> ``triton`` (``cuda`` has no relu_dropout kernel; else ``reference``). An explicit
    ``backend="cuda"`` raises; the same request from :func:`use_backend` or ``FASTSHARE_BACKEND`` (meant
    for the ops that have CUDA kernels) is resolved as ``auto``, whose reasons
    :func:`last_fallback_reasons` keeps.

    The request is traced (a compiled graph is guarded on it and recompiles when it changes); what it
    resolves to is a constant (:func:`_resolve_request`)."""
    return _resolve_request(backends.requested_backend(explicit), explicit is not None, device, dtype)


@torch.compiler.assume_constant_result
def _resolve_request(requested: str, explicit: bool, device: torch.device, dtype: torch.dtype) -> str:
    # A constant for torch.compile: dynamo runs this eagerly instead of tracing the availability probes
    # (importlib, extension import), which some torch versions refuse to trace.
    if requested in _KERNELS:
        return backends.resolve(requested, device, dtype, _OP)
    if explicit and requested != "auto":
        raise backends.BackendUnavailableError(
            f"backend {requested!r} cannot run relu_dropout: it has kernels for {', '.join(_KERNELS)} only")
    return backends.resolve("auto", device, dtype, _OP)


def relu_dropout(x: torch.Tensor, p: float, training: bool = True, *, seed: torch.Tensor | int | None = None,
                 offset: int = 0, backend: str | None = None) -> torch.Tensor:
    """``F.dropout(torch.relu(x), p, training)`` in one pass, with a counter-based mask (module docstring).

    Args:
        x: any shape, floating point (cpu backend: float32, float64, bfloat16; triton: float32, float16,
            bfloat16; other dtypes run the reference).
        p: drop probability in ``[0, 1)``.
        training: dropout is applied only when True and ``p > 0``; otherwise this is ``torch.relu(x)``.
        seed: integer in ``[0, 2^32)`` or a one-element int64 CPU tensor; None draws one with
            ``torch.randint`` from torch's default CPU generator (so ``torch.manual_seed`` controls it).
        offset: first counter of the random stream, ``>= 0``.
        backend: ``auto``, ``reference``, ``cpu`` or ``triton``; None: the context's choice (see
            ``_resolve_backend``).

    Returns:
        ``keep ? relu(x) / (1 - p) : 0`` with ``x``'s shape and dtype, contiguous (a non-contiguous ``x`` is
        read in row-major order); without dropout (``training=False`` or ``p == 0``), ``torch.relu(x)`` in
        ``x``'s layout. Backward: ``mask ? grad / (1 - p) : 0``, ``mask = keep & (x > 0)`` saved as
        one byte per element; ``x`` itself is not saved.

    Example:
        >>> h = relu_dropout(torch.addmm(b, a, w.t()), 0.5)   # training-mode ReLU + Dropout(0.5)
    """
    _check_p(p)
    if not x.is_floating_point():
        raise TypeError(f"relu_dropout: x must be a floating-point tensor, got {x.dtype}")
    if not training or p == 0:
        return torch.relu(x)
    _check_offset(offset, x.numel())
    if seed is None:
        seed = torch.randint(0, 1 << 32, (), dtype=torch.int64)
    elif isinstance(seed, int):
        if not 0 <= seed <= _M32:
            raise ValueError(f"relu_dropout: seed must be in [0, 2^32), got {seed}")
        seed = torch.tensor(seed, dtype=torch.int64)
    elif seed.dtype != torch.int64 or seed.numel() != 1 or seed.device.type != "cpu":
        raise ValueError(f"relu_dropout: seed must be a one-element int64 CPU tensor, got {seed.dtype} of shape "
                         f"{tuple(seed.shape)} on {seed.device}")
    name = _resolve_backend(backend, x.device, x.dtype)
    out, _ = _relu_dropout_op(x, seed, offset, float(p), name)
    return out
