"""The ASPP heads' dilated 3x3 convolution, split into zero-padding-free bands
(:func:`fastshare.ops.pruned_conv.pruned_conv3x3`, ``split=True``) against the one padded ``F.conv2d``,
forward + backward (input, weight and bias gradients).

Cases: the first convolution of an ASPP branch on ResNet-34/18 features, ``C_in = 512 -> 1024``, at each
rate ``d``; CUDA: ``[16, 512, 41, 41]`` (B = 16 at 321 x 321) in IEEE float32 (TF32 off) and in bf16 +
channels_last; CPU: ``[4, 512, 16, 16]`` (the CPU step size, 128 x 128; rates 18 and 24 are 1x1 there
either way) and ``[2, 512, 41, 41]`` in float32, channels_last (oneDNN's layout in the fast heads).

Before timing, ``split``'s output and gradients must match ``padded``'s (pre-pass: relative error, in
norm, <= 1e-4 in float32 and 1e-2 in bf16, ``fastshare.bench.prepass.ORACLE_FLOOR``; the two differ only
in summation order).

Variants ``split`` and ``padded`` run in one process on the same tensors, alternating round by round
(``fastshare.bench.timing.time_interleaved``); the ratio of their medians (``split / padded``: below 1
means the split is faster) and the share of multiply-adds the split keeps (``live_fraction``) are printed
and stored in ``extra_info`` with the raw times. This is the comparison that ``FASTSHARE_CONV_SPLIT=auto``
makes on the first call of each shape.

Run::

    python -m pytest bench/bench_pruned_conv.py --benchmark-only -s

``FASTSHARE_BENCH_ROUNDS`` (default 7) sets the interleaved rounds.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import check_prepass
from fastshare.bench.prepass import ORACLE_FLOOR
from fastshare.bench.timing import Timed, time_interleaved
from fastshare.ops.pruned_conv import live_tap_fraction, pruned_conv3x3

ROUNDS = int(os.environ.get("FASTSHARE_BENCH_ROUNDS", "7"))
C_OUT = 1024
RATES = (6, 12, 18, 24)
VARIANTS = ("split", "padded")


def _cases(device: torch.device) -> list[tuple[list[int], int, torch.dtype]]:
    if device.type == "cuda":
        return [([16, 512, 41, 41], d, dt) for dt in (torch.float32, torch.bfloat16) for d in RATES]
    return ([([4, 512, 16, 16], d, torch.float32) for d in (6, 12)]
            + [([2, 512, 41, 41], d, torch.float32) for d in RATES])


def _results(variant: str, leaves: list[torch.Tensor], grad: torch.Tensor, d: int) -> dict[str, torch.Tensor]:
    """Output and x, weight, bias gradients of ``split`` or ``padded`` on ``leaves = [x, weight, bias]``."""
    if variant == "split":
        out = pruned_conv3x3(*leaves, d, split=True)
    else:
        out = F.conv2d(*leaves, 1, d, d)
    grads = torch.autograd.grad(out, leaves, grad)
    return dict(zip(("output", "grad x", "grad weight", "grad bias"), (out, *grads)))


@pytest.mark.benchmark(group="pruned-conv")
@pytest.mark.parametrize("index", range(8))
def test_pruned_conv_fwd_bwd(benchmark, device, index):
    cases = _cases(device)
    if index >= len(cases):
        pytest.skip(f"{device.type} has {len(cases)} cases")
    shape, d, dtype = cases[index]
    gen = torch.Generator(device=device).manual_seed(index)
    # The fast heads' layouts: channels_last on the CPU and in bf16; NCHW for CUDA float32 (cuDNN is slow
    # there in channels_last).
    layout = torch.channels_last if device.type == "cpu" or dtype != torch.float32 else torch.contiguous_format
    x = torch.randn(shape, device=device, generator=gen).to(dtype).contiguous(memory_format=layout)
    weight = (torch.randn(C_OUT, shape[1], 3, 3, device=device, generator=gen) * 0.02).to(dtype)
    bias = torch.randn(C_OUT, device=device, generator=gen).to(dtype)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    grad = torch.randn(shape[0], C_OUT, *shape[2:], device=device, generator=gen).to(dtype)
    grad = grad.contiguous(memory_format=layout)

    def run(variant: str) -> dict[str, torch.Tensor]:
        return _results(variant, leaves, grad, d)

    def run_synced() -> None:  # pytest-benchmark times with the host clock
        run("split")
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        check_prepass(f"split d={d}", run("split"), run("padded"), ORACLE_FLOOR[dtype])
        stats = time_interleaved({v: Timed(lambda _, v=v: run(v)) for v in VARIANTS}, device, warmup=1,
                                 min_rounds=ROUNDS, max_rounds=ROUNDS)
        benchmark.pedantic(run_synced, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    split_ms, padded_ms = stats["split"].median_ms, stats["padded"].median_ms
    live = live_tap_fraction(d, shape[2], shape[3])
    name = f"conv3x3 d={d} {shape} -> {C_OUT} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update({"case": name, "device": str(device), "threads": torch.get_num_threads(),
                                 "times_ms": {v: list(st.times_ms) for v, st in stats.items()},
                                 "split_over_padded": split_ms / padded_ms, "live_fraction": live,
                                 "load_avg": os.getloadavg()})
    print(f"\n{name} fwd+bwd, median of {ROUNDS} interleaved rounds: split {split_ms:.2f} ms, "
          f"padded {padded_ms:.2f} ms; split / padded = {split_ms / padded_ms:.3f} "
          f"(it computes {live:.2f} of the multiply-adds)")
