"""``fastshare::relu_dropout``: the counter-based ReLU + dropout op (fastshare/ops/relu_dropout.py).

The C++ kernel (``torch.ops.fastshare_C.relu_dropout_fwd/_bwd``) is checked bit for bit against the
reference: masks, outputs and gradients (NaN compared as NaN, whatever its payload); the scale 1 / (1 - p)
of outputs and gradients is checked without the reference, at p = 0.1 and 0.9. The random stream is
checked statistically (keep rate, independence of neighbours, of seeds and of offsets), the op layer with
opcheck and torch.compile, and the fast ASPP head that uses it end to end. Tests of the C++ kernel skip
without the extension (or fail where ``FASTSHARE_REQUIRE_BACKENDS`` names ``cpu``).
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_verbose, skip_or_fail
from fastshare.ops import BackendUnavailableError, available_backends, relu_dropout, use_backend
from fastshare.ops.relu_dropout import dropout_keep_ref, relu_dropout_backward_ref, relu_dropout_ref

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}


def _cpu_available() -> bool:
    return not available_backends("cpu", torch.float32, "relu_dropout_fwd")["cpu"]


def require_cpu_kernel() -> None:
    reasons = available_backends("cpu", torch.float32, "relu_dropout_fwd")["cpu"]
    if reasons:
        skip_or_fail("cpu", "; ".join(reasons))


BACKENDS_HERE = ["reference"] + (["cpu"] if _cpu_available() else [])


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Same dtype, shape and bits; NaNs must sit at the same places (their payloads may differ)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"{name}: dtype/shape"
    if actual.dtype == torch.bool:
        assert torch.equal(actual, expected), f"{name}: {int((actual != expected).sum())} elements differ"
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN positions differ"
    bits_a = actual.contiguous().view(_INT_VIEW[actual.dtype])[~nan_a]
    bits_e = expected.contiguous().view(_INT_VIEW[expected.dtype])[~nan_e]
    diff = int((bits_a != bits_e).sum())
    assert diff == 0, f"{name}: {diff} / {bits_a.numel()} elements differ in their bits"


def _special_input(shape, dtype, seed=0):
    """Gaussian data with zeros, signed zeros, infinities and a NaN planted at the start."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    flat = x.view(-1)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-30, -1e-30], dtype=dtype)
    k = min(flat.numel(), specials.numel())
    flat[:k] = specials[:k]
    return x


# (shape, offset): one element; odd sizes; a size over one parallel grain; counters crossing 2^32 (the key
# changes there); counters near 2^63.
CASES = [
    ((1,), 0),
    ((7, 13), 5),
    ((3, 5, 9, 11), 123456789),
    ((257, 301), 0),
    ((40, 1000), (1 << 32) - 20000),
    ((17, 19), (1 << 63) - 17 * 19),
]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpu_matches_reference_bitwise(case, dtype, p):
    require_cpu_kernel()
    shape, offset = CASES[case]
    x = _special_input(shape, dtype, seed=case)
    seed = torch.tensor(2654435769 + case, dtype=torch.int64)
    out, mask = torch.ops.fastshare_C.relu_dropout_fwd(x, seed, offset, p)
    ref_out, ref_mask = relu_dropout_ref(x, seed, offset, p)
    assert out.is_contiguous() and mask.dtype == torch.bool
    assert_bitwise(mask, ref_mask, "mask")
    assert_bitwise(out, ref_out, "out")
    grad = _special_input(shape, dtype, seed=100 + case)
    assert_bitwise(torch.ops.fastshare_C.relu_dropout_bwd(grad, mask, p),
                   relu_dropout_backward_ref(grad, ref_mask, p), "dx")


