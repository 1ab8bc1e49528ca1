"""Lazy access to the compiled extension ``fastshare._C``.

The extension registers its kernels as torch ops in the ``fastshare_C`` namespace
(``torch.ops.fastshare_C.gated_residual_fwd`` ...), with a CPU implementation always and a CUDA one when it
was built with CUDA. It is imported on first use, never at ``import fastshare``.
"""

from __future__ import annotations

import functools

import torch

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e .  (see README, 'Building')"


@functools.lru_cache(maxsize=None)
def load() -> tuple[object | None, str | None]:
    """Import the extension once: ``(module, None)`` or ``(None, why it is unavailable)``."""
    try:
        from fastshare import _C  # noqa: F401
    except ImportError as exc:
        return None, f"the extension fastshare._C is not built or failed to import ({exc}); {REBUILD_HINT}"
    return _C, None


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``fastshare_C::<op>`` has an implementation for ``device_type`` ('cpu' or 'cuda')."""
    module, _ = load()
    if module is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastshare_C::{op}", key)
