"""CUDA kernels of the fused gated residual (``fastshare._C`` built with CUDA) against the reference.

The checks of test_ext_cpu.py on CUDA tensors (float32, float16, bfloat16; deterministic and fast
gate-gradient reductions), plus: the unaligned (scalar) fallback, many segments, run-to-run determinism,
capture in a CUDA graph with new inputs and new segment offsets at replay, and the full-size shape
[48, 256, 81, 81]. Skipped without a CUDA device; without CUDA kernels in the extension, skipped unless
``FASTSHARE_REQUIRE_BACKENDS`` names ``cuda``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_verbose
from test_ext_cpu import CASES, check_backward, check_forward, make_inputs, require_ext

pytestmark = pytest.mark.gpu

CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FULL_SHAPE = (48, 256, 81, 81)


@pytest.fixture(autouse=True)
def _cuda_ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    require_ext("cuda")


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "fast"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_backward(case, dtype, hard, deterministic):
    shape, offsets = CASES[case]
    d, f, r, alpha, u, tau, seg = make_inputs(shape, offsets, dtype, device="cuda", seed=200 + case)
    check_forward(f, r, alpha, u, tau, hard, seg)
    check_backward(d, f, r, alpha, u, tau, hard, seg, deterministic)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_channels_last_and_float64_gate(dtype):
    d, f, r, alpha, u, tau, seg = make_inputs((7, 5, 9, 11), [0, 0, 2, 3, 7, 7], dtype, device="cuda", seed=3,
                                              channels_last=True, alpha_dtype=torch.float64)
    for hard in (False, True):
        check_forward(f, r, alpha, u, tau, hard, seg)
        check_backward(d, f, r, alpha, u, tau, hard, seg)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_unaligned_fallback(dtype):
    """Tensors that start 1 element into their storage: no 16-byte vectors, the scalar kernels run."""
    d, f, r, alpha, u, tau, seg = make_inputs((13, 3, 7, 5), [0, 4, 4, 13], dtype, device="cuda", seed=31)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        return out

    d, f, r = shifted(d), shifted(f), shifted(r)
    assert f.data_ptr() % 16 != 0
    check_forward(f, r, alpha, u, tau, False, seg)
    for deterministic in (True, False):
        check_backward(d, f, r, alpha, u, tau, True, seg, deterministic)


def test_many_segments():
    n_seg = 300
    torch.manual_seed(37)
    lengths = torch.randint(0, 4, (n_seg,))
    offsets = [0] + torch.cumsum(lengths, 0).tolist()
    d, f, r, alpha, u, tau, seg = make_inputs((offsets[-1], 3, 11), offsets, torch.float32, device="cuda",
                                              seed=38)
    check_forward(f, r, alpha, u, tau, False, seg)
    for deterministic in (True, False):
        check_backward(d, f, r, alpha, u, tau, False, seg, deterministic)


def test_too_many_segments_raises():
    d, f, r, alpha, u, tau, seg = make_inputs((1025, 2), list(range(1026)), torch.float32, device="cuda", seed=41)
    with pytest.raises(RuntimeError, match="at most 1024 segments"):
        torch.ops.fastshare_C.gated_residual_fwd(f, r, alpha, u, tau, False, seg)


def test_empty():
    for shape, offsets in (((0, 3), [0, 0]), ((4, 0), [0, 1, 4])):
        d, f, r, alpha, u, tau, seg = make_inputs(shape, offsets, torch.float32, device="cuda", seed=43)
        out = torch.ops.fastshare_C.gated_residual_fwd(f, r, alpha, u, tau, False, seg)
        for deterministic in (True, False):
            df, dr, dalpha = torch.ops.fastshare_C.gated_residual_bwd(d, f, r, alpha, u, tau, False, seg,
                                                                     deterministic)
            assert out.shape == f.shape and df.shape == f.shape and dr.shape == f.shape
            assert torch.equal(dalpha, torch.zeros_like(alpha))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_is_bitwise_reproducible(dtype):
    d, f, r, alpha, u, tau, seg = make_inputs((48, 64, 33, 33), [0, 7, 7, 30, 48], dtype, device="cuda",
                                              seed=47)
    runs = [torch.ops.fastshare_C.gated_residual_bwd(d, f, r, alpha, u, tau, False, seg, True) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    _, _, dalpha_fast = torch.ops.fastshare_C.gated_residual_bwd(d, f, r, alpha, u, tau, False, seg, False)
    torch.testing.assert_close(dalpha_fast, runs[0][2], rtol=1e-4, atol=1e-4 * runs[0][2].abs().max().item())


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "fast"])
def test_cuda_graph_capture(deterministic):
    """fwd + bwd captured once, replayed on new data, new gate inputs and new segment offsets."""
    shape = (12, 8, 9, 9)
    d, f, r, alpha, u, tau, seg = make_inputs(shape, [0, 4, 8, 12], torch.bfloat16, device="cuda", seed=53)
    static = [t.clone() for t in (d, f, r, alpha, u, seg)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs requires
        torch.ops.fastshare_C.gated_residual_fwd(*static[1:5], tau, True, static[5])
        torch.ops.fastshare_C.gated_residual_bwd(*static[:5], tau, True, static[5], deterministic)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.fastshare_C.gated_residual_fwd(*static[1:5], tau, True, static[5])
        grads = torch.ops.fastshare_C.gated_residual_bwd(*static[:5], tau, True, static[5], deterministic)
    for seed, offsets in ((59, [0, 1, 1, 12]), (61, [0, 6, 11, 12])):
        fresh = make_inputs(shape, offsets, torch.bfloat16, device="cuda", seed=seed)
        for dst, src in zip(static, fresh[:5] + fresh[6:]):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        sd, sf, sr, sa, su, sseg = static
        check_forward(sf, sr, sa, su, tau, True, sseg)
        expected = torch.ops.fastshare_C.gated_residual_fwd(sf, sr, sa, su, tau, True, sseg)
        assert torch.equal(out, expected)
        expected_grads = check_backward(sd, sf, sr, sa, su, tau, True, sseg, deterministic)
        for a, b in zip(grads[:2], expected_grads[:2]):
            assert torch.equal(a, b)
        torch.testing.assert_close(grads[2], expected_grads[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_full_size(dtype):
    """[48, 256, 81, 81] in 4 unequal segments (one empty), soft forward, hard backward, both reductions."""
    d, f, r, alpha, u, tau, seg = make_inputs(FULL_SHAPE, [0, 13, 13, 29, 48], dtype, device="cuda", seed=67)
    check_forward(f, r, alpha, u, tau, False, seg)
    for deterministic in (True, False):
        check_backward(d, f, r, alpha, u, tau, True, seg, deterministic)


def test_bad_arguments_raise():
    d, f, r, alpha, u, tau, seg = make_inputs((4, 3, 5, 6), [0, 1, 4], torch.float32, device="cuda", seed=71)
    fwd = torch.ops.fastshare_C.gated_residual_fwd
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        fwd(f.transpose(2, 3), r.transpose(2, 3), alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="r must have f's memory layout"):
        fwd(f, r.to(memory_format=torch.channels_last), alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="grad must have f's memory layout"):
        torch.ops.fastshare_C.gated_residual_bwd(d.to(memory_format=torch.channels_last), f, r, alpha, u, tau,
                                                 False, seg, True)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        fwd(f.double(), r.double(), alpha, u, tau, False, seg)
    with pytest.raises(RuntimeError, match="seg must be on f's device"):
        fwd(f, r, alpha, u, tau, False, seg.cpu())
    with pytest.raises(RuntimeError, match="alpha must be on f's device"):
        fwd(f, r, alpha.cpu(), u, tau, False, seg)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_dalpha_keeps_its_precision_at_saturated_gates(backend, hard):
    """The CUDA twin of test_ops' check: float32 dalpha within 1e-4 of a float64 oracle at y_min ~ 1e-6."""
    from test_ops import _dalpha_oracle, _saturated_inputs

    f, r, d, alpha, u, seg = _saturated_inputs()
    want, _ = _dalpha_oracle(f, r, d, alpha, u, 0.5, seg)
    cuda = [t.cuda() for t in (d, f, r, alpha, u, seg)]
    for deterministic in (False, True):
        _, _, dalpha = torch.ops.fastshare.gated_residual_backward(*cuda[:5], 0.5, hard, cuda[5], backend,
                                                                   deterministic)
        assert_close_verbose(dalpha.double().cpu(), want, 0.0, 1e-4, f"dalpha (deterministic={deterministic})")
