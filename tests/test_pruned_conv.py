"""``fastshare::pruned_conv3x3`` against its spec, the padded ``F.conv2d``: the band plan, forward and
backward across sizes, rates, layouts and dtypes, opcheck, torch.compile, autocast, bad input, and the
split choice (timed per shape). The CUDA twin is at the end (marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastshare.ops import pruned_conv
from fastshare.ops.pruned_conv import live_tap_fraction, pruned_conv3x3, pruned_dilated_kernel, tap_bands

from conftest import assert_close_verbose, record_split_conv_calls, tolerance

# (h, w, d): every band regime on each axis (d >= n, 2d <= n, n < 2d with d < n, 2d == n), square and not.
SIZES = [(16, 16, 6), (16, 16, 12), (41, 41, 24), (5, 9, 3), (8, 20, 12), (7, 7, 4), (6, 6, 3), (9, 4, 2),
         (3, 11, 1), (5, 5, 6)]


def _inputs(h, w, d, dtype=torch.float64, channels_last=False, bias=True, seed=0, c_in=5, c_out=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, h, w, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=dtype)
    b = torch.randn(c_out, generator=gen, dtype=dtype) if bias else None
    return x, weight, b


def _live_taps_brute_force(d: int, n: int, i: int) -> list[int]:
    return [t for t in range(3) if 0 <= i + (t - 1) * d < n]


# ----------------------------------------------------------------------------------------------------
# The plan.

@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 12, 16, 24, 41])
@pytest.mark.parametrize("d", [1, 2, 3, 6, 12, 18, 24])
def test_bands_partition_the_axis_and_read_exactly_the_live_taps(d, n):
    bands = tap_bands(d, n)
    assert bands[0].start == 0 and bands[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(bands, bands[1:]))
    for band in bands:
        lo, hi = band.input_span(d)
        assert 0 <= lo < hi <= n, "a split band must read no padding"
        for i in range(band.start, band.stop):
            assert list(range(band.first_tap, band.stop_tap)) == _live_taps_brute_force(d, n, i)


@pytest.mark.parametrize("n,d", [(16, 6), (5, 5), (5, 9)])
def test_unsplit_plan_is_one_band(n, d):
    (band,) = tap_bands(d, n, split=False)
    assert (band.start, band.stop) == (0, n)
    assert (band.first_tap, band.stop_tap) == ((1, 2) if d >= n else (0, 3))


def test_pruned_dilated_kernel_shapes():
    w = torch.randn(4, 3, 3, 3)
    assert pruned_dilated_kernel(w, 6, 5, 5)[0].shape == (4, 3, 1, 1)
    k, pad = pruned_dilated_kernel(w, 12, 8, 20)
    assert k.shape == (4, 3, 1, 3) and pad == (0, 12)
    k, pad = pruned_dilated_kernel(w, 6, 16, 16)
    assert k.shape == (4, 3, 3, 3) and pad == (6, 6)
    with pytest.raises(ValueError, match="3, 3"):
        pruned_dilated_kernel(torch.randn(4, 3, 1, 1), 6, 5, 5)


def test_live_tap_fraction_counts_the_products_that_touch_the_input():
    for h, w, d in SIZES:
        live = sum(len(_live_taps_brute_force(d, h, i)) * len(_live_taps_brute_force(d, w, j))
                   for i in range(h) for j in range(w))
        assert live_tap_fraction(d, h, w) == pytest.approx(live / (9 * h * w))
    # The ASPP rates at 41 x 41 (ResNet at output stride 8 on a 321 x 321 image).
    assert [round(live_tap_fraction(d, 41, 41), 2) for d in (6, 12, 18, 24)] == [0.81, 0.65, 0.5, 0.37]


def test_flop_counter_sees_the_live_fraction_of_the_padded_convolution():
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        x, weight, b = (t.requires_grad_() for t in _inputs(16, 16, 12, dtype=torch.float32))
        with FlopCounterMode(display=False) as counter:
            fn(x, weight, b).sum().backward()
        return counter.get_total_flops()

    padded = count(lambda x, w, b: F.conv2d(x, w, b, 1, 12, 12))
    split = count(lambda x, w, b: pruned_conv3x3(x, w, b, 12, split=True))
    assert split == pytest.approx(padded * live_tap_fraction(12, 16, 16)) and split == padded / 4
    # Without an input gradient, the backward is the weight gradient only: 2 of the 3 passes' FLOPs.
    padded_w = count(lambda x, w, b: F.conv2d(x.detach(), w, b, 1, 12, 12))
    split_w = count(lambda x, w, b: pruned_conv3x3(x.detach(), w, b, 12, split=True))
    assert padded_w == padded * 2 / 3 and split_w == padded_w / 4


# ----------------------------------------------------------------------------------------------------
# Forward and backward against F.conv2d.

def _check_against_conv2d(x, weight, b, d, split, atol, rtol):
    leaves = [t.detach().requires_grad_() for t in (x, weight, b) if t is not None]
    xs, ws = leaves[0], leaves[1]
    bs = leaves[2] if b is not None else None
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = F.conv2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if b is not None else None, 1, d, d)
    got = pruned_conv3x3(xs, ws, bs, d, split=split)
    assert got.dtype == x.dtype and got.shape == ref.shape
    if split is False or d >= max(x.shape[2:]):  # one F.conv2d: its layout
        assert got.is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
            memory_format=torch.channels_last)
    elif split:  # the split's matmuls write pixel rows (split=None: whichever the timing chose)
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert_close_verbose(got, ref, atol, rtol, "output")
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(ref.device)
    g_ref = torch.autograd.grad(ref, ref_leaves, grad)
    g_got = torch.autograd.grad(got, leaves, grad.to(x.dtype))
    for name, a, e in zip(("x", "weight", "bias"), g_got, g_ref):
        assert_close_verbose(a, e, atol * 10, rtol * 10, f"grad {name}")


@pytest.mark.parametrize("split", [True, False], ids=["split", "unsplit"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("h,w,d", SIZES)
def test_matches_padded_conv_float64(h, w, d, channels_last, split):
    x, weight, b = _inputs(h, w, d, channels_last=channels_last)
    _check_against_conv2d(x, weight, b, d, split, 1e-12, 1e-10)


def test_matches_padded_conv_on_random_shapes():
    gen = torch.Generator().manual_seed(11)
    for _ in range(40):
        h, w = (int(v) for v in torch.randint(1, 24, (2,), generator=gen))
        d = int(torch.randint(1, 26, (1,), generator=gen))
        x, weight, b = _inputs(h, w, d, c_in=3, c_out=2, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        _check_against_conv2d(x, weight, b, d, True, 1e-12, 1e-10)


# Every band regime (SIZES) and every ASPP rate at 41 x 41.
LOW_PRECISION_SIZES = SIZES + [(41, 41, 6), (41, 41, 12), (41, 41, 18)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("h,w,d", LOW_PRECISION_SIZES)
def test_low_precision_error_at_most_twice_conv2d(h, w, d, dtype):
    """Output and the x, weight and bias gradients in ``dtype``: relative error ``||r - r64|| / ||r64||``
    against float64 ``F.conv2d`` on the same (rounded) inputs at most twice that of ``F.conv2d`` in
    ``dtype``, plus 1 % of the dtype's eps. Measured here: at most 1.63x in float32, 1.47x in bfloat16;
    2.4x with bfloat16 gradients accumulated in bfloat16. In norm, not max: the backward rounds each
    region's bfloat16 matmul before the float32 sum, so single elements reach up to 2.9x conv2d's max
    error (1.0x when those matmuls run in float32)."""
    _assert_error_at_most_twice_conv2d(h, w, d, dtype, "cpu")


def _assert_error_at_most_twice_conv2d(h: int, w: int, d: int, dtype: torch.dtype, device: str) -> None:
    x, weight, b = (t.to(device) for t in _inputs(h, w, d, dtype=dtype, channels_last=True, c_in=32, c_out=24,
                                                  seed=1))
    grad = torch.randn(2, 24, h, w, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    leaves64 = [t.double().requires_grad_() for t in (x, weight, b)]
    out64 = F.conv2d(*leaves64, 1, d, d)
    want = [out64.detach(), *torch.autograd.grad(out64, leaves64, grad.double())]

    def errors(fn) -> list[float]:
        leaves = [t.detach().requires_grad_() for t in (x, weight, b)]
        out = fn(*leaves)
        assert out.dtype == dtype
        got = [out.detach(), *torch.autograd.grad(out, leaves, grad)]
        return [float((a.double() - e).norm() / e.norm()) for a, e in zip(got, want)]

    conv = errors(lambda x, w, b: F.conv2d(x, w, b, 1, d, d))
    split = errors(lambda x, w, b: pruned_conv3x3(x, w, b, d, split=True))
    atol = 0.01 * torch.finfo(dtype).eps
    for name, e_split, e_conv in zip(("output", "grad x", "grad weight", "grad bias"), split, conv):
        assert e_split <= 2 * e_conv + atol, f"{name}: split {e_split:.2e} vs conv2d {e_conv:.2e} (relative)"


@pytest.mark.parametrize("split", [True, None], ids=["split", "auto"])
def test_empty_batch(split, monkeypatch, empty_cache):
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "auto")
    x, weight, b = _inputs(16, 16, 6)
    x, weight = x[:0], weight.requires_grad_()
    out = pruned_conv3x3(x, weight, b, 6, split=split)
    assert out.shape == (0, weight.shape[0], 16, 16)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_output_rows_can_be_modified_in_place():
    # The fast heads apply relu_ to the output's pixel-row view (a custom op may not return a view for that).
    x, weight, b = _inputs(16, 16, 6)
    w_leaf, w_ref = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    out = pruned_conv3x3(x, w_leaf, b, 6, split=True)
    rows = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    torch.relu_(rows).sum().backward()
    torch.relu(F.conv2d(x, w_ref, b, 1, 6, 6)).sum().backward()
    assert_close_verbose(w_leaf.grad, w_ref.grad, 1e-10, 1e-10, "grad through relu_")


@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "x+bias"])
def test_only_the_wanted_gradients(wanted):
    x, weight, b = _inputs(16, 16, 6)
    leaves = {"x": x, "weight": weight, "bias": b}
    for name in wanted.split("+"):
        leaves[name].requires_grad_()
    wanted_leaves = [leaves[n] for n in wanted.split("+")]
    got = torch.autograd.grad(pruned_conv3x3(x, weight, b, 6, split=True).square().sum(), wanted_leaves)
    ref = torch.autograd.grad(F.conv2d(x, weight, b, 1, 6, 6).square().sum(), wanted_leaves)
    for name, a, e in zip(wanted.split("+"), got, ref):
        assert_close_verbose(a, e, 1e-10, 1e-10, f"grad {name}")


def test_without_bias():
    x, weight, _ = _inputs(16, 16, 6, bias=False)
    _check_against_conv2d(x, weight, None, 6, True, 1e-12, 1e-10)


def test_gradcheck_float64():
    x, weight, b = _inputs(7, 6, 3, c_in=2, c_out=3)
    args = [t.requires_grad_() for t in (x, weight, b)]
    assert torch.autograd.gradcheck(lambda *a: pruned_conv3x3(*a, 3, split=True), args)


def test_opcheck():
    x, weight, b = _inputs(9, 7, 3, dtype=torch.float32, c_in=3, c_out=4)
    for args in [(x, weight, b, 3), (x.contiguous(memory_format=torch.channels_last), weight, None, 3)]:
        torch.library.opcheck(torch.ops.fastshare.pruned_conv3x3.default, args)
    grad = torch.randn(2, 4, 9, 7)
    for input_grad, weight_grad in [(True, True), (True, False), (False, True)]:
        torch.library.opcheck(torch.ops.fastshare.pruned_conv3x3_backward.default,
                              (grad, x, weight, 3, input_grad, weight_grad))


def test_compiles_fullgraph():
    x, weight, b = _inputs(16, 16, 6, dtype=torch.float32, channels_last=True)
    fn = torch.compile(lambda *a: pruned_conv3x3(*a, 6, split=True), fullgraph=True, backend="aot_eager")
    eager_leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    comp_leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    out_e = pruned_conv3x3(*eager_leaves, 6, split=True)
    out_c = fn(*comp_leaves)
    assert_close_verbose(out_c, out_e, 1e-6, 1e-5, "compiled output")
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for name, a, e in zip(("x", "weight", "bias"), comp_leaves, eager_leaves):
        assert_close_verbose(a.grad, e.grad, 1e-5, 1e-5, f"compiled grad {name}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_casts_like_conv2d(x_dtype):
    """Float32 parameters with a float32 or (an earlier autocast layer's) bfloat16 input."""
    x, weight, b = _inputs(16, 16, 6, dtype=torch.float32, channels_last=True)
    x = x.to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.conv2d(x, weight, b, 1, 6, 6)
        got = pruned_conv3x3(x, weight, b, 6, split=True)
    assert got.dtype == ref.dtype == torch.bfloat16
    assert_close_verbose(got, ref, 0.1, 2e-2, "autocast output")


def test_op_keeps_its_inputs_dtype_under_autocast():
    # Called directly (not through the functional, which casts first), the op must not let autocast change
    # its output dtype: its fake says the inputs' dtype.
    x, weight, b = _inputs(16, 16, 6, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.fastshare.pruned_conv3x3(x, weight, b, 6)
    assert out.dtype == torch.float32
    assert_close_verbose(out, F.conv2d(x, weight, b, 1, 6, 6), 1e-4, 1e-5, "op under autocast")


# ----------------------------------------------------------------------------------------------------
# Bad input.

def test_bad_input_is_named():
    x, weight, b = _inputs(8, 8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        pruned_conv3x3(x, weight, b, 0)
    with pytest.raises(ValueError, match="dilation must be an int >= 1"):
        pruned_conv3x3(x, weight, b, 2.0)
    with pytest.raises(ValueError, match=r"x must be \(B, C_in, h, w\)"):
        pruned_conv3x3(x[0], weight, b, 2)
    with pytest.raises(ValueError, match=r"weight must be \(C_out, 5, 3, 3\)"):
        pruned_conv3x3(x, weight[:, :, :1], b, 2)
    with pytest.raises(ValueError, match=r"weight must be \(C_out, 5, 3, 3\)"):
        pruned_conv3x3(x, weight[:, :4], b, 2)
    with pytest.raises(ValueError, match=r"bias must be \(4,\)"):
        pruned_conv3x3(x, weight, b[:3], 2)
    with pytest.raises(ValueError, match="weight is torch.float64"):
        pruned_conv3x3(x, weight.double(), b, 2)
    with pytest.raises(ValueError, match="bias is .* on meta"):
        pruned_conv3x3(x, weight, b.to("meta"), 2)
    with pytest.raises(TypeError, match="floating point"):
        pruned_conv3x3(x.long(), weight.long(), None, 2)


def test_unknown_split_mode_is_named(monkeypatch):
    x, weight, b = _inputs(8, 8, 2, dtype=torch.float32)
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "sometimes")
    with pytest.raises(ValueError, match="FASTSHARE_CONV_SPLIT='sometimes'"):
        pruned_conv3x3(x, weight, b, 2)


# ----------------------------------------------------------------------------------------------------
# The split choice.

@pytest.fixture
def empty_cache(monkeypatch):
    monkeypatch.setattr(pruned_conv, "split_choice_cache", {})
    return pruned_conv


@pytest.mark.parametrize("mode,expected", [("always", [6]), ("never", [])])
def test_split_modes(monkeypatch, empty_cache, mode, expected):
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", mode)
    seen = record_split_conv_calls(monkeypatch)
    x, weight, b = _inputs(16, 16, 6, dtype=torch.float32)
    pruned_conv3x3(x, weight, b, 6)
    assert seen == expected  # unsplit with d < n is one F.conv2d, not the op
    assert empty_cache.split_choice_cache == {}, "only auto times and fills the cache"


@pytest.mark.parametrize("faster", [True, False])
def test_tuning_keeps_the_faster_and_times_each_shape_once(monkeypatch, empty_cache, faster):
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "auto")
    timed: list[dict[bool, float]] = []

    def fake_timer(run, device):
        run(False)
        run(True)
        times = {faster: 1.0, not faster: 2.0}
        timed.append(times)
        return times

    x, weight, b = _inputs(16, 16, 6, dtype=torch.float32)
    weight.requires_grad_()
    for _ in range(2):
        assert pruned_conv._choose_split(x, weight, b, 6, timer=fake_timer) is faster
    assert len(timed) == 1
    (key,) = empty_cache.split_choice_cache
    assert key[-3] is True, "weight requires grad: forward and backward are timed"
    assert key[-2] is False, "TF32 is a CUDA float32 matter"
    assert key[-1] is False, "cuDNN's algorithm search is a CUDA matter"
    assert weight.grad is None, "timing must not leave gradients behind"
    with torch.backends.cudnn.flags(enabled=True, benchmark=True):
        pruned_conv._choose_split(x, weight, b, 6, timer=fake_timer)
    assert len(timed) == 1, "on the CPU, cuDNN's flags change nothing"
    with torch.no_grad():
        pruned_conv._choose_split(x, weight, b, 6, timer=fake_timer)
    assert len(timed) == 2, "forward-only calls are a shape of their own"


def test_real_tuning_consumes_no_randomness(monkeypatch, empty_cache):
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "auto")
    x, weight, b = _inputs(8, 8, 3, dtype=torch.float32)
    state = torch.get_rng_state()
    out = pruned_conv3x3(x, weight.requires_grad_(), b, 3)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(empty_cache.split_choice_cache) == 1 and weight.grad is None
    assert_close_verbose(out, F.conv2d(x, weight, b, 1, 3, 3), 1e-5, 1e-5, "tuned output")


