"""Gated-residual op cases: each backend against the eager reference and ``torch.compile`` of it."""

from __future__ import annotations

from typing import Callable

import torch

from fastshare import reference
from fastshare.bench.common import data_checks, finish_ratios, log, shape_str
from fastshare.bench.config import DTYPES, SuiteConfig, timing_kwargs
from fastshare.bench.prepass import (GatedResidualInputs, OpForward, PrepassError, check_gated_residual,
                                     gated_residual_inputs)
from fastshare.bench.rates import PASSES, cache_bytes, gated_residual_bytes, gbps, rotation_copies
from fastshare.bench.results import CaseResult
from fastshare.bench.timing import Timed, TimingStats, time_interleaved


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


def op_timed(forward: OpForward, sets: list[GatedResidualInputs], pass_: str) -> Timed:
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


def run_op_cases(cfg: SuiteConfig, device: torch.device, copy_bw: float, selected: Callable[[str], bool]
                 ) -> tuple[list[CaseResult], dict[str, str]]:
    """Gated-residual op: every shape x dtype x variant x pass that ``selected`` keeps."""
    results: list[CaseResult] = []
    skipped_all: dict[str, str] = {}
    cache = cache_bytes(device)
    for shape in cfg.op_shapes:
        for dname in cfg.op_dtypes:
            dtype = DTYPES[dname]
            variants, skipped = op_backends(device, dtype)
            skipped_all.update({f"{b}/{dname}": why for b, why in skipped.items()})
            group = f"gr/{shape_str(shape)}/{dname}"
            names = {(v, p): f"{group}/{v}/{p}" for v in variants for p in PASSES}
            wanted = {k: n for k, n in names.items() if selected(n)}
            if not wanted:
                continue
            log(f"[bench] {group}: {', '.join(sorted({v for v, _ in wanted}))}")
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
                items = {v: op_timed(forwards[v], sets, p) for (v, q) in wanted if q == p and v not in failed}
                stats: dict[str, TimingStats] = {}
                if items:
                    try:
                        with data_checks(cfg.data_checks_while_timing):
                            stats = time_interleaved(items, device, **timing_kwargs(cfg, len(items)))
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
    finish_ratios(results, "reference", "vs_reference")
    finish_ratios(results, "compile", "vs_compile")
    return results, skipped_all
