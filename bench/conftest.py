"""pytest-benchmark fixtures for ``pytest bench/ --benchmark-only`` (helpers live in :mod:`fastshare.bench`).

``bench_*.py`` files are collected here (the project's default test run, ``testpaths = ["tests"]``, never
sees them). Fixtures: the device under test, its copy bandwidth and matmul rates measured once per session,
and ``record``: after a timed run, it stores GB/s, % of copy bandwidth and TFLOP/s in
``benchmark.extra_info`` from pytest-benchmark's own median.

GPU timing: pytest-benchmark times with the host clock, so every timed function synchronizes the device
before it returns (:func:`synced`).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from fastshare.bench.config import SuiteConfig, suite_config
from fastshare.bench.rates import MatmulRates, gbps, measure_copy_bandwidth


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
