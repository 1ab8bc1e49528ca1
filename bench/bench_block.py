"""A full gated block (conv3x3-BN-ReLU-conv3x3-BN + gated residual on K=3 task segments), forward and
forward+backward (``pytest bench/ --benchmark-only``).

Variants: ``sequential`` (the reference: one pass per task with plain BatchNorm and the reference gate,
the paper's order) and ``batched-<backend>`` (one call on all ``K B`` rows with segmented BatchNorm and
the fused op of each backend that runs here). Each batched variant passes a float64-oracle pre-pass
(outputs and every gradient) before it is timed; ``extra_info`` holds FLOPs and TFLOP/s (and % of the
device's matmul rate, measured in the same session).
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastshare.bench.blocks import block_forward
from fastshare.bench.common import backward_grads, count_step_flops, data_checks, shape_str
from fastshare.bench.config import DTYPE_NAMES, DTYPES, suite_config
from fastshare.bench.op_cases import op_backends
from fastshare.bench.prepass import ORACLE_FLOOR, check_oracle
from fastshare.model.backbone import BasicBlock
from conftest import synced

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_CFG = suite_config(_DEVICE.type, quick=_DEVICE.type == "cpu")
_VARIANTS = ("sequential", "batched-reference", "batched-cpu", "batched-triton", "batched-cuda")
_ROUNDS = {"cpu": (3, 1), "cuda": (20, 3)}


@pytest.fixture(scope="module", params=[(tuple(s), d) for s in _CFG.block_shapes for d in _CFG.block_dtypes],
                ids=lambda p: f"{shape_str(p[0])}-{p[1]}")
def block_case(request, device):
    """``(block, x, grad, alpha, u, oracle, same-dtype reference)`` of one block shape and dtype."""
    shape, dname = request.param
    dtype = DTYPES[dname]
    torch.manual_seed(0)
    block = BasicBlock(shape[1], shape[1]).to(device=device, dtype=dtype).train()
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    alpha = torch.randn(_CFG.segments, 2, device=device, generator=gen)
    u = torch.rand(_CFG.segments, 2, device=device, generator=gen).clamp_(1e-6, 1 - 1e-6)
    block64 = copy.deepcopy(block).double()
    oracle = _outputs_and_grads(block64, "sequential", x.double(), alpha.double(), u, grad.double())
    same = _outputs_and_grads(block, "sequential", x, alpha, u, grad)
    return block, x, grad, alpha, u, oracle, same


def _outputs_and_grads(block, variant, x, alpha, u, grad):
    fn = block_forward(block, variant, _CFG.segments, _CFG.tau, _CFG.hard)
    xl, al = x.detach().requires_grad_(True), alpha.detach().requires_grad_(True)
    out = fn(xl, al, u)
    return [out.detach(), *backward_grads(out, [xl, al, *block.parameters()], grad)]


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", _VARIANTS)
def test_gated_block(benchmark, record, matmul_rates, device, block_case, variant, pass_):
    block, x, grad, alpha, u, oracle, same = block_case
    if variant != "sequential":
        backend = variant.split("-", 1)[1]
        runnable, skipped = op_backends(device, x.dtype)
        if backend not in runnable:
            pytest.skip(skipped.get(backend, f"{backend} does not run on {device.type}"))
        for a, b, o in zip(_outputs_and_grads(block, variant, x, alpha, u, grad), same, oracle):
            check_oracle(variant, a, b, o, ORACLE_FLOOR[x.dtype])
    fn = block_forward(block, variant, _CFG.segments, _CFG.tau, _CFG.hard)
    params = list(block.parameters())

    def run() -> object:
        if pass_ == "fwd":
            with torch.no_grad():
                return fn(x, alpha, u)
        xl, al = x.detach().requires_grad_(True), alpha.detach().requires_grad_(True)
        return backward_grads(fn(xl, al, u), [xl, al, *params], grad)

    flops = count_step_flops(run, params, device)
    dname = DTYPE_NAMES[x.dtype]
    benchmark.group = f"block/{shape_str(x.shape)}/{dname}/{pass_}"
    rounds, warmup = _ROUNDS[device.type]
    with data_checks(False):
        benchmark.pedantic(synced(run, device), rounds=rounds, warmup_rounds=warmup)
    record(flops=flops, tflops_ref=matmul_rates.get(dname))
