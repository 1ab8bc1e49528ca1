"""Benchmarks: shared helpers and the ``fastshare bench`` suite (``python -m fastshare.bench``).

What is measured (STYLE.md §13):

- **gated residual op** per backend (``reference`` = eager :func:`fastshare.reference.gated_residual_ref`,
  ``compile`` = ``torch.compile`` of it, and the ``cpu`` / ``cuda`` / ``triton`` kernels where they run),
  forward, backward and forward+backward separately, as time and as GB/s and % of the device's copy
  bandwidth measured in the same run. Bytes: forward reads ``f, r`` and writes ``out`` (3N elements);
  backward reads ``grad, f, r`` and writes ``df, dr`` (5N); forward+backward 8N.
- **gated block** (conv-BN-ReLU-conv-BN + gated residual on ``K`` task segments): the sequential
  reference (one pass per task, the paper's order) against one batched call with segmented BatchNorm and
  the fused op of each backend; FLOPs and TFLOP/s against the device's matmul rate measured in the run.
- **steps** of a whole :class:`~fastshare.model.AdaShareNet`: the policy-learning step (sampled soft
  gates, forward + backward), the re-train step (fixed policy, forward + backward) and inference, with
  the sequential reference against the batched / tree executors; FLOPs, saved-for-backward bytes and
  (on CUDA) peak memory.

Every timed case first passes a correctness pre-pass against the reference on its own inputs (forward
and gradients); a case that fails it is marked FAILED and not timed. Timing: the variants of one case are
timed interleaved, round by round (so that load drift on a shared machine hits them alike), CPU with
``time.perf_counter`` around each call, CUDA with a pair of ``torch.cuda.Event`` per call; median, p20 and
p80 are reported. Inputs are rotated over copies when one set would sit in cache.

Results go to ``bench/results/<device-slug>-<YYYY-MM-DD>.json`` (see :func:`write_results`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from fastshare import reference

__all__ = [
    "SCHEMA",
    "TimingStats",
    "Timed",
    "PrepassError",
    "CaseResult",
    "quantile",
    "timing_stats",
    "time_interleaved",
    "GATED_RESIDUAL_ELEMENT_IO",
    "gated_residual_bytes",
    "gbps",
    "measure_copy_bandwidth",
    "measure_matmul_tflops",
    "rotation_copies",
    "device_slug",
    "device_name",
    "git_commit",
    "environment",
    "check_close",
    "check_gated_residual",
    "gated_residual_inputs",
    "op_forward",
    "op_backends",
    "write_results",
    "validate_results",
    "default_results_path",
    "format_table",
    "run_suite",
    "main",
]

SCHEMA = "fastshare-bench/1"
PASSES = ("fwd", "bwd", "fwd+bwd")
#: Elements read + written per element of ``f`` by each pass of the gated residual (DESIGN.md §2).
GATED_RESIDUAL_ELEMENT_IO = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
REPO_ROOT = Path(__file__).resolve().parent.parent

# Pre-pass tolerances (atol, rtol) for elementwise results. Benchmarks refuse *wrong* kernels; the tight,
# per-dtype tolerances of the test suite live in tests/conftest.py.
PREPASS_TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}


# ----------------------------------------------------------------------------------------------------
# Timing.

@dataclass(frozen=True)
class TimingStats:
    """Per-call times in milliseconds and their median, p20 and p80 (linear interpolation)."""

    times_ms: tuple[float, ...]
    median_ms: float
    p20_ms: float
    p80_ms: float

    @property
    def rounds(self) -> int:
        return len(self.times_ms)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 <= q <= 1) of ``values`` with linear interpolation between order statistics."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timing_stats(times_ms: Sequence[float]) -> TimingStats:
    """:class:`TimingStats` of raw per-call times (milliseconds)."""
    t = tuple(float(x) for x in times_ms)
    return TimingStats(t, quantile(t, 0.5), quantile(t, 0.2), quantile(t, 0.8))


@dataclass
class Timed:
    """One timed variant: ``run(prepare(i))`` is timed, ``prepare(i)`` (round ``i``, for input rotation or
    an untimed forward before a timed backward) is not."""

    run: Callable[[Any], object]
    prepare: Callable[[int], Any] = lambda i: None


def _call_ms(item: Timed, i: int, device: torch.device, events: list | None) -> float | None:
    """Time one call: the elapsed ms on CPU; on CUDA record an event pair into ``events`` (None returned)."""
    arg = item.prepare(i)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        item.run(arg)
        end.record()
        events.append((start, end))
        return None
    t0 = time.perf_counter()
    item.run(arg)
    return (time.perf_counter() - t0) * 1e3


def _time_calls(item: Timed, device: torch.device, indices: Sequence[int]) -> list[float]:
    events: list = []
    out = [_call_ms(item, i, device, events) for i in indices]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    return out


def time_interleaved(items: Mapping[str, Timed], device: torch.device | str, *, warmup: int = 2,
                     min_rounds: int = 5, max_rounds: int = 100, target_ms: float = 1000.0
                     ) -> dict[str, TimingStats]:
    """Time several variants of one case round by round (variant order fixed within each round).

    Each variant first runs ``warmup`` times (at least once); the rounds are then chosen as
    ``clamp(target_ms / sum of the variants' warm-up medians, min_rounds, max_rounds)``, as
    ``triton.testing.do_bench`` picks its repetitions from an estimate.
    """
    device = torch.device(device)
    estimate = 0.0
    for item in items.values():
        warm = _time_calls(item, device, range(max(1, warmup)))
        estimate += quantile(warm, 0.5)
    rounds = int(min(max_rounds, max(min_rounds, target_ms / max(estimate, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in items}
    events: dict[str, list] = {name: [] for name in items}
    for i in range(rounds):
        for name, item in items.items():
            ms = _call_ms(item, i, device, events[name])
            if ms is not None:
                times[name].append(ms)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = {name: [s.elapsed_time(e) for s, e in ev] for name, ev in events.items()}
    return {name: timing_stats(t) for name, t in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# Bytes, bandwidth and FLOP rates.

def gated_residual_bytes(numel: int, dtype: torch.dtype, pass_: str) -> int:
    """Minimal DRAM bytes of one gated-residual pass on ``numel`` elements of ``dtype``.

    ``fwd``: read ``f, r``, write ``out`` (3N); ``bwd``: read ``grad, f, r``, write ``df, dr`` (5N);
    ``fwd+bwd``: 8N. The ``(S, 2)`` gate inputs and outputs are negligible and not counted.
    """
    if pass_ not in GATED_RESIDUAL_ELEMENT_IO:
        raise ValueError(f"pass must be one of {', '.join(PASSES)}, got {pass_!r}")
    return GATED_RESIDUAL_ELEMENT_IO[pass_] * int(numel) * torch.empty((), dtype=dtype).element_size()


def gbps(nbytes: float, ms: float) -> float:
    """GB/s (1e9 bytes per second) of ``nbytes`` moved in ``ms`` milliseconds."""
    if ms <= 0:
        raise ValueError(f"time must be > 0 ms, got {ms}")
    return nbytes / (ms * 1e-3) / 1e9


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, rounds: int = 10) -> float:
    """Achievable memory bandwidth in GB/s: a large device-to-device ``copy_`` of ``nbytes``, counting
    bytes read + written (``2 * nbytes``), median over ``rounds``."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    stats = time_interleaved({"copy": Timed(lambda _: dst.copy_(src))}, device, warmup=2,
                             min_rounds=rounds, max_rounds=rounds)["copy"]
    return gbps(2 * src.numel() * 4, stats.median_ms)


