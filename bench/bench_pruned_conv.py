"""The ASPP heads' dilated 3x3 convolution, split into zero-padding-free bands
(:func:`fastshare.ops.pruned_conv.pruned_conv3x3`, ``split=True``) against the one padded ``F.conv2d``,
forward + backward (input, weight and bias gradients).

Cases: the first convolution of an ASPP branch on ResNet-34/18 features, ``C_in = 512 -> 1024``, at each
rate ``d``; CUDA: ``[16, 512, 41, 41]`` (B = 16 at 321 x 321) in IEEE float32 (TF32 off) and in bf16 +
channels_last; CPU: ``[4, 512, 16, 16]`` (the CPU step size, 128 x 128; rates 18 and 24 are 1x1 there
either way) and ``[2, 512, 41, 41]`` in float32, channels_last (oneDNN's layout in the fast heads).

Variants ``split`` and ``padded`` run in one process on the same tensors, alternating round by round; the
ratio of their medians (``split / padded``: below 1 means the split is faster) and the share of
multiply-adds the split keeps (``live_fraction``) are printed and stored in ``extra_info``. This is the
comparison that ``FASTSHARE_CONV_SPLIT=auto`` makes on the first call of each shape.

Run::

    python -m pytest bench/bench_pruned_conv.py --benchmark-only -s

``FASTSHARE_BENCH_ROUNDS`` (default 7) sets the interleaved rounds.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

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


def _median(v: list[float]) -> float:
    s = sorted(v)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


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

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(variant: str) -> float:
        sync()
        t0 = time.perf_counter()
        if variant == "split":
            out = pruned_conv3x3(x, weight, bias, d, split=True)
        else:
            out = F.conv2d(x, weight, bias, 1, d, d)
        torch.autograd.grad(out, leaves, grad)
        sync()
        return time.perf_counter() - t0

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:
            run(v)  # warm-up (cuDNN plans, allocator)
        for _ in range(ROUNDS):
            for v in VARIANTS:
                times[v].append(run(v))
        benchmark.pedantic(lambda: run("split"), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    ratio = _median(times["split"]) / _median(times["padded"])
    live = live_tap_fraction(d, shape[2], shape[3])
    name = f"conv3x3 d={d} {shape} -> {C_OUT} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update({"case": name, "device": str(device), "threads": torch.get_num_threads(),
                                 "seconds": times, "split_over_padded": ratio, "live_fraction": live,
                                 "load_avg": os.getloadavg()})
    print(f"\n{name} fwd+bwd, median of {ROUNDS} interleaved rounds: split {_median(times['split']) * 1e3:.2f} ms, "
          f"padded {_median(times['padded']) * 1e3:.2f} ms; split / padded = {ratio:.3f} "
          f"(it computes {live:.2f} of the multiply-adds)")
