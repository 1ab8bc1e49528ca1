"""The K task heads batched across tasks against the loop over tasks that the batched executor runs
(issue 4: "batch them across tasks where that is faster; measure it"), forward + backward.

The K heads have the same shapes but their own weights, so "batched" means one ``baddbmm`` over K weight
sets for the branches whose first convolution is pruned to 1x1 and for the ``W -> W`` layers, and one
grouped convolution (``groups = K``) for the dilated 3x3 branches, on the task-stacked features
``(K B, C, h, w)``; ``across-tasks-mm`` batches only the matmuls and keeps one 3x3 convolution per task.
The ``W -> classes`` layers stay a loop (the class counts differ). Both variants use
:mod:`fastshare.model.fast_heads`' exact tap pruning; dropout is off so that the pre-check can compare
them exactly (its masks are the same work in both).

Setup (the issue-4 CPU case): K = 3 heads (40 / 3 / 1 classes), width 1024, ResNet-34 features of B = 4
images of 128 x 128: ``(12, 512, 16, 16)`` (rates 18 and 24 prune to 1x1, rates 6 and 12 stay 3x3).

Run (2 threads)::

    OMP_NUM_THREADS=2 python -m pytest bench/bench_heads_across_tasks.py -o python_files='bench_*.py' \\
        --benchmark-only -s

``FASTSHARE_BENCH_ROUNDS`` (default 7) sets the interleaved rounds; the ratio of the medians is printed
and stored in ``extra_info``.
"""

from __future__ import annotations

import copy
import os
from statistics import median

import pytest
import torch
import torch.nn.functional as F

from fastshare.bench.timing import Timed, interleaved_seconds
from fastshare.model.fast_heads import aspp_head_forward
from fastshare.ops.pruned_conv import pruned_dilated_kernel
from fastshare.model.heads import ASPPHead

ROUNDS = int(os.environ.get("FASTSHARE_BENCH_ROUNDS", "7"))
K, B, C_IN, SIZE, WIDTH, CLASSES = 3, 4, 512, 16, 1024, (40, 3, 1)
VARIANTS = ("loop", "across-tasks", "across-tasks-mm")


def heads_loop(heads: list[ASPPHead], h: torch.Tensor) -> list[torch.Tensor]:
    """What the batched executor does: task ``k``'s head on rows ``kB:(k+1)B``."""
    b = h.shape[0] // len(heads)
    return [aspp_head_forward(head, h[k * b:(k + 1) * b]) for k, head in enumerate(heads)]


def heads_across_tasks(heads: list[ASPPHead], h: torch.Tensor, grouped_conv: bool = True) -> list[torch.Tensor]:
    """The same outputs with each layer batched over the K heads (dropout must be off); with
    ``grouped_conv=False`` the dilated 3x3 convolutions stay one per task (only the matmuls are batched)."""
    k = len(heads)
    bsz, c, hh, ww = h.shape[0] // k, h.shape[1], h.shape[2], h.shape[3]
    n = bsz * hh * ww
    branches = [head.branches() for head in heads]  # [k][j]
    n_branches = len(branches[0])
    pruned = [[pruned_dilated_kernel(br.conv1.weight, br.conv1.dilation[0], hh, ww) for br in task]
              for task in branches]
    rows = h.view(k, bsz, c, hh, ww).permute(0, 1, 3, 4, 2).reshape(k, n, c)  # (K, N, C)
    hidden: list[torch.Tensor | None] = [None] * n_branches  # (K, N, W) per branch
    point = [j for j in range(n_branches) if pruned[0][j][0].shape[2:] == (1, 1)]
    if point:
        w1 = torch.stack([torch.cat([pruned[t][j][0].reshape(WIDTH, c) for j in point]) for t in range(k)])
        b1 = torch.stack([torch.cat([branches[t][j].conv1.bias for j in point]) for t in range(k)])
        a = torch.relu_(torch.baddbmm(b1.unsqueeze(1), rows, w1.transpose(1, 2)))
        for i, j in enumerate(point):
            hidden[j] = a[:, :, i * WIDTH:(i + 1) * WIDTH]
    grouped = None
    for j in range(n_branches):
        if hidden[j] is not None:
            continue
        if not grouped_conv:
            conv = branches[0][j].conv1
            xc = h.contiguous(memory_format=torch.channels_last)
            per_task = [F.conv2d(xc[t * bsz:(t + 1) * bsz], pruned[t][j][0], branches[t][j].conv1.bias, 1,
                                 pruned[t][j][1], conv.dilation) for t in range(k)]
            hidden[j] = torch.relu_(torch.stack([o.permute(0, 2, 3, 1).reshape(n, WIDTH) for o in per_task]))
            continue
        if grouped is None:
            grouped = h.view(k, bsz, c, hh, ww).transpose(0, 1).reshape(bsz, k * c, hh, ww)
        kernel, pad = pruned[0][j]
        conv = branches[0][j].conv1
        weight = torch.cat([pruned[t][j][0] for t in range(k)])
        bias = torch.cat([branches[t][j].conv1.bias for t in range(k)])
        out = F.conv2d(grouped, weight, bias, 1, pad, conv.dilation, groups=k)  # (B, K W, h, w)
        hidden[j] = torch.relu_(out.view(bsz, k, WIDTH, hh, ww).permute(1, 0, 3, 4, 2).reshape(k, n, WIDTH))
    h2 = []
    for j in range(n_branches):
        w2 = torch.stack([branches[t][j].conv2.weight.reshape(WIDTH, WIDTH) for t in range(k)])
        b2 = torch.stack([branches[t][j].conv2.bias for t in range(k)])
        h2.append(torch.relu_(torch.baddbmm(b2.unsqueeze(1), hidden[j], w2.transpose(1, 2))))
    outs = []
    for t in range(k):
        bias = torch.stack([br.conv3.bias for br in branches[t]]).sum(0)
        out = None
        for j, br in enumerate(branches[t]):
            w3 = br.conv3.weight.reshape(br.conv3.out_channels, -1).t()
            out = torch.addmm(bias if out is None else out, h2[j][t], w3)
        outs.append(out.reshape(bsz, hh, ww, -1).permute(0, 3, 1, 2).contiguous())
    return outs


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    heads = [ASPPHead(C_IN, classes, width=WIDTH, dropout=0.0).train() for classes in CLASSES]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(K * B, C_IN, SIZE, SIZE, generator=g)
    grads = [torch.randn(B, classes, SIZE, SIZE, generator=g) for classes in CLASSES]
    return heads, h, grads