def test_compiled_call_reuses_the_eager_choice(monkeypatch, empty_cache):
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "auto")
    x, weight, b = _inputs(16, 16, 6, dtype=torch.float32)
    pruned_conv._choose_split(x, weight, b, 6, timer=lambda run, device: {True: 1.0, False: 2.0})
    seen = record_split_conv_calls(monkeypatch)
    fn = torch.compile(lambda *a: pruned_conv3x3(*a, 6), fullgraph=True, backend="aot_eager")
    assert_close_verbose(fn(x, weight, b), F.conv2d(x, weight, b, 1, 6, 6), 1e-5, 1e-5, "compiled")
    assert seen == [6], "the cached choice (split) is used inside the graph"


# ----------------------------------------------------------------------------------------------------
# CUDA twin.

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_cuda_matches_padded_conv(dtype, channels_last, monkeypatch, empty_cache):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "auto")
    x, weight, b = _inputs(41, 41, 12, dtype=dtype, channels_last=channels_last, c_in=16, c_out=24, seed=4)
    x, weight, b = x.cuda(), weight.cuda(), b.cuda()
    atol, rtol = tolerance(dtype)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for split in (True, None):  # None: timed once, then cached
            _check_against_conv2d(x, weight, b, 12, split, atol * 12, rtol * 12)
    assert len(empty_cache.split_choice_cache) == 1
    if dtype == torch.float32:  # with TF32 allowed, which form is faster is a new question
        same_call = [t.detach().requires_grad_() for t in (x, weight, b)]  # as in _check_against_conv2d
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            pruned_conv3x3(*same_call, 12)
        assert len(empty_cache.split_choice_cache) == 1
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
            pruned_conv3x3(*same_call, 12)
        assert len(empty_cache.split_choice_cache) == 2
        with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):  # cuDNN's own search
            pruned_conv3x3(*same_call, 12)
        assert len(empty_cache.split_choice_cache) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("h,w,d", [(41, 41, 24), (41, 41, 6), (16, 16, 12)])
def test_cuda_error_at_most_twice_conv2d(h, w, d, dtype):
    """The CPU rule on CUDA (cuBLAS matmuls against cuDNN's convolution), TF32 off."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        _assert_error_at_most_twice_conv2d(h, w, d, dtype, "cuda")


@pytest.mark.gpu
def test_cuda_graph_capture_uses_the_cached_choice(monkeypatch, empty_cache):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "auto")
    from fastshare.bench import capture_cuda_graph

    x, weight, b = (t.cuda() for t in _inputs(41, 41, 24, dtype=torch.float32, c_in=8, c_out=8))
    weight.requires_grad_()

    def step():
        weight.grad = None
        out = pruned_conv3x3(x, weight, b, 24)
        out.square().sum().backward()
        return out

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        replay, static = capture_cuda_graph(step)
        replay()
        ref = F.conv2d(x, weight, b, 1, 24, 24)
    torch.cuda.synchronize()
    assert len(empty_cache.split_choice_cache) == 1
    assert_close_verbose(static, ref, 1e-5, 1e-5, "replayed output")
