"""pytest-benchmark fixtures for ``pytest bench/ --benchmark-only`` (helpers live in :mod:`fastshare.bench`).

``bench_*.py`` files are collected here (the project's default test run, ``testpaths = ["tests"]``, never
sees them). Fixtures: the device under test, its copy bandwidth and matmul rates measured once per session,
and ``record``: after a timed run, it stores GB/s, % of copy bandwidth and TFLOP/s in
``benchmark.extra_info`` from pytest-benchmark's own median. Pre-pass helpers: :func:`check_prepass`
(a fast path's results against the reference's before it is timed), :func:`check_step_variants` (whole
steps; :func:`step_results`: a step's outputs and gradients) and :func:`dropout_off`.

GPU timing: pytest-benchmark times with the host clock, so every timed function synchronizes the device
before it returns (:func:`synced`).
"""

from __future__ import annotations

import contextlib
import fnmatch
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
import torch

from fastshare.bench.common import backward_grads
from fastshare.bench.config import SuiteConfig, suite_config
from fastshare.bench.prepass import PrepassError, check_relative
from fastshare.bench.rates import MatmulRates, gbps, measure_copy_bandwidth
from fastshare.losses import task_loss


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect ``bench_*.py`` as test modules unless pytest already does (a file named on the command line,
    or ``-o python_files=...`` matching it)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def suite(device: torch.device) -> SuiteConfig:
    """The shapes and budgets of ``fastshare bench`` for this device (quick on the CPU)."""
    return suite_config(device.type, quick=device.type == "cpu")


@pytest.fixture(scope="session")
def copy_bandwidth(device: torch.device, suite: SuiteConfig) -> float:
    """The device's copy bandwidth in GB/s (bytes read + written), measured once per session."""
    return measure_copy_bandwidth(device, suite.copy_bytes)


@pytest.fixture(scope="session")
def matmul_rates(device: torch.device, suite: SuiteConfig) -> MatmulRates:
    """The device's matmul TFLOP/s per dtype name (measured on first use)."""
    return MatmulRates(device, suite.matmul_n, suite.matmul_dtypes)


def synced(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """``fn`` followed by a device synchronize, so that the host clock sees the kernels finish."""
    def run(*args: Any) -> Any:
        out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return run


@pytest.fixture
def record(benchmark, copy_bandwidth: float) -> Callable[..., None]:
    """``record(nbytes=..., flops=..., tflops_ref=...)`` after ``benchmark.pedantic``: GB/s, % of copy
    bandwidth and TFLOP/s from the benchmark's median into ``benchmark.extra_info``."""
    def put(nbytes: int | None = None, flops: float | None = None, tflops_ref: float | None = None) -> None:
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["copy_gbps"] = round(copy_bandwidth, 2)
        if nbytes is not None:
            rate = gbps(nbytes, median_ms)
            benchmark.extra_info.update(bytes=nbytes, gbps=round(rate, 2),
                                        pct_copy_bw=round(100 * rate / copy_bandwidth, 1))
        if flops is not None:
            tflops = flops / (median_ms * 1e-3) / 1e12
            benchmark.extra_info.update(flops=flops, tflops=round(tflops, 4))
            if tflops_ref:
                benchmark.extra_info["pct_matmul"] = round(100 * tflops / tflops_ref, 1)
    return put


def check_prepass(name: str, got: Mapping[str, torch.Tensor | None], want: Mapping[str, torch.Tensor | None],
                  rtol: float) -> None:
    """Pre-pass of a fast path before it is timed: each of its results (outputs, gradients; named as the
    reference's, computed in the same dtype on the benchmark's own inputs) within ``rtol`` relative error
    ``||got - want|| / ||want||`` of the reference's; a result missing (None) or zero on one side must be
    zero on the other; NaN fails. Raises :class:`PrepassError`: the benchmark fails instead of timing a
    wrong path."""
    if set(got) != set(want):
        raise PrepassError(f"{name}: the names of the results differ from the reference's")
    for key, ref in want.items():
        check_relative(f"{name}: {key}", got[key], ref, rtol)


#: Pre-pass tolerances of a whole float32 step (bench_executors.py, bench_tree.py): relative error, in norm,
#: of each task output and each parameter gradient from the sequential executor's. Measured for the
#: batched variants (bench_executors.py) on this CPU: outputs <= 2.5e-5; gradients up to 1.5e-2, the
#: BatchNorm gradients of ResNet-34's first blocks, which are ~1e-2 from a float64 step in every float32
#: execution (ReLU flips near 0, cancellation). A wrong path is off by O(1); exact equivalence is the tests'
#: job, in float64.
STEP_OUTPUT_RTOL, STEP_GRAD_RTOL = 1e-3, 5e-2


def step_results(model: torch.nn.Module, out: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """The end of a step's forward and backward (bench_executors.py, bench_tree.py): the sum of the task
    losses of ``out`` backward into ``model``'s parameters; returns the task outputs (detached) and each
    parameter's gradient by name."""
    names, params = zip(*model.named_parameters())
    grads = backward_grads(sum(task_loss(t, out[t], targets[t]) for t in model.tasks), params)
    return {t: o.detach() for t, o in out.items()}, dict(zip(names, grads))


def check_step_variants(what: str, model: torch.nn.Module, call: Callable[[str], tuple[Mapping, Mapping]],
                        variants: Sequence[str]) -> None:
    """Pre-pass of whole steps (bench_executors.py, bench_tree.py): ``call(variant)`` returns the step's
    (outputs, gradients); with ``model``'s dropout off, each of ``variants[1:]`` against ``variants[0]``
    within ``STEP_OUTPUT_RTOL`` / ``STEP_GRAD_RTOL`` (:func:`check_prepass`)."""
    with dropout_off(model):
        out_ref, grads_ref = call(variants[0])
        for v in variants[1:]:
            out, grads = call(v)
            check_prepass(f"{what} {v} output", out, out_ref, STEP_OUTPUT_RTOL)
            check_prepass(f"{what} {v} gradient", grads, grads_ref, STEP_GRAD_RTOL)


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """Every ``nn.Dropout`` of ``model`` in eval mode for the block, the rest in its own mode: two paths
    draw different dropout masks, so a pre-pass compares them without dropout."""
    active = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in active:
        m.eval()
    try:
        yield
    finally:
        for m in active:
            m.train()