def _run(heads, h, grads, variant):
    """Outputs and the gradients of every head parameter and of the features."""
    leaf = h.detach().requires_grad_(True)
    for head in heads:
        head.zero_grad(set_to_none=True)
    if variant == "loop":
        outs = heads_loop(heads, leaf)
    else:
        outs = heads_across_tasks(heads, leaf, grouped_conv=variant == "across-tasks")
    torch.autograd.backward(outs, grads)
    return outs, [leaf.grad] + [p.grad for head in heads for p in head.parameters()]


def test_across_tasks_equals_loop(case):
    """In float64 (in float32, ReLU units within rounding of 0 flip between the two summation orders and
    move the feature gradient by ~1 % of its largest entry)."""
    heads, h, grads = case
    heads64 = [copy.deepcopy(head).double() for head in heads]
    h64, grads64 = h.double(), [g.double() for g in grads]
    out_a, g_a = _run(heads64, h64, grads64, "loop")
    for variant in VARIANTS[1:]:
        out_b, g_b = _run(heads64, h64, grads64, variant)
        # outputs, features, 4 branches x 3 convs x (weight, bias) per head
        assert len(out_a + g_a) == len(out_b + g_b) == K + 1 + 24 * K
        for a, b in zip(out_a + g_a, out_b + g_b):
            assert a is not None and b is not None
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * float(a.abs().max()))


@pytest.mark.benchmark(group="heads-across-tasks")
def test_heads_fwd_bwd(benchmark, case):
    heads, h, grads = case
    times = interleaved_seconds({v: Timed(lambda _, v=v: _run(heads, h, grads, v)) for v in VARIANTS}, ROUNDS)
    med = {v: median(t) for v, t in times.items()}
    ratios = {v: med[v] / med["loop"] for v in VARIANTS[1:]}
    benchmark.pedantic(lambda: _run(heads, h, grads, "across-tasks"), rounds=ROUNDS, iterations=1,
                       warmup_rounds=0)
    load = os.getloadavg()
    benchmark.extra_info.update({"seconds": times, "over_loop": ratios, "load_avg": load,
                                 "threads": torch.get_num_threads()})
    print(f"\nK={K} heads on ({K * B}, {C_IN}, {SIZE}, {SIZE}), width {WIDTH}, fwd+bwd, {torch.get_num_threads()} "
          f"threads, load {load[0]:.1f}: " + ", ".join(f"{v} {med[v] * 1e3:.1f} ms" for v in VARIANTS)
          + "; over loop: " + ", ".join(f"{v} {r:.3f}" for v, r in ratios.items()))
