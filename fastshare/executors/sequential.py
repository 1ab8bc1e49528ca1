"""The sequential reference executor: AdaShare's execution order, pure PyTorch (DESIGN.md §3).

For each task k in order: stem, then every block l computed (also skipped ones, as the paper's code does),
``x <- g0 * relu(r + F(x)) + g1 * r`` with the task's gate ``g`` for that block, then the task's head.
BatchNorm running statistics are therefore updated once per task per block, in task order.
"""

from __future__ import annotations

import torch

from fastshare.executors import register
from fastshare.policy import FIXED, FORCED, Gates
from fastshare.reference import gumbel_gate_ref


def _task_gate(gates: Gates, k: int, l: int) -> torch.Tensor | None:
    """``(2,)`` gate of task ``k`` at block ``l``; None for a forced block (gate (1, 0))."""
    kind = gates.kinds[l]
    if kind == FORCED:
        return None
    if kind == FIXED:
        return gates.fixed_values(l)[k]
    alpha, u = gates.block_alpha(l)
    return gumbel_gate_ref(alpha[k], u[k], gates.tau, gates.hard)


@register("sequential")
def run_sequential(model, x: torch.Tensor, gates: Gates) -> dict[str, torch.Tensor]:
    """One backbone pass per task: ``{task: head(backbone_k(x))}``."""
    bb = model.backbone
    outputs = {}
    for k, task in enumerate(model.tasks):
        h = bb.stem(x)
        for l in range(bb.num_blocks):
            r = bb.shortcut(l, h)
            fx = torch.relu(r + bb.residual_branch(l, h))
            g = _task_gate(gates, k, l)
            h = fx if g is None else g[0].to(fx.dtype) * fx + g[1].to(fx.dtype) * r
        outputs[task] = model.heads[task](h)
    return outputs
