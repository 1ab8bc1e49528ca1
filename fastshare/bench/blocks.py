"""Gated-block cases: the sequential reference against one batched call with each op backend."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from fastshare import reference
from fastshare.bench.common import backward_grads, data_checks, finish_ratios, log, record_timed, shape_str
from fastshare.bench.config import DTYPES, SuiteConfig, timing_kwargs
from fastshare.bench.op_cases import op_backends
from fastshare.bench.prepass import ORACLE_FLOOR, PrepassError, check_oracle
from fastshare.bench.rates import MatmulRates
from fastshare.bench.results import CaseResult
from fastshare.bench.timing import Timed, time_interleaved


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


def run_block_cases(cfg: SuiteConfig, device: torch.device, matmul: "MatmulRates",
                    selected: Callable[[str], bool]) -> list[CaseResult]:
    """Gated block: sequential reference vs batched with each backend; fwd and fwd+bwd."""
    from fastshare.model.backbone import BasicBlock

    results: list[CaseResult] = []
    k = cfg.segments
    for shape in cfg.block_shapes:
        for dname in cfg.block_dtypes:
            dtype = DTYPES[dname]
            group = f"block/{shape_str(shape)}/{dname}"
            variants = _block_variants(device, dtype)
            wanted = {(v, p): f"{group}/{v}/{p}" for v in variants for p in ("fwd", "fwd+bwd")}
            wanted = {key: n for key, n in wanted.items() if selected(n)}
            if not wanted:
                continue
            log(f"[bench] {group}")
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
                return [out.detach(), *backward_grads(out, [xl, al, *blk.parameters()], grad.to(dt))]

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
                        return backward_grads(fns[v](xl, al, u), [xl, al, *params_list], grad)
                    return run

                items = {v: Timed(call(v)) for (v, q) in wanted if q == p and v not in failed}
                with data_checks(cfg.data_checks_while_timing):
                    stats = time_interleaved(items, device, **timing_kwargs(cfg, len(items))) if items else {}
                for (v, q), name in wanted.items():
                    if q != p:
                        continue
                    res = CaseResult(name, group, v, p, params=params)
                    if v in failed:
                        res.status, res.error = "FAILED", failed[v]
                        results.append(res)
                        continue
                    record_timed(res, items[v].run, params_list, device, stats[v], mm_rate)
                    results.append(res)
    finish_ratios(results, "sequential", "vs_reference")
    return results
