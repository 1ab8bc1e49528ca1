"""``SegmentedBatchNorm2d``: a drop-in ``nn.BatchNorm2d`` that normalises each task's rows on their own.

The batched executor stacks the tasks along the batch axis (``K * B`` rows); a plain BatchNorm would then
pool the statistics of all tasks, while the reference (one pass per task) normalises every task with its
own batch. :class:`SegmentedBatchNorm2d` reads the current row segmentation from :func:`batch_segments`
(a thread-local stack the executor sets around its calls) and runs
:func:`fastshare.ops.segmented_bn.segmented_batch_norm`; with no segmentation set it *is*
``nn.BatchNorm2d`` (same forward, parameters, buffers and state-dict keys).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from fastshare.ops.segmented_bn import segmented_batch_norm

__all__ = ["SegmentedBatchNorm2d", "batch_segments", "current_segments", "convert_batch_norm", "Segments"]

_state = threading.local()


@dataclass(frozen=True)
class Segments:
    """A row segmentation: ``seg`` int64 ``(S + 1,)`` CPU offsets; each segment stands for ``repeats``
    identical consecutive segments in the running-statistics update."""

    seg: torch.Tensor
    repeats: int = 1

    @property
    def num_updates(self) -> int:
        """Momentum updates per training forward: ``S * repeats`` (added to ``num_batches_tracked``)."""
        return (self.seg.numel() - 1) * self.repeats


@contextlib.contextmanager
def batch_segments(seg: torch.Tensor | list[int], repeats: int = 1) -> Iterator[Segments]:
    """Within this context every :class:`SegmentedBatchNorm2d` normalises per segment of rows.

    Args:
        seg: ``(S + 1,)`` row offsets (a list or an int64 tensor; kept on the CPU).
        repeats: each segment stands for ``repeats`` identical ones (running statistics and
            ``num_batches_tracked`` advance ``S * repeats`` times), e.g. ``B`` rows shared by ``K`` tasks.

    Example:
        >>> with batch_segments([0, B, 2 * B, 3 * B]):  # three tasks of B rows
        ...     h = backbone.residual_branch(l, h)
    """
    seg_t = torch.as_tensor(seg, dtype=torch.int64, device="cpu")
    if seg_t.ndim != 1 or seg_t.numel() < 2:
        raise ValueError(f"seg must hold S + 1 >= 2 row offsets, got {seg!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    segments = Segments(seg_t, repeats)
    stack.append(segments)
    try:
        yield segments
    finally:
        stack.pop()


def current_segments() -> Segments | None:
    """The innermost :func:`batch_segments` of this thread, or None."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


class SegmentedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-segment training statistics inside :func:`batch_segments`.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``. Under a segmentation ``seg`` (``S`` segments, ``repeats R``)
    in training mode, segment ``s`` is normalised with its own batch mean and biased variance, the running
    statistics receive the ``S R`` momentum updates that ``S R`` sequential ``nn.BatchNorm2d`` calls would
    make, and ``num_batches_tracked`` grows by ``S R``. In eval mode (with running statistics) or without a
    segmentation it runs ``nn.BatchNorm2d.forward`` unchanged. ``momentum=None`` (cumulative average) is
    supported only outside a segmentation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = current_segments()
        use_batch_stats = self.training or not self.track_running_stats
        if segments is None or not use_batch_stats:
            return super().forward(x)
        self._check_input_dim(x)
        if self.momentum is None:
            raise NotImplementedError("SegmentedBatchNorm2d with momentum=None (cumulative moving average) "
                                      "cannot run under batch_segments; use a float momentum")
        update = self.training and self.track_running_stats
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(segments.num_updates)
        return segmented_batch_norm(x, self.weight, self.bias, self.running_mean if update else None,
                                    self.running_var if update else None, segments.seg, self.momentum, self.eps,
                                    True, segments.repeats)


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` (in place) by a :class:`SegmentedBatchNorm2d`.

    Parameters, buffers, their ``requires_grad`` flags, the training flag and hooks-free state carry over
    (the parameter and buffer objects themselves are moved, so optimisers holding them stay valid).
    Returns ``module`` (or the replacement if ``module`` itself is a BatchNorm2d).
    """
    if type(module) is nn.BatchNorm2d:
        new = SegmentedBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, device="meta")
        for name, p in module._parameters.items():
            new._parameters[name] = p
        for name, b in module._buffers.items():
            new._buffers[name] = b
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = convert_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module
