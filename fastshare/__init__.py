"""fastshare: fast AdaShare multi-task training.

``import fastshare`` is light: it imports torch and the pure-PyTorch modules, never Triton or the compiled
extension (those load on first use). Public API:

- ops: :func:`gated_residual`, :func:`gumbel_gate`, :func:`segmented_batch_norm`, :func:`use_backend`
- model: :class:`AdaShareNet`, :func:`deeplab_resnet` backbones, ASPP heads
- reference: :mod:`fastshare.reference`, the pure-PyTorch specification of every op
"""

from fastshare.export import export
from fastshare.ops import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    gated_residual,
    gumbel_gate,
    segmented_batch_norm,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "export",
    "gated_residual",
    "gumbel_gate",
    "segmented_batch_norm",
    "use_backend",
    "__version__",
]