def test_reference_semantics_on_special_values():
    """relu keeps NaN and -0 (as torch.relu); a dropped element is +0 even for inf/NaN; mask = keep & x > 0."""
    x = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 2.0, -2.0] * 64)
    keep = dropout_keep_ref(x.numel(), 7, 3, 0.5)
    out, mask = relu_dropout_ref(x, 7, 3, 0.5)
    expected = torch.where(keep, torch.relu(x) * 2.0, 0.0)
    assert_bitwise(out, expected, "out")
    assert torch.equal(mask, keep & (x > 0))
    assert 0 < int(keep.sum()) < x.numel()


def assert_scaled_by_one_over_keep_probability(backend: str, p: float, device: str = "cpu") -> None:
    """Without the reference: an output is 0 wherever x <= 0, else 0 or relu(x) / (1 - p); about 1 - p of
    the positive inputs are kept (5 sigma); the gradient is 1 / (1 - p) where kept, exactly 0 elsewhere."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_()
    out = relu_dropout(x, p, seed=2024, offset=7, backend=backend)
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x, q = x.detach(), 1 - p
    kept, positive = out != 0, x > 0
    assert not bool((kept & ~positive).any()), "non-zero output where x <= 0"
    n_pos = int(positive.sum())
    frac = int(kept.sum()) / n_pos
    assert abs(frac - q) < 5 * math.sqrt(p * q / n_pos), f"kept {frac:.3f} of the positive inputs, not {q}"
    assert_close_verbose(out[kept], x[kept].double() / q, 0.0, 1e-6, "kept outputs")
    assert_close_verbose(dx, kept.double() / q, 0.0, 1e-6, "gradient")


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("p", [0.1, 0.9])
def test_kept_elements_scaled_by_one_over_keep_probability(backend, p):
    if backend == "cpu":
        require_cpu_kernel()
    assert_scaled_by_one_over_keep_probability(backend, p)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(backend, p):
    """Keep rate ~ 1 - p (5 sigma); neighbours, nearby seeds and shifted offsets are independent (pair
    agreement ~ p^2 + (1 - p)^2, 5 sigma)."""
    if backend == "cpu":
        require_cpu_kernel()
    n = 1 << 20
    x = torch.ones(n)

    def keep(seed, offset=0):
        return relu_dropout(x, p, seed=seed, offset=offset, backend=backend) > 0

    k = keep(12345)
    q = 1 - p
    sigma = math.sqrt(p * q / n)
    assert abs(k.double().mean().item() - q) < 5 * sigma, f"keep rate {k.double().mean().item()} vs {q}"
    both = p * p + q * q
    sigma2 = math.sqrt(both * (1 - both) / n)
    pairs = {"neighbour": (k[1:], k[:-1]), "seed+1": (k, keep(12346)), "offset+1": (k, keep(12345, 1)),
             "row of 1024": (k[1024:], k[:-1024])}
    for name, (a, b) in pairs.items():
        agree = (a == b).double().mean().item()
        assert abs(agree - both) < 5 * sigma2, f"{name}: agreement {agree} vs {both}"


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_offset_places_the_call_in_one_stream(backend):
    """keep(seed, offset)[i] == keep(seed, 0)[offset + i], also across the 2^32 key change."""
    if backend == "cpu":
        require_cpu_kernel()
    x = torch.ones(3000)
    whole = relu_dropout(torch.ones(5000), 0.5, seed=99, offset=(1 << 32) - 2500, backend=backend)
    part = relu_dropout(x, 0.5, seed=99, offset=(1 << 32) - 500, backend=backend)
    assert torch.equal(part, whole[2000:])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_gradient_matches_autograd_of_reference(backend, dtype):
    """The op's backward, mask * grad / (1 - p), equals autograd through the reference, bit for bit."""
    if backend == "cpu":
        require_cpu_kernel()
    torch.manual_seed(0)
    x = torch.randn(37, 53).to(dtype)
    grad = torch.randn(37, 53).to(dtype)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = relu_dropout(xa, 0.3, seed=4242, offset=11, backend=backend)
    out.backward(grad)
    ref_out, _ = relu_dropout_ref(xr, 4242, 11, 0.3)
    ref_out.backward(grad)
    assert_bitwise(out.detach(), ref_out.detach(), "out")
    assert_bitwise(xa.grad, xr.grad, "dx")


