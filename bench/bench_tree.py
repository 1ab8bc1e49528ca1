"""Tree executor vs the sequential reference on AdaShare's NYU 3-task example policy (issue 5 targets).

Setup: Deeplab-ResNet-34, paper heads (ASPP width 1024, dropout 0.5), K = 3 tasks (40 / 3 / 1 classes),
B = 4 images of 128 x 128, float32 on the CPU. Policy over blocks 0..15: task 1 skips block 6, task 2 skips
9, 10, 11, task 3 skips 5, 10, 11. Both executors run the same model, policy and inputs in this process;
rounds alternate between the two executors so that machine load hits both alike.

- ``retrain_step``: forward, sum of the three task losses, backward, SGD step (target: tree <= 0.85x).
- ``inference``: one eval-mode forward under ``torch.no_grad`` (target: tree <= 0.80x).
- ``flops``: FlopCounterMode counts of one forward of each executor; the tree / sequential ratio is the
  count from the layer shapes (about 0.86 for the backbone, 0.93 for the whole forward).

Run (2 threads, as measured for the issue)::

    OMP_NUM_THREADS=2 python -m pytest bench/bench_tree.py -o python_files='bench_*.py' \
        --benchmark-only --benchmark-group-by=group -s

The ratio lines printed at the end (and stored in ``extra_info``) compare medians of the interleaved rounds.
Before timing, each tree variant passes a pre-pass on the case's own inputs, without the optimiser step and
with every ``nn.Dropout`` off (the executors draw different masks): its task outputs and (re-train)
parameter gradients against the sequential executor's (``STEP_OUTPUT_RTOL``, ``STEP_GRAD_RTOL`` in
bench/conftest.py).
"""

from __future__ import annotations

import os
from statistics import median

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import check_step_variants, step_results
from fastshare.bench.steps import nyu_example_policy
from fastshare.bench.timing import Timed, interleaved_seconds
from fastshare.executors import tree as tree_module
from fastshare.model import AdaShareNet

ROUNDS = int(os.environ.get("FASTSHARE_BENCH_ROUNDS", "5"))
TASKS = {"seg": 40, "sn": 3, "depth": 1}
B, SIZE = 4, 128


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = AdaShareNet("resnet34", TASKS)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, SIZE, SIZE, generator=g)
    targets = {"seg": torch.randint(0, 40, (B, SIZE, SIZE), generator=g),
               "sn": torch.randn(B, 3, SIZE, SIZE, generator=g),
               "depth": torch.rand(B, 1, SIZE, SIZE, generator=g) + 0.1}
    gates = model.gates("fixed", policy=nyu_example_policy())
    opt = torch.optim.SGD(model.network_parameters(), lr=1e-6, momentum=0.9)
    return model, x, targets, gates, opt


def _forward_backward(setup, executor: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """Forward and backward of the re-train step (no optimiser step): task outputs and parameter gradients."""
    model, x, targets, gates, _ = setup
    return step_results(model, model(x, gates, executor=executor), targets)


def _retrain_step(setup, executor: str) -> None:
    """Forward, the three task losses, backward, SGD step (training mode: set by the test)."""
    _forward_backward(setup, executor)
    setup[-1].step()


def _inference(setup, executor: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """One forward without gradients (eval mode: set by the test): the task outputs (and no gradients)."""
    model, x, _, gates, _ = setup
    with torch.no_grad():
        return model(x, gates, executor=executor), {}


def _call(fn, setup, variant: str):
    """``fn`` under ``variant``; ``tree-plain-heads`` is the tree executor with the heads' own forward."""
    fast_heads = tree_module._head_forward
    if variant == "tree-plain-heads":
        tree_module._head_forward = None
    try:
        return fn(setup, "sequential" if variant == "sequential" else "tree")
    finally:
        tree_module._head_forward = fast_heads


def _record(benchmark, what: str, fn, setup, results) -> None:
    """Pre-pass with ``results`` (the step's outputs and gradients, dropout off), then time ``fn``."""
    variants = ["sequential", "tree"] + (["tree-plain-heads"] if tree_module._head_forward is not None else [])
    check_step_variants(what, setup[0], lambda v: _call(results, setup, v), variants)
    times = interleaved_seconds({v: Timed(lambda _, v=v: _call(fn, setup, v)) for v in variants}, ROUNDS)
    base = median(times["sequential"])
    ratios = {v: median(t) / base for v, t in times.items() if v != "sequential"}
    # pytest-benchmark's own timing of the tree executor, plus the interleaved comparison in extra_info.
    benchmark.pedantic(fn, args=(setup, "tree"), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({"threads": torch.get_num_threads(), "seconds": times,
                                 "over_sequential": ratios, "load_avg": os.getloadavg()})
    line = ", ".join(f"{v} {median(t):.3f} s" for v, t in times.items())
    print(f"\n{what} (median of {ROUNDS} interleaved rounds, {torch.get_num_threads()} threads, load "
          f"{os.getloadavg()[0]:.1f}): {line}; over sequential: "
          + ", ".join(f"{v} {r:.3f}" for v, r in ratios.items()))


@pytest.mark.benchmark(group="retrain_step")
def test_retrain_step(benchmark, setup):
    setup[0].train()
    _record(benchmark, "retrain step", _retrain_step, setup, _forward_backward)


@pytest.mark.benchmark(group="inference")
def test_inference(benchmark, setup):
    setup[0].eval()
    _record(benchmark, "inference", _inference, setup, _inference)


@pytest.mark.benchmark(group="flops")
def test_flops(benchmark, setup):
    model, x, _, gates, _ = setup
    model.eval()
    counts = {}
    for name in ("sequential", "tree"):
        with torch.no_grad():
            model(x, gates, executor=name)  # warm-up: the heads time their split convolutions uncounted
        with torch.no_grad(), FlopCounterMode(display=False) as total:
            model(x, gates, executor=name)
        counts[name] = total.get_total_flops()
    from fastshare import export

    report = export(model, nyu_example_policy()).report((B, 3, SIZE, SIZE))
    ratio = counts["tree"] / counts["sequential"]
    benchmark.extra_info.update({
        "flops_sequential": counts["sequential"], "flops_tree": counts["tree"], "flops_ratio": ratio,
        "backbone_flops_ratio": report.ratios["backbone_flops_vs_single_task"], "report": report.to_dict()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    # The compact report counts the plain heads (the layer shapes); the tree executor's count is lower
    # when it runs the fast heads, whose pruned dilated taps skip multiplications by zero padding.
    shapes = report.flops_total / report.flops_single_task
    print(f"\nFLOPs of one forward: sequential {counts['sequential'] / 1e9:.1f} G, tree executor "
          f"{counts['tree'] / 1e9:.1f} G (ratio {ratio:.4f}); from the layer shapes (plain heads): whole "
          f"forward {shapes:.4f}, backbone {report.ratios['backbone_flops_vs_single_task']:.4f}\n{report}")
    assert report.flops_single_task == counts["sequential"]