def measure_matmul_tflops(device: torch.device | str, dtype: torch.dtype, n: int, rounds: int = 10) -> float:
    """Dense matmul rate in TFLOP/s: ``(n, n) @ (n, n)`` (``2 n^3`` FLOPs), median over ``rounds``.

    On CUDA, float32 uses TF32 exactly when cuDNN convolutions do (``torch.backends.cudnn.allow_tf32``),
    so that block and step TFLOP/s compare like with like.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    ctx = contextlib.nullcontext()
    if device.type == "cuda" and dtype == torch.float32:
        ctx = _matmul_tf32(torch.backends.cudnn.allow_tf32)
    with ctx:
        stats = time_interleaved({"mm": Timed(lambda _: torch.mm(a, b))}, device, warmup=2,
                                 min_rounds=rounds, max_rounds=rounds)["mm"]
    return 2.0 * n ** 3 / (stats.median_ms * 1e-3) / 1e12


@contextlib.contextmanager
def _matmul_tf32(enabled: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache that a benchmark's inputs should not fit in (GPU L2, CPU L3 or L2)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            sizes.append(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    return max(sizes) if sizes else 32 << 20


def rotation_copies(set_bytes: int, cache: int, max_copies: int = 4) -> int:
    """How many copies of an input set to rotate over so that ``copies * set_bytes >= 2 * cache``,
    clamped to ``[1, max_copies]`` (memory bound)."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes must be > 0, got {set_bytes}")
    return max(1, min(max_copies, math.ceil(2 * cache / set_bytes)))


# ----------------------------------------------------------------------------------------------------
# Environment.

def device_name(device: torch.device | str) -> str:
    """Human-readable device name: the GPU's name or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device | str, name: str | None = None) -> str:
    """File-name-safe device id: ``<type>-<lowercased name, non-alphanumerics as '-'>``, e.g.
    ``cuda-nvidia-h100-80gb-hbm3`` or ``cpu-intel-r-xeon-r-processor``."""
    device = torch.device(device)
    name = device_name(device) if name is None else name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{slug}" if slug else device.type


def git_commit(root: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of the source tree, or ``"unknown"`` (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else "unknown"


#: The files whose content decides what a benchmark runs (hashed by :func:`source_digest`).
SOURCE_GLOBS = ("setup.py", "fastshare/**/*.py", "kernels/**/*.py", "csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu")


def source_digest(root: Path = REPO_ROOT) -> str:
    """SHA-256 over the paths and contents of the :data:`SOURCE_GLOBS` files: identifies the code that ran
    even where the checkout's ``.git`` does not match its files (a copied working tree, say). Compare with
    ``python -c "from fastshare.bench import source_digest; print(source_digest())"`` on a checkout."""
    h = hashlib.sha256()
    files = sorted({f for g in SOURCE_GLOBS for f in root.glob(g) if f.is_file()})
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _git_dirty(root: Path = REPO_ROOT) -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device, versions, commit and machine load recorded with every result file."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": {"type": device.type, "name": device_name(device), "slug": device_slug(device)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
                     if torch.backends.cudnn.is_available() else None},
        "git_commit": git_commit(),
        "git_dirty": _git_dirty(),
        "source_sha256": source_digest(),
        "machine": {"hostname_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"].update({"capability": f"{props.major}.{props.minor}",
                              "memory_gib": round(props.total_memory / (1 << 30), 1),
                              "sm_count": props.multi_processor_count})
    return env


# ----------------------------------------------------------------------------------------------------
# Correctness pre-pass.

class PrepassError(AssertionError):
    """A fast path disagrees with the reference on a benchmark's own inputs: it must not be timed."""


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> float:
    """Raise :class:`PrepassError` unless ``|actual - expected| <= atol + rtol |expected|`` everywhere;
    return the max abs error."""
    if actual.shape != expected.shape:
        raise PrepassError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    if not bool((torch.isfinite(a) == torch.isfinite(e)).all()):
        raise PrepassError(f"{name}: non-finite values differ from the reference")
    err = (a - e).abs().nan_to_num(0.0)
    bad = err > atol + rtol * e.abs().nan_to_num(0.0)
    max_err = float(err.max()) if err.numel() else 0.0
    if bool(bad.any()):
        raise PrepassError(f"{name}: {int(bad.sum())} / {err.numel()} elements out of tolerance "
                           f"(atol={atol}, rtol={rtol}); max abs err {max_err:.3e}")
    return max_err


@dataclass
class GatedResidualInputs:
    """Inputs of one gated-residual case: ``f, r, grad`` ``(N, ...)``; ``alpha, u`` ``(S, 2)`` float32;
    ``seg`` ``(S + 1,)`` int64 on the device."""

    f: torch.Tensor
    r: torch.Tensor
    grad: torch.Tensor
    alpha: torch.Tensor
    u: torch.Tensor
    seg: torch.Tensor
    tau: float
    hard: bool


def gated_residual_inputs(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                          segments: int = 3, tau: float = 5.0, hard: bool = False, seed: int = 0
                          ) -> GatedResidualInputs:
    """Random inputs for :func:`fastshare.gated_residual` with ``segments`` equal-ish row segments."""
    device = torch.device(device)
    n = int(shape[0])
    if not 1 <= segments <= n:
        raise ValueError(f"segments must be in [1, {n}], got {segments}")
    gen = torch.Generator(device=device).manual_seed(seed)
    f = torch.randn(tuple(shape), device=device, dtype=dtype, generator=gen)
    r = torch.randn(tuple(shape), device=device, dtype=dtype, generator=gen)
    grad = torch.randn(tuple(shape), device=device, dtype=dtype, generator=gen)
    alpha = torch.randn(segments, 2, device=device, generator=gen)
    u = torch.rand(segments, 2, device=device, generator=gen).clamp_(1e-6, 1 - 1e-6)
    seg = torch.tensor([round(i * n / segments) for i in range(segments + 1)], dtype=torch.int64, device=device)
    return GatedResidualInputs(f, r, grad, alpha, u, seg, tau, hard)


OpForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_gated_residual(forward: OpForward, inp: GatedResidualInputs) -> dict[str, float]:
    """Pre-pass of a gated-residual implementation ``forward(f, r, alpha, u, seg) -> out`` (gradients through
    autograd) against :mod:`fastshare.reference` on ``inp``.

    Elementwise results (``out, df, dr``) must match the float32 reference within
    ``PREPASS_TOLERANCES``; the reduction ``dalpha`` follows the flash-attn rule against a float64
    reference: its error is at most twice the float32 reference's plus ``1e-6`` of the reduction's
    absolute sum. Raises :class:`PrepassError`; returns the max errors.
    """
    atol, rtol = PREPASS_TOLERANCES[inp.f.dtype]
    f = inp.f.detach().clone().requires_grad_(True)
    r = inp.r.detach().clone().requires_grad_(True)
    alpha = inp.alpha.detach().clone().requires_grad_(True)
    try:
        out = forward(f, r, alpha, inp.u, inp.seg)
        df, dr, dalpha = torch.autograd.grad(out, (f, r, alpha), inp.grad)
    except PrepassError:
        raise
    except Exception as exc:  # a kernel that crashes is as wrong as one that miscomputes
        raise PrepassError(f"the fast path raised {type(exc).__name__}: {exc}") from exc
    args = (inp.alpha, inp.u, inp.tau, inp.hard, inp.seg)
    with torch.no_grad():
        out_ref = reference.gated_residual_ref(inp.f, inp.r, *args)
        df_ref, dr_ref, dalpha_ref = reference.gated_residual_backward_ref(inp.grad, inp.f, inp.r, *args)
        f64, r64, g64 = inp.f.double(), inp.r.double(), inp.grad.double()
        _, _, dalpha64 = reference.gated_residual_backward_ref(g64, f64, r64, inp.alpha.double(), inp.u.double(),
                                                               inp.tau, inp.hard, inp.seg)
        scale = float((g64.abs() * ((r64 + f64).clamp_min(0) + r64.abs())).sum()) / inp.tau
    errors = {
        "out": check_close("forward out", out, out_ref, atol, rtol),
        "df": check_close("df", df, df_ref, atol, rtol),
        "dr": check_close("dr", dr, dr_ref, atol, rtol),
    }
    kernel_err = float((dalpha.double() - dalpha64).abs().max())
    ref_err = float((dalpha_ref.double() - dalpha64).abs().max())
    bound = 2 * ref_err + 1e-6 * scale
    if not kernel_err <= bound:
        raise PrepassError(f"dalpha: error {kernel_err:.3e} vs float64 > 2 x float32 reference error "
                           f"{ref_err:.3e} + 1e-6 x abs-sum {scale:.3e}")
    errors["dalpha"] = kernel_err
    return errors


def _rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double().to(actual.device)
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


#: Floor of :func:`check_oracle`'s bound per dtype: the equivalence contract's gradient tolerance in
#: float32 (DESIGN.md §3); bf16 results are compared at bf16's resolution.
ORACLE_FLOOR = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float64: 1e-10}


def check_oracle(name: str, actual: torch.Tensor | None, same_dtype_ref: torch.Tensor | None,
                 oracle: torch.Tensor | None, floor: float) -> float:
    """flash-attn rule on relative norms: ``err(actual) <= 2 err(same_dtype_ref) + floor``, both errors
    ``||x - oracle|| / ||oracle||`` against a float64 ``oracle``. A missing tensor (None: a gradient the path
    never computes) equals an all-zero one. Raises :class:`PrepassError`; returns ``err(actual)``."""
    if oracle is None or not bool(oracle.any()):
        for t in (actual, same_dtype_ref):
            if t is not None and bool(t.any()):
                raise PrepassError(f"{name}: non-zero where the float64 reference is zero or absent")
        return 0.0
    if actual is None:
        raise PrepassError(f"{name}: missing, the float64 reference is non-zero")
    if actual.shape != oracle.shape:
        raise PrepassError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(oracle.shape)}")
    err = _rel_error(actual, oracle)
    ref_err = _rel_error(same_dtype_ref, oracle)
    if not err <= 2 * ref_err + floor:
        raise PrepassError(f"{name}: relative error {err:.3e} vs float64 > 2 x same-dtype reference error "
                           f"{ref_err:.3e} + {floor:.0e}")
    return err


# ----------------------------------------------------------------------------------------------------
# Gated-residual op variants.

def op_forward(backend: str, tau: float, hard: bool, compile_dynamic: bool = False) -> OpForward:
    """``forward(f, r, alpha, u, seg) -> out`` for ``backend``: ``reference`` (eager
    :func:`fastshare.reference.gated_residual_ref`), ``compile`` (``torch.compile`` of it) or a concrete
    fastshare backend (``cpu``, ``cuda``, ``triton``) through :func:`fastshare.gated_residual`."""
    if backend in ("reference", "compile"):
        def ref(f, r, alpha, u, seg):
            return reference.gated_residual_ref(f, r, alpha, u, tau, hard, seg)

        if backend == "reference":
            return ref
        compiled = torch.compile(ref, dynamic=compile_dynamic)

        def run_compiled(f, r, alpha, u, seg):
            # Every case compiles the same code object (``ref``): lift dynamo's per-code recompile limit so
            # that no case silently falls back to eager.
            with torch._dynamo.config.patch(recompile_limit=256):
                return compiled(f, r, alpha, u, seg)

        return run_compiled
    from fastshare.ops import gated_residual

    def fast(f, r, alpha, u, seg):
        return gated_residual(f, r, alpha, u, tau, hard, seg, backend=backend)

    return fast


def op_backends(device: torch.device | str, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """Op variants that run here (``reference``, ``compile``, then the kernels) and, for each kernel
    backend that cannot, why (from :func:`fastshare.ops.available_backends`)."""
    from fastshare.ops import available_backends

    device = torch.device(device)
    runnable, skipped = ["reference", "compile"], {}
    for name in ("cpu", "triton", "cuda"):
        reasons = available_backends(device, dtype).get(name, [])
        if device.type == "cpu" and name == "triton" and not reasons:
            reasons = ["the Triton CPU interpreter is for correctness tests, not timing"]
        if reasons:
            skipped[name] = "; ".join(reasons)
        else:
            runnable.append(name)
    return runnable, skipped


# ----------------------------------------------------------------------------------------------------
# Results.

@dataclass
class CaseResult:
    """One row of the results: a (case, variant, pass) with its status, timing and derived rates."""

    name: str
    group: str
    variant: str
    pass_: str
    status: str = "ok"  # "ok" | "FAILED" | "ERROR"
    error: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    timing: TimingStats | None = None
    bytes: int | None = None
    flops: float | None = None
    saved_bytes: int | None = None
    saved_param_bytes: int | None = None
    aten_ops: int | None = None
    peak_bytes: int | None = None
    prepass: dict[str, float] | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    tflops: float | None = None
    pct_matmul: float | None = None
    vs_reference: float | None = None
    vs_compile: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("timing", "pass_")}
        d["pass"] = self.pass_
        t = self.timing
        d.update({"median_ms": t.median_ms if t else None, "p20_ms": t.p20_ms if t else None,
                  "p80_ms": t.p80_ms if t else None, "rounds": t.rounds if t else 0,
                  "times_ms": list(t.times_ms) if t else []})
        return d


_REQUIRED_CASE_KEYS = ("name", "group", "variant", "pass", "status", "median_ms", "p20_ms", "p80_ms", "rounds",
                       "times_ms", "gbps", "pct_copy_bw", "vs_reference", "vs_compile")
_REQUIRED_TOP_KEYS = ("schema", "created", "device", "versions", "git_commit", "config", "reference_rates",
                      "cases")


