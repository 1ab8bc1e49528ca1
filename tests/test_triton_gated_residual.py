"""Triton backend of the fused gated residual against the reference (DESIGN.md §2).

On a CUDA machine the kernels run compiled; elsewhere they run under the Triton interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before Triton is imported:

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_gated_residual.py -q

Without either, the module is skipped, unless ``FASTSHARE_REQUIRE_BACKENDS`` names ``triton`` (CI), where
that is an error.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import require_triton_module

pytestmark = pytest.mark.triton

require_triton_module()

import fastshare  # noqa: E402
from fastshare import reference  # noqa: E402
from fastshare.kernels import gated_residual as tk  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

# (atol, rtol) of elementwise results against the reference on the same inputs: both compute in float32
# and round once to the dtype, so they differ by at most about one unit in the last place.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
DTYPES = list(TOLERANCES)

# (shape, segment row offsets): one element; odd sizes that fill no tile; tiles holding several
# segments (short rows); rows longer than a tile; empty segments first, inside and last; 1 to 6 segments.
CASES = [
    ((1,), [0, 1]),
    ((3, 5), [0, 1, 1, 3]),
    ((40, 3), [0, 4, 5, 5, 17, 30, 40]),
    ((7, 3, 5, 5), [0, 0, 2, 3, 7, 7]),
    ((5, 3, 13, 17), [0, 2, 5]),
    ((9, 37), [0, 9]),
]


def _inputs(shape, offsets, dtype, seed, tau=2.0, channels_last=False, alpha_dtype=torch.float32):
    """Fresh random (d, f, r, alpha, u, seg) on DEVICE; f and r straddle zero so that relu masks vary."""
    torch.manual_seed(seed)
    n_seg = len(offsets) - 1
    f, r, d = (torch.randn(shape, dtype=torch.float32, device=DEVICE).to(dtype) for _ in range(3))
    if channels_last:
        f, r, d = (t.to(memory_format=torch.channels_last) for t in (f, r, d))
    alpha = torch.randn(n_seg, 2, device=DEVICE, dtype=alpha_dtype)
    u = torch.rand(n_seg, 2, device=DEVICE, dtype=alpha_dtype).clamp_(1e-4, 1 - 1e-4)
    seg = torch.tensor(offsets, dtype=torch.int64, device=DEVICE)
    return d, f, r, alpha, u, seg


def _assert_close(actual, expected, dtype, name):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.stride() == expected.stride() or actual.numel() <= 1, (
        f"{name}: strides {actual.stride()} != {expected.stride()}")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _assert_reduction_close(actual, d, f, r, alpha, u, tau, hard, seg):
    """dalpha (a reduction): kernel error vs float64 <= 2x the reference's own error + a small atol."""
    f64 = [t.double() for t in (d, f, r, alpha, u)]
    exact = reference.gated_residual_backward_ref(f64[0], f64[1], f64[2], f64[3], f64[4], tau, hard, seg)[2]
    same_dtype = reference.gated_residual_backward_ref(d, f, r, alpha, u, tau, hard, seg)[2]
    ref_err = (same_dtype.double() - exact).abs().max().item() if exact.numel() else 0.0
    err = (actual.double() - exact).abs().max().item() if exact.numel() else 0.0
    atol = 1e-6 * (1.0 + exact.abs().max().item() if exact.numel() else 1.0)
    assert err <= 2 * ref_err + atol, (
        f"dalpha error {err:.3e} > 2 x reference error {ref_err:.3e} + {atol:.1e}\nkernel {actual}\nexact {exact}")


