"""The fused gated residual per backend: forward, backward and forward+backward (``pytest bench/ --benchmark-only``).

Variants: ``reference`` (eager :func:`fastshare.reference.gated_residual_ref`), ``compile`` (``torch.compile``
of it), ``cpu`` / ``cuda`` / ``triton`` kernels (skipped with the dispatcher's reasons where they cannot
run). Shapes: ``fastshare bench``'s (GPU: ResNet-18/34 activations of K=3, B=16 at 321x321 and the issue-3
target ``[48, 256, 81, 81]``; CPU: the scaled-down issue-3 target ``[12, 64, 64, 64]``). Each variant passes
the correctness pre-pass on its own inputs before it is timed. ``extra_info`` holds GB/s (3N / 5N / 8N
elements moved) and % of the copy bandwidth measured in the same session.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fastshare.bench.common import data_checks, shape_str
from fastshare.bench.config import DTYPES, suite_config
from fastshare.bench.op_cases import op_backends, op_forward, op_timed
from fastshare.bench.prepass import check_gated_residual, gated_residual_inputs
from fastshare.bench.rates import PASSES, cache_bytes, gated_residual_bytes, rotation_copies
from conftest import synced

_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_CFG = suite_config(_DEVICE, quick=_DEVICE == "cpu")
_VARIANTS = ("reference", "compile", "cpu", "triton", "cuda")
_ROUNDS = {"cpu": (5, 1), "cuda": (50, 5)}  # (rounds, warm-up rounds)
_cache: dict[tuple, tuple] = {}


def _prepared(variant: str, shape: tuple[int, ...], dname: str, device: torch.device):
    """``(forward, input sets)`` of one case, checked against the reference once per session."""
    key = (variant, shape, dname)
    if key not in _cache:
        dtype = DTYPES[dname]
        runnable, skipped = op_backends(device, dtype)
        if variant not in runnable:
            pytest.skip(skipped.get(variant, f"{variant} does not run on {device.type}"))
        base = gated_residual_inputs(shape, dtype, device, _CFG.segments, _CFG.tau, _CFG.hard)
        copies = rotation_copies(3 * base.f.numel() * base.f.element_size(), cache_bytes(device))
        sets = [base] + [gated_residual_inputs(shape, dtype, device, _CFG.segments, _CFG.tau, _CFG.hard,
                                                     seed=i) for i in range(1, copies)]
        forward = op_forward(variant, _CFG.tau, _CFG.hard, _CFG.compile_dynamic)
        check_gated_residual(forward, base)  # raises PrepassError: a wrong kernel is never timed
        _cache[key] = (forward, sets)
    return _cache[key]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("dname", _CFG.op_dtypes)
@pytest.mark.parametrize("shape", [tuple(s) for s in _CFG.op_shapes], ids=shape_str)
def test_gated_residual(benchmark, record, device, shape, dname, variant, pass_):
    forward, sets = _prepared(variant, shape, dname, device)
    timed = op_timed(forward, sets, pass_)
    counter = itertools.count()
    benchmark.group = f"gr/{shape_str(shape)}/{dname}/{pass_}"
    rounds, warmup = _ROUNDS[device.type]
    with data_checks(False):
        benchmark.pedantic(synced(timed.run, device), setup=lambda: ((timed.prepare(next(counter)),), {}),
                           rounds=rounds, warmup_rounds=warmup)
    record(nbytes=gated_residual_bytes(sets[0].f.numel(), sets[0].f.dtype, pass_))
