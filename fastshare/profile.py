"""A one-step profiler: FLOPs, bytes saved for backward, ATen ops dispatched, peak memory.

:func:`profile_step` runs a callable (typically forward + loss + backward of one training step) once under
three instruments and returns a :class:`StepProfile`:

- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and
  backward; elementwise ops and fastshare's custom ops count as 0, as in PyTorch's counter).
- **Bytes saved for backward**: ``torch.autograd.graph.saved_tensors_hooks``; every tensor autograd saves
  is attributed to its storage, and each storage is counted once (views of one activation, or a weight
  saved by several ops, are not double counted). Parameters are reported apart, since they live anyway.
- **ATen ops dispatched**: a ``TorchDispatchMode`` that counts every op reaching the dispatcher below
  autograd (forward and backward), by name: a proxy for launch and framework overhead.
- **Peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` over the step (after a reset), minus the
  memory allocated before it. On CPU PyTorch keeps no allocator statistics (and ``tracemalloc`` does not
  see torch's allocations), so ``peak_memory_bytes`` is None there; ``saved_bytes`` (the activations that
  are alive at the end of the forward) is the measurable proxy.

The instruments slow the step down a lot, so wall time is measured separately: ``timed_runs`` extra
uninstrumented runs, reported as their median.

Example:
    >>> prof = profile_step(lambda: loss_fn(model(x)).backward(), params=model.parameters())
    >>> print(prof.summary())

CLI: ``python -m fastshare.profile --backbone resnet18 --executor batched --stage 1`` prints the summary of
one policy-learning step.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["StepProfile", "profile_step", "profile_policy_step"]


@dataclass
class StepProfile:
    """What one step costs.

    Attributes:
        flops: floating-point operations (multiply-add = 2) counted by ``FlopCounterMode``.
        saved_bytes: bytes of the unique non-parameter storages saved for backward.
        saved_param_bytes: bytes of the unique parameter storages saved for backward.
        saved_tensors: number of tensors saved for backward (with repeats).
        aten_ops: ATen ops dispatched (forward and backward).
        op_counts: per-op counts, e.g. ``{"aten.convolution.default": 40, ...}``.
        peak_memory_bytes: CUDA peak allocated memory above the start of the step; None on CPU.
        wall_s: median seconds of ``timed_runs`` uninstrumented runs (None if 0 runs).
        device: the device the step ran on, in words.
    """

    flops: int
    saved_bytes: int
    saved_param_bytes: int
    saved_tensors: int
    aten_ops: int
    op_counts: dict[str, int] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    wall_s: float | None = None
    device: str = "cpu"

    def summary(self) -> str:
        """One human-readable line per quantity."""
        peak = "n/a (CPU: no allocator statistics)" if self.peak_memory_bytes is None else \
            f"{self.peak_memory_bytes / 2**20:.1f} MiB"
        wall = "not timed" if self.wall_s is None else f"{self.wall_s * 1e3:.1f} ms"
        top = ", ".join(f"{k} x{v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: -kv[1])[:5])
        return (f"device: {self.device}\nFLOPs: {self.flops / 1e9:.3f} GFLOP\n"
                f"saved for backward: {self.saved_bytes / 2**20:.2f} MiB activations "
                f"+ {self.saved_param_bytes / 2**20:.2f} MiB parameters ({self.saved_tensors} tensors)\n"
                f"ATen ops: {self.aten_ops} (top: {top})\npeak memory: {peak}\nwall: {wall}")


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    return str(t.device), storage.data_ptr()


def profile_step(step: Callable[[], object], params: Iterable[torch.Tensor] = (), device: torch.device | str = "cpu",
                 timed_runs: int = 0, warmup: int = 0) -> StepProfile:
    """Run ``step()`` once under the instruments (and ``timed_runs`` times without) and report its cost.

    Args:
        step: one training step, e.g. forward, loss and ``backward()``; its return value is ignored.
        params: the model's parameters (their saved storages are reported apart).
        device: the device the step runs on (CUDA enables the peak-memory measurement).
        timed_runs: extra uninstrumented runs for ``wall_s`` (the median).
        warmup: uninstrumented runs first, so that first-call choices (the fast heads time their split
            convolutions once per shape, ``FASTSHARE_CONV_SPLIT``) are made outside the count and the
            instrumented run executes what later steps execute. Each run is a full step (BatchNorm running
            statistics advance).
    """
    if warmup < 0 or timed_runs < 0:
        raise ValueError(f"profile_step: warmup and timed_runs must be >= 0, got {warmup} and {timed_runs}")
    for _ in range(warmup):
        step()
    device = torch.device(device)
    param_keys = {k for k in (_storage_key(p) for p in params) if k is not None}
    saved: dict[tuple[str, int], int] = {}
    saved_params: dict[tuple[str, int], int] = {}
    n_saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal n_saved
        n_saved += 1
        key = _storage_key(t)
        if key is not None:
            (saved_params if key in param_keys else saved)[key] = t.untyped_storage().nbytes()
        return t

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    counter = _OpCounter()
    flop_mode = FlopCounterMode(display=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), flop_mode, counter:
        step()
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    wall = None
    if timed_runs > 0:
        times = []
        for _ in range(timed_runs):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        wall = statistics.median(times)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return StepProfile(flops=int(flop_mode.get_total_flops()), saved_bytes=sum(saved.values()),
                       saved_param_bytes=sum(saved_params.values()), saved_tensors=n_saved,
                       aten_ops=sum(counter.counts.values()), op_counts=dict(counter.counts),
                       peak_memory_bytes=peak, wall_s=wall, device=name)


def profile_policy_step(model, x: torch.Tensor, stage: int | None, executor: str, tau: float = 5.0,
                        hard: bool = False, timed_runs: int = 0, seed: int = 0, warmup: int = 1) -> StepProfile:
    """Profile one policy-learning step of an :class:`~fastshare.model.AdaShareNet`: Gumbel gates at
    curriculum ``stage``, forward through ``executor``, the sum of squared outputs as a stand-in task
    loss, backward (gradients zeroed first), after ``warmup`` uninstrumented steps (see
    :func:`profile_step`)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(tuple(model.logits.shape), generator=gen).clamp_(1e-6, 1 - 1e-6).to(model.logits.device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        gates = model.gates("sample", tau=tau, hard=hard, num_train_layers=stage, u=u)
        outputs = model(x, gates, executor=executor)
        sum(o.float().pow(2).mean() for o in outputs.values()).backward()

    return profile_step(step, params=list(model.parameters()), device=x.device, timed_runs=timed_runs,
                        warmup=warmup)


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)