def validate_results(doc: Mapping[str, Any]) -> list[str]:
    """Problems with a result document (empty list: valid). Checks keys, types and timing consistency."""
    problems = [f"missing top-level key {k!r}" for k in _REQUIRED_TOP_KEYS if k not in doc]
    if problems:
        return problems
    if doc["schema"] != SCHEMA:
        problems.append(f"schema {doc['schema']!r} != {SCHEMA!r}")
    for k in ("name", "type", "slug"):
        if not isinstance(doc["device"].get(k), str):
            problems.append(f"device.{k} must be a string")
    for k in ("torch", "triton", "cuda"):
        if k not in doc["versions"]:
            problems.append(f"versions.{k} missing")
    if not isinstance(doc["cases"], list):
        return problems + ["cases must be a list"]
    for i, case in enumerate(doc["cases"]):
        missing = [k for k in _REQUIRED_CASE_KEYS if k not in case]
        if missing:
            problems.append(f"case {i}: missing {', '.join(missing)}")
            continue
        if case["status"] == "ok":
            times = case["times_ms"]
            if case["rounds"] != len(times) or not times:
                problems.append(f"case {case['name']}: rounds {case['rounds']} != {len(times)} times")
            elif not min(times) <= case["p20_ms"] <= case["median_ms"] <= case["p80_ms"] <= max(times):
                problems.append(f"case {case['name']}: p20/median/p80 inconsistent with times_ms")
        elif case["status"] in ("FAILED", "ERROR"):
            if not case.get("error"):
                problems.append(f"case {case['name']}: status {case['status']} without an error message")
        else:
            problems.append(f"case {case['name']}: unknown status {case['status']!r}")
    return problems


def default_results_path(device: torch.device | str, date: _dt.date | None = None,
                         root: Path = REPO_ROOT / "bench" / "results") -> Path:
    """``bench/results/<device-slug>-<YYYY-MM-DD>.json``."""
    date = date or _dt.date.today()
    return root / f"{device_slug(device)}-{date.isoformat()}.json"


