"""``fastshare::segmented_batch_norm`` and ``SegmentedBatchNorm2d`` against separate BatchNorm calls."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastshare import segmented_batch_norm
from fastshare.model.norm import SegmentedBatchNorm2d, batch_segments, convert_batch_norm, current_segments
from fastshare.reference import segmented_batch_norm_ref


def _inputs(bounds, channels=5, hw=(3, 4), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(bounds[-1], channels, *hw, generator=gen) * 2 + 0.5).to(dtype)
    weight = torch.randn(channels, generator=gen).to(dtype)
    bias = torch.randn(channels, generator=gen).to(dtype)
    rm = torch.randn(channels, generator=gen).to(dtype)
    rv = (torch.rand(channels, generator=gen) + 0.5).to(dtype)
    return x, weight, bias, rm, rv, torch.tensor(bounds, dtype=torch.int64)


def _assert_close(a, b, rtol, name):
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"


@pytest.mark.parametrize("bounds", [[0, 4], [0, 2, 6, 9], [0, 3, 6, 9, 12, 15], [0, 1, 3]])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference_loop(bounds, training, affine):
    x, w, b, rm, rv, seg = _inputs(bounds)
    if not affine:
        w = b = None
    else:
        w.requires_grad_()
        b.requires_grad_()
    x.requires_grad_()
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = segmented_batch_norm(x, w, b, rm, rv, seg, 0.1, 1e-5, training)
    ref = segmented_batch_norm_ref(x, w, b, rm_ref, rv_ref, seg, 0.1, 1e-5, training)
    _assert_close(out, ref, 1e-12, "output")
    _assert_close(rm, rm_ref, 1e-12, "running_mean")
    _assert_close(rv, rv_ref, 1e-12, "running_var")
    grad = torch.randn_like(out)
    params = [x] + ([w, b] if affine else [])
    for g_out, g_ref, name in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad),
                                  ["x", "weight", "bias"]):
        _assert_close(g_out, g_ref, 1e-11, f"grad {name}")


@pytest.mark.parametrize("repeats", [1, 2, 5])
def test_repeats_equal_repeated_segments(repeats):
    x, w, b, rm, rv, _ = _inputs([0, 3])
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = segmented_batch_norm(x, w, b, rm, rv, torch.tensor([0, 3]), 0.1, 1e-5, True, repeats=repeats)
    stacked = x.repeat(repeats, 1, 1, 1)
    seg_ref = torch.arange(0, 3 * (repeats + 1), 3)
    ref = segmented_batch_norm_ref(stacked, w, b, rm_ref, rv_ref, seg_ref, 0.1, 1e-5, True)
    _assert_close(out, ref[:3], 1e-12, "output")
    _assert_close(rm, rm_ref, 1e-12, "running_mean")
    _assert_close(rv, rv_ref, 1e-12, "running_var")


def test_running_update_closed_form():
    """``rm <- (1-m)^K rm + sum_k m (1-m)^(K-k) mean_k`` and the unbiased variance."""
    x, w, b, rm, rv, seg = _inputs([0, 2, 5, 6], hw=(2, 2))
    rm0, rv0, m = rm.clone(), rv.clone(), 0.3
    segmented_batch_norm(x, w, b, rm, rv, seg, m, 1e-5, True)
    bounds = seg.tolist()
    k = len(bounds) - 1
    exp_m, exp_v = (1 - m) ** k * rm0, (1 - m) ** k * rv0
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        xs = x[lo:hi].transpose(0, 1).reshape(x.shape[1], -1)
        exp_m = exp_m + m * (1 - m) ** (k - i - 1) * xs.mean(1)
        exp_v = exp_v + m * (1 - m) ** (k - i - 1) * xs.var(1, unbiased=True)
    _assert_close(rm, exp_m, 1e-12, "running_mean")
    _assert_close(rv, exp_v, 1e-12, "running_var")


@pytest.mark.parametrize("std", [1e-2, 1e-4, 3e-5])
def test_float32_running_var_of_low_variance_channels(std):
    """The running variance follows nn.BatchNorm2d's even where the variance is far below eps (rebuilding it
    from the inverse std, 1 / invstd^2 - eps, lost up to 1e-3 of it at std 3e-5)."""
    gen = torch.Generator().manual_seed(5)
    x = 0.3 + std * torch.randn(12, 4, 5, 5, generator=gen)
    bn = SegmentedBatchNorm2d(4)
    ref = nn.BatchNorm2d(4)
    for m in (bn, ref):  # start at 0, so that the running variance is the batches' variances only
        m.running_var.zero_()
    with batch_segments([0, 4, 8, 12]):
        bn(x)
    for lo in (0, 4, 8):
        ref(x[lo:lo + 4])
    _assert_close(bn.running_var, ref.running_var, 1e-5, "running_var")
    _assert_close(bn.running_mean, ref.running_mean, 1e-6, "running_mean")


def test_float32_bitwise_equal_to_separate_batch_norms():
    x, w, b, rm, rv, seg = _inputs([0, 4, 8, 12], channels=16, hw=(7, 7), dtype=torch.float32)
    out = segmented_batch_norm(x, w, b, None, None, seg, 0.1, 1e-5, True)
    ref = torch.cat([F.batch_norm(x[i:i + 4], None, None, w, b, True, 0.1, 1e-5) for i in (0, 4, 8)])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts(layout):
    x, w, b, rm, rv, seg = _inputs([0, 2, 6], channels=6, hw=(4, 5))
    if layout == "channels_last":
        xin = x.contiguous(memory_format=torch.channels_last)
    else:
        big = torch.zeros(x.shape[0], 3 * x.shape[1], 4, 10, dtype=x.dtype)
        big[:, 1::3, :, ::2] = x
        xin = big[:, 1::3, :, ::2]
    xin.requires_grad_()
    out = segmented_batch_norm(xin, w, b, None, None, seg, 0.1, 1e-5, True)
    ref = segmented_batch_norm_ref(x, w, b, None, None, seg, 0.1, 1e-5, True)
    _assert_close(out, ref, 1e-12, "output")
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad(out, xin, grad)
    (g_ref,) = torch.autograd.grad(segmented_batch_norm_ref(x.requires_grad_(), w, b, None, None, seg, 0.1, 1e-5,
                                                            True), x, grad)
    _assert_close(g, g_ref, 1e-11, "grad x")


def test_bfloat16_input_float32_parameters():
    x, w, b, rm, rv, seg = _inputs([0, 4, 8], channels=8, hw=(5, 5), dtype=torch.float32)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = segmented_batch_norm(x.bfloat16(), w, b, rm, rv, seg, 0.1, 1e-5, True)
    ref = segmented_batch_norm_ref(x.bfloat16().float(), w, b, rm_ref, rv_ref, seg, 0.1, 1e-5, True)
    assert out.dtype == torch.bfloat16 and rm.dtype == torch.float32
    _assert_close(out.float(), ref, 2e-2, "output")
    _assert_close(rm, rm_ref, 1e-5, "running_mean")
    assert rv.dtype == torch.float32
    _assert_close(rv, rv_ref, 1e-5, "running_var")


@pytest.mark.parametrize("params", ["none", "bf16"])
def test_bfloat16_input_low_precision_parameters(params):
    """ATen's CPU kernels keep bf16 statistics for bf16 input without float32 parameters; the op still
    returns float32 statistics, and output and gradients stay within bf16 tolerance of float64."""
    x, w, b, rm, rv, seg = _inputs([0, 3, 7], channels=6, hw=(4, 5), dtype=torch.float64)
    affine = (None, None) if params == "none" else (w.bfloat16(), b.bfloat16())
    leaves = [x.bfloat16().requires_grad_()] + [t.requires_grad_() for t in affine if t is not None]
    out, save_mean, save_invstd, batch_var = torch.ops.fastshare.segmented_batch_norm(leaves[0], *affine, None,
                                                                                      None, seg, 1e-5, True)
    assert out.dtype == torch.bfloat16
    assert save_mean.dtype == save_invstd.dtype == batch_var.dtype == torch.float32
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    w64, b64 = (None, None) if params == "none" else leaves64[1:]
    ref = torch.cat([F.batch_norm(leaves64[0][lo:hi], None, None, w64, b64, True, 0.1, 1e-5)
                     for lo, hi in ((0, 3), (3, 7))])
    want = torch.autograd.grad(ref, leaves64, grad.double())
    _assert_close(out, ref, 2e-2, "output")
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        assert a.dtype == torch.bfloat16
        _assert_close(a, e, 2e-2, name)


def test_bfloat16_module_in_segments():
    torch.manual_seed(0)
    bn = SegmentedBatchNorm2d(4).bfloat16()
    ref = copy.deepcopy(bn).double()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    with batch_segments([0, 2, 6]):
        out = bn(x.bfloat16())
    ref_out = torch.cat([ref(x[:2]), ref(x[2:])])
    _assert_close(out, ref_out, 2e-2, "output")
    _assert_close(bn.running_mean, ref.running_mean, 2e-2, "running_mean")
    _assert_close(bn.running_var, ref.running_var, 2e-2, "running_var")


def test_eval_allows_empty_segments_and_batches():
    """Eval with running statistics never looks at the segments (F.batch_norm accepts N = 0 there)."""
    x, w, b, rm, rv, seg = _inputs([0, 3, 3, 5])
    want = F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    for fn in (segmented_batch_norm, segmented_batch_norm_ref):
        _assert_close(fn(x, w, b, rm, rv, seg, 0.1, 1e-5, False), want, 1e-12, fn.__name__)
        empty = fn(x[:0], w, b, rm, rv, torch.tensor([0, 0]), 0.1, 1e-5, False)
        assert empty.shape == (0,) + tuple(x.shape[1:])
        with pytest.raises(ValueError, match="at least one row"):
            fn(x, w, b, rm, rv, seg, 0.1, 1e-5, True)


def test_reference_eval_without_running_stats_uses_segment_statistics():
    x, w, b, _, _, seg = _inputs([0, 2, 5])
    want = torch.cat([F.batch_norm(x[lo:hi], None, None, w, b, True, 0.1, 1e-5) for lo, hi in ((0, 2), (2, 5))])
    for fn in (segmented_batch_norm, segmented_batch_norm_ref):
        _assert_close(fn(x, w, b, None, None, seg, 0.1, 1e-5, False), want, 1e-12, fn.__name__)


def test_gradcheck_float64():
    x, w, b, rm, rv, seg = _inputs([0, 2, 5], channels=3, hw=(2, 3))
    args = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: segmented_batch_norm(x, w, b, None, None, seg, 0.1, 1e-5, True),
                                    args)
    assert torch.autograd.gradcheck(lambda x, w, b: segmented_batch_norm(x, w, b, rm, rv, seg, 0.1, 1e-5, False),
                                    args)


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    x, w, b, rm, rv, seg = _inputs([0, 2, 6, 9], dtype=torch.float32)
    for t in (x, w, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastshare.segmented_batch_norm.default, (x, w, b, rm, rv, seg, 1e-5, training))
    torch.library.opcheck(torch.ops.fastshare.segmented_batch_norm.default, (x, None, None, None, None, seg, 1e-5,
                                                                             True))
    batch = torch.randn(3, x.shape[1]), torch.rand(3, x.shape[1]) + 1
    torch.library.opcheck(torch.ops.fastshare.segmented_batch_norm_update_stats.default,
                          (rm, rv, batch[0], batch[1], seg, 0.1, 2))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck_backward(training, affine):
    x, w, b, rm, rv, seg = _inputs([0, 2, 6, 9], dtype=torch.float32)
    w = w if affine else None
    _, save_mean, save_invstd, _ = torch.ops.fastshare.segmented_batch_norm(x, w, None, rm, rv, seg, 1e-5, training)
    grad = torch.randn_like(x)
    running = (None, None) if training else (rm, rv)
    torch.library.opcheck(torch.ops.fastshare.segmented_batch_norm_backward.default,
                          (grad, x, w, *running, save_mean, save_invstd, seg, 1e-5, training))


@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_fullgraph(training):
    x, w, b, rm, rv, seg = _inputs([0, 3, 6], dtype=torch.float32)
    x.requires_grad_()
    rm2, rv2 = rm.clone(), rv.clone()

    def fn(x, rm, rv):
        return segmented_batch_norm(x, w, b, rm, rv, seg, 0.1, 1e-5, training).relu()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x, rm, rv), fn(x, rm2, rv2)
    _assert_close(out, ref, 1e-6, "output")
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2)
    (g,) = torch.autograd.grad(out.sum(), x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    _assert_close(g, g_ref, 1e-5, "grad")


def test_bad_inputs():
    x, w, b, rm, rv, seg = _inputs([0, 2, 6])
    with pytest.raises(ValueError, match="seg"):
        segmented_batch_norm(x, w, b, rm, rv, torch.tensor([0, 2, 5]), 0.1, 1e-5, True)
    with pytest.raises(ValueError, match="at least one row"):
        segmented_batch_norm(x, w, b, rm, rv, torch.tensor([0, 0, 6]), 0.1, 1e-5, True)
    with pytest.raises(ValueError, match="repeats"):
        segmented_batch_norm(x, w, b, rm, rv, seg, 0.1, 1e-5, True, repeats=0)
    with pytest.raises(ValueError, match="momentum"):
        segmented_batch_norm(x, w, b, rm, rv, seg, None, 1e-5, True)
    with pytest.raises(ValueError, match="weight"):
        segmented_batch_norm(x, w[:2], b, rm, rv, seg, 0.1, 1e-5, True)
    with pytest.raises(ValueError, match="more than 1 value"):
        segmented_batch_norm(torch.randn(2, 3, 1, 1), None, None, None, None, torch.tensor([0, 1, 2]), 0.1,
                             1e-5, True)


# ----------------------------------------------------------------------------------------------------
# The module.

def test_module_without_segments_is_batch_norm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    seg_bn = convert_batch_norm(copy.deepcopy(bn))
    assert type(seg_bn) is SegmentedBatchNorm2d
    x = torch.randn(6, 4, 3, 3)
    for mode in (True, False):
        bn.train(mode)
        seg_bn.train(mode)
        assert torch.equal(bn(x), seg_bn(x))
    assert list(bn.state_dict()) == list(seg_bn.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(value, seg_bn.state_dict()[key])


def test_module_with_segments_equals_task_loop():
    torch.manual_seed(0)
    bn = SegmentedBatchNorm2d(4).double()
    ref = copy.deepcopy(bn)
    x = torch.randn(9, 4, 3, 3, dtype=torch.float64)
    with batch_segments([0, 3, 6, 9]) as segments:
        assert current_segments() is segments
        out = bn(x)
    assert current_segments() is None
    ref_out = torch.cat([ref(x[i:i + 3]) for i in (0, 3, 6)])
    _assert_close(out, ref_out, 1e-12, "output")
    for key, value in ref.state_dict().items():
        _assert_close(bn.state_dict()[key], value, 1e-12, key)
    with batch_segments([0, 3], repeats=3):
        bn(x[:3])
    for _ in range(3):
        ref(x[:3])
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 6
    _assert_close(bn.running_var, ref.running_var, 1e-12, "running_var")
    bn.eval()
    ref.eval()
    with batch_segments([0, 3, 6, 9]):
        _assert_close(bn(x), ref(x), 1e-12, "eval output")


def test_module_frozen_affine_and_no_running_stats():
    bn = SegmentedBatchNorm2d(3, track_running_stats=False).double()
    bn.weight.requires_grad_(False)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    bn.eval()  # without running statistics, eval uses batch statistics (per segment)
    with batch_segments([0, 2, 4]):
        out = bn(x)
    ref = torch.cat([F.batch_norm(x[i:i + 2], None, None, bn.weight, bn.bias, True, 0.1, 1e-5) for i in (0, 2)])
    _assert_close(out, ref, 1e-12, "output")
    out.sum().backward()
    assert bn.weight.grad is None and bn.bias.grad is not None


def test_convert_batch_norm_keeps_parameters_and_optimiser_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    params = list(model.parameters())
    state = copy.deepcopy(model.state_dict())
    model[1].eval()
    convert_batch_norm(model)
    assert type(model[1]) is SegmentedBatchNorm2d and type(model[2][0]) is SegmentedBatchNorm2d
    assert not model[1].training and model[2][0].training
    assert all(a is b for a, b in zip(params, model.parameters()))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_module_errors():
    bn = SegmentedBatchNorm2d(3, momentum=None)
    with batch_segments([0, 2, 4]), pytest.raises(NotImplementedError, match="momentum=None"):
        bn(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="repeats"):
        with batch_segments([0, 2], repeats=0):
            pass
    with pytest.raises(ValueError, match="row offsets"):
        with batch_segments([0]):
            pass
