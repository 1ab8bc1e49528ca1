"""Triton kernels of ``fastshare::relu_dropout`` (ReLU + dropout in one pass) and its backward.

The maths is :mod:`fastshare.ops.relu_dropout`'s, bit for bit: element ``i`` (row-major) is kept when
``h >= floor(p 2^32)`` with the counter ``c = offset + i``, ``key = fmix32(seed + 0x9E3779B9 (hi(c) + 1))``
and ``h = fmix32(fmix32(lo(c) ^ key) + key)``; all hash arithmetic is on uint32 (wrapping, like the
reference's ``mod 2^32``), ``fmix32`` is MurmurHash3's finaliser. ``out = keep ? relu(x) * scale : 0`` and
``dx = mask ? grad * scale : 0`` are computed in float32 and rounded once to the data's dtype, with
``scale = float32(1 / (1 - p))`` and ``mask = keep & (x > 0)`` stored as one byte per element.

Each program handles ``BLOCK`` consecutive elements: one read of ``x`` and one write of ``out`` and the
mask (forward), one read of ``grad`` and the mask and one write of ``dx`` (backward); the hash costs about
twenty integer operations per element, far below the memory time on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["relu_dropout_fwd", "relu_dropout_bwd"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 512 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 2048


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _round(v, OUT_BF16: tl.constexpr):
    """float32 -> the output dtype, rounded to nearest even. bfloat16 is rounded by hand: Triton's
    interpreter truncates (it ignores ``fp_downcast_rounding``); GPUs round to nearest even, as this does."""
    if OUT_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), rounded)  # a NaN stays NaN (its rounding could carry to inf)
    else:  # not a fall-through: compiled Triton (3.6) checks both returns' types even when OUT_BF16 is fixed
        return v


# seed and threshold are not specialised: Triton turns an int argument equal to 1 into a constexpr, on
# which .to() fails to compile (seed = 1 is a valid seed; threshold = 1 is p ~ 2.3e-10).
@triton.jit(do_not_specialize=["seed", "threshold"])
def _fwd_kernel(x_ptr, out_ptr, mask_ptr, numel, seed, offset, threshold, scale, BLOCK: tl.constexpr,
                OUT_BF16: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < numel
    c = idx + offset
    hi = (c >> 32).to(tl.uint32)
    lo = c.to(tl.uint32)
    key = _fmix32(seed.to(tl.uint32) + (hi + 1) * 0x9E3779B9)
    h = _fmix32(_fmix32(lo ^ key) + key)
    keep = h >= threshold.to(tl.uint32)
    x = tl.load(x_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    relu = tl.where(x < 0.0, 0.0, x)  # keeps NaN, as torch.relu
    out = tl.where(keep, relu * scale, 0.0)
    tl.store(out_ptr + idx, _round(out, OUT_BF16).to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(mask_ptr + idx, (keep & (x > 0.0)).to(tl.uint8), mask=inside)


@triton.jit
def _bwd_kernel(grad_ptr, mask_ptr, dx_ptr, numel, scale, BLOCK: tl.constexpr, OUT_BF16: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < numel
    g = tl.load(grad_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + idx, mask=inside, other=0)
    dx = tl.where(m != 0, g * scale, 0.0)
    tl.store(dx_ptr + idx, _round(dx, OUT_BF16).to(dx_ptr.dtype.element_ty), mask=inside)


def _scale(p: float) -> float:
    # Rounded to float32 once, like the reference's torch.tensor(1 / (1 - p), dtype=float32).
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def _check_data(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(f"relu_dropout (triton): {name} must be float32, float16 or bfloat16, got {t.dtype}")


def relu_dropout_fwd(x: torch.Tensor, seed: int, offset: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, mask)`` of ReLU + dropout (module docstring), both contiguous with ``x``'s shape.

    Args:
        x: any shape, float32/float16/bfloat16, read in row-major order (copied if not contiguous).
        seed: integer in ``[0, 2^32)``; offset: first counter, ``>= 0``; p: drop probability in ``[0, 1)``.
    """
    _check_data("x", x)
    x = x.contiguous()
    out = torch.empty_like(x)
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    numel = x.numel()
    if numel:
        threshold = int(p * 4294967296.0)  # floor(p 2^32): p in [0, 1), so p 2^32 >= 0 and exact
        _fwd_kernel[(triton.cdiv(numel, _BLOCK),)](x, out, mask.view(torch.uint8), numel, int(seed), int(offset),
                                                   threshold, _scale(p), BLOCK=_BLOCK,
                                                   OUT_BF16=x.dtype == torch.bfloat16)
    return out, mask


def relu_dropout_bwd(grad: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """``mask ? grad * scale : 0`` in ``grad``'s dtype, contiguous (``mask``: the forward's bool mask)."""
    _check_data("grad", grad)
    if mask.dtype != torch.bool or mask.shape != grad.shape:
        raise ValueError(f"relu_dropout (triton): mask must be bool with grad's shape {tuple(grad.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    grad, mask = grad.contiguous(), mask.contiguous()
    dx = torch.empty_like(grad)
    numel = grad.numel()
    if numel:
        _bwd_kernel[(triton.cdiv(numel, _BLOCK),)](grad, mask.view(torch.uint8), dx, numel, _scale(p), BLOCK=_BLOCK,
                                                   OUT_BF16=grad.dtype == torch.bfloat16)
    return dx