def _check_all(shape, offsets, dtype, hard, seed, tau=2.0, channels_last=False):
    d, f, r, alpha, u, seg = _inputs(shape, offsets, dtype, seed, tau, channels_last)
    out = tk.gated_residual_fwd(f, r, alpha, u, tau, hard, seg)
    _assert_close(out, reference.gated_residual_ref(f, r, alpha, u, tau, hard, seg), dtype, "out")
    df_ref, dr_ref, _ = reference.gated_residual_backward_ref(d, f, r, alpha, u, tau, hard, seg)
    for deterministic in (False, True):
        df, dr, dalpha = tk.gated_residual_bwd(d, f, r, alpha, u, tau, hard, seg, deterministic)
        _assert_close(df, df_ref, dtype, f"df (deterministic={deterministic})")
        _assert_close(dr, dr_ref, dtype, f"dr (deterministic={deterministic})")
        assert dalpha.dtype == alpha.dtype
        _assert_reduction_close(dalpha, d, f, r, alpha, u, tau, hard, seg)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(case, dtype, hard):
    shape, offsets = CASES[case]
    _check_all(shape, offsets, dtype, hard, seed=100 + case, tau=(0.5, 1.0, 5.0)[case % 3])


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_larger(dtype, hard):
    _check_all((12, 8, 17, 17), [0, 3, 3, 7, 12], dtype, hard, seed=7)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last(dtype, hard):
    _check_all((6, 5, 7, 9), [0, 1, 4, 6], dtype, hard, seed=11, channels_last=True)


@pytest.mark.parametrize("logits", [(8.0, -8.0), (-8.0, 8.0), (0.3, 0.3)], ids=["all_select", "all_skip", "tie"])
def test_hard_one_hot_extremes(logits):
    d, f, r, alpha, u, seg = _inputs((6, 4, 5), [0, 2, 6], torch.float32, seed=3)
    alpha = torch.tensor([logits, logits], device=DEVICE)
    u = torch.full_like(alpha, 0.5)  # equal noise: a tie of the logits is a tie of the gate
    select = logits[0] >= logits[1]  # ties go to column 0 (execute)
    out = tk.gated_residual_fwd(f, r, alpha, u, 1.0, True, seg)
    expected = torch.relu(r + f) if select else r
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    df, dr, dalpha = tk.gated_residual_bwd(d, f, r, alpha, u, 1.0, True, seg, False)
    torch.testing.assert_close(df, d * (r + f > 0) if select else torch.zeros_like(d), atol=0, rtol=0)
    _assert_reduction_close(dalpha, d, f, r, alpha, u, 1.0, True, seg)


def test_float64_logits():
    d, f, r, alpha, u, seg = _inputs((5, 3, 4), [0, 3, 5], torch.float32, seed=5, alpha_dtype=torch.float64)
    out = tk.gated_residual_fwd(f, r, alpha, u, 1.5, False, seg)
    _assert_close(out, reference.gated_residual_ref(f, r, alpha.float(), u.float(), 1.5, False, seg),
                  torch.float32, "out")
    for deterministic in (False, True):
        dalpha = tk.gated_residual_bwd(d, f, r, alpha, u, 1.5, False, seg, deterministic)[2]
        assert dalpha.dtype == torch.float64
        _assert_reduction_close(dalpha, d, f, r, alpha, u, 1.5, False, seg)