def test_gradcheck_float64():
    x = torch.randn(6, 7, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_()  # away from the kink at 0
    for backend in BACKENDS_HERE:
        assert torch.autograd.gradcheck(lambda t: relu_dropout(t, 0.4, seed=5, backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_opcheck(backend):
    if backend == "cpu":
        require_cpu_kernel()
    torch.manual_seed(1)
    seed = torch.tensor(77, dtype=torch.int64)
    for x in (torch.randn(5, 33, requires_grad=True), torch.randn(4, 3, 6, 5, dtype=torch.float64,
                                                                   requires_grad=True)):
        torch.library.opcheck(torch.ops.fastshare.relu_dropout.default, (x, seed, 3, 0.25, backend))
        _, mask = relu_dropout_ref(x.detach(), seed, 3, 0.25)
        torch.library.opcheck(torch.ops.fastshare.relu_dropout_backward.default,
                              (torch.randn_like(x.detach()), mask, 0.25, backend))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_compiled_head_fullgraph(backend):
    """A small ASPP head through the fast forward in training mode compiles without graph breaks and
    matches eager under the same torch.manual_seed (the seeds come from torch.randint in the graph)."""
    from fastshare.model.fast_heads import aspp_head_forward
    from fastshare.model.heads import ASPPHead

    if backend == "cpu":
        require_cpu_kernel()
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = ASPPHead(8, 3, width=16, dropout=0.5).train()
    x = torch.randn(2, 8, 5, 5)

    def run(fn):
        torch.manual_seed(123)
        with use_backend(backend):
            out = fn(head, x)
        head.zero_grad()
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in head.parameters()]

    out_e, grads_e = run(aspp_head_forward)
    out_c, grads_c = run(torch.compile(aspp_head_forward, fullgraph=True, backend="aot_eager"))
    assert_close_verbose(out_c, out_e, 1e-6, 1e-5, "compiled out")
    for g_c, g_e in zip(grads_c, grads_e):
        assert_close_verbose(g_c, g_e, 1e-6, 1e-5, "compiled grad")


def test_fast_head_uses_the_op_and_backends_agree():
    """In training the fast head's dropout is relu_dropout: the cpu and reference backends give the same
    head output and gradients under one torch.manual_seed, and nothing float-sized is saved for a mask."""
    from fastshare.model.fast_heads import aspp_head_forward
    from fastshare.model.heads import ASPPHead

    require_cpu_kernel()
    torch.manual_seed(0)
    head = ASPPHead(8, 3, width=32, dropout=0.5).train()
    x = torch.randn(2, 8, 7, 6)
    results = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(5)
        with use_backend(backend):
            out = aspp_head_forward(head, x)
        head.zero_grad()
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in head.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert_close_verbose(a, b, 1e-6, 1e-5, "grad")
    torch.manual_seed(5)
    ops = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ops.add(t.dtype) or t, lambda t: t):
        aspp_head_forward(head, x)
    assert torch.bool in ops


def test_eval_and_p_zero_are_plain_relu():
    x = torch.randn(4, 9)
    state = torch.get_rng_state()
    assert torch.equal(relu_dropout(x, 0.5, training=False), torch.relu(x))
    assert torch.equal(relu_dropout(x, 0.0, training=True), torch.relu(x))
    assert torch.equal(torch.get_rng_state(), state), "no seed is drawn when dropout is inactive"


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, math.nan, True, "0.5"])
def test_bad_p_raises(p):
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\)"):
        relu_dropout(torch.randn(3), p)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\)"):
        relu_dropout_ref(torch.randn(3), 1, 0, p)


