"""Reference rates measured in the same run (copy bandwidth, matmul TFLOP/s) and the bytes the op moves."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fastshare.bench.config import DTYPES
from fastshare.bench.timing import Timed, time_interleaved


PASSES = ("fwd", "bwd", "fwd+bwd")


#: Elements read + written per element of ``f`` by each pass of the gated residual (DESIGN.md §2).
GATED_RESIDUAL_ELEMENT_IO = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}


def gated_residual_bytes(numel: int, dtype: torch.dtype, pass_: str) -> int:
    """Minimal DRAM bytes of one gated-residual pass on ``numel`` elements of ``dtype``.

    ``fwd``: read ``f, r``, write ``out`` (3N); ``bwd``: read ``grad, f, r``, write ``df, dr`` (5N);
    ``fwd+bwd``: 8N. The ``(S, 2)`` gate inputs and outputs are negligible and not counted.
    """
    if pass_ not in GATED_RESIDUAL_ELEMENT_IO:
        raise ValueError(f"pass must be one of {', '.join(PASSES)}, got {pass_!r}")
    return GATED_RESIDUAL_ELEMENT_IO[pass_] * int(numel) * torch.empty((), dtype=dtype).element_size()


def gbps(nbytes: float, ms: float) -> float:
    """GB/s (1e9 bytes per second) of ``nbytes`` moved in ``ms`` milliseconds."""
    if ms <= 0:
        raise ValueError(f"time must be > 0 ms, got {ms}")
    return nbytes / (ms * 1e-3) / 1e9


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, rounds: int = 10) -> float:
    """Achievable memory bandwidth in GB/s: a large device-to-device ``copy_`` of ``nbytes``, counting
    bytes read + written (``2 * nbytes``), median over ``rounds``."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    stats = time_interleaved({"copy": Timed(lambda _: dst.copy_(src))}, device, warmup=2,
                             min_rounds=rounds, max_rounds=rounds)["copy"]
    return gbps(2 * src.numel() * 4, stats.median_ms)


def measure_matmul_tflops(device: torch.device | str, dtype: torch.dtype, n: int, rounds: int = 10,
                          tf32: bool | None = None) -> float:
    """Dense matmul rate in TFLOP/s: ``(n, n) @ (n, n)`` (``2 n^3`` FLOPs), median over ``rounds``.

    On CUDA, float32 uses TF32 when ``tf32`` says so; None: exactly when cuDNN convolutions do
    (``torch.backends.cudnn.allow_tf32``), so that block TFLOP/s compare like with like.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    ctx = contextlib.nullcontext()
    if device.type == "cuda" and dtype == torch.float32:
        ctx = _matmul_tf32(torch.backends.cudnn.allow_tf32 if tf32 is None else tf32)
    with ctx:
        stats = time_interleaved({"mm": Timed(lambda _: torch.mm(a, b))}, device, warmup=2,
                                 min_rounds=rounds, max_rounds=rounds)["mm"]
    return 2.0 * n ** 3 / (stats.median_ms * 1e-3) / 1e12


@contextlib.contextmanager
def _matmul_tf32(enabled: bool) -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def cache_bytes(device: torch.device) -> int:
    """Size of the last-level cache that a benchmark's inputs should not fit in (GPU L2, CPU L3 or L2)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            sizes.append(int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)])
    return max(sizes) if sizes else 32 << 20


def rotation_copies(set_bytes: int, cache: int, max_copies: int = 4) -> int:
    """How many copies of an input set to rotate over so that ``copies * set_bytes >= 2 * cache``,
    clamped to ``[1, max_copies]`` (memory bound)."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes must be > 0, got {set_bytes}")
    return max(1, min(max_copies, math.ceil(2 * cache / set_bytes)))


class MatmulRates:
    """The device's matmul TFLOP/s per dtype name, measured on first use (only when a FLOP-rate case runs)."""

    def __init__(self, device: torch.device, n: int, dtypes: Sequence[str]) -> None:
        self.device, self.n, self.dtypes = device, n, tuple(dtypes)
        self.measured: dict[str, float] = {}

    def get(self, dname: str, tf32: bool | None = None) -> float | None:
        """TFLOP/s of an ``n^3`` matmul in ``dname`` (None for a dtype the config does not measure).

        ``tf32`` (float32 on CUDA): False measures IEEE float32, the step cases' ``fp32`` (stored as
        ``fp32-ieee``); None follows cuDNN's TF32 setting, as the block cases run.
        """
        if dname not in self.dtypes:
            return None
        key = dname if tf32 is None else f"{dname}-{'tf32' if tf32 else 'ieee'}"
        if key not in self.measured:
            self.measured[key] = measure_matmul_tflops(self.device, DTYPES[dname], self.n, tf32=tf32)
        return self.measured[key]
