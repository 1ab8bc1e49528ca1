"""The fast ASPP head with the fused ReLU + dropout (``fastshare.ops.relu_dropout``) against the same head
with ``torch.relu_`` + ``F.dropout`` (the two-pass form it replaced), forward + backward (issue 4, heads).

Cases (float32, CPU, training mode, dropout 0.5):

- ``head``: one task's paper head on ResNet-34 features, input ``[4, 512, 16, 16]``, width 1024, 40 classes,
  through :func:`fastshare.model.fast_heads.aspp_head_forward` (2 branches dilated 3x3, 2 pruned to 1x1).
- ``op``: ReLU + dropout alone on the head's largest activation, ``(B h w, 2 W) = [1024, 2048]`` (the two
  1x1 branches' first layer), forward + backward (plus the backward of the ``x * 1`` that makes the input a
  fresh activation, common to both variants).

Before timing, ``fused`` passes a pre-pass on the case's own inputs, output and every gradient: under one
``torch.manual_seed`` it must equal the same computation with the op's reference (``relu_dropout_ref``,
seeded as the op seeds itself; the masks are the same, relative error <= 1e-4 in norm); for ``head``, with
every ``nn.Dropout`` off, the fast head must also match the module's own forward within 1e-2 (float32 ReLU
flips near 0 move single gradients of the two ~2e-3 apart). ``two-pass`` is PyTorch's own.

Variants ``fused`` and ``two-pass`` run in one process on the same model and input, alternating round by
round so that machine load hits both alike; the ratio of their medians is printed and stored in
``extra_info`` together with the load average (the machine is shared). pytest-benchmark's own table times
the ``fused`` variant.

Run (2 threads)::

    OMP_NUM_THREADS=2 python -m pytest bench/bench_heads.py --benchmark-only -s

``FASTSHARE_BENCH_ROUNDS`` (default 7) sets the interleaved rounds.
"""

from __future__ import annotations

import contextlib
import os
from statistics import median
from typing import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from conftest import check_prepass, dropout_off
from fastshare.bench.common import backward_grads
from fastshare.bench.timing import Timed, interleaved_seconds, quantile
from fastshare.model import fast_heads
from fastshare.model.heads import ASPPHead
from fastshare.ops import relu_dropout

ROUNDS = int(os.environ.get("FASTSHARE_BENCH_ROUNDS", "7"))
B, C_IN, SIZE, WIDTH, CLASSES, P = 4, 512, 16, 1024, 40, 0.5
VARIANTS = ("fused", "two-pass")


def _two_pass(t: torch.Tensor, p: float) -> torch.Tensor:
    """The head's ReLU + dropout before the fused op (same signature as ``fast_heads._relu_dropout``:
    ``p = 0`` is inactive dropout): in-place ReLU, then F.dropout (float mask)."""
    t = torch.relu_(t)
    return F.dropout(t, p, True) if p > 0 else t


#: ReLU + dropout ``(t, p) -> out`` of each variant (``reference``: the pre-pass's yardstick, the op on its
#: reference backend, ``relu_dropout_ref``, which draws its seed as the fused variant does: under one
#: ``torch.manual_seed``, the same masks).
RELU_DROPOUT = {"fused": lambda t, p: relu_dropout(t, p, True), "two-pass": _two_pass,
                "reference": lambda t, p: relu_dropout(t, p, True, backend="reference")}


@contextlib.contextmanager
def _variant(name: str) -> Iterator[None]:
    """The fast head with ``name``'s ReLU + dropout (``fused``: the head's own, ``fast_heads._relu_dropout``)."""
    fused = fast_heads._relu_dropout
    if name != "fused":
        fast_heads._relu_dropout = RELU_DROPOUT[name]
    try:
        yield
    finally:
        fast_heads._relu_dropout = fused


def _report(benchmark, case: str, times: dict[str, list[float]], fused_step: Callable[[], object]) -> None:
    ratio = median(times["fused"]) / median(times["two-pass"])
    benchmark.pedantic(fused_step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    load = os.getloadavg()
    benchmark.extra_info.update({"case": case, "threads": torch.get_num_threads(), "seconds": times,
                                 "fused_over_two_pass": ratio, "load_avg": load})
    line = ", ".join(f"{v} {median(t) * 1e3:.1f} ms (p20-p80 {quantile(t, 0.2) * 1e3:.1f}-"
                     f"{quantile(t, 0.8) * 1e3:.1f})" for v, t in times.items())
    print(f"\n{case} fwd+bwd (median of {len(times['fused'])} interleaved rounds, {torch.get_num_threads()} "
          f"threads, load {load[0]:.1f}): {line}; fused / two-pass = {ratio:.3f}")


@pytest.fixture(scope="module")
def head_case():
    torch.manual_seed(0)
    head = ASPPHead(C_IN, CLASSES, width=WIDTH, dropout=P).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C_IN, SIZE, SIZE, generator=g)
    grad = torch.randn(B, CLASSES, SIZE, SIZE, generator=g)
    return head, x, grad


def _head_results(head: ASPPHead, x: torch.Tensor, grad: torch.Tensor, variant: str | None
                  ) -> dict[str, torch.Tensor | None]:
    """Output and parameter gradients of the fast head under ``variant`` (None: the module's forward), from
    ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    if variant is None:
        out = head(x)
    else:
        with _variant(variant):
            out = fast_heads.aspp_head_forward(head, x)
    names, params = zip(*head.named_parameters())
    return {"output": out.detach(), **{f"grad {n}": g for n, g in zip(names, backward_grads(out, params, grad))}}


@pytest.mark.benchmark(group="heads")
def test_head_fwd_bwd(benchmark, head_case):
    head, x, grad = head_case
    check_prepass("fused head", _head_results(head, x, grad, "fused"), _head_results(head, x, grad, "reference"),
                  1e-4)
    with dropout_off(head):
        check_prepass("fast head, dropout off", _head_results(head, x, grad, "fused"),
                      _head_results(head, x, grad, None), 1e-2)

    def run(variant: str) -> None:
        with _variant(variant):
            head.zero_grad(set_to_none=True)
            fast_heads.aspp_head_forward(head, x).backward(grad)

    times = interleaved_seconds({v: Timed(lambda _, v=v: run(v)) for v in VARIANTS}, ROUNDS)
    _report(benchmark, f"head [{B},{C_IN},{SIZE},{SIZE}] width {WIDTH}", times, lambda: run("fused"))


@pytest.mark.benchmark(group="heads")
def test_relu_dropout_op_fwd_bwd(benchmark):
    g = torch.Generator().manual_seed(2)
    shape = (B * SIZE * SIZE, 2 * WIDTH)
    a = torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g)
    leaf = a.requires_grad_()

    def fresh_activation(_: int) -> torch.Tensor:
        """Not timed: as in the head, relu_ works in place on a fresh activation."""
        leaf.grad = None
        return leaf * 1.0

    def run(variant: str, h: torch.Tensor) -> dict[str, torch.Tensor]:
        out = RELU_DROPOUT[variant](h, P)
        out.backward(grad)  # also the backward of h = leaf * 1 (one pass, common to both)
        return {"output": out, "grad": leaf.grad}

    def seeded(variant: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        return run(variant, fresh_activation(0))

    check_prepass("fused op", seeded("fused"), seeded("reference"), 1e-4)
    times = interleaved_seconds({v: Timed(lambda h, v=v: run(v, h), fresh_activation) for v in VARIANTS}, ROUNDS)
    _report(benchmark, f"relu+dropout op {list(shape)}", times, lambda: run("fused", fresh_activation(0)))