def test_bad_arguments_raise():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^32\)"):
        relu_dropout(x, 0.5, seed=1 << 32)
    with pytest.raises(ValueError, match="one-element int64 CPU tensor"):
        relu_dropout(x, 0.5, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        relu_dropout(x, 0.5, offset=-1)
    with pytest.raises(ValueError, match=r"offset \+ numel - 1 must be < 2\^63"):
        relu_dropout(x, 0.5, offset=(1 << 63) - 11)
    with pytest.raises(TypeError, match="floating-point"):
        relu_dropout(torch.ones(3, dtype=torch.int64), 0.5)
    with pytest.raises(BackendUnavailableError, match="kernels for reference, cpu, triton only"):
        relu_dropout(x, 0.5, backend="cuda")


def test_cpu_kernel_checks_its_arguments():
    require_cpu_kernel()
    fwd, bwd = torch.ops.fastshare_C.relu_dropout_fwd, torch.ops.fastshare_C.relu_dropout_bwd
    x, seed = torch.randn(3, 4), torch.tensor(1)
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
        fwd(x, seed, 0, 1.0)
    with pytest.raises(RuntimeError, match=r"seed must be in \[0, 2\^32\)"):
        fwd(x, torch.tensor(-1), 0, 0.5)
    with pytest.raises(RuntimeError, match="one-element int64 CPU tensor"):
        fwd(x, seed.int(), 0, 0.5)
    with pytest.raises(RuntimeError, match="offset must be >= 0"):
        fwd(x, seed, -1, 0.5)
    with pytest.raises(RuntimeError, match=r"offset \+ numel - 1 < 2\^63"):
        fwd(x, seed, (1 << 63) - 11, 0.5)
    with pytest.raises(RuntimeError, match="float32, float64 and bfloat16"):
        fwd(x.half(), seed, 0, 0.5)
    with pytest.raises(RuntimeError, match="mask must have grad's shape"):
        bwd(x, torch.ones(4, 3, dtype=torch.bool), 0.5)
    with pytest.raises(RuntimeError, match="mask must be a bool CPU tensor"):
        bwd(x, torch.ones(3, 4), 0.5)


def test_backend_choice(monkeypatch):
    from fastshare.ops import last_fallback_reasons

    monkeypatch.delenv("FASTSHARE_BACKEND", raising=False)
    x = torch.randn(8, 8)
    with use_backend("cuda"):  # a context meant for other ops: resolved as auto
        relu_dropout(x, 0.5, seed=3)
    ref = relu_dropout(x, 0.5, seed=3, backend="reference")
    assert torch.equal(relu_dropout(x, 0.5, seed=3), ref)
    relu_dropout(x.half(), 0.5, seed=3)  # float16: auto falls back to the reference and says why
    if _cpu_available():
        assert any("float16" in why for why in last_fallback_reasons()["cpu"])


def test_non_contiguous_input_is_read_in_row_major_order():
    base = torch.randn(6, 10, 8)
    for x in (base[:, 2:7], base.transpose(0, 2)):
        for backend in BACKENDS_HERE:
            out = relu_dropout(x, 0.5, seed=21, offset=4, backend=backend)
            assert out.is_contiguous()
            assert torch.equal(out, relu_dropout(x.contiguous(), 0.5, seed=21, offset=4, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_determinism_with_manual_seed(backend):
    """Seeds come from torch's default generator: torch.manual_seed repeats a run, successive calls differ."""
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    a1, a2 = relu_dropout(x, 0.5, backend=backend), relu_dropout(x, 0.5, backend=backend)
    torch.manual_seed(3)
    b1, b2 = relu_dropout(x, 0.5, backend=backend), relu_dropout(x, 0.5, backend=backend)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)


def test_cpu_result_independent_of_thread_count():
    require_cpu_kernel()
    x = torch.randn(300, 1000)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(torch.ops.fastshare_C.relu_dropout_fwd(x, torch.tensor(8), 5, 0.5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
