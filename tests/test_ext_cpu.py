"""C++ CPU kernels of the fused gated residual (``fastshare._C``, ops ``torch.ops.fastshare_C.*``) against
the reference (DESIGN.md §2).

Every test draws fresh random inputs (seeded per test). Elementwise results (out, df, dr) are compared with
the reference on the same inputs under the per-dtype tolerances of conftest; the gate-logit gradient, a
reduction, follows the flash-attn rule: its error against a float64 reference is at most twice the error of
the reference evaluated in the kernel's dtype, plus a small atol.

Without the extension these tests are skipped, unless ``FASTSHARE_REQUIRE_BACKENDS`` names ``cpu`` (CI),
where that is a failure. Build it with ``pip install --no-build-isolation -e .``.

The helpers (``make_inputs``, ``check_forward``, ``check_backward``) are shared with test_ext_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_verbose, assert_reduction_close, skip_or_fail, tolerance
from fastshare import reference as R

# (shape, segment row offsets): one element; odd sizes; empty segments first, inside and last; rows shorter
# than a SIMD vector (segment boundaries inside vectors); 1 to 6 segments of unequal length.
CASES = [
    ((1,), [0, 1]),
    ((5,), [0, 2, 2, 5]),
    ((3, 7), [0, 1, 1, 3]),
    ((40, 3), [0, 4, 5, 5, 17, 30, 40]),
    ((7, 5, 9, 11), [0, 0, 2, 3, 7, 7]),
    ((6, 3, 13, 17), [0, 2, 6]),
    ((9, 37), [0, 9]),
]
# The largest CPU case: several parallel chunks per segment.
LARGE = ((24, 64, 33, 33), [0, 5, 5, 16, 24])

# atol of the gate-logit gradient on top of the 2x rule, relative to max |dalpha|.
DALPHA_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def require_ext(device_type: str) -> None:
    """Skip (or fail, where FASTSHARE_REQUIRE_BACKENDS names the backend) unless fastshare._C has kernels
    for ``device_type`` ('cpu' or 'cuda')."""
    try:
        import fastshare._C  # noqa: F401
    except ImportError as exc:
        skip_or_fail(device_type, f"fastshare._C is not built ({exc}); build it with "
                                  "pip install --no-build-isolation -e .")
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastshare_C::gated_residual_fwd", key):
        skip_or_fail(device_type, f"fastshare._C was built without {key} kernels")


@pytest.fixture(autouse=True)
def _cpu_ext():
    require_ext("cpu")


def make_inputs(shape, offsets, dtype, device="cpu", seed=0, tau=0.7, channels_last=False, alpha_dtype=None):
    """Fresh random (d, f, r, alpha, u, tau, seg) on ``device``; f and r straddle zero so relu masks vary.

    alpha and u are float64 for float64 data (a float32 gate is only float32-accurate: it would not meet the
    float64 tolerance), float32 otherwise, unless ``alpha_dtype`` says.
    """
    torch.manual_seed(seed)
    if alpha_dtype is None:
        alpha_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    n_seg = len(offsets) - 1
    d, f, r = (torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype) for _ in range(3))
    if channels_last:
        d, f, r = (t.to(memory_format=torch.channels_last) for t in (d, f, r))
    alpha = (2 * torch.randn(n_seg, 2, dtype=torch.float64)).to(device=device, dtype=alpha_dtype)
    u = torch.rand(n_seg, 2, dtype=torch.float64).clamp_(1e-4, 1 - 1e-4).to(device=device, dtype=alpha_dtype)
    seg = torch.tensor(offsets, dtype=torch.int64, device=device)
    return d, f, r, alpha, u, tau, seg


def check_forward(f, r, alpha, u, tau, hard, seg):
    """Kernel forward == reference on the same inputs; layout preserved; every element finite."""
    out = torch.ops.fastshare_C.gated_residual_fwd(f, r, alpha, u, tau, hard, seg)
    expected = R.gated_residual_ref(f, r, alpha, u, tau, hard, seg)
    assert out.dtype == f.dtype and out.shape == f.shape and out.device == f.device
    assert out.stride() == f.stride(), "out must keep f's memory layout"
    assert bool(torch.isfinite(out).all()), "out holds NaN/Inf: an element was not written"
    atol, rtol = tolerance(f.dtype)
    assert_close_verbose(out, expected, atol, rtol, "out")
    return out


def check_backward(d, f, r, alpha, u, tau, hard, seg, deterministic=True):
    """Kernel backward == reference: df, dr elementwise; dalpha by the 2x rule against float64."""
    df, dr, dalpha = torch.ops.fastshare_C.gated_residual_bwd(d, f, r, alpha, u, tau, hard, seg, deterministic)
    ref_df, ref_dr, ref_dalpha = R.gated_residual_backward_ref(d, f, r, alpha, u, tau, hard, seg)
    d64, f64, r64 = (t.double() for t in (d, f, r))
    _, _, dalpha64 = R.gated_residual_backward_ref(d64, f64, r64, alpha.double(), u.double(), tau, hard, seg)
    for name, t in (("df", df), ("dr", dr)):
        assert t.dtype == f.dtype and t.shape == f.shape and t.stride() == f.stride(), f"{name}: layout"
        assert bool(torch.isfinite(t).all()), f"{name} holds NaN/Inf: an element was not written"
    assert dalpha.dtype == alpha.dtype and dalpha.shape == alpha.shape and dalpha.device == alpha.device
    assert bool(torch.isfinite(dalpha).all())
    atol, rtol = tolerance(f.dtype)
    assert_close_verbose(df, ref_df, atol, rtol, "df")
    assert_close_verbose(dr, ref_dr, atol, rtol, "dr")
    scale = max(1.0, dalpha64.abs().max().item())
    assert_reduction_close(dalpha, dalpha64, ref_dalpha, atol=DALPHA_ATOL[f.dtype] * scale, name="dalpha")
    return df, dr, dalpha


CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_backward(case, dtype, hard):
    shape, offsets = CASES[case]
    d, f, r, alpha, u, tau, seg = make_inputs(shape, offsets, dtype, seed=100 + case)
    check_forward(f, r, alpha, u, tau, hard, seg)
    check_backward(d, f, r, alpha, u, tau, hard, seg)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_large(dtype, channels_last):
    shape, offsets = LARGE
    d, f, r, alpha, u, tau, seg = make_inputs(shape, offsets, dtype, seed=7, channels_last=channels_last)
    for hard in (False, True):  # segments spanning several parallel chunks, in both gate modes
        check_forward(f, r, alpha, u, tau, hard, seg)
        check_backward(d, f, r, alpha, u, tau, hard, seg)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_channels_last(dtype, hard):
    d, f, r, alpha, u, tau, seg = make_inputs((7, 5, 9, 11), [0, 0, 2, 3, 7, 7], dtype, seed=3,
                                              channels_last=True)
    check_forward(f, r, alpha, u, tau, hard, seg)
    check_backward(d, f, r, alpha, u, tau, hard, seg)


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_tau_sweep(tau):
    d, f, r, alpha, u, _, seg = make_inputs((12, 3, 5, 7), [0, 3, 8, 12], torch.float32, seed=11)
    for hard in (False, True):
        check_forward(f, r, alpha, u, tau, hard, seg)
        check_backward(d, f, r, alpha, u, tau, hard, seg)


@pytest.mark.parametrize("select", [True, False], ids=["all_select", "all_skip"])
def test_all_select_all_skip(select):
    d, f, r, alpha, u, tau, seg = make_inputs((10, 4, 6), [0, 3, 3, 10], torch.float32, seed=5)
    alpha = torch.tensor([[30.0, -30.0]] * 3) if select else torch.tensor([[-30.0, 30.0]] * 3)
    out = check_forward(f, r, alpha, u, tau, True, seg)
    expected = torch.relu(r + f) if select else r
    assert torch.equal(out, expected)
    check_backward(d, f, r, alpha, u, tau, True, seg)


def test_float64_gate_params_and_strided_alpha():
    """alpha/u in float64 (gate computed in float64), and alpha a non-contiguous slice of a [S, L, 2] tensor."""
    d, f, r, _, _, tau, seg = make_inputs((9, 4, 5), [0, 2, 9], torch.float32, seed=13)
    torch.manual_seed(14)
    logits = torch.randn(2, 3, 2, dtype=torch.float64)
    alpha = logits[:, 1, :]
    assert not alpha.is_contiguous()
    u = torch.rand(2, 2, dtype=torch.float64).clamp_(1e-4, 1 - 1e-4)
    for hard in (False, True):
        check_forward(f, r, alpha, u, tau, hard, seg)
        check_backward(d, f, r, alpha, u, tau, hard, seg)


def test_empty():
    """No rows, and rows of zero elements: empty outputs, zero gate-logit gradient."""
    for shape, offsets in (((0, 3), [0, 0]), ((4, 0), [0, 1, 4])):
        d, f, r, alpha, u, tau, seg = make_inputs(shape, offsets, torch.float32, seed=17)
        out = torch.ops.fastshare_C.gated_residual_fwd(f, r, alpha, u, tau, False, seg)
        df, dr, dalpha = torch.ops.fastshare_C.gated_residual_bwd(d, f, r, alpha, u, tau, False, seg, True)
        assert out.shape == f.shape and df.shape == f.shape and dr.shape == f.shape
        assert torch.equal(dalpha, torch.zeros_like(alpha))


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_deterministic_and_thread_count_independent(dtype):
    """Two backward runs are bitwise equal, for 1 and 2 threads and either value of the flag."""
    shape, offsets = LARGE
    d, f, r, alpha, u, tau, seg = make_inputs(shape, offsets, dtype, seed=19)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for deterministic in (True, False):
                out = torch.ops.fastshare_C.gated_residual_fwd(f, r, alpha, u, tau, False, seg)
                grads = torch.ops.fastshare_C.gated_residual_bwd(d, f, r, alpha, u, tau, False, seg,
                                                                 deterministic)
                results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_public_api_backward_matches_reference():
    """fastshare.gated_residual(backend='cpu') with autograd == autograd through the reference."""
    import fastshare

    d, f, r, alpha, u, tau, seg = make_inputs((8, 3, 5, 5), [0, 3, 3, 8], torch.float32, seed=23)
    grads = []
    for backend in ("cpu", "reference"):
        fl, rl, al = (t.detach().clone().requires_grad_() for t in (f, r, alpha))
        out = fastshare.gated_residual(fl, rl, al, u, tau, False, seg, backend=backend)
        out.backward(d)
        grads.append((out.detach(), fl.grad, rl.grad, al.grad))
    for name, a, b in zip(("out", "df", "dr", "dalpha"), *grads):
        assert_close_verbose(a, b, 1e-6, 1e-5, name)


def _bwd(*args):
    return torch.ops.fastshare_C.gated_residual_bwd(*args)


def test_bad_layouts_and_arguments_raise():
    d, f, r, alpha, u, tau, seg = make_inputs((4, 3, 5, 6), [0, 1, 4], torch.float32, seed=29)
    fwd = torch.ops.fastshare_C.gated_residual_fwd
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        fwd(f.transpose(2, 3), r.transpose(2, 3), alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        fwd(f[:, :, ::2], r[:, :, ::2], alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="r must have f's memory layout"):
        fwd(f, r.to(memory_format=torch.channels_last), alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="grad must have f's memory layout"):
        _bwd(d.to(memory_format=torch.channels_last), f, r, alpha, u, tau, False, seg, True)
    with pytest.raises(RuntimeError, match="r must have f's shape"):
        fwd(f, r[:3], alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="r must have f's dtype"):
        fwd(f, r.double(), alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="float32, float64 and bfloat16"):
        fwd(f.half(), r.half(), alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="alpha must have shape"):
        fwd(f, r, alpha[:, :1], u[:, :1], tau, False, seg)
    with pytest.raises(RuntimeError, match="u must have alpha's dtype"):
        fwd(f, r, alpha, u.double(), tau, False, seg)
    with pytest.raises(RuntimeError, match="seg must be int64"):
        fwd(f, r, alpha, u, tau, False, seg.int())
    with pytest.raises(RuntimeError, match=r"seg must have shape \(3,\)"):
        fwd(f, r, alpha, u, tau, False, seg[:2])
    with pytest.raises(RuntimeError, match="seg must start at 0 and end at the number of rows"):
        fwd(f, r, alpha, u, tau, False, torch.tensor([0, 1, 3]))
    with pytest.raises(RuntimeError, match="seg must be non-decreasing"):
        fwd(f, r, alpha, u, tau, False, torch.tensor([0, 5, 4]))
    with pytest.raises(RuntimeError, match="tau must be a finite number > 0"):
        fwd(f, r, alpha, u, 0.0, False, seg)


def test_opcheck_of_the_extension_ops():
    """The fastshare_C kernels have fake implementations (registered when fastshare loads the extension), so
    they trace when called directly."""
    from fastshare import _ext

    assert _ext.load()[0] is not None
    d, f, r, alpha, u, _, seg = make_inputs((6, 3, 4), [0, 2, 6], torch.float32, seed=3)
    ops = torch.ops.fastshare_C
    torch.library.opcheck(ops.gated_residual_fwd.default, (f, r, alpha, u, 0.7, False, seg))
    torch.library.opcheck(ops.gated_residual_bwd.default, (d, f, r, alpha, u, 0.7, True, seg, True))
    x = torch.randn(5, 7)
    seed = torch.tensor(11, dtype=torch.int64)
    torch.library.opcheck(ops.relu_dropout_fwd.default, (x, seed, 3, 0.25))
    _, mask = ops.relu_dropout_fwd(x, seed, 3, 0.25)
    torch.library.opcheck(ops.relu_dropout_bwd.default, (torch.randn_like(x), mask, 0.25))
