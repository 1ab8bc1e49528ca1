"""Triton kernels of the fused Gumbel-gated residual (DESIGN.md §2) and their launchers.

Layout: ``f``, ``r`` (and the upstream gradient ``d``) are ``(N, ...)`` tensors whose memory is dense
with dimension 0 outermost (contiguous, or channels_last 4-D) and identical for all of them. The kernels
therefore stream them as one flat array of ``numel = N * row`` elements: element ``i`` belongs to row
``i // row``, and row ``n`` to segment ``s`` with ``seg[s] <= n < seg[s+1]``. In element units segment ``s``
is the half-open range ``[seg[s] * row, seg[s+1] * row)``, so no per-element division is needed.

Each program handles one tile of ``BLOCK`` consecutive elements. It finds the first and last segment of
its tile by comparing the ``S + 1`` offsets in ``seg`` with the tile's bounds (one vector load). A tile
inside one segment (all but a few) is processed in one vectorised pass; a tile that straddles segments
makes one masked pass per segment. Each program computes the gate of its segment(s),
``y = softmax((alpha[s] + G) / tau)``, ``G = -log(-log u[s])``, in float32 itself: no host access to the
values of ``seg`` (CUDA-graph capturable), no separate gate tensor, one launch in the forward.

Backward reductions ``dg[s] = (sum_s d * relu(r + f), sum_s d * r)`` (float32):

- fast: each tile sums its elements of each segment in float32 and adds these partials with
  ``tl.atomic_add`` into one of 32 float64 copies of an ``(S, 2)`` accumulator, picked by tile index. The
  copies spread the same-address atomics of thousands of tiles; float64 keeps their unordered
  accumulation from adding error (in float32 it reached about 10x the reference's error at
  ``[48, 256, 81, 81]``). A tiny kernel then sums the copies and computes ``dalpha`` in float32;
- deterministic: each tile writes its partial sum for its first segment to ``head[tile]`` and, for every
  other segment starting inside it, to ``start[s]``; one program per segment then adds, in a fixed order,
  the partial of the tile where the segment starts and ``head`` of the following tiles it covers.

``dalpha = (dg - <y, dg>) * y / tau`` uses the soft gate ``y`` in both modes (straight-through).

On GPUs the tile size and warp count of the forward and of the atomic backward are autotuned per
``(numel, row, dtype)`` (the first call of a shape benchmarks them, so warm up before capturing a CUDA
graph); ``FASTSHARE_TRITON_AUTOTUNE=0`` (read at import) uses the fixed configuration of the
deterministic backward instead. ``numel`` stays specialised (divisibility by 16 lets the masked loads be
vectorised); ``row`` and ``S`` only enter scalar arithmetic, so they are not.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["gated_residual_fwd", "gated_residual_bwd"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if _interpret():
    # The interpreter runs each program in numpy: one small tile keeps tests fast and makes them cross
    # tile boundaries; benchmarking configurations would only waste time there.
    _ELEMENTWISE_CONFIGS = [triton.Config({"BLOCK": 512}, num_warps=4)]
    _DETERMINISTIC_CONFIG = triton.Config({"BLOCK": 512}, num_warps=4)
else:
    # Fixed (not autotuned), so that the partial-sum layout, hence every bit of dalpha, is the same in
    # every process.
    _DETERMINISTIC_CONFIG = triton.Config({"BLOCK": 4096}, num_warps=8)
    if os.environ.get("FASTSHARE_TRITON_AUTOTUNE", "1") == "0":
        _ELEMENTWISE_CONFIGS = [_DETERMINISTIC_CONFIG]
    else:
        _ELEMENTWISE_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps)
                                for block in (2048, 4096, 8192) for warps in (4, 8)]

# Tiles summed per step by the deterministic reduction (one program per segment).
_REDUCE_BLOCK = 1024 if not _interpret() else 64
# Copies of the atomic accumulator: tile t adds into copy t % _ATOMIC_SLOTS, which divides the
# serialisation of same-address atomics (thousands of tiles per segment) by as much.
_ATOMIC_SLOTS = 32


# ----------------------------------------------------------------------------------------------------
# Kernels.

@triton.jit
def _log(x, PRECISE: tl.constexpr):
    # tl.log may lower to an approximate instruction whose absolute error, for u close to 1, is large
    # relative to log(u); libdevice's logf is accurate to 1 ulp but does not exist in the interpreter.
    if PRECISE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _segment_gate(alpha_ptr, u_ptr, s, tau, stride_as, stride_ac, stride_us, stride_uc,
                  PRECISE: tl.constexpr):
    """Soft gate ``(y0, y1) = softmax((alpha[s] + G) / tau)`` of segment ``s``, in float32."""
    a0 = tl.load(alpha_ptr + s * stride_as).to(tl.float32)
    a1 = tl.load(alpha_ptr + s * stride_as + stride_ac).to(tl.float32)
    u0 = tl.load(u_ptr + s * stride_us).to(tl.float32)
    u1 = tl.load(u_ptr + s * stride_us + stride_uc).to(tl.float32)
    z0 = (a0 - _log(-_log(u0, PRECISE), PRECISE)) / tau
    z1 = (a1 - _log(-_log(u1, PRECISE), PRECISE)) / tau
    zmax = tl.maximum(z0, z1)
    e0 = tl.exp(z0 - zmax)
    e1 = tl.exp(z1 - zmax)
    return e0 / (e0 + e1), e1 / (e0 + e1)


@triton.jit
def _forward_gate(y0, y1, HARD: tl.constexpr):
    """The gate applied in the forward: one-hot argmax of the soft gate (ties to column 0) if HARD."""
    if HARD:
        g0 = tl.where(y0 >= y1, 1.0, 0.0)
        return g0, 1.0 - g0
    else:
        return y0, y1


@triton.jit
def _tile_segments(seg_ptr, S, row, tile_start, tile_len, SEG_BLOCK: tl.constexpr):
    """First and last segment holding an element of ``[tile_start, tile_start + tile_len)``.

    The segment of element ``i`` is the number of segment ends ``seg[s+1] * row`` that are ``<= i``
    (empty segments are skipped by construction).
    """
    idx = tl.arange(0, SEG_BLOCK)
    ends = tl.load(seg_ptr + 1 + idx, mask=idx < S, other=0).to(tl.int64) * row
    valid = idx < S
    s_first = tl.sum((valid & (ends <= tile_start)).to(tl.int32), axis=0)
    s_last = tl.sum((valid & (ends <= tile_start + tile_len - 1)).to(tl.int32), axis=0)
    return s_first, s_last


@triton.jit
def _local_bound(seg_ptr, s, row, tile_start, BLOCK: tl.constexpr):
    """``seg[s] * row`` relative to the tile start, clamped to ``[0, BLOCK]`` (int32)."""
    bound = tl.load(seg_ptr + s).to(tl.int64) * row - tile_start
    return tl.minimum(tl.maximum(bound, 0), BLOCK).to(tl.int32)


@triton.jit
def _fwd_part(f_ptr, r_ptr, out_ptr, offs, mask, g0, g1):
    """``out = g0 * relu(r + f) + g1 * r`` on the elements ``offs[mask]`` of one tile (scalar gate)."""
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = g0 * tl.maximum(r + f, 0.0) + g1 * r
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["row", "S"])
def _gated_residual_fwd_kernel(
    # Pointers
    f_ptr, r_ptr, out_ptr, alpha_ptr, u_ptr, seg_ptr,
    # Dimensions
    numel, row, S, tau,
    # Strides
    stride_as, stride_ac, stride_us, stride_uc,
    # Meta-parameters
    HARD: tl.constexpr,  # one-hot vs soft gate: a different program, chosen once per call
    PRECISE: tl.constexpr,  # libdevice log on GPUs, tl.log in the interpreter (no libdevice there)
    SEG_BLOCK: tl.constexpr,  # power of two >= S, the length of the vector load of seg (tl.arange)
    BLOCK: tl.constexpr,  # elements per program; tile shape and vector width must be known at compile time
):
    """``out = g0 * relu(r + f) + g1 * r`` on one tile of ``BLOCK`` flat elements."""
    # The tile start is a 64-bit scalar added to the base pointers, so per-element offsets stay int32
    # for any numel.
    tile_start = tl.program_id(0).to(tl.int64) * BLOCK
    tile_len = tl.minimum(numel - tile_start, BLOCK).to(tl.int32)
    local = tl.arange(0, BLOCK)
    mask = local < tile_len
    f_ptr += tile_start
    r_ptr += tile_start
    out_ptr += tile_start

    s_first, s_last = _tile_segments(seg_ptr, S, row, tile_start, tile_len, SEG_BLOCK)
    if s_first == s_last:
        # The whole tile lies in one segment (all but a few tiles): one gate, vectorised accesses.
        y0, y1 = _segment_gate(alpha_ptr, u_ptr, s_first, tau, stride_as, stride_ac, stride_us, stride_uc,
                               PRECISE)
        g0, g1 = _forward_gate(y0, y1, HARD)
        _fwd_part(f_ptr, r_ptr, out_ptr, local, mask, g0, g1)
    else:
        # One masked pass per segment: nothing is carried across iterations, which keeps the register
        # count (hence the occupancy of the common path above) as low as a one-segment tile needs.
        hi = _local_bound(seg_ptr, s_first, row, tile_start, BLOCK)
        for s in range(s_first, s_last + 1):
            lo = hi
            hi = _local_bound(seg_ptr, s + 1, row, tile_start, BLOCK)
            y0, y1 = _segment_gate(alpha_ptr, u_ptr, s, tau, stride_as, stride_ac, stride_us, stride_uc,
                                   PRECISE)
            g0, g1 = _forward_gate(y0, y1, HARD)
            _fwd_part(f_ptr, r_ptr, out_ptr, local, mask & (local >= lo) & (local < hi), g0, g1)


@triton.jit
def _store_partials(part_ptr, start_ptr, pid, s, s_first, S, sum0, sum1, DETERMINISTIC: tl.constexpr,
                    SLOTS: tl.constexpr):
    """Record tile ``pid``'s partial ``(sum0, sum1)`` of ``dg[s]``.

    Atomic: add it (in float64) to ``part[pid % SLOTS, s]``, relaxed (no memory fences: the sums are only
    read by the next kernel on the stream, and fences around every tile's atomics cost 20% of the
    bandwidth). Deterministic: write it to ``part[pid]`` (head) if ``s`` is
    the tile's first segment, else to ``start[s]`` (``s`` then starts inside this tile, which is the only
    one to write there).
    """
    if DETERMINISTIC:
        dst = tl.where(s == s_first, part_ptr + pid.to(tl.int64) * 2, start_ptr + s * 2)
        tl.store(dst, sum0)
        tl.store(dst + 1, sum1)
    else:
        dst = part_ptr + ((pid % SLOTS) * S + s) * 2
        tl.atomic_add(dst, sum0.to(tl.float64), sem="relaxed")
        tl.atomic_add(dst + 1, sum1.to(tl.float64), sem="relaxed")


@triton.jit
def _bwd_part(grad_ptr, f_ptr, r_ptr, df_ptr, dr_ptr, offs, mask, g0, g1):
    """``df``, ``dr`` on the elements ``offs[mask]`` of one tile (scalar gate ``g``) and their partial sums
    ``(sum d * relu(r + f), sum d * r)`` in float32 (masked lanes load zeros and add nothing)."""
    d = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pre = r + f
    gm = tl.where(pre > 0.0, g0, 0.0)
    tl.store(df_ptr + offs, (gm * d).to(df_ptr.dtype.element_ty), mask=mask)
    tl.store(dr_ptr + offs, ((gm + g1) * d).to(dr_ptr.dtype.element_ty), mask=mask)
    return tl.sum(d * tl.maximum(pre, 0.0), axis=0), tl.sum(d * r, axis=0)


@triton.jit(do_not_specialize=["row", "S"])
def _gated_residual_bwd_kernel(
    # Pointers
    grad_ptr, f_ptr, r_ptr, df_ptr, dr_ptr, alpha_ptr, u_ptr, seg_ptr,
    part_ptr,  # atomic: (SLOTS, S, 2) float64 accumulators of dg; deterministic: (num_tiles, 2) float32 heads
    start_ptr,  # deterministic: (S, 2) partials of the segments starting inside a tile; atomic: unused
    # Dimensions
    numel, row, S, tau,
    # Strides
    stride_as, stride_ac, stride_us, stride_uc,
    # Meta-parameters
    HARD: tl.constexpr,  # one-hot vs soft forward gate: a different program, chosen once per call
    DETERMINISTIC: tl.constexpr,  # partial-sum buffers instead of atomics: different stores
    PRECISE: tl.constexpr,  # libdevice log on GPUs, tl.log in the interpreter (no libdevice there)
    SEG_BLOCK: tl.constexpr,  # power of two >= S, the length of the vector load of seg (tl.arange)
    SLOTS: tl.constexpr,  # atomic accumulator copies (power of two: pid % SLOTS is a mask)
    BLOCK: tl.constexpr,  # elements per program; tile shape and vector width must be known at compile time
):
    """``df = g0 m d``, ``dr = (g0 m + g1) d`` and per-segment partials of ``dg`` on one tile."""
    pid = tl.program_id(0)
    tile_start = pid.to(tl.int64) * BLOCK
    tile_len = tl.minimum(numel - tile_start, BLOCK).to(tl.int32)
    local = tl.arange(0, BLOCK)
    mask = local < tile_len
    grad_ptr += tile_start
    f_ptr += tile_start
    r_ptr += tile_start
    df_ptr += tile_start
    dr_ptr += tile_start

    s_first, s_last = _tile_segments(seg_ptr, S, row, tile_start, tile_len, SEG_BLOCK)
    if s_first == s_last:
        # The whole tile lies in one segment (all but a few tiles): one gate, vectorised accesses.
        y0, y1 = _segment_gate(alpha_ptr, u_ptr, s_first, tau, stride_as, stride_ac, stride_us, stride_uc,
                               PRECISE)
        g0, g1 = _forward_gate(y0, y1, HARD)
        sum0, sum1 = _bwd_part(grad_ptr, f_ptr, r_ptr, df_ptr, dr_ptr, local, mask, g0, g1)
        _store_partials(part_ptr, start_ptr, pid, s_first, s_first, S, sum0, sum1, DETERMINISTIC, SLOTS)
    else:
        # One masked pass per segment, nothing carried across iterations (see the forward).
        hi = _local_bound(seg_ptr, s_first, row, tile_start, BLOCK)
        for s in range(s_first, s_last + 1):
            lo = hi
            hi = _local_bound(seg_ptr, s + 1, row, tile_start, BLOCK)
            y0, y1 = _segment_gate(alpha_ptr, u_ptr, s, tau, stride_as, stride_ac, stride_us, stride_uc,
                                   PRECISE)
            g0, g1 = _forward_gate(y0, y1, HARD)
            sum0, sum1 = _bwd_part(grad_ptr, f_ptr, r_ptr, df_ptr, dr_ptr, local,
                                   mask & (local >= lo) & (local < hi), g0, g1)
            _store_partials(part_ptr, start_ptr, pid, s, s_first, S, sum0, sum1, DETERMINISTIC, SLOTS)


@triton.jit(do_not_specialize=["row"])
def _gated_residual_dalpha_kernel(
    # Pointers
    dalpha_ptr, alpha_ptr, u_ptr, seg_ptr,
    part_ptr,  # atomic: (SLOTS, S, 2) float64 dg; deterministic: (num_tiles, 2) float32 head partials
    start_ptr,  # deterministic: (S, 2) partials of segments starting inside a tile; atomic: unused
    # Dimensions
    row, S, tau,
    # Strides
    stride_as, stride_ac, stride_us, stride_uc, stride_ds, stride_dc,
    # Meta-parameters
    DETERMINISTIC: tl.constexpr,  # read dg from the atomic buffer or reduce the partials
    PRECISE: tl.constexpr,  # libdevice log on GPUs, tl.log in the interpreter (no libdevice there)
    TILE: tl.constexpr,  # BLOCK of the backward kernel, which fixes the tile of each partial
    REDUCE_BLOCK: tl.constexpr,  # partials summed per step (vector length)
    SLOTS: tl.constexpr,  # atomic accumulator copies, summed here (vector length)
):
    """``dalpha[s] = (dg[s] - <y[s], dg[s]>) * y[s] / tau``; one program per segment."""
    s = tl.program_id(0)
    if DETERMINISTIC:
        start = tl.load(seg_ptr + s).to(tl.int64) * row
        end = tl.load(seg_ptr + s + 1).to(tl.int64) * row
        nonempty = end > start
        t0 = start // TILE
        t1 = (end - 1) // TILE  # < t0 + 1 for an empty segment: the loop below does not run
        # The tile where the segment starts: head[t0] if the segment starts that tile, else start[s].
        first = tl.where(start == t0 * TILE, part_ptr + t0 * 2, start_ptr + s * 2)
        acc0 = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
        idx = tl.arange(0, REDUCE_BLOCK)
        for t in range(t0 + 1, t1 + 1, REDUCE_BLOCK):
            m = t + idx <= t1
            acc0 += tl.load(part_ptr + (t + idx) * 2, mask=m, other=0.0)
            acc1 += tl.load(part_ptr + (t + idx) * 2 + 1, mask=m, other=0.0)
        dg0 = tl.load(first, mask=nonempty, other=0.0) + tl.sum(acc0, axis=0)
        dg1 = tl.load(first + 1, mask=nonempty, other=0.0) + tl.sum(acc1, axis=0)
    else:
        slot = tl.arange(0, SLOTS)
        dg0 = tl.sum(tl.load(part_ptr + (slot * S + s) * 2), axis=0).to(tl.float32)
        dg1 = tl.sum(tl.load(part_ptr + (slot * S + s) * 2 + 1), axis=0).to(tl.float32)
    y0, y1 = _segment_gate(alpha_ptr, u_ptr, s, tau, stride_as, stride_ac, stride_us, stride_uc, PRECISE)
    # (dg - <y, dg>) * y / tau without its cancellation at saturated gates (y0 + y1 = 1).
    d0 = y0 * y1 * (dg0 - dg1) / tau
    tl.store(dalpha_ptr + s * stride_ds, d0.to(dalpha_ptr.dtype.element_ty))
    tl.store(dalpha_ptr + s * stride_ds + stride_dc, (-d0).to(dalpha_ptr.dtype.element_ty))


# The autotuned entry points. Neither writes its inputs; the atomic accumulator of the backward is
# zeroed before every trial run and once more before the real one (reset_to_zero).
_fwd_tuned = triton.autotune(configs=_ELEMENTWISE_CONFIGS, key=["numel", "row"])(_gated_residual_fwd_kernel)
_bwd_atomic_tuned = triton.autotune(configs=_ELEMENTWISE_CONFIGS, key=["numel", "row"],
                                    reset_to_zero=["part_ptr"])(_gated_residual_bwd_kernel)


# ----------------------------------------------------------------------------------------------------
# Launchers.

def _same_memory_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Dense tensors of one shape map indices to memory alike iff strides agree on every dim of size > 1.
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _dense_rows(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return True
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last)


def _check(f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor, seg: torch.Tensor,
           grad: torch.Tensor | None = None) -> None:
    tensors = {"f": f, "r": r} if grad is None else {"grad": grad, "f": f, "r": r}
    for name, t in tensors.items():
        if t.shape != f.shape or t.dtype != f.dtype or t.device != f.device:
            raise ValueError(f"{name} must match f: shape {tuple(f.shape)}, {f.dtype} on {f.device}; got "
                             f"{tuple(t.shape)}, {t.dtype} on {t.device}")
        if not _dense_rows(t) or not _same_memory_order(t, f):
            raise ValueError(f"the triton gated_residual kernels read {', '.join(tensors)} as one flat dense "
                             f"layout (contiguous or channels_last, identical strides); {name} has shape "
                             f"{tuple(t.shape)} and strides {t.stride()} (f: {f.stride()}); make them "
                             "contiguous first")
    if f.ndim < 1:
        raise ValueError("f must have at least one dimension (rows)")
    if f.dtype not in _DTYPES:
        raise ValueError(f"the triton gated_residual kernels support float32, float16 and bfloat16, got {f.dtype}")
    if alpha.ndim != 2 or alpha.shape[1] != 2 or u.shape != alpha.shape:
        raise ValueError(f"alpha and u must have shape (S, 2), got {tuple(alpha.shape)} and {tuple(u.shape)}")
    if alpha.dtype not in (torch.float32, torch.float64) or u.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"alpha and u must be float32 or float64, got {alpha.dtype} and {u.dtype}")
    if seg.dtype != torch.int64 or seg.shape != (alpha.shape[0] + 1,):
        raise ValueError(f"seg must be int64 of shape ({alpha.shape[0] + 1},), got {seg.dtype} {tuple(seg.shape)}")
    for name, t in (("alpha", alpha), ("u", u), ("seg", seg)):
        if t.device != f.device:
            raise ValueError(f"{name} is on {t.device} but f is on {f.device}")


def _seg_block(n_seg: int) -> int:
    # At least 8, so that the usual task counts share one compiled program.
    return max(8, triton.next_power_of_2(n_seg))


def gated_residual_fwd(f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, u: torch.Tensor, tau: float,
                       hard: bool, seg: torch.Tensor) -> torch.Tensor:
    """Forward of the fused gated residual: ``out = g[s,0] * relu(r + f) + g[s,1] * r`` on segment ``s``.

    Args:
        f, r: ``(N, ...)`` float32/float16/bfloat16, same shape, dtype, device and dense layout
            (contiguous or channels_last).
        alpha, u: ``(S, 2)`` float32 or float64 logits and uniform noise in (0, 1).
        tau: temperature > 0.
        hard: ``g`` is the one-hot argmax of the soft gate (ties to column 0) instead of the soft gate.
        seg: int64 ``(S + 1,)`` row offsets on ``f``'s device; its values are read on the device only.

    Returns:
        ``out``: ``torch.empty_like(f)`` (same layout), computed in float32.
    """
    _check(f, r, alpha, u, seg)
    out = torch.empty_like(f)
    numel = f.numel()
    if numel == 0:
        return out
    n_seg = alpha.shape[0]
    grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
    _fwd_tuned[grid](
        f, r, out, alpha, u, seg,
        numel, numel // f.shape[0], n_seg, float(tau),
        alpha.stride(0), alpha.stride(1), u.stride(0), u.stride(1),
        HARD=bool(hard), PRECISE=not _interpret(), SEG_BLOCK=_seg_block(n_seg),
    )
    return out


def gated_residual_bwd(grad: torch.Tensor, f: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor,
                       u: torch.Tensor, tau: float, hard: bool, seg: torch.Tensor, deterministic: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`gated_residual_fwd` (DESIGN.md §2).

    With ``m = [r + f > 0]``, the forward gate ``g`` and the soft gate ``y``:
    ``df = g0 m d``, ``dr = (g0 m + g1) d``, ``dg[s] = (sum_s d relu(r + f), sum_s d r)`` in float32 and
    ``dalpha[s] = (dg[s] - <y[s], dg[s]>) * y[s] / tau``.

    Args:
        grad: ``(N, ...)`` upstream gradient ``d``, same dtype and layout as ``f``.
        f, r, alpha, u, tau, hard, seg: as in :func:`gated_residual_fwd`.
        deterministic: two-stage fixed-order reduction of ``dg`` instead of float64 atomics.

    Returns:
        ``(df, dr, dalpha)``: ``df``, ``dr`` like ``f``; ``dalpha`` ``(S, 2)`` in ``alpha``'s dtype.
    """
    _check(f, r, alpha, u, seg, grad)
    df, dr = torch.empty_like(f), torch.empty_like(r)
    n_seg = alpha.shape[0]
    dalpha = torch.empty(n_seg, 2, dtype=alpha.dtype, device=alpha.device)
    if n_seg == 0:
        return df, dr, dalpha
    numel = f.numel()
    row = numel // f.shape[0] if f.shape[0] else 0
    precise = not _interpret()
    common = dict(HARD=bool(hard), PRECISE=precise, SEG_BLOCK=_seg_block(n_seg), SLOTS=_ATOMIC_SLOTS)
    strides = (alpha.stride(0), alpha.stride(1), u.stride(0), u.stride(1))
    if deterministic:
        block = _DETERMINISTIC_CONFIG.kwargs["BLOCK"]
        n_tiles = triton.cdiv(numel, block)
        part = torch.empty(max(n_tiles, 1), 2, dtype=torch.float32, device=f.device)
        start = torch.empty(n_seg, 2, dtype=torch.float32, device=f.device)
        if numel:
            _gated_residual_bwd_kernel[(n_tiles,)](
                grad, f, r, df, dr, alpha, u, seg, part, start,
                numel, row, n_seg, float(tau), *strides,
                DETERMINISTIC=True, BLOCK=block, num_warps=_DETERMINISTIC_CONFIG.num_warps, **common,
            )
    else:
        block = 1  # unused by the atomic finalisation
        part = torch.zeros(_ATOMIC_SLOTS, n_seg, 2, dtype=torch.float64, device=f.device)
        start = part
        if numel:
            grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
            _bwd_atomic_tuned[grid](
                grad, f, r, df, dr, alpha, u, seg, part, start,
                numel, row, n_seg, float(tau), *strides,
                DETERMINISTIC=False, **common,
            )
    _gated_residual_dalpha_kernel[(n_seg,)](
        dalpha, alpha, u, seg, part, start,
        row, n_seg, float(tau), *strides, dalpha.stride(0), dalpha.stride(1),
        DETERMINISTIC=bool(deterministic), PRECISE=precise, TILE=block, REDUCE_BLOCK=_REDUCE_BLOCK,
        SLOTS=_ATOMIC_SLOTS,
    )
    return df, dr, dalpha
