"""Shared test helpers: tolerances per dtype (written once), a verbose allclose, a scale-relative check,
gradient comparison, BatchNorm conversions, device parametrisation."""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

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


def assert_scale_close(got: torch.Tensor, ref: torch.Tensor, rtol: float, floor: float = 0.0,
                       name: str = "tensor") -> None:
    """``max|got - ref| <= rtol * max(max|ref|, floor)``: the error relative to the tensor's own scale, naming
    the tensor and the worst index. Shapes and dtypes must agree; any NaN or infinity fails (named as such
    where only one of the two tensors has it)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} != {ref.dtype}"
    got, ref = got.detach().double(), ref.detach().double()
    finite_got, finite_ref = torch.isfinite(got), torch.isfinite(ref)
    assert torch.equal(finite_got, finite_ref), \
        f"{name}: {int((finite_got != finite_ref).sum())} elements finite in only one of result and reference"
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, floor, 1e-300)
    err = (got - ref).abs()
    max_err = float(err.max())
    if not max_err <= rtol * scale:
        worst = int(err.argmax())
        raise AssertionError(f"{name}: relative error {max_err / scale:.3e} > {rtol:.1e} (max abs err "
                             f"{max_err:.3e}, scale {scale:.3e}); worst flat index {worst}: got "
                             f"{got.flatten()[worst].item():.8g}, expected {ref.flatten()[worst].item():.8g}")


def compare_grads(ref: torch.nn.Module, fast: torch.nn.Module,
                  check: Callable[[torch.Tensor, torch.Tensor, str], None]) -> None:
    """``check(got, want, name)`` on each parameter's gradient from ``fast`` (``want``: ``ref``'s); a
    parameter ``fast`` leaves without one (used by no task) must have none or an all-zero one in ``ref``. At
    least one gradient is compared."""
    n_compared = 0
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
        if p_fast.grad is None:
            ref_zero = p_ref.grad is None or not bool(p_ref.grad.any())
            assert ref_zero, f"{name}: no gradient, the reference's is non-zero"
            continue
        assert p_ref.grad is not None, f"{name}: a gradient where the reference has none"
        check(p_fast.grad, p_ref.grad, f"grad {name}")
        n_compared += 1
    assert n_compared > 0, "no gradient compared"


def plain_batch_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every SegmentedBatchNorm2d by a plain nn.BatchNorm2d with the same state (in place)."""
    from fastshare.model.norm import SegmentedBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, SegmentedBatchNorm2d):
            plain = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.dtype)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            plain_batch_norms(child)
    return module


def without_running_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Every nn.BatchNorm2d of ``model`` without running statistics (batch statistics in train and eval
    mode), in place."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


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
