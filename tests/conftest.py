"""Shared test helpers: tolerances per dtype (written once), a verbose allclose, device parametrisation."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# (atol, rtol) for elementwise results, per dtype (STYLE.md §5).
TOLERANCES = {
    torch.float64: (1e-10, 1e-7),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                         name: str = "tensor") -> None:
    """allclose that reports max/mean error and the worst index on failure."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{name}: non-finite values differ"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    if bool((err <= bound).all()):
        return
    worst = int((err - bound).argmax())
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
    raise AssertionError(
        f"{name}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}, "
        f"{int((err > bound).sum())} / {err.numel()} elements out of tolerance (atol={atol}, rtol={rtol}); "
        f"worst at {idx}: got {a[idx].item():.8g}, expected {e[idx].item():.8g}")


def assert_reduction_close(actual: torch.Tensor, expected64: torch.Tensor, same_dtype_ref: torch.Tensor,
                           atol: float = 0.0, name: str = "reduction") -> None:
    """flash-attn rule for reductions: kernel error vs a float64 reference <= 2x the error of the reference
    computed in the kernel's dtype (+ atol)."""
    e64 = expected64.detach().double().cpu()
    kernel_err = (actual.detach().double().cpu() - e64).abs().max().item()
    ref_err = (same_dtype_ref.detach().double().cpu() - e64).abs().max().item()
    assert kernel_err <= 2 * ref_err + atol, (
        f"{name}: kernel error {kernel_err:.3e} > 2 x reference error {ref_err:.3e} + atol {atol:.1e}")


def required_backends() -> set[str]:
    """Backends CI requires (``FASTSHARE_REQUIRE_BACKENDS=cpu,triton``): their tests fail instead of skip."""
    return {b.strip() for b in os.environ.get("FASTSHARE_REQUIRE_BACKENDS", "").split(",") if b.strip()}


def skip_or_fail(backend: str, reason: str) -> None:
    if backend in required_backends():
        pytest.fail(f"backend {backend!r} is required (FASTSHARE_REQUIRE_BACKENDS) but unavailable: {reason}")
    pytest.skip(reason)


def require_triton_module() -> None:
    """At a test module's top: skip the module unless Triton can run here (compiled on a CUDA device, or
    under ``TRITON_INTERPRET=1``, which must be set before triton is imported); where
    ``FASTSHARE_REQUIRE_BACKENDS`` names ``triton`` (CI), fail instead."""
    if importlib.util.find_spec("triton") is None:
        reason = "triton is not installed"
    elif not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        reason = ("no CUDA device and TRITON_INTERPRET is not 1: run with TRITON_INTERPRET=1 in the environment "
                  "(it must be set before triton is imported)")
    else:
        return
    if "triton" in required_backends():
        pytest.fail(f"FASTSHARE_REQUIRE_BACKENDS requires triton, but: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def record_split_conv_calls(monkeypatch) -> list[int]:
    """Record the dilation of every call of ``fastshare::pruned_conv3x3`` (the band split) made through
    :func:`fastshare.ops.pruned_conv.pruned_conv3x3` while ``monkeypatch`` is active."""
    from fastshare.ops import pruned_conv

    calls: list[int] = []
    real = pruned_conv._pruned_conv3x3_op

    def spy(x, weight, bias, dilation):
        calls.append(dilation)
        return real(x, weight, bias, dilation)

    monkeypatch.setattr(pruned_conv, "_pruned_conv3x3_op", spy)
    return calls


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
