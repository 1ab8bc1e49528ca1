"""fastshare's custom ops (``torch.ops.fastshare.*``) and their functional API.

- :func:`gated_residual`: the fused Gumbel-gated residual (DESIGN.md §2).
- :func:`gumbel_gate`: the Gumbel-Softmax gate.
- :func:`segmented_batch_norm`: BatchNorm with statistics per (segment, channel).
- :func:`relu_dropout`: ReLU + dropout in one pass with a counter-based mask (the ASPP heads).
- :func:`pruned_conv3x3`: a dilated 3x3 convolution without the products with zero padding (the ASPP heads).
- :func:`use_backend`, :func:`available_backends`: backend choice (see :mod:`fastshare.ops.backends`).
"""

from fastshare.ops.backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    last_fallback_reasons,
    use_backend,
)
from fastshare.ops.gated_residual import deterministic_reductions, gated_residual, gumbel_gate
from fastshare.ops.pruned_conv import pruned_conv3x3
from fastshare.ops.relu_dropout import relu_dropout
from fastshare.ops.segmented_bn import segmented_batch_norm

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "deterministic_reductions",
    "gated_residual",
    "gumbel_gate",
    "last_fallback_reasons",
    "pruned_conv3x3",
    "relu_dropout",
    "segmented_batch_norm",
    "use_backend",
]
