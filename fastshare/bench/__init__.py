"""Benchmarks: the ``fastshare bench`` suite (``python -m fastshare.bench``) and its helpers.

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

Modules: :mod:`~fastshare.bench.timing` (interleaved timing), :mod:`~fastshare.bench.rates` (copy
bandwidth, matmul rate, bytes moved), :mod:`~fastshare.bench.environment` (device, versions, commit,
source digest), :mod:`~fastshare.bench.prepass` (correctness pre-pass), :mod:`~fastshare.bench.results`
(records, result files, table), :mod:`~fastshare.bench.config` (the suite per machine),
:mod:`~fastshare.bench.op_cases`, :mod:`~fastshare.bench.blocks`, :mod:`~fastshare.bench.steps` (the
cases), :mod:`~fastshare.bench.suite` (``run_suite`` and the command line).
"""

from fastshare.bench.environment import device_name, device_slug, environment, git_commit, source_digest
from fastshare.bench.prepass import (ORACLE_FLOOR, PrepassError, check_close, check_gated_residual, check_oracle,
                                     gated_residual_inputs)
from fastshare.bench.rates import (GATED_RESIDUAL_ELEMENT_IO, MatmulRates, gated_residual_bytes, gbps,
                                   measure_copy_bandwidth, measure_matmul_tflops, rotation_copies)
from fastshare.bench.results import (SCHEMA, CaseResult, default_results_path, format_table, validate_results,
                                     write_results)
from fastshare.bench.config import SuiteConfig, suite_config
from fastshare.bench.op_cases import op_backends, op_forward
from fastshare.bench.steps import (StepVariant, capture_cuda_graph, nyu_example_policy, run_step_cases, step_policy,
                                   step_variants)
from fastshare.bench.suite import main, run_suite
from fastshare.bench.timing import Timed, TimingStats, interleaved_seconds, quantile, time_interleaved, timing_stats

__all__ = [
    "SCHEMA", "TimingStats", "Timed", "PrepassError", "CaseResult", "SuiteConfig", "MatmulRates", "StepVariant",
    "quantile", "timing_stats", "time_interleaved", "interleaved_seconds",
    "GATED_RESIDUAL_ELEMENT_IO", "gated_residual_bytes", "gbps", "measure_copy_bandwidth", "measure_matmul_tflops",
    "rotation_copies",
    "device_slug", "device_name", "git_commit", "source_digest", "environment",
    "ORACLE_FLOOR", "check_close", "check_gated_residual", "check_oracle", "gated_residual_inputs",
    "op_forward", "op_backends",
    "write_results", "validate_results", "default_results_path", "format_table",
    "suite_config", "nyu_example_policy", "step_policy", "step_variants", "capture_cuda_graph", "run_step_cases",
    "run_suite", "main",
]
