"""The registered ops: backend dispatch, opcheck, torch.compile, layouts — for every backend available here.

Backend-specific kernel sweeps live in test_ext_*.py and test_triton_*.py; this file holds what every
backend must satisfy through the op layer.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastshare
from conftest import assert_close_verbose, skip_or_fail
from fastshare import reference as R
from fastshare.ops import BackendUnavailableError, available_backends, last_fallback_reasons, use_backend
from fastshare.ops import deterministic_reductions


def _inputs(n=6, shape=(3, 5, 4), lengths=(2, 1, 3), dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, *shape, generator=gen).to(device, dtype)
    r = torch.randn(n, *shape, generator=gen).to(device, dtype)
    alpha = torch.randn(len(lengths), 2, generator=gen).to(device)
    u = torch.rand(len(lengths), 2, generator=gen).clamp_(1e-6, 1 - 1e-6).to(device)
    seg = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    return f, r, alpha, u, seg


def _runnable_backends() -> list[str]:
    names = ["reference"]
    for name in ("cpu", "triton"):
        if not available_backends("cpu")[name]:
            names.append(name)
    return names


BACKENDS_HERE = _runnable_backends()


def test_requested_backends_are_available():
    from conftest import required_backends

    for name in sorted(required_backends() - {"cuda"}):
        reasons = available_backends("cpu")[name]
        if reasons:
            skip_or_fail(name, "; ".join(reasons))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("hard", [False, True])
def test_op_matches_reference_forward_and_backward(backend, hard):
    f, r, alpha, u, seg = _inputs(seed=1 + hard)
    f.requires_grad_(), r.requires_grad_(), alpha.requires_grad_()
    out = fastshare.gated_residual(f, r, alpha, u, 0.8, hard, seg, backend=backend)
    d = torch.randn_like(out)
    (out * d).sum().backward()
    fr, rr, ar = (t.detach().clone().requires_grad_() for t in (f, r, alpha))
    ref = R.gated_residual_ref(fr, rr, ar, u, 0.8, hard, seg)
    (ref * d).sum().backward()
    assert_close_verbose(out, ref, 1e-6, 1e-5, "out")
    assert_close_verbose(f.grad, fr.grad, 1e-6, 1e-5, "df")
    assert_close_verbose(r.grad, rr.grad, 1e-6, 1e-5, "dr")
    assert_close_verbose(alpha.grad, ar.grad, 1e-5, 1e-4, "dalpha")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("alpha_layout", ["contiguous", "transposed"])
def test_opcheck_gated_residual(backend, alpha_layout):
    f, r, alpha, u, seg = _inputs(seed=3)
    if alpha_layout == "transposed":  # dense, strides (1, S): the fake's dalpha must still be contiguous
        alpha = alpha.t().contiguous().t()
    for t in (f, r, alpha):
        t.requires_grad_()
    grad = torch.randn_like(f)
    for hard in (False, True):
        torch.library.opcheck(torch.ops.fastshare.gated_residual.default,
                              (f, r, alpha, u, 1.1, hard, seg, backend))
        torch.library.opcheck(torch.ops.fastshare.gated_residual_backward.default,
                              (grad, f.detach(), r.detach(), alpha.detach(), u, 1.1, hard, seg, backend, True))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_empty_batch_forward_and_backward(backend):
    f, r, alpha, u, _ = _inputs(seed=5)
    f, r = f[:0], r[:0]
    seg = torch.zeros(4, dtype=torch.int64)
    out = fastshare.gated_residual(f, r, alpha, u, 1.0, False, seg, backend=backend)
    assert out.shape == f.shape
    df, dr, dalpha = torch.ops.fastshare.gated_residual_backward(torch.randn_like(f), f, r, alpha, u, 1.0, False,
                                                                 seg, backend, True)
    assert df.shape == dr.shape == f.shape and torch.equal(dalpha, torch.zeros_like(alpha))


def _saturated_inputs(dtype=torch.float32):
    """Gates with y1 (or y0) near 1e-6 and large per-segment sums dg: where ``(dg - <y, dg>) * y`` cancels."""
    gen = torch.Generator().manual_seed(11)
    n, shape = 6, (4, 16, 16)
    f = torch.randn(n, *shape, generator=gen).to(dtype)
    r = (torch.randn(n, *shape, generator=gen) + 0.5).to(dtype)
    d = (torch.randn(n, *shape, generator=gen) * 0.2 + 1.0).to(dtype)
    alpha = torch.tensor([[3.5, -3.5], [-3.4, 3.4], [3.3, -3.3]])
    u = torch.full((3, 2), 0.5)
    seg = torch.tensor([0, 2, 3, 6])
    return f, r, d, alpha, u, seg


def _dalpha_oracle(f, r, d, alpha, u, tau, seg):
    """dalpha in float64 from the float64 softmax: y0 * y1 * (dg0 - dg1) / tau."""
    f, r, d = f.double(), r.double(), d.double()
    y = torch.softmax((alpha.double() + R.gumbel_noise(u.double())) / tau, dim=-1)
    out = torch.empty(len(seg) - 1, 2, dtype=torch.float64)
    for s in range(len(seg) - 1):
        rows = slice(int(seg[s]), int(seg[s + 1]))
        dg0 = (d[rows] * torch.relu(r[rows] + f[rows])).sum()
        dg1 = (d[rows] * r[rows]).sum()
        out[s, 0] = y[s, 0] * y[s, 1] * (dg0 - dg1) / tau
        out[s, 1] = -out[s, 0]
    return out, y


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("hard", [False, True])
def test_dalpha_keeps_its_precision_at_saturated_gates(backend, hard):
    """float32 dalpha within 1e-4 of a float64 oracle with y_min ~ 1e-6 and |dg| ~ 1e3: the textbook
    ``(dg - <y, dg>) * y / tau`` loses ~3% there (the cancellation of ``dg0 - <y, dg>``)."""
    f, r, d, alpha, u, seg = _saturated_inputs()
    tau = 0.5
    want, y = _dalpha_oracle(f, r, d, alpha, u, tau, seg)
    assert y.min() < 1e-5 and y.min() > 1e-7  # the regime this test is about
    for deterministic in (False, True):
        _, _, dalpha = torch.ops.fastshare.gated_residual_backward(d, f, r, alpha, u, tau, hard, seg, backend,
                                                                   deterministic)
        assert dalpha.dtype == torch.float32
        assert_close_verbose(dalpha.double(), want, 0.0, 1e-4, f"dalpha (deterministic={deterministic})")


def test_gumbel_gate_gradient_keeps_its_precision_at_saturated_gates():
    alpha = torch.tensor([[3.5, -3.5], [-3.4, 3.4]], requires_grad=True)
    u = torch.full((2, 2), 0.5)
    dy = torch.tensor([[1000.0, -700.0], [250.0, 900.0]])
    (fastshare.gumbel_gate(alpha, u, 0.5, False) * dy).sum().backward()
    y = torch.softmax((alpha.detach().double() + R.gumbel_noise(u.double())) / 0.5, dim=-1)
    want0 = y[:, 0] * y[:, 1] * (dy[:, 0] - dy[:, 1]).double() / 0.5
    assert_close_verbose(alpha.grad.double(), torch.stack((want0, -want0), -1), 0.0, 1e-5, "dalpha")


def test_opcheck_gumbel_gate():
    alpha = torch.randn(4, 2, requires_grad=True)
    u = torch.rand(4, 2).clamp_(1e-6, 1 - 1e-6)
    for hard in (False, True):
        torch.library.opcheck(torch.ops.fastshare.gumbel_gate.default, (alpha, u, 0.7, hard))


def test_gumbel_gate_keeps_float32_noise_for_bfloat16_logits():
    """u = 0.999 is valid noise; rounded to bf16 it would be 1.0 (rejected) and others would shift the gate."""
    alpha = torch.randn(3, 2).bfloat16()
    u = torch.tensor([[0.999, 0.3], [0.123456, 0.654321], [0.5, 0.9995]])
    got = fastshare.gumbel_gate(alpha, u, 0.5, False)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, R.gumbel_gate_ref(alpha, u, 0.5, False))


def test_gumbel_gate_op_matches_reference_and_gradient():
    alpha = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    u = torch.rand(5, 2, dtype=torch.float64).clamp_(1e-6, 1 - 1e-6)
    assert torch.autograd.gradcheck(lambda a: fastshare.gumbel_gate(a, u, 0.6, False), (alpha,))
    for hard in (False, True):
        a1 = alpha.detach().clone().requires_grad_()
        a2 = alpha.detach().clone().requires_grad_()
        d = torch.randn(5, 2, dtype=torch.float64)
        (fastshare.gumbel_gate(a1, u, 0.6, hard) * d).sum().backward()
        (R.gumbel_gate_ref(a2, u, 0.6, hard) * d).sum().backward()
        assert torch.allclose(a1.grad, a2.grad)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_compiled_gated_block_has_no_graph_break_and_matches_eager(backend):
    torch._dynamo.reset()
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    bn = torch.nn.BatchNorm2d(3).eval()

    def block(x, alpha, u, seg):
        f = bn(conv(torch.relu(x)))
        return fastshare.gated_residual(f, x, alpha, u, 0.9, True, seg, backend=backend)

    x = torch.randn(6, 3, 5, 4)
    alpha = torch.randn(3, 2, requires_grad=True)
    u = torch.rand(3, 2).clamp_(1e-6, 1 - 1e-6)
    seg = torch.tensor([0, 2, 3, 6])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out_c = compiled(x, alpha, u, seg)
    out_c.sum().backward()
    grad_c = alpha.grad.clone()
    alpha.grad = None
    out_e = block(x, alpha, u, seg)
    out_e.sum().backward()
    assert_close_verbose(out_c, out_e, 1e-6, 1e-5, "compiled out")
    assert_close_verbose(grad_c, alpha.grad, 1e-6, 1e-5, "compiled dalpha")


@pytest.mark.parametrize("switch", ["use_backend", "env"])
def test_compiled_graph_follows_a_later_backend_request(switch, monkeypatch):
    """The request (use_backend context, FASTSHARE_BACKEND) is guarded: a compiled graph recompiles when it
    changes instead of keeping the backend it was traced with."""
    if "cpu" not in BACKENDS_HERE:
        skip_or_fail("cpu", "needs the C++ extension")
    import sys

    module = sys.modules["fastshare.ops.gated_residual"]
    calls: list[str] = []
    for name, (fwd, bwd) in list(module._IMPLS.items()):
        monkeypatch.setitem(module._IMPLS, name,
                            (lambda *a, _f=fwd, _n=name: (calls.append(_n), _f(*a))[1], bwd))
    f, r, alpha, u, seg = _inputs(seed=7)
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, r: fastshare.gated_residual(f, r, alpha, u, 1.0, False, seg),
                             fullgraph=True, backend="aot_eager")
    for name in ("reference", "cpu"):
        if switch == "env":
            monkeypatch.setenv("FASTSHARE_BACKEND", name)
            compiled(f, r)
        else:
            with use_backend(name):
                compiled(f, r)
    assert calls == ["reference", "cpu"]


@pytest.mark.parametrize("hard", [False, True])
def test_compiled_gumbel_gate_has_no_graph_break_and_matches_eager(hard):
    torch._dynamo.reset()
    alpha = torch.randn(4, 2, requires_grad=True)
    u = torch.rand(4, 2).clamp_(1e-6, 1 - 1e-6)
    compiled = torch.compile(lambda a: fastshare.gumbel_gate(a, u, 0.7, hard), fullgraph=True, backend="aot_eager")
    d = torch.randn(4, 2)
    out_c = compiled(alpha)
    (g_c,) = torch.autograd.grad(out_c, alpha, d)
    out_e = fastshare.gumbel_gate(alpha, u, 0.7, hard)
    (g_e,) = torch.autograd.grad(out_e, alpha, d)
    assert_close_verbose(out_c, out_e, 1e-7, 1e-6, "compiled gate")
    assert_close_verbose(g_c, g_e, 1e-7, 1e-6, "compiled dalpha")


@pytest.mark.parametrize("backend", [b for b in BACKENDS_HERE if b in ("reference", "cpu")])  # float64 ones
def test_gradcheck_float64_through_the_op(backend):
    """The registered backward (explicit formulas, C++ kernel for ``cpu``) against finite differences."""
    f, r, alpha, u, seg = (t.double() if t.is_floating_point() else t for t in _inputs(n=6, shape=(2, 3), seed=8))
    f, r, alpha = (t.requires_grad_() for t in (f, r, alpha))
    assert torch.autograd.gradcheck(
        lambda f, r, a: fastshare.gated_residual(f, r, a, u, 0.9, False, seg, backend=backend), (f, r, alpha))
    assert torch.autograd.gradcheck(
        lambda f, r: fastshare.gated_residual(f, r, alpha, u, 0.9, True, seg, backend=backend), (f, r))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_saves_only_its_inputs_for_backward(backend):
    """DESIGN §2: the backward recomputes relu(r + f); the forward saves f and r (and the small gate
    inputs), never an activation of f's size of its own."""
    f, r, alpha, u, seg = _inputs(seed=9)
    f, r, alpha = (t.requires_grad_() for t in (f, r, alpha))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastshare.gated_residual(f, r, alpha, u, 0.8, False, seg, backend=backend)
    big = [t for t in saved if t.numel() == f.numel()]
    assert len(big) == 2 and all(any(t.data_ptr() == x.data_ptr() for x in (f, r)) for t in big), \
        [tuple(t.shape) for t in saved]
    assert all(t.numel() <= seg.numel() * 2 for t in saved if t.numel() != f.numel())
    out.sum().backward()


