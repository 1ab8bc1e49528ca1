"""Small host-known constants (segment offsets, per-segment coefficients) as cached device tensors.

An op that needs such a constant on a CUDA device would otherwise copy it from pageable host memory on
every call: a synchronous copy in eager mode, and in a captured CUDA graph a copy whose host buffer is
freed before the graph replays. Cached device copies avoid both: the first call of each distinct value
creates it (outside any capture), later calls and graph replays reuse it.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["device_constant"]


@functools.lru_cache(maxsize=256)
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype, device)``, created once per distinct argument and never written.

    Raises ``RuntimeError`` when first asked for while a CUDA graph is being captured (the copy cannot be
    captured): run the step once eagerly before capturing it.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fastshare: the constant {list(values)[:8]} ({dtype}) was first needed during CUDA graph capture; "
            "run the step once eagerly before capturing it")
    with torch.inference_mode(False):  # a normal tensor, usable later by autograd too
        return torch.tensor(values, dtype=dtype, device=device)