def write_results(path: Path | str, env: Mapping[str, Any], config: Mapping[str, Any],
                  reference_rates: Mapping[str, Any], cases: Sequence[CaseResult],
                  skipped: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write a validated result document (JSON) and return it."""
    doc = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **env,
        "config": dict(config),
        "reference_rates": dict(reference_rates),
        "skipped_backends": dict(skipped or {}),
        "cases": [c.to_json() for c in cases],
    }
    if hasattr(os, "getloadavg"):
        doc.setdefault("machine", {})["loadavg_end"] = list(os.getloadavg())
    problems = validate_results(doc)
    if problems:
        raise ValueError("refusing to write an invalid result file: " + "; ".join(problems))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return doc


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(results: Sequence[CaseResult]) -> str:
    """A Markdown table: one row per result (median, p20-p80, GB/s, % copy BW, TFLOP/s, % matmul, speed-up
    vs the reference and vs torch.compile, status)."""
    header = ("| case | median ms | p20-p80 ms | GB/s | % copy BW | TFLOP/s | % matmul | x ref | x compile "
              "| status |")
    lines = [header, "|" + "---|" * 10]
    for c in results:
        t = c.timing
        spread = f"{t.p20_ms:.3g}-{t.p80_ms:.3g}" if t else ""
        status = c.status if c.status == "ok" else f"{c.status}: {c.error}"
        lines.append(f"| {c.name} | {_fmt(t.median_ms if t else None, '.3f')} | {spread} | {_fmt(c.gbps, '.1f')} "
                     f"| {_fmt(c.pct_copy_bw, '.0f')} | {_fmt(c.tflops, '.2f')} | {_fmt(c.pct_matmul, '.0f')} "
                     f"| {_fmt(c.vs_reference, '.2f')} | {_fmt(c.vs_compile, '.2f')} | {status} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The suite.

@dataclass
class SuiteConfig:
    """Shapes and budgets of one suite run (see :func:`suite_config`)."""

    device: str
    quick: bool
    op_shapes: list[list[int]]
    op_dtypes: list[str]
    segments: int
    tau: float
    hard: bool
    block_shapes: list[list[int]]
    block_dtypes: list[str]
    step: dict[str, Any]
    warmup: int
    min_rounds: int
    max_rounds: int
    target_ms_per_variant: float
    copy_bytes: int
    matmul_n: int
    matmul_dtypes: list[str]
    compile_dynamic: bool
    step_rounds: int = 3
    data_checks_while_timing: bool = False


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def suite_config(device: str, quick: bool) -> SuiteConfig:
    """The suite that fits the machine: GPU: ResNet-18/34 activation shapes of K=3, B=16 at 321x321, and
    whole steps of ResNet-34/18 at that size in fp32 and bf16 + channels_last, eager and CUDA-graphed;
    CPU: scaled-down shapes (including the issue-3 CPU target ``[12, 64, 64, 64]`` fp32, 3 segments)."""
    if device == "cuda":
        op_shapes = [[48, 256, 81, 81], [48, 64, 81, 81], [48, 128, 41, 41], [48, 256, 41, 41], [48, 512, 41, 41]]
        block_shapes = [[48, 64, 81, 81], [48, 256, 41, 41]]
        step = {"backbones": ["resnet34"] if quick else ["resnet34", "resnet18"],
                "tasks": {"seg": 40, "sn": 3, "depth": 1}, "batch": 16, "image": 321, "head_width": 1024,
                "precisions": list(STEP_PRECISIONS), "graph": True}
        cfg = SuiteConfig(device, quick, op_shapes[:1] if quick else op_shapes, ["bf16", "fp32"], 3, 5.0, False,
                          block_shapes[:1] if quick else block_shapes, ["bf16", "fp32"], step,
                          warmup=3, min_rounds=10, max_rounds=200, target_ms_per_variant=100.0,
                          copy_bytes=1 << 30, matmul_n=8192, matmul_dtypes=["bf16", "fp32"], compile_dynamic=True,
                          step_rounds=3 if quick else 5)
        return cfg
    op_shapes = [[12, 64, 64, 64], [12, 128, 32, 32], [12, 512, 16, 16]]
    step = {"backbones": ["resnet18"], "tasks": {"seg": 13, "sn": 3, "depth": 1}, "batch": 2, "image": 33,
            "head_width": 32, "precisions": ["fp32"], "graph": False}
    return SuiteConfig(device, quick, op_shapes[:1] if quick else op_shapes, ["fp32"] if quick else ["fp32", "bf16"],
                       3, 5.0, False, [[12, 64, 32, 32]], ["fp32"], step,
                       warmup=1 if quick else 2, min_rounds=3 if quick else 5, max_rounds=10 if quick else 15,
                       target_ms_per_variant=150.0 if quick else 600.0, copy_bytes=(64 if quick else 256) << 20,
                       matmul_n=1024, matmul_dtypes=["fp32"], compile_dynamic=False)


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


@contextlib.contextmanager
def _data_checks(enabled: bool) -> Iterator[None]:
    """Set ``FASTSHARE_DATA_CHECKS`` (value checks that read tensors: one host sync each) for a block."""
    old = os.environ.get("FASTSHARE_DATA_CHECKS")
    os.environ["FASTSHARE_DATA_CHECKS"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTSHARE_DATA_CHECKS", None)
        else:
            os.environ["FASTSHARE_DATA_CHECKS"] = old


def _timing_kwargs(cfg: SuiteConfig, n_variants: int) -> dict[str, Any]:
    return {"warmup": cfg.warmup, "min_rounds": cfg.min_rounds, "max_rounds": cfg.max_rounds,
            "target_ms": cfg.target_ms_per_variant * n_variants}


def _op_timed(forward: OpForward, sets: list[GatedResidualInputs], pass_: str) -> Timed:
    """Timed call of one pass of the op, rotating over ``sets``."""
    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().requires_grad_(True)

    if pass_ == "fwd":
        def run_fwd(i: int) -> torch.Tensor:
            s = sets[i % len(sets)]
            with torch.no_grad():
                return forward(s.f, s.r, s.alpha, s.u, s.seg)

        return Timed(run_fwd, lambda i: i)

    def forward_graph(i: int):
        s = sets[i % len(sets)]
        f, r, alpha = leaf(s.f), leaf(s.r), leaf(s.alpha)
        return forward(f, r, alpha, s.u, s.seg), (f, r, alpha), s.grad

    if pass_ == "bwd":
        return Timed(lambda st: torch.autograd.grad(st[0], st[1], st[2]), forward_graph)

    def run_both(i: int):
        out, leaves, grad = forward_graph(i)
        return torch.autograd.grad(out, leaves, grad)

    return Timed(run_both, lambda i: i)


def _finish_ratios(results: list[CaseResult], baseline: str, attr: str) -> None:
    """Set ``attr`` (``vs_reference`` / ``vs_compile``) = baseline median / own median within each group."""
    base = {(c.group, c.pass_): c.timing.median_ms for c in results
            if c.variant == baseline and c.status == "ok" and c.timing}
    for c in results:
        b = base.get((c.group, c.pass_))
        if c.status == "ok" and c.timing and b is not None:
            setattr(c, attr, b / c.timing.median_ms)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_op_cases(cfg: SuiteConfig, device: torch.device, copy_bw: float, selected: Callable[[str], bool]
                 ) -> tuple[list[CaseResult], dict[str, str]]:
    """Gated-residual op: every shape x dtype x variant x pass that ``selected`` keeps."""
    results: list[CaseResult] = []
    skipped_all: dict[str, str] = {}
    cache = cache_bytes(device)
    for shape in cfg.op_shapes:
        for dname in cfg.op_dtypes:
            dtype = _DTYPES[dname]
            variants, skipped = op_backends(device, dtype)
            skipped_all.update({f"{b}/{dname}": why for b, why in skipped.items()})
            group = f"gr/{_shape_str(shape)}/{dname}"
            names = {(v, p): f"{group}/{v}/{p}" for v in variants for p in PASSES}
            wanted = {k: n for k, n in names.items() if selected(n)}
            if not wanted:
                continue
            _log(f"[bench] {group}: {', '.join(sorted({v for v, _ in wanted}))}")
            base = gated_residual_inputs(shape, dtype, device, cfg.segments, cfg.tau, cfg.hard)
            set_bytes = 3 * base.f.numel() * base.f.element_size()
            copies = rotation_copies(set_bytes, cache)
            sets = [base] + [gated_residual_inputs(shape, dtype, device, cfg.segments, cfg.tau, cfg.hard, seed=i)
                             for i in range(1, copies)]
            params = {"shape": list(shape), "dtype": dname, "segments": cfg.segments, "tau": cfg.tau,
                      "hard": cfg.hard, "rotation_copies": copies}
            forwards: dict[str, OpForward] = {}
            failed: dict[str, tuple[str, str]] = {}
            prepass: dict[str, dict[str, float]] = {}
            for v in sorted({v for v, _ in wanted}, key=variants.index):
                forwards[v] = op_forward(v, cfg.tau, cfg.hard, cfg.compile_dynamic)
                try:
                    prepass[v] = check_gated_residual(forwards[v], base)
                except PrepassError as exc:
                    failed[v] = ("FAILED", str(exc))
            numel = base.f.numel()
            for p in PASSES:
                items = {v: _op_timed(forwards[v], sets, p) for (v, q) in wanted if q == p and v not in failed}
                stats: dict[str, TimingStats] = {}
                if items:
                    try:
                        with _data_checks(cfg.data_checks_while_timing):
                            stats = time_interleaved(items, device, **_timing_kwargs(cfg, len(items)))
                    except Exception as exc:  # report, keep going with the other cases
                        failed.update({v: ("ERROR", f"{type(exc).__name__}: {exc}") for v in items})
                for (v, q), name in wanted.items():
                    if q != p:
                        continue
                    nbytes = gated_residual_bytes(numel, dtype, p)
                    res = CaseResult(name, group, v, p, params=params, bytes=nbytes, prepass=prepass.get(v))
                    if v in failed:
                        res.status, res.error = failed[v]
                    else:
                        res.timing = stats[v]
                        res.gbps = gbps(nbytes, res.timing.median_ms)
                        res.pct_copy_bw = 100.0 * res.gbps / copy_bw
                    results.append(res)
            del sets, base
    _finish_ratios(results, "reference", "vs_reference")
    _finish_ratios(results, "compile", "vs_compile")
    return results, skipped_all


# ---- gated block --------------------------------------------------------------------------------

def _profile(res: CaseResult, fn: Callable[[], object], params: Sequence[torch.Tensor],
             device: torch.device) -> None:
    """Fill ``res``'s FLOPs, saved-for-backward bytes and (CUDA) peak memory from one instrumented run of
    ``fn`` under :func:`fastshare.profile.profile_step` (the step profiler)."""
    from fastshare.profile import profile_step

    prof = profile_step(fn, params=params, device=device)
    res.flops = float(prof.flops)
    res.saved_bytes, res.saved_param_bytes = prof.saved_bytes, prof.saved_param_bytes
    res.aten_ops, res.peak_bytes = prof.aten_ops, prof.peak_memory_bytes


def _record_timed(res: CaseResult, run: Callable[[Any], object], params: Sequence[torch.Tensor],
                  device: torch.device, timing: TimingStats, mm_rate: float | None) -> None:
    """Fill a timed block or step case: profiler counts of one run, its timing, TFLOP/s and % of the
    measured matmul rate."""
    _profile(res, lambda: run(None), params, device)
    res.timing = timing
    res.tflops = res.flops / (timing.median_ms * 1e-3) / 1e12
    res.pct_matmul = 100.0 * res.tflops / mm_rate if mm_rate else None


def count_step_flops(fn: Callable[[], object], params: Sequence[torch.Tensor], device: torch.device) -> float:
    """FLOPs of one call of ``fn`` (convolutions and matmuls, forward and backward), from the step profiler."""
    from fastshare.profile import profile_step

    return float(profile_step(fn, params=params, device=device).flops)


def _block_variants(device: torch.device, dtype: torch.dtype) -> list[str]:
    kernels = [v for v in op_backends(device, dtype)[0] if v not in ("reference", "compile")]
    return ["sequential", "batched-reference"] + [f"batched-{b}" for b in kernels]


def block_forward(block: torch.nn.Module, variant: str, k: int, tau: float, hard: bool
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn(x, alpha, u) -> out`` for ``x`` ``(K B, C, H, W)`` with the block's identity shortcut.

    ``sequential``: the reference: per task, ``F(x_k)`` with plain BatchNorm and
    ``y0 relu(x_k + F) + y1 x_k`` with :func:`fastshare.reference.gumbel_gate_ref`; ``batched-<backend>``:
    one call on all rows with segmented BatchNorm and :func:`fastshare.gated_residual` on ``backend``.
    """
    from fastshare.model.norm import batch_segments
    from fastshare.ops import gated_residual

    def sequential(x, alpha, u):
        rows = x.shape[0] // k
        outs = []
        for t in range(k):
            xk = x[t * rows:(t + 1) * rows]
            y = reference.gumbel_gate_ref(alpha[t], u[t], tau, hard).to(x.dtype)
            outs.append(y[0] * torch.relu(xk + block(xk)) + y[1] * xk)
        return torch.cat(outs)

    if variant == "sequential":
        return sequential
    backend = variant.split("-", 1)[1]

    def batched(x, alpha, u):
        rows = x.shape[0] // k
        seg = torch.arange(0, (k + 1) * rows, rows, dtype=torch.int64)
        with batch_segments(seg):
            f = block(x)
        return gated_residual(f, x, alpha, u, tau, hard, seg, backend=backend)

    return batched


def _backward(out: torch.Tensor, leaves: Sequence[torch.Tensor], grad: torch.Tensor | None = None
              ) -> list[torch.Tensor | None]:
    """``out.backward(grad)`` into freshly cleared ``.grad`` of ``leaves``; returns those gradients.

    ``backward()`` rather than ``torch.autograd.grad``: the step profiler's FLOP counter installs module
    hooks that ``autograd.grad`` rejects, and timed and profiled runs should do the same work.
    """
    for t in leaves:
        t.grad = None
    out.backward(grad)
    return [t.grad for t in leaves]


def run_block_cases(cfg: SuiteConfig, device: torch.device, matmul: "MatmulRates",
                    selected: Callable[[str], bool]) -> list[CaseResult]:
    """Gated block: sequential reference vs batched with each backend; fwd and fwd+bwd."""
    from fastshare.model.backbone import BasicBlock

    results: list[CaseResult] = []
    k = cfg.segments
    for shape in cfg.block_shapes:
        for dname in cfg.block_dtypes:
            dtype = _DTYPES[dname]
            group = f"block/{_shape_str(shape)}/{dname}"
            variants = _block_variants(device, dtype)
            wanted = {(v, p): f"{group}/{v}/{p}" for v in variants for p in ("fwd", "fwd+bwd")}
            wanted = {key: n for key, n in wanted.items() if selected(n)}
            if not wanted:
                continue
            _log(f"[bench] {group}")
            torch.manual_seed(0)
            block = BasicBlock(shape[1], shape[1]).to(device=device, dtype=dtype).train()
            gen = torch.Generator(device=device).manual_seed(1)
            x = torch.randn(shape, device=device, dtype=dtype, generator=gen)
            grad = torch.randn(shape, device=device, dtype=dtype, generator=gen)
            alpha = torch.randn(k, 2, device=device, generator=gen)
            u = torch.rand(k, 2, device=device, generator=gen).clamp_(1e-6, 1 - 1e-6)
            params_list = list(block.parameters())
            fns = {v: block_forward(block, v, k, cfg.tau, cfg.hard) for v in {v for v, _ in wanted}}
            block64 = copy.deepcopy(block).double()

            def outputs_and_grads(fn: Callable, blk: torch.nn.Module, dt: torch.dtype) -> list[torch.Tensor | None]:
                xl = x.detach().to(dt).requires_grad_(True)
                al = alpha.detach().to(torch.float64 if dt == torch.float64 else alpha.dtype).requires_grad_(True)
                out = fn(xl, al, u)
                return [out.detach(), *_backward(out, [xl, al, *blk.parameters()], grad.to(dt))]

            oracle = outputs_and_grads(block_forward(block64, "sequential", k, cfg.tau, cfg.hard), block64,
                                       torch.float64)
            same = outputs_and_grads(block_forward(block, "sequential", k, cfg.tau, cfg.hard), block, dtype)
            labels = ["out", "dx", "dalpha"] + [f"d{n}" for n, _ in block.named_parameters()]
            failed: dict[str, str] = {}
            for v in sorted(v for v in fns if v != "sequential"):
                try:
                    fast = outputs_and_grads(fns[v], block, dtype)
                    for lab, a, b, o in zip(labels, fast, same, oracle):
                        check_oracle(f"block {lab}", a, b, o, ORACLE_FLOOR[dtype])
                except PrepassError as exc:
                    failed[v] = str(exc)
            del block64, oracle, same
            params_list = list(block.parameters())
            params = {"shape": list(shape), "dtype": dname, "segments": k, "tau": cfg.tau, "hard": cfg.hard,
                      "block": "BasicBlock conv3x3-BN-ReLU-conv3x3-BN + gated residual (identity shortcut)"}
            mm_rate = matmul.get(dname)
            for p in ("fwd", "fwd+bwd"):
                def call(v: str, pass_: str = p) -> Callable[[Any], object]:
                    def run(_: Any) -> object:
                        if pass_ == "fwd":
                            with torch.no_grad():
                                return fns[v](x, alpha, u)
                        xl, al = x.detach().requires_grad_(True), alpha.detach().requires_grad_(True)
                        return _backward(fns[v](xl, al, u), [xl, al, *params_list], grad)
                    return run

                items = {v: Timed(call(v)) for (v, q) in wanted if q == p and v not in failed}
                with _data_checks(cfg.data_checks_while_timing):
                    stats = time_interleaved(items, device, **_timing_kwargs(cfg, len(items))) if items else {}
                for (v, q), name in wanted.items():
                    if q != p:
                        continue
                    res = CaseResult(name, group, v, p, params=params)
                    if v in failed:
                        res.status, res.error = "FAILED", failed[v]
                        results.append(res)
                        continue
                    _record_timed(res, items[v].run, params_list, device, stats[v], mm_rate)
                    results.append(res)
    _finish_ratios(results, "sequential", "vs_reference")
    return results


# ---- whole steps --------------------------------------------------------------------------------

#: Step kinds: the policy-learning step at curriculum stage 1 (one sampled block, the rest forced and
#: shared) and stage L (all blocks sampled), the re-train step and inference (both with a fixed policy).
STEP_KINDS = ("policy-stage1", "policy-stageL", "retrain", "inference")
#: Precisions of the step cases. ``fp32``: IEEE float32 everywhere (cuDNN's TF32 off, as in the
#: reference); ``bf16cl``: bfloat16 autocast over float32 weights, model and images channels_last.
STEP_PRECISIONS = ("fp32", "bf16cl")


@dataclass(frozen=True)
class StepVariant:
    """How one step runs: executor, op backend (batched executor), precision, captured in a CUDA graph.

    Names: ``sequential``, ``batched-cuda``, ``tree+bf16cl``, ``batched-cuda+bf16cl+graph``, ...
    """

    executor: str
    backend: str = ""
    precision: str = "fp32"
    graph: bool = False

    @property
    def name(self) -> str:
        base = f"{self.executor}-{self.backend}" if self.backend else self.executor
        return base + ("" if self.precision == "fp32" else f"+{self.precision}") + ("+graph" if self.graph else "")

    @property
    def eager(self) -> "StepVariant":
        return dataclasses.replace(self, graph=False)

    @property
    def reference(self) -> "StepVariant":
        """The sequential reference in this variant's precision (its same-dtype reference)."""
        return StepVariant("sequential", precision=self.precision)


def nyu_example_policy() -> torch.Tensor:
    """The fixed policy the paper's code uses as its 3-task NYU v2 example (ResNet-34, blocks 0..15):
    task 1 skips block 6, task 2 skips 9, 10, 11, task 3 skips 5, 10, 11. ``(3, 16)``, 1 = execute."""
    policy = torch.ones(3, 16)
    policy[0, 6] = 0
    policy[1, [9, 10, 11]] = 0
    policy[2, [5, 10, 11]] = 0
    return policy


def step_policy(k: int, n_blocks: int) -> torch.Tensor:
    """The fixed ``(K, L)`` policy of the re-train and inference cases: :func:`nyu_example_policy` for
    K = 3 tasks on 16 blocks; otherwise every task runs the first half and task ``t`` skips block ``l`` of
    the second half when ``(l + t) % 3 == 0``."""
    if (k, n_blocks) == (3, 16):
        return nyu_example_policy()
    policy = torch.ones(k, n_blocks)
    for t in range(k):
        for l in range(n_blocks // 2, n_blocks):
            if (l + t) % 3 == 0:
                policy[t, l] = 0.0
    return policy


def _executors_available() -> list[str]:
    from fastshare import executors

    return [n for n in ("batched", "tree") if n in executors._EXECUTORS]


def step_variants(step: str, device: torch.device, precisions: Sequence[str], graph: bool) -> list[StepVariant]:
    """The variants of one step case: the sequential reference in each precision; the fast executor
    (batched for the policy step, with the fastest op backend that runs: the op cases compare backends;
    tree for fixed policies) in each precision; on CUDA with ``graph``, the fast executor captured in a
    CUDA graph."""
    fast_ex = "tree" if step in ("retrain", "inference") else "batched"
    if fast_ex not in _executors_available():
        return [StepVariant("sequential", precision=p) for p in precisions]
    runnable = op_backends(device, torch.float32)[0]
    kernels = [b for b in ("cuda", "triton", "cpu") if b in runnable] or ["reference"]  # fastest first
    out: list[StepVariant] = []
    for p in precisions:
        out.append(StepVariant("sequential", precision=p))
        if fast_ex == "tree":
            fast = [StepVariant("tree", precision=p)]
        else:
            fast = [StepVariant("batched", kernels[0], p)]
        out += fast
        if graph and device.type == "cuda":
            out.append(dataclasses.replace(fast[0], graph=True))
    return out


@dataclass
class _StepModel:
    """One model copy of a step case (fp32 NCHW, or channels_last for ``bf16cl``) with its gates."""

    model: torch.nn.Module
    x: torch.Tensor
    gates: Any
    params: list[torch.Tensor]
    names: list[str]


def _step_model(sc: Mapping[str, Any], backbone: str, step: str, device: torch.device, dtype: torch.dtype,
                precision: str, tau: float, hard: bool) -> _StepModel:
    """The model, images and gates of a step case: the same weights, images and noise for every dtype
    and precision (seeded)."""
    from fastshare.model import AdaShareNet

    torch.manual_seed(0)
    model = AdaShareNet(backbone, sc["tasks"], head_width=sc["head_width"], dropout=0.0)
    model = model.to(device=device, dtype=dtype).train(step != "inference")
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(sc["batch"], 3, sc["image"], sc["image"], device=device, generator=gen).to(dtype)
    if precision == "bf16cl":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if step.startswith("policy"):
        u = torch.rand(model.logits.shape, device=device, generator=gen).clamp_(1e-6, 1 - 1e-6)
        stage = 1 if step == "policy-stage1" else model.num_blocks
        gates = model.gates("sample", tau=tau, hard=hard, num_train_layers=stage, u=u.to(dtype))
    else:
        gates = model.gates("fixed", policy=step_policy(model.num_tasks, model.num_blocks))
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return _StepModel(model, x, gates, list(params), list(names))


@contextlib.contextmanager
def _precision(precision: str, device: torch.device, graph: bool = False) -> Iterator[None]:
    """``fp32``: TF32 off in cuDNN and matmuls (IEEE float32, like the float64 oracle's arithmetic);
    ``bf16cl``: bfloat16 autocast (its cast cache off inside a CUDA graph capture, as PyTorch advises)."""
    if precision == "bf16cl":
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not graph):
            yield
        return
    if device.type != "cuda":
        yield
        return
    old_mm = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_mm


def _step_call(sm: _StepModel, step: str, variant: StepVariant, capturing: bool = False
               ) -> list[torch.Tensor | None]:
    """One eager step of ``variant``: inference: the task outputs (no grad); otherwise the gradients of every
    trainable parameter of the loss ``sum_t mean(out_t^2)`` (a float32 sum under autocast)."""
    from fastshare import use_backend

    device = sm.x.device
    with _precision(variant.precision, device, capturing), use_backend(variant.backend or "reference"):
        if step == "inference":
            with torch.no_grad():
                return list(sm.model(sm.x, sm.gates, executor=variant.executor).values())
        outs = sm.model(sm.x, sm.gates, executor=variant.executor)
        loss = sum(o.float().square().mean() for o in outs.values())
    return _backward(loss, sm.params)


def capture_cuda_graph(fn: Callable[[], Any], warmup: int = 2) -> tuple[Callable[[], None], Any]:
    """Capture ``fn()`` (static shapes and addresses, no host syncs) in a CUDA graph after ``warmup`` eager
    calls on a side stream; returns ``(replay, static result)``: each ``replay()`` recomputes the static
    result in place (gradients land in the ``.grad`` tensors that the captured call created)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph.replay, static


def _graph_step(sm: _StepModel, step: str, variant: StepVariant) -> tuple[Callable[[Any], object],
                                                                         list[torch.Tensor | None]]:
    """``variant``'s eager step captured in a CUDA graph: ``(run, static results)``."""
    eager = variant.eager

    def fn() -> list[torch.Tensor | None]:
        with _data_checks(False):
            return _step_call(sm, step, eager, capturing=True)

    replay, static = capture_cuda_graph(fn)

    def run(_: Any) -> list[torch.Tensor | None]:
        replay()
        return static  # held here: the replays write into these tensors

    return run, static


def run_step_cases(cfg: SuiteConfig, device: torch.device, matmul: "MatmulRates",
                   selected: Callable[[str], bool],
                   progress: Callable[[list[CaseResult]], None] | None = None) -> list[CaseResult]:
    """Policy-learning steps (curriculum stage 1 and L), the re-train step and inference of a whole
    AdaShareNet, per backbone, executor, backend, precision and (CUDA) graph capture.

    Every variant's ``x ref`` is against the sequential reference in float32 (the paper's execution). The
    pre-pass checks each variant against a float64 sequential oracle with the reference in the variant's
    own precision as the yardstick (:func:`check_oracle`); a CUDA-graph variant is checked on its replayed
    results. The loss is the sum over tasks of the mean square of each task's output (the task losses are
    a negligible part of a step; every variant computes the same one). ``progress`` receives the results
    so far after each group (a long run keeps what it measured when it is cut short).
    """
    sc = cfg.step
    results: list[CaseResult] = []
    for backbone in sc["backbones"]:
        for step in STEP_KINDS:
            group = f"step/{backbone}/{step}"
            variants = [v for v in step_variants(step, device, sc["precisions"], sc["graph"])
                        if selected(f"{group}/{v.name}")]
            if not variants:
                continue
            _log(f"[bench] {group}: {', '.join(v.name for v in variants)}")
            results += _run_step_group(cfg, device, matmul, backbone, step, group, variants)
            _finish_ratios(results, "sequential", "vs_reference")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if progress is not None:
                progress(results)
    return results


def _run_step_group(cfg: SuiteConfig, device: torch.device, matmul: "MatmulRates", backbone: str, step: str,
                    group: str, variants: Sequence[StepVariant]) -> list[CaseResult]:
    sc = cfg.step
    models = {p: _step_model(sc, backbone, step, device, torch.float32, p, cfg.tau, cfg.hard)
              for p in {v.precision for v in variants} | {"fp32"}}
    sm64 = _step_model(sc, backbone, step, device, torch.float64, "fp32", cfg.tau, cfg.hard)
    oracle = _step_call(sm64, step, StepVariant("sequential"))
    del sm64
    labels = list(models["fp32"].model.tasks) if step == "inference" else [f"d{n}" for n in models["fp32"].names]
    refs = {p: _step_call(models[p], step, StepVariant("sequential", precision=p)) for p in models}
    runs: dict[StepVariant, Callable[[Any], object]] = {}
    failed: dict[StepVariant, tuple[str, str]] = {}
    for v in variants:
        sm = models[v.precision]
        try:
            if v.graph:
                runs[v], got = _graph_step(sm, step, v)
                runs[v](None)
                torch.cuda.synchronize(device)
            else:
                runs[v] = (lambda _, sm=sm, v=v: _step_call(sm, step, v))
                got = _step_call(sm, step, v)
            if v.executor != "sequential":
                for lab, a, b, o in zip(labels, got, refs[v.precision], oracle):
                    check_oracle(lab, a, b, o, ORACLE_FLOOR[torch.bfloat16 if v.precision == "bf16cl"
                                                           else torch.float32])
        except PrepassError as exc:
            failed[v] = ("FAILED", str(exc))
        except Exception as exc:  # an executor or a capture that crashes is reported, the suite goes on
            failed[v] = ("ERROR", f"{type(exc).__name__}: {exc}")
        if v in failed:
            runs.pop(v, None)
            _log(f"[bench] {group}/{v.name}: {failed[v][0]}: {failed[v][1][:200]}")
    del oracle, refs
    items = {v: Timed(run) for v, run in runs.items()}
    with _data_checks(cfg.data_checks_while_timing):
        stats = time_interleaved(items, device, warmup=1, min_rounds=cfg.step_rounds,
                                 max_rounds=cfg.step_rounds) if items else {}
    m = models["fp32"].model
    info = {"backbone": backbone, "step": step, **{k: v for k, v in sc.items() if k not in ("backbones",)},
            "tau": cfg.tau, "hard": cfg.hard,
            "gates": ("sampled, curriculum stage " + ("1" if step == "policy-stage1" else f"L = {m.num_blocks}"))
            if step.startswith("policy") else "fixed: " + str(step_policy(m.num_tasks, m.num_blocks).int().tolist())}
    results = []
    for v in variants:
        res = CaseResult(f"{group}/{v.name}", group, v.name, "fwd" if step == "inference" else "fwd+bwd",
                         params={**info, "precision": v.precision, "cuda_graph": v.graph})
        if v in failed:
            res.status, res.error = failed[v]
        else:
            # Counters come from the eager run (a graph replay dispatches no ATen ops to count).
            sm, eager = models[v.precision], v.eager
            _record_timed(res, lambda _: _step_call(sm, step, eager), sm.params, device, stats[v],
                          matmul.get("bf16" if v.precision == "bf16cl" else "fp32"))
        results.append(res)
    return results


class MatmulRates:
    """The device's matmul TFLOP/s per dtype name, measured on first use (only when a FLOP-rate case runs)."""

    def __init__(self, device: torch.device, n: int, dtypes: Sequence[str]) -> None:
        self.device, self.n, self.dtypes = device, n, tuple(dtypes)
        self.measured: dict[str, float] = {}

    def get(self, dname: str) -> float | None:
        """TFLOP/s of an ``n^3`` matmul in ``dname`` (None for a dtype the config does not measure)."""
        if dname not in self.dtypes:
            return None
        if dname not in self.measured:
            self.measured[dname] = measure_matmul_tflops(self.device, _DTYPES[dname], self.n)
        return self.measured[dname]


def run_suite(cfg: SuiteConfig, filters: Sequence[str] | None = None,
              progress: Callable[[dict[str, Any], list[CaseResult], dict[str, str]], None] | None = None
              ) -> tuple[dict[str, Any], list[CaseResult], dict[str, str]]:
    """Run every case whose name contains one of ``filters`` (all when None); returns (reference rates,
    results, skipped backends). ``progress(rates, results so far, skipped)`` is called after the op and
    block sections and after each step group."""
    device = torch.device(cfg.device)

    def selected(name: str) -> bool:
        return not filters or any(f in name for f in filters)

    copy_bw = measure_copy_bandwidth(device, cfg.copy_bytes)
    rates: dict[str, Any] = {"copy_gbps": copy_bw, "copy_bytes": cfg.copy_bytes, "matmul_n": cfg.matmul_n}
    matmul = MatmulRates(device, cfg.matmul_n, cfg.matmul_dtypes)

    def report(done: list[CaseResult]) -> None:
        if matmul.measured:
            rates["matmul_tflops"] = dict(matmul.measured)
        if progress is not None and done:
            progress(rates, done, skipped)

    results, skipped = run_op_cases(cfg, device, copy_bw, selected)
    report(results)
    results += run_block_cases(cfg, device, matmul, selected)
    report(results)
    results += run_step_cases(cfg, device, matmul, selected, progress=lambda steps: report(results + steps))
    report([])
    return rates, results, skipped


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastshare bench", description="Run fastshare's benchmark suite for this "
                                "machine, print one table and write bench/results/<device>-<date>.json.")
    p.add_argument("--filter", action="append", default=None, metavar="SUBSTR",
                   help="run only cases whose name contains SUBSTR (e.g. 'gr/12x64x64x64/fp32', 'block/', "
                   "'step/policy'); repeat to run the union")
    p.add_argument("--quick", action="store_true", help="fewer shapes and rounds (smoke run)")
    p.add_argument("--out", default=None, help="result file (a .json path) or directory; default "
                   "bench/results/<device-slug>-<YYYY-MM-DD>.json")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``fastshare bench``: run the suite, print the table, write the result file. Returns 0, or 1 when a
    case failed its pre-pass or errored."""
    args = _parse(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        _log("fastshare bench: --device cuda but torch sees no CUDA device")
        return 2
    cfg = suite_config(device, args.quick)
    env = environment(device)
    if args.out is None:
        path = default_results_path(device)
    else:
        path = Path(args.out)
        if path.suffix != ".json":
            path = default_results_path(device, root=path)
    config = {**dataclasses.asdict(cfg), "filter": args.filter, "step_fp32_tf32": False}

    def partial(rates: dict[str, Any], done: list[CaseResult], skipped: dict[str, str]) -> None:
        write_results(path, env, {**config, "partial": True}, rates, done, skipped)

    rates, results, skipped = run_suite(cfg, args.filter, progress=partial)
    if not results:
        _log(f"fastshare bench: no case matches --filter {' / '.join(args.filter or [])!r}")
        return 2
    write_results(path, env, {**config, "partial": False}, rates, results, skipped)
    print(f"device: {env['device']['name']} | torch {env['versions']['torch']} | commit {env['git_commit'][:12]}"
          f" | copy {rates['copy_gbps']:.1f} GB/s" + "".join(
              f" | {d} matmul {v:.2f} TFLOP/s" for d, v in rates.get("matmul_tflops", {}).items()))
    print(format_table(results))
    for b, why in skipped.items():
        print(f"skipped {b}: {why}")
    print(f"results: {path}")
    return 1 if any(c.status != "ok" for c in results) else 0


if __name__ == "__main__":
    sys.exit(main())