def test_channels_last_and_strided_inputs():
    f, r, alpha, u, seg = _inputs(n=6, shape=(4, 5, 3), seed=4)
    cl_f, cl_r = f.to(memory_format=torch.channels_last), r.to(memory_format=torch.channels_last)
    out = fastshare.gated_residual(cl_f, cl_r, alpha, u, 1.0, False, seg)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_verbose(out, R.gated_residual_ref(f, r, alpha, u, 1.0, False, seg), 1e-6, 1e-5, "cl")
    big_f, big_r = torch.randn(6, 12, 5, 3), torch.randn(6, 12, 5, 3)
    sl_f, sl_r = big_f[:, 4:8], big_r[:, 4:8]  # non-contiguous slices: documented copy
    out = fastshare.gated_residual(sl_f, sl_r, alpha, u, 1.0, False, seg)
    assert_close_verbose(out, R.gated_residual_ref(sl_f.contiguous(), sl_r.contiguous(), alpha, u, 1.0, False,
                                                   seg), 1e-6, 1e-5, "sliced")


class TestDispatch:
    def test_unknown_backend(self):
        f, r, alpha, u, seg = _inputs()
        with pytest.raises(ValueError, match="unknown backend 'fast'"):
            fastshare.gated_residual(f, r, alpha, u, 1.0, False, seg, backend="fast")

    def test_explicit_unavailable_backend_raises_with_reasons(self):
        f, r, alpha, u, seg = _inputs()
        with pytest.raises(BackendUnavailableError, match="the cuda backend runs on CUDA tensors, got cpu"):
            fastshare.gated_residual(f, r, alpha, u, 1.0, False, seg, backend="cuda")

    def test_context_and_env_precedence(self, monkeypatch):
        from fastshare.ops.backends import requested_backend

        monkeypatch.setenv("FASTSHARE_BACKEND", "reference")
        assert requested_backend() == "reference"
        with use_backend("auto"):
            assert requested_backend() == "auto"
            with use_backend("cpu"):
                assert requested_backend() == "cpu"
                assert requested_backend("triton") == "triton"
            assert requested_backend() == "auto"
        monkeypatch.setenv("FASTSHARE_BACKEND", "bogus")
        with pytest.raises(ValueError, match="FASTSHARE_BACKEND='bogus'"):
            requested_backend()

    def test_auto_records_why_it_fell_back(self, monkeypatch):
        from fastshare.ops import backends

        monkeypatch.setattr(backends._ext, "load", lambda: (None, "not built in this test"))
        f, r, alpha, u, seg = _inputs()
        fastshare.gated_residual(f, r, alpha, u, 1.0, False, seg, backend="auto")
        reasons = last_fallback_reasons()
        assert "cpu" in reasons and any("not built in this test" in why for why in reasons["cpu"])

    def test_deterministic_switch(self, monkeypatch):
        assert not deterministic_reductions() or os.environ.get("FASTSHARE_DETERMINISTIC") == "1"
        monkeypatch.setenv("FASTSHARE_DETERMINISTIC", "1")
        assert deterministic_reductions()
