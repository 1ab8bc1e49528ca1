"""The reference ops against direct float64 formulas, gradcheck, and their explicit backward formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import assert_close_verbose
from fastshare import reference as R


def _noise(shape, gen):
    return torch.rand(shape, generator=gen, dtype=torch.float64).clamp_(1e-6, 1 - 1e-6)


def _segments(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int64)


def _direct_gate(alpha, u, tau):
    """Float64 Gumbel-Softmax written with math, one segment at a time."""
    out = []
    for (a0, a1), (u0, u1) in zip(alpha.tolist(), u.tolist()):
        z0 = (a0 - math.log(-math.log(u0))) / tau
        z1 = (a1 - math.log(-math.log(u1))) / tau
        m = max(z0, z1)
        e0, e1 = math.exp(z0 - m), math.exp(z1 - m)
        out.append((e0 / (e0 + e1), e1 / (e0 + e1)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.1, 1.0, 5.0])
def test_gumbel_gate_matches_formula(tau):
    gen = torch.Generator().manual_seed(1)
    alpha = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    u = _noise((7, 2), gen)
    y = R.gumbel_gate_ref(alpha, u, tau, hard=False)
    assert_close_verbose(y, _direct_gate(alpha, u, tau), 1e-12, 1e-12, "soft gate")
    yh = R.gumbel_gate_ref(alpha, u, tau, hard=True)
    expect = _direct_gate(alpha, u, tau)
    onehot = torch.stack(((expect[:, 0] >= expect[:, 1]).double(), (expect[:, 0] < expect[:, 1]).double()), 1)
    assert torch.equal(yh, onehot)


def test_gumbel_gate_backward_formula_matches_autograd():
    gen = torch.Generator().manual_seed(2)
    for hard in (False, True):
        alpha = torch.randn(5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
        u = _noise((5, 2), gen)
        dy = torch.randn(5, 2, generator=gen, dtype=torch.float64)
        (R.gumbel_gate_ref(alpha, u, 0.7, hard) * dy).sum().backward()
        assert_close_verbose(R.gumbel_gate_backward_ref(dy, alpha.detach(), u, 0.7, hard), alpha.grad,
                             1e-12, 1e-10, f"dalpha hard={hard}")


def _direct_gated_residual(f, r, y, lengths):
    """Loop over segments and elements' rows in float64: ``y0 * relu(r + f) + y1 * r``."""
    out = torch.empty_like(f, dtype=torch.float64)
    row = 0
    for s, n in enumerate(lengths):
        for i in range(row, row + n):
            s_ = r[i].double() + f[i].double()
            out[i] = y[s, 0] * s_.clamp(min=0) + y[s, 1] * r[i].double()
        row += n
    return out


