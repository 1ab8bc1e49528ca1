"""Batched executor vs the sequential reference: one full policy-learning step (issue 4 targets).

Setup: Deeplab-ResNet-18 and -34, paper heads (ASPP width 1024, dropout 0.5), K = 3 tasks (40 / 3 / 1
classes), B = 4 images of 128 x 128, float32 on the CPU. One step = Gumbel gates (soft, tau 5) at
curriculum stage 1 or L, forward, the three task losses, backward, SGD step over every parameter. All
variants share one model and input in this process; rounds alternate between them so that machine load
hits them alike.

Variants:

- ``sequential``: the reference executor (one backbone pass per task, module heads).
- ``batched``: shared prefix once, tasks stacked after it, segmented BN, fused gated residual, fast heads.
- ``batched-plain-heads``: the batched executor with the heads' own forward (shows what the fast heads
  contribute).
- ``batched-channels-last``: ``batched`` on a channels_last input (the whole backbone then runs
  channels_last).

Before timing, each batched variant passes a pre-pass on the step's own inputs, without the optimiser step
and with every ``nn.Dropout`` off (the executors draw different masks): its task outputs and parameter
gradients against the sequential step's (``STEP_OUTPUT_RTOL``, ``STEP_GRAD_RTOL`` in bench/conftest.py).

Targets (median over sequential): ResNet-34 stage 1 <= 0.65, stage L <= 0.90; ResNet-18 stage 1 <= 0.75,
stage L <= 0.90.

Run (2 threads, as measured for the issue)::

    OMP_NUM_THREADS=2 python -m pytest bench/bench_executors.py -o python_files='bench_*.py' \
        --benchmark-only --benchmark-group-by=group -s

``FASTSHARE_BENCH_ROUNDS`` (default 5) sets the interleaved rounds; the ratio lines printed at the end
(and stored in ``extra_info``) compare their medians.
"""

from __future__ import annotations

import os
from statistics import median

import pytest
import torch

from conftest import check_step_variants, step_results
from fastshare.bench.timing import Timed, interleaved_seconds
from fastshare.executors import batched as batched_module
from fastshare.model import AdaShareNet

ROUNDS = int(os.environ.get("FASTSHARE_BENCH_ROUNDS", "5"))
TASKS = {"seg": 40, "sn": 3, "depth": 1}
B, SIZE = 4, 128
VARIANTS = ("sequential", "batched", "batched-plain-heads", "batched-channels-last")


def _setup(backbone: str):
    torch.manual_seed(0)
    model = AdaShareNet(backbone, TASKS).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, SIZE, SIZE, generator=g)
    targets = {"seg": torch.randint(0, 40, (B, SIZE, SIZE), generator=g),
               "sn": torch.randn(B, 3, SIZE, SIZE, generator=g),
               "depth": torch.rand(B, 1, SIZE, SIZE, generator=g) + 0.1}
    u = torch.rand(tuple(model.logits.shape), generator=g).clamp_(1e-6, 1 - 1e-6)
    # A tiny learning rate keeps the model (and so the work per step) the same across rounds.
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    return model, x, targets, u, opt


@pytest.fixture(scope="module", params=["resnet18", "resnet34"])
def setup(request):
    return (request.param,) + _setup(request.param)


def _forward_backward(setup, stage: int, variant: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """Forward and backward of ``variant`` (no optimiser step): its task outputs and parameter gradients."""
    _, model, x, targets, u, _ = setup
    executor = "sequential" if variant == "sequential" else "batched"
    head = batched_module._head
    if variant == "batched-plain-heads":
        batched_module._head = lambda module, h: module(h)
    inp = x.contiguous(memory_format=torch.channels_last) if variant == "batched-channels-last" else x
    try:
        gates = model.gates("sample", tau=5.0, hard=False, num_train_layers=stage, u=u)
        out = model(inp, gates, executor=executor)
    finally:
        batched_module._head = head
    return step_results(model, out, targets)


def _policy_step(setup, stage: int, variant: str) -> None:
    """One policy-learning step of ``variant``."""
    _forward_backward(setup, stage, variant)
    setup[-1].step()


@pytest.mark.benchmark(group="policy_step")
@pytest.mark.parametrize("stage_of", ["1", "L"])
def test_policy_step(benchmark, setup, stage_of):
    backbone, model = setup[0], setup[1]
    stage = 1 if stage_of == "1" else model.num_blocks
    check_step_variants(f"{backbone} stage {stage}", model, lambda v: _forward_backward(setup, stage, v), VARIANTS)
    times = interleaved_seconds({v: Timed(lambda _, v=v: _policy_step(setup, stage, v)) for v in VARIANTS}, ROUNDS)
    base = median(times["sequential"])
    ratios = {v: median(t) / base for v, t in times.items() if v != "sequential"}
    benchmark.pedantic(_policy_step, args=(setup, stage, "batched"), rounds=ROUNDS, iterations=1,
                       warmup_rounds=0)
    benchmark.extra_info.update({"backbone": backbone, "stage": stage, "threads": torch.get_num_threads(),
                                 "seconds": times, "over_sequential": ratios, "load_avg": os.getloadavg()})
    line = ", ".join(f"{v} {median(t):.3f} s" for v, t in times.items())
    print(f"\n{backbone} stage {stage} policy step (median of {ROUNDS} interleaved rounds, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}): {line}; over sequential: "
          + ", ".join(f"{v} {r:.3f}" for v, r in ratios.items()))
