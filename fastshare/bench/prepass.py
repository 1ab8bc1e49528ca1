"""Correctness pre-pass: a fast path is timed only if it agrees with the reference on its own inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fastshare import reference


# Pre-pass tolerances (atol, rtol) for elementwise results. Benchmarks refuse *wrong* kernels; the tight,
# per-dtype tolerances of the test suite live in tests/conftest.py.
PREPASS_TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}


class PrepassError(AssertionError):
    """A fast path disagrees with the reference on a benchmark's own inputs: it must not be timed."""


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> float:
    """Raise :class:`PrepassError` unless ``|actual - expected| <= atol + rtol |expected|`` everywhere;
    return the max abs error."""
    if actual.shape != expected.shape:
        raise PrepassError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    if not bool((torch.isfinite(a) == torch.isfinite(e)).all()):
        raise PrepassError(f"{name}: non-finite values differ from the reference")
    err = (a - e).abs().nan_to_num(0.0)
    bad = err > atol + rtol * e.abs().nan_to_num(0.0)
    max_err = float(err.max()) if err.numel() else 0.0
    if bool(bad.any()):
        raise PrepassError(f"{name}: {int(bad.sum())} / {err.numel()} elements out of tolerance "
                           f"(atol={atol}, rtol={rtol}); max abs err {max_err:.3e}")
    return max_err


@dataclass
class GatedResidualInputs:
    """Inputs of one gated-residual case: ``f, r, grad`` ``(N, ...)``; ``alpha, u`` ``(S, 2)`` float32;
    ``seg`` ``(S + 1,)`` int64 on the device."""

    f: torch.Tensor
    r: torch.Tensor
    grad: torch.Tensor
    alpha: torch.Tensor
    u: torch.Tensor
    seg: torch.Tensor
    tau: float
    hard: bool


def gated_residual_inputs(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                          segments: int = 3, tau: float = 5.0, hard: bool = False, seed: int = 0
                          ) -> GatedResidualInputs:
    """Random inputs for :func:`fastshare.gated_residual` with ``segments`` equal-ish row segments."""
    device = torch.device(device)
    n = int(shape[0])
    if not 1 <= segments <= n:
        raise ValueError(f"segments must be in [1, {n}], got {segments}")
    gen = torch.Generator(device=device).manual_seed(seed)
    f = torch.randn(tuple(shape), device=device, dtype=dtype, generator=gen)
    r = torch.randn(tuple(shape), device=device, dtype=dtype, generator=gen)
    grad = torch.randn(tuple(shape), device=device, dtype=dtype, generator=gen)
    alpha = torch.randn(segments, 2, device=device, generator=gen)
    u = torch.rand(segments, 2, device=device, generator=gen).clamp_(1e-6, 1 - 1e-6)
    seg = torch.tensor([round(i * n / segments) for i in range(segments + 1)], dtype=torch.int64, device=device)
    return GatedResidualInputs(f, r, grad, alpha, u, seg, tau, hard)


OpForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_gated_residual(forward: OpForward, inp: GatedResidualInputs) -> dict[str, float]:
    """Pre-pass of a gated-residual implementation ``forward(f, r, alpha, u, seg) -> out`` (gradients through
    autograd) against :mod:`fastshare.reference` on ``inp``.

    Elementwise results (``out, df, dr``) must match the float32 reference within
    ``PREPASS_TOLERANCES``; the reduction ``dalpha`` follows the flash-attn rule against a float64
    reference: its error is at most twice the float32 reference's plus ``1e-6`` of the reduction's
    absolute sum. Raises :class:`PrepassError`; returns the max errors.
    """
    atol, rtol = PREPASS_TOLERANCES[inp.f.dtype]
    f = inp.f.detach().clone().requires_grad_(True)
    r = inp.r.detach().clone().requires_grad_(True)
    alpha = inp.alpha.detach().clone().requires_grad_(True)
    try:
        out = forward(f, r, alpha, inp.u, inp.seg)
        df, dr, dalpha = torch.autograd.grad(out, (f, r, alpha), inp.grad)
    except PrepassError:
        raise
    except Exception as exc:  # a kernel that crashes is as wrong as one that miscomputes
        raise PrepassError(f"the fast path raised {type(exc).__name__}: {exc}") from exc
    args = (inp.alpha, inp.u, inp.tau, inp.hard, inp.seg)
    with torch.no_grad():
        out_ref = reference.gated_residual_ref(inp.f, inp.r, *args)
        df_ref, dr_ref, dalpha_ref = reference.gated_residual_backward_ref(inp.grad, inp.f, inp.r, *args)
        f64, r64, g64 = inp.f.double(), inp.r.double(), inp.grad.double()
        _, _, dalpha64 = reference.gated_residual_backward_ref(g64, f64, r64, inp.alpha.double(), inp.u.double(),
                                                               inp.tau, inp.hard, inp.seg)
        scale = float((g64.abs() * ((r64 + f64).clamp_min(0) + r64.abs())).sum()) / inp.tau
    errors = {
        "out": check_close("forward out", out, out_ref, atol, rtol),
        "df": check_close("df", df, df_ref, atol, rtol),
        "dr": check_close("dr", dr, dr_ref, atol, rtol),
    }
    kernel_err = float((dalpha.double() - dalpha64).abs().max())
    ref_err = float((dalpha_ref.double() - dalpha64).abs().max())
    bound = 2 * ref_err + 1e-6 * scale
    if not kernel_err <= bound:
        raise PrepassError(f"dalpha: error {kernel_err:.3e} vs float64 > 2 x float32 reference error "
                           f"{ref_err:.3e} + 1e-6 x abs-sum {scale:.3e}")
    errors["dalpha"] = kernel_err
    return errors


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


#: Floor of :func:`check_oracle`'s bound per dtype: the equivalence contract's gradient tolerance in
#: float32 (DESIGN.md §3); bf16 results are compared at bf16's resolution.
ORACLE_FLOOR = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float64: 1e-10}


def _comparable(name: str, actual: torch.Tensor | None, expected: torch.Tensor | None,
                reference: str = "reference") -> bool:
    """The zero rule of :func:`check_relative` and :func:`check_oracle`: a missing tensor (None: a gradient
    the path never computes) equals an all-zero one. False where ``expected`` is zero or missing and so is
    ``actual``; True where ``expected`` is non-zero and ``actual`` has its shape; otherwise raises
    :class:`PrepassError` (``reference`` names ``expected`` in the message)."""
    if expected is None or not bool(expected.any()):
        if actual is not None and bool(actual.any()):
            raise PrepassError(f"{name}: non-zero where the {reference} is zero or absent")
        return False
    if actual is None:
        raise PrepassError(f"{name}: missing, the {reference} is non-zero")
    if actual.shape != expected.shape:
        raise PrepassError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    return True


def check_relative(name: str, actual: torch.Tensor | None, expected: torch.Tensor | None, rtol: float) -> float:
    """``||actual - expected|| / ||expected|| <= rtol``; a missing tensor (None) equals an all-zero one, and
    where ``expected`` is zero or missing ``actual`` must be too; NaN fails. Raises :class:`PrepassError`;
    returns the relative error (0 where ``expected`` is zero)."""
    if not _comparable(name, actual, expected):
        return 0.0
    err = rel_error(actual, expected)
    if not err <= rtol:
        raise PrepassError(f"{name}: relative error {err:.3e} from the reference > {rtol:.0e}")
    return err


def check_oracle(name: str, actual: torch.Tensor | None, same_dtype_ref: torch.Tensor | None,
                 oracle: torch.Tensor | None, floor: float) -> float:
    """flash-attn rule on relative norms: ``err(actual) <= 2 err(same_dtype_ref) + floor``, both errors
    ``||x - oracle|| / ||oracle||`` against a float64 ``oracle``. A missing tensor (None: a gradient the path
    never computes) equals an all-zero one. Raises :class:`PrepassError`; returns ``err(actual)``."""
    if not _comparable(name, actual, oracle, "float64 reference"):
        _comparable(name, same_dtype_ref, oracle, "float64 reference")  # zero or absent too
        return 0.0
    err = rel_error(actual, oracle)
    ref_err = rel_error(same_dtype_ref, oracle)
    if not err <= 2 * ref_err + floor:
        raise PrepassError(f"{name}: relative error {err:.3e} vs float64 > 2 x same-dtype reference error "
                           f"{ref_err:.3e} + {floor:.0e}")
    return err