@pytest.mark.parametrize("lengths", [[3], [1, 4, 2], [2, 0, 3, 1], [1, 1, 1, 1, 1, 1]])
@pytest.mark.parametrize("hard", [False, True])
def test_gated_residual_matches_formula(lengths, hard):
    gen = torch.Generator().manual_seed(len(lengths) * 10 + hard)
    n = sum(lengths)
    f = torch.randn(n, 3, 5, 4, generator=gen, dtype=torch.float64)
    r = torch.randn(n, 3, 5, 4, generator=gen, dtype=torch.float64)
    alpha = torch.randn(len(lengths), 2, generator=gen, dtype=torch.float64)
    u = _noise((len(lengths), 2), gen)
    seg = _segments(lengths)
    y = R.gumbel_gate_ref(alpha, u, 2.0, hard)
    out = R.gated_residual_ref(f, r, alpha, u, 2.0, hard, seg)
    assert_close_verbose(out, _direct_gated_residual(f, r, y, lengths), 1e-12, 1e-12, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_low_precision_casts_back(dtype):
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(4, 8, generator=gen).to(dtype)
    r = torch.randn(4, 8, generator=gen).to(dtype)
    alpha, u = torch.randn(2, 2, generator=gen), _noise((2, 2), gen).float()
    seg = _segments([1, 3])
    out = R.gated_residual_ref(f, r, alpha, u, 1.0, False, seg)
    assert out.dtype == dtype
    expect = R.gated_residual_ref(f.double(), r.double(), alpha.double(), u.double(), 1.0, False, seg)
    assert_close_verbose(out, expect, 1e-2 if dtype == torch.bfloat16 else 1e-6, 1e-2, "out")


def test_gated_residual_gradcheck_soft():
    gen = torch.Generator().manual_seed(4)
    f = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    u = _noise((3, 2), gen)
    seg = _segments([2, 1, 2])
    assert torch.autograd.gradcheck(lambda f, r, a: R.gated_residual_ref(f, r, a, u, 0.9, False, seg),
                                    (f, r, alpha))


def test_gated_residual_gradcheck_hard_wrt_activations():
    # Hard mode is piecewise constant in alpha (its alpha gradient is straight-through, checked below).
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    u = _noise((2, 2), gen)
    seg = _segments([3, 1])
    assert torch.autograd.gradcheck(lambda f, r: R.gated_residual_ref(f, r, alpha, u, 0.5, True, seg), (f, r))


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("lengths", [[4], [2, 3, 1], [1, 0, 4]])
def test_gated_residual_backward_formula_matches_autograd(hard, lengths):
    gen = torch.Generator().manual_seed(6 + hard + len(lengths))
    n = sum(lengths)
    f = torch.randn(n, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(n, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(len(lengths), 2, generator=gen, dtype=torch.float64, requires_grad=True)
    u = _noise((len(lengths), 2), gen)
    seg = _segments(lengths)
    d = torch.randn(n, 3, 4, generator=gen, dtype=torch.float64)
    (R.gated_residual_ref(f, r, alpha, u, 1.3, hard, seg) * d).sum().backward()
    df, dr, da = R.gated_residual_backward_ref(d, f.detach(), r.detach(), alpha.detach(), u, 1.3, hard, seg)
    assert_close_verbose(df, f.grad, 1e-12, 1e-10, "df")
    assert_close_verbose(dr, r.grad, 1e-12, 1e-10, "dr")
    assert_close_verbose(da, alpha.grad, 1e-12, 1e-10, "dalpha")


def test_gate_one_zero_is_plain_residual_and_zero_one_is_shortcut():
    gen = torch.Generator().manual_seed(7)
    f, r = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    seg = _segments([4])
    u = torch.full((1, 2), 0.5)
    execute = R.gated_residual_ref(f, r, torch.tensor([[30.0, -30.0]]), u, 1.0, True, seg)
    skip = R.gated_residual_ref(f, r, torch.tensor([[-30.0, 30.0]]), u, 1.0, True, seg)
    assert torch.equal(execute, torch.relu(r + f))
    assert torch.equal(skip, r)


def _sequential_bn(x, lengths, bn: nn.BatchNorm2d):
    outs, row = [], 0
    for n in lengths:
        outs.append(bn(x[row:row + n]))
        row += n
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[2, 3], [1, 4, 2], [3]])
def test_segmented_batch_norm_equals_sequential_modules(lengths):
    gen = torch.Generator().manual_seed(8)
    n, c = sum(lengths), 4
    x = torch.randn(n, c, 5, 3, generator=gen, dtype=torch.float64) * 3 + 1
    bn = nn.BatchNorm2d(c, momentum=0.2).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    out = R.segmented_batch_norm_ref(x, bn.weight, bn.bias, rm, rv, _segments(lengths), 0.2, bn.eps, True)
    expect = _sequential_bn(x, lengths, bn)
    assert_close_verbose(out, expect, 1e-12, 1e-10, "out")
    assert_close_verbose(rm, bn.running_mean, 1e-12, 1e-10, "running_mean")
    assert_close_verbose(rv, bn.running_var, 1e-12, 1e-10, "running_var")
    # closed form of DESIGN.md §2: rm <- (1-m)^K rm + sum_k m (1-m)^(K-k) mean_k
    m, k = 0.2, len(lengths)
    rm0 = torch.zeros(c, dtype=torch.float64)
    bounds = _segments(lengths).tolist()
    closed = (1 - m) ** k * rm0
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        closed = closed + m * (1 - m) ** (k - i) * x[lo:hi].mean(dim=(0, 2, 3))
    rm_zero = torch.zeros(c, dtype=torch.float64)
    R.segmented_batch_norm_ref(x, None, None, rm_zero, torch.ones(c, dtype=torch.float64),
                               _segments(lengths), m, 1e-5, True)
    assert_close_verbose(rm_zero, closed, 1e-12, 1e-10, "closed form")


def test_segmented_batch_norm_eval_uses_running_stats():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(5, 3, 4, 4, generator=gen)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    out = R.segmented_batch_norm_ref(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                     _segments([2, 3]), 0.1, bn.eps, False)
    assert_close_verbose(out, bn(x), 1e-6, 1e-5, "eval out")


def test_segmented_batch_norm_gradcheck():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(5, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    seg = _segments([2, 3])
    assert torch.autograd.gradcheck(
        lambda x, w, b: R.segmented_batch_norm_ref(x, w, b, None, None, seg, 0.1, 1e-5, True), (x, w, b))


def test_segmented_batch_norm_gradcheck_eval_running_statistics():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=gen, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(2, generator=gen, dtype=torch.float64), torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: R.segmented_batch_norm_ref(x, w, b, rm, rv, _segments([2, 3]), 0.1, 1e-5, False), (x, w, b))


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_gate_gradcheck(hard):
    """Soft: the softmax's gradient; hard: straight-through, the soft gate's gradient (so the one-hot forward
    is checked against it through y_soft + (y_hard - y_soft).detach() by gradcheck's finite differences on
    the soft gate only)."""
    gen = torch.Generator().manual_seed(12)
    alpha = torch.randn(4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.rand(4, 2, generator=gen, dtype=torch.float64).clamp_(1e-6, 1 - 1e-6)
    if not hard:
        assert torch.autograd.gradcheck(lambda a: R.gumbel_gate_ref(a, u, 0.3, False), (alpha,))
        return
    grad = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad(R.gumbel_gate_ref(alpha, u, 0.3, True), alpha, grad)
    (want,) = torch.autograd.grad(R.gumbel_gate_ref(alpha, u, 0.3, False), alpha, grad)
    assert torch.equal(got, want)


class TestBadInputs:
    def _args(self):
        f, r = torch.randn(4, 3), torch.randn(4, 3)
        return f, r, torch.randn(2, 2), torch.full((2, 2), 0.5), 1.0, False, _segments([1, 3])

    def test_tau_must_be_positive(self):
        f, r, a, u, _, hard, seg = self._args()
        for tau in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="tau"):
                R.gated_residual_ref(f, r, a, u, tau, hard, seg)

    def test_nan_logits(self):
        f, r, a, u, tau, hard, seg = self._args()
        a[1, 0] = float("nan")
        with pytest.raises(ValueError, match="alpha holds NaN"):
            R.gated_residual_ref(f, r, a, u, tau, hard, seg)

    def test_noise_outside_unit_interval(self):
        f, r, a, u, tau, hard, seg = self._args()
        u[0, 0] = 1.0
        with pytest.raises(ValueError, match=r"u must lie strictly inside \(0, 1\)"):
            R.gated_residual_ref(f, r, a, u, tau, hard, seg)

    def test_wrong_logit_shape(self):
        f, r, _, u, tau, hard, seg = self._args()
        with pytest.raises(ValueError, match=r"alpha must have shape \(\.\.\., 2\)"):
            R.gated_residual_ref(f, r, torch.randn(2, 3), u, tau, hard, seg)
        with pytest.raises(ValueError, match="seg must have shape"):
            R.gated_residual_ref(f, r, torch.randn(3, 2), torch.full((3, 2), 0.5), tau, hard, seg)

    def test_mismatched_shapes_dtypes_devices(self):
        f, r, a, u, tau, hard, seg = self._args()
        with pytest.raises(ValueError, match="same shape"):
            R.gated_residual_ref(f, r[:3], a, u, tau, hard, seg)
        with pytest.raises(TypeError, match="same dtype"):
            R.gated_residual_ref(f, r.double(), a, u, tau, hard, seg)
        with pytest.raises(ValueError, match="f is on cpu but r is on meta"):
            R.gated_residual_ref(f, r.to("meta"), a, u, tau, hard, seg)
        with pytest.raises(TypeError, match="floating"):
            R.gated_residual_ref(f.long(), r.long(), a, u, tau, hard, seg)

    def test_bad_segments(self):
        f, r, a, u, tau, hard, _ = self._args()
        with pytest.raises(ValueError, match="end at the number of rows"):
            R.gated_residual_ref(f, r, a, u, tau, hard, torch.tensor([0, 1, 3]))
        with pytest.raises(ValueError, match="non-decreasing"):
            R.gated_residual_ref(f, r, a, u, tau, hard, torch.tensor([0, 5, 4]))
        with pytest.raises(TypeError, match="int64"):
            R.gated_residual_ref(f, r, a, u, tau, hard, torch.tensor([0, 1, 4], dtype=torch.int32))

    def test_batch_norm_needs_nonempty_segments(self):
        x = torch.randn(3, 2, 2, 2)
        with pytest.raises(ValueError, match="at least one row"):
            R.segmented_batch_norm_ref(x, None, None, None, None, torch.tensor([0, 0, 3]), 0.1, 1e-5, True)
        with pytest.raises(ValueError, match=r"weight must have shape \(2,\)"):
            R.segmented_batch_norm_ref(x, torch.ones(3), None, None, None, torch.tensor([0, 3]), 0.1, 1e-5, True)
