"""``fastshare bench``: run the suite that fits the machine, print one table, write the result file."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fastshare.bench.blocks import run_block_cases
from fastshare.bench.config import STEP_PRECISIONS, SuiteConfig, suite_config
from fastshare.bench.common import cudnn_flags, log
from fastshare.bench.environment import environment
from fastshare.bench.op_cases import run_op_cases
from fastshare.bench.rates import MatmulRates, measure_copy_bandwidth
from fastshare.bench.results import CaseResult, default_results_path, format_table, write_results
from fastshare.bench.steps import run_step_cases
from fastshare.ops.pruned_conv import split_choices


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
    p.add_argument("--precisions", default=None, metavar="LIST",
                   help="comma-separated step precisions to run (default: the machine's suite; "
                   f"choose from {', '.join(STEP_PRECISIONS)})")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="run every case with cuDNN's algorithm search (torch.backends.cudnn.benchmark = True) "
                   "instead of its heuristics; recorded as config.cudnn_benchmark. A whole run, not a variant: "
                   "cuDNN caches one plan per convolution whichever way it was chosen")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``fastshare bench``: run the suite, print the table, write the result file. Returns 0, or 1 when a
    case failed its pre-pass or errored."""
    args = _parse(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        log("fastshare bench: --device cuda but torch sees no CUDA device")
        return 2
    cfg = suite_config(device, args.quick)
    if args.precisions is not None:
        wanted = [p.strip() for p in args.precisions.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in STEP_PRECISIONS]
        if unknown or not wanted:
            log(f"fastshare bench: --precisions {args.precisions!r}: choose from {', '.join(STEP_PRECISIONS)}")
            return 2
        cfg.step = {**cfg.step, "precisions": wanted}
    env = environment(device)
    if args.out is None:
        path = default_results_path(device)
    else:
        path = Path(args.out)
        if path.suffix != ".json":
            path = default_results_path(device, root=path)
    config = {**dataclasses.asdict(cfg), "filter": args.filter, "step_fp32_tf32": False,
              "cudnn_benchmark": args.cudnn_benchmark}

    def run_config(partial: bool) -> dict[str, Any]:
        # The fast heads' split choices are made while the steps run (timed per shape on CUDA).
        return {**config, "partial": partial,
                "conv_split": {"mode": os.environ.get("FASTSHARE_CONV_SPLIT", "auto"), "choices": split_choices()}}

    def partial(rates: dict[str, Any], done: list[CaseResult], skipped: dict[str, str]) -> None:
        write_results(path, env, run_config(True), rates, done, skipped)

    with cudnn_flags(benchmark=args.cudnn_benchmark):
        rates, results, skipped = run_suite(cfg, args.filter, progress=partial)
    if not results:
        log(f"fastshare bench: no case matches --filter {' / '.join(args.filter or [])!r}")
        return 2
    write_results(path, env, run_config(False), rates, results, skipped)
    print(f"device: {env['device']['name']} | torch {env['versions']['torch']} | commit {env['git_commit'][:12]}"
          f" | copy {rates['copy_gbps']:.1f} GB/s" + "".join(
              f" | {d} matmul {v:.2f} TFLOP/s" for d, v in rates.get("matmul_tflops", {}).items()))
    print(format_table(results))
    for b, why in skipped.items():
        print(f"skipped {b}: {why}")
    print(f"results: {path}")
    return 1 if any(c.status != "ok" for c in results) else 0
