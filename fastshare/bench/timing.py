"""Interleaved timing of benchmark variants: per-call times and their median, p20 and p80."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch


@dataclass(frozen=True)
class TimingStats:
    """Per-call times in milliseconds and their median, p20 and p80 (linear interpolation)."""

    times_ms: tuple[float, ...]
    median_ms: float
    p20_ms: float
    p80_ms: float

    @property
    def rounds(self) -> int:
        return len(self.times_ms)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 <= q <= 1) of ``values`` with linear interpolation between order statistics."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timing_stats(times_ms: Sequence[float]) -> TimingStats:
    """:class:`TimingStats` of raw per-call times (milliseconds)."""
    t = tuple(float(x) for x in times_ms)
    return TimingStats(t, quantile(t, 0.5), quantile(t, 0.2), quantile(t, 0.8))


@dataclass
class Timed:
    """One timed variant: ``run(prepare(i))`` is timed, ``prepare(i)`` (round ``i``, for input rotation or
    an untimed forward before a timed backward) is not."""

    run: Callable[[Any], object]
    prepare: Callable[[int], Any] = lambda i: None


def _call_ms(item: Timed, i: int, device: torch.device, events: list | None) -> float | None:
    """Time one call: the elapsed ms on CPU; on CUDA record an event pair into ``events`` (None returned)."""
    arg = item.prepare(i)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        item.run(arg)
        end.record()
        events.append((start, end))
        return None
    t0 = time.perf_counter()
    item.run(arg)
    return (time.perf_counter() - t0) * 1e3


def _time_calls(item: Timed, device: torch.device, indices: Sequence[int]) -> list[float]:
    events: list = []
    out = [_call_ms(item, i, device, events) for i in indices]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    return out


def time_interleaved(items: Mapping[str, Timed], device: torch.device | str, *, warmup: int = 2,
                     min_rounds: int = 5, max_rounds: int = 100, target_ms: float = 1000.0
                     ) -> dict[str, TimingStats]:
    """Time several variants of one case round by round (variant order fixed within each round).

    Each variant first runs ``warmup`` times (at least once); the rounds are then chosen as
    ``clamp(target_ms / sum of the variants' warm-up medians, min_rounds, max_rounds)``, as
    ``triton.testing.do_bench`` picks its repetitions from an estimate.
    """
    device = torch.device(device)
    estimate = 0.0
    for item in items.values():
        warm = _time_calls(item, device, range(max(1, warmup)))
        estimate += quantile(warm, 0.5)
    rounds = int(min(max_rounds, max(min_rounds, target_ms / max(estimate, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in items}
    events: dict[str, list] = {name: [] for name in items}
    for i in range(rounds):
        for name, item in items.items():
            ms = _call_ms(item, i, device, events[name])
            if ms is not None:
                times[name].append(ms)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = {name: [s.elapsed_time(e) for s, e in ev] for name, ev in events.items()}
    return {name: timing_stats(t) for name, t in times.items()}


def interleaved_seconds(items: Mapping[str, Timed], rounds: int, device: torch.device | str = "cpu"
                        ) -> dict[str, list[float]]:
    """Per-call seconds of each variant over exactly ``rounds`` interleaved rounds, after one warm-up call
    each (:func:`time_interleaved` with a fixed round count, in the seconds the bench files report)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    stats = time_interleaved(items, device, warmup=1, min_rounds=rounds, max_rounds=rounds)
    return {name: [t / 1e3 for t in s.times_ms] for name, s in stats.items()}
