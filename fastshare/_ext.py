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
    _register_fakes()
    return _C, None


def _register_fakes() -> None:
    """Fake (meta) kernels of the ``fastshare_C`` ops: output shapes and dtypes for tracing.

    The ``fastshare::`` custom ops call these kernels inside their own implementations, so tracing never
    reaches them there; the fakes make them traceable when called directly (torch.compile, export, opcheck)
    once fastshare has loaded the extension (every fastshare entry point goes through :func:`load`).
    """
    def gated_residual_fwd(f, r, alpha, u, tau, hard, seg):
        return torch.empty_like(f)

    def gated_residual_bwd(grad, f, r, alpha, u, tau, hard, seg, deterministic):
        return torch.empty_like(f), torch.empty_like(r), alpha.new_empty(alpha.shape)

    def relu_dropout_fwd(x, seed, offset, p):
        return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.bool)

    def relu_dropout_bwd(grad, mask, p):
        return grad.new_empty(grad.shape)

    for fn in (gated_residual_fwd, gated_residual_bwd, relu_dropout_fwd, relu_dropout_bwd):
        torch.library.register_fake(f"fastshare_C::{fn.__name__}")(fn)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``fastshare_C::<op>`` has an implementation for ``device_type`` ('cpu' or 'cuda')."""
    module, _ = load()
    if module is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastshare_C::{op}", key)