def _main(argv: list[str] | None = None) -> None:
    from fastshare.model import AdaShareNet

    parser = argparse.ArgumentParser(prog="python -m fastshare.profile",
                                     description="Profile one AdaShare policy-learning step.")
    parser.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet101"])
    parser.add_argument("--executor", default="batched", choices=["sequential", "batched"])
    parser.add_argument("--stage", type=_positive_int, default=None, help="curriculum stage (None: all blocks)")
    parser.add_argument("--image", type=_positive_int, default=128)
    parser.add_argument("--batch", type=_positive_int, default=4)
    parser.add_argument("--head-width", type=_positive_int, default=1024)
    parser.add_argument("--timed-runs", type=_int_at_least(0), default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device")
    torch.manual_seed(0)
    model = AdaShareNet(args.backbone, {"seg": 40, "sn": 3, "depth": 1}, head_width=args.head_width).to(device)
    if args.stage is not None and args.stage > model.num_blocks:
        parser.error(f"--stage {args.stage}: {args.backbone} has {model.num_blocks} blocks")
    model.train()
    x = torch.randn(args.batch, 3, args.image, args.image, device=device)
    print(profile_policy_step(model, x, args.stage, args.executor, timed_runs=args.timed_runs).summary())


if __name__ == "__main__":
    _main()