def test_empty_rows():
    d, f, r, alpha, u, seg = _inputs((0, 4), [0, 0, 0], torch.float32, seed=1)
    assert tk.gated_residual_fwd(f, r, alpha, u, 1.0, False, seg).shape == (0, 4)
    for deterministic in (False, True):
        df, dr, dalpha = tk.gated_residual_bwd(d, f, r, alpha, u, 1.0, False, seg, deterministic)
        assert df.shape == dr.shape == (0, 4)
        torch.testing.assert_close(dalpha, torch.zeros_like(alpha), atol=0, rtol=0)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_deterministic_is_bitwise_reproducible(hard):
    d, f, r, alpha, u, seg = _inputs((7, 3, 5, 5), [0, 1, 1, 4, 7], torch.float32, seed=21)
    first = tk.gated_residual_bwd(d, f, r, alpha, u, 0.7, hard, seg, True)
    second = tk.gated_residual_bwd(d, f, r, alpha, u, 0.7, hard, seg, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = tk.gated_residual_bwd(d, f, r, alpha, u, 0.7, hard, seg, False)
    torch.testing.assert_close(atomic[2], first[2], atol=1e-5, rtol=1e-5)


def test_rejects_non_dense_layouts():
    d, f, r, alpha, u, seg = _inputs((4, 6, 5), [0, 2, 4], torch.float32, seed=2)
    sliced = torch.randn(4, 12, 5, device=DEVICE)[:, ::2]
    with pytest.raises(ValueError, match="flat dense layout"):
        tk.gated_residual_fwd(sliced, r, alpha, u, 1.0, False, seg)
    with pytest.raises(ValueError, match="flat dense layout"):
        tk.gated_residual_bwd(d.transpose(1, 2).contiguous().transpose(1, 2), f, r, alpha, u, 1.0, False, seg,
                              False)
    f4, r4 = (torch.randn(2, 3, 4, 5, device=DEVICE) for _ in range(2))
    with pytest.raises(ValueError, match="flat dense layout"):
        tk.gated_residual_fwd(f4, r4.to(memory_format=torch.channels_last), alpha, u, 1.0, False, seg)


# ----------------------------------------------------------------------------------------------------
# Through the registered op.

def _op_inputs(seed, dtype=torch.float32):
    d, f, r, alpha, u, seg = _inputs((6, 3, 4, 5), [0, 2, 2, 6], dtype, seed)
    return d, f.requires_grad_(), r.requires_grad_(), alpha.requires_grad_(), u, seg


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_op_autograd_matches_reference(hard):
    d, f, r, alpha, u, seg = _op_inputs(31)
    out = fastshare.gated_residual(f, r, alpha, u, 1.3, hard, seg, backend="triton")
    grads = torch.autograd.grad(out, (f, r, alpha), d)
    out_ref = fastshare.gated_residual(f, r, alpha, u, 1.3, hard, seg, backend="reference")
    grads_ref = torch.autograd.grad(out_ref, (f, r, alpha), d)
    _assert_close(out, out_ref, torch.float32, "out")
    for name, g, g_ref in zip(("df", "dr", "dalpha"), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_opcheck(hard):
    _, f, r, alpha, u, seg = _op_inputs(41)
    torch.library.opcheck(
        torch.ops.fastshare.gated_residual.default, (f, r, alpha, u, 1.3, hard, seg, "triton"),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_torch_compile_fullgraph():
    d, f, r, alpha, u, seg = _op_inputs(51)

    def block(f, r, alpha):
        return fastshare.gated_residual(f, r, alpha, u, 0.9, False, seg, backend="triton") * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    out = compiled(f, r, alpha)
    grads = torch.autograd.grad(out, (f, r, alpha), d)
    out_eager = block(f, r, alpha)
    grads_eager = torch.autograd.grad(out_eager, (f, r, alpha), d)
    torch.testing.assert_close(out, out_eager, atol=0, rtol=0)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# GPU only.

@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled Triton)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_shape(dtype):
    _check_all((48, 256, 81, 81), [0, 8, 8, 16, 24, 40, 48], dtype, hard=False, seed=61)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (compiled Triton)")
def test_cuda_graph_capture():
    d, f, r, alpha, u, seg = _inputs((16, 64, 9, 9), [0, 4, 12, 16], torch.bfloat16, seed=71)
    launch = lambda: (tk.gated_residual_fwd(f, r, alpha, u, 2.0, False, seg),  # noqa: E731
                      *tk.gated_residual_bwd(d, f, r, alpha, u, 2.0, False, seg, False),
                      *tk.gated_residual_bwd(d, f, r, alpha, u, 2.0, False, seg, True))
    eager = launch()  # autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = launch()
    seg.copy_(torch.tensor([0, 2, 2, 16], device=DEVICE))  # new offsets, read on the device at replay
    graph.replay()
    torch.cuda.synchronize()
    expected = launch()
    for a, b in zip(captured, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(eager[0], expected[0])
