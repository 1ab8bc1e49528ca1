"""Helpers shared by the op, block and step cases: naming, logging, ratios, profiling, backward."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import torch

from fastshare.bench.results import CaseResult
from fastshare.bench.timing import TimingStats


def shape_str(shape: Sequence[int]) -> str:
    """``[48, 256, 81, 81]`` -> ``"48x256x81x81"`` (case names)."""
    return "x".join(str(s) for s in shape)


@contextlib.contextmanager
def env_var(name: str, value: str) -> Iterator[None]:
    """Set the environment variable ``name`` to ``value`` for a block; its previous state (or absence) after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def cudnn_flags(**changes: bool) -> contextlib.AbstractContextManager[None]:
    """``torch.backends.cudnn.flags`` for a block with cuDNN's ``enabled``, ``benchmark``, ``deterministic``
    and ``allow_tf32`` as they are now, except those set in ``changes`` (e.g. ``benchmark=False``); every
    flag restored after the block."""
    cudnn = torch.backends.cudnn
    current = {"enabled": cudnn.enabled, "benchmark": cudnn.benchmark, "deterministic": cudnn.deterministic,
               "allow_tf32": cudnn.allow_tf32}
    return cudnn.flags(**{**current, **changes})


def data_checks(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Set ``FASTSHARE_DATA_CHECKS`` (value checks that read tensors: one host sync each) for a block."""
    return env_var("FASTSHARE_DATA_CHECKS", "1" if enabled else "0")


def log(msg: str) -> None:
    """Progress lines go to stderr, so that stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def finish_ratios(results: list[CaseResult], baseline: str, attr: str) -> None:
    """Set ``attr`` (``vs_reference`` / ``vs_compile``) = baseline median / own median within each group."""
    base = {(c.group, c.pass_): c.timing.median_ms for c in results
            if c.variant == baseline and c.status == "ok" and c.timing}
    for c in results:
        b = base.get((c.group, c.pass_))
        if c.status == "ok" and c.timing and b is not None:
            setattr(c, attr, b / c.timing.median_ms)


def profile_into(res: CaseResult, fn: Callable[[], object], params: Sequence[torch.Tensor],
                 device: torch.device) -> None:
    """Fill ``res``'s FLOPs, saved-for-backward bytes and (CUDA) peak memory from one instrumented run of
    ``fn`` under :func:`fastshare.profile.profile_step` (the step profiler)."""
    from fastshare.profile import profile_step

    prof = profile_step(fn, params=params, device=device)
    res.flops = float(prof.flops)
    res.saved_bytes, res.saved_param_bytes = prof.saved_bytes, prof.saved_param_bytes
    res.aten_ops, res.peak_bytes = prof.aten_ops, prof.peak_memory_bytes


def record_timed(res: CaseResult, run: Callable[[Any], object], params: Sequence[torch.Tensor],
                 device: torch.device, timing: TimingStats, mm_rate: float | None) -> None:
    """Fill a timed block or step case: profiler counts of one run, its timing, TFLOP/s and % of the
    measured matmul rate."""
    profile_into(res, lambda: run(None), params, device)
    res.timing = timing
    res.tflops = res.flops / (timing.median_ms * 1e-3) / 1e12
    res.pct_matmul = 100.0 * res.tflops / mm_rate if mm_rate else None


def count_step_flops(fn: Callable[[], object], params: Sequence[torch.Tensor], device: torch.device) -> float:
    """FLOPs of one call of ``fn`` (convolutions and matmuls, forward and backward), from the step profiler."""
    from fastshare.profile import profile_step

    return float(profile_step(fn, params=params, device=device).flops)


def backward_grads(out: torch.Tensor, leaves: Sequence[torch.Tensor], grad: torch.Tensor | None = None
                   ) -> list[torch.Tensor | None]:
    """``out.backward(grad)`` into freshly cleared ``.grad`` of ``leaves``; returns those gradients.

    ``backward()`` rather than ``torch.autograd.grad``: the step profiler's FLOP counter installs module
    hooks that ``autograd.grad`` rejects, and timed and profiled runs should do the same work.
    """
    for t in leaves:
        t.grad = None
    out.backward(grad)
    return [t.grad for t in leaves]
