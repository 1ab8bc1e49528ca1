"""The batched executor for policy learning (DESIGN.md §3).

All tasks see the same images ``x (B, 3, H, W)``. With ``P = gates.shared_prefix()`` (forced blocks of the
curriculum, warm-up, fixed blocks on which all tasks agree):

1. **Shared prefix, B rows.** The stem and blocks ``0..P-1`` run once on ``B`` rows. Their BatchNorms run
   under ``batch_segments([0, B], repeats=K)``: the output is the one every task's pass would compute,
   and the running statistics advance ``K`` times, as in the sequential reference (``num_batches_tracked
   += K``).
2. **Fan-out block P.** Its input is still shared, so ``F(h)`` and ``r = shortcut(h)`` run once on ``B``
   rows (again ``repeats=K``), ``z = relu(r + F(h))`` once, and the ``K`` task outputs
   ``y[k,0] z + y[k,1] r`` are produced by broadcasting straight into ``K B`` rows (no
   repeat of ``f`` or ``r`` is materialised; gradients to ``f``, ``r`` and the logits are exact sums over
   tasks).
3. **Stacked tasks, K*B rows.** Every later block runs once for all tasks on the task-major stack
   (task ``k`` = rows ``kB:(k+1)B``) with per-task BatchNorm (``batch_segments([0, B, ..., KB])``) and the
   fused :func:`fastshare.ops.gated_residual` (backend from the usual dispatch). Sampled gates are never
   merged across tasks, even when hard gates agree: the logit gradients need each task's own upstream
   gradient.
4. **Heads.** Task ``k``'s head runs on its rows through :func:`fastshare.model.fast_heads.aspp_head_forward`
   (exact dilated-tap pruning and fused matmuls), one task after the other. Batching the heads across
   tasks (their weights differ: ``baddbmm`` over the K weight sets, a grouped convolution for the 3x3
   branches) was measured and is slower: forward + backward of K = 3 heads on ``(12, 512, 16, 16)``
   (width 1024, 2 CPU threads), 1.14-1.16x the loop's time, and 1.20x with only the matmuls batched
   (``bench/bench_heads_across_tasks.py``). Not measured on a GPU.

Fixed gates follow the same path (the tree executor is the fast path for them); a fixed gate ``(p, 1-p)``
is applied as ``p * relu(r + F) + (1 - p) * r`` like the reference.

**BatchNorm.** Per-task statistics come from :class:`~fastshare.model.norm.SegmentedBatchNorm2d` reading
:func:`~fastshare.model.norm.batch_segments`; any other BatchNorm class would normalise all ``K B`` rows
together (and advance its running statistics once instead of ``K`` times). So every backbone BatchNorm
that uses batch statistics (training mode, or no running statistics) must be a ``SegmentedBatchNorm2d``,
else the executor raises ``TypeError`` naming the module, e.g. after
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (``wrap_model(sync_bn=True)``, which therefore needs
``executor="sequential"``). BatchNorms on running statistics (eval mode) may be of any class.

**Empty batch** (``B = 0``): nothing to stack; the sequential reference runs (empty outputs, and the
``num_batches_tracked`` updates of the reference).
"""

from __future__ import annotations

import torch

from fastshare.executors import check_batch_norms, register
from fastshare.executors.sequential import run_sequential
from fastshare.model.fast_heads import aspp_head_forward
from fastshare.model.heads import ASPPHead
from fastshare.model.norm import SegmentedBatchNorm2d, batch_segments
from fastshare.ops import gated_residual, gumbel_gate
from fastshare.policy import FIXED, SAMPLED, Gates

__all__ = ["run_batched"]


def _task_view(t: torch.Tensor) -> tuple[int, ...]:
    """Broadcast shape of a ``(K,)`` per-task factor against ``(K, B, ...)``."""
    return (-1,) + (1,) * t.ndim


def _block_gates(gates: Gates, l: int, like: torch.Tensor) -> torch.Tensor:
    """``(K, 2)`` gates of a fixed or sampled block ``l`` in ``like``'s dtype (Gumbel samples or fixed)."""
    if gates.kinds[l] == FIXED:
        return gates.fixed_values(l).to(device=like.device, dtype=like.dtype)
    alpha, u = gates.block_alpha(l)
    return gumbel_gate(alpha, u, gates.tau, gates.hard).to(like.dtype)


def _fan_out(f: torch.Tensor, r: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, ...)`` shared ``f``, ``r`` and ``(K, 2)`` gates -> ``(K B, ...)``:
    ``y[k,0] relu(r + f) + y[k,1] r`` on task ``k``'s rows."""
    z = torch.relu(r + f)
    y0 = y[:, 0].reshape(_task_view(z))
    y1 = y[:, 1].reshape(_task_view(z))
    # Not addcmul: its fused multiply-add rounds differently from the reference's y0 * z + y1 * r, and a
    # one-ulp difference can flip a later ReLU in float32.
    out = y0 * z.unsqueeze(0) + y1 * r.unsqueeze(0)
    return out.reshape((k * z.shape[0],) + tuple(z.shape[1:]))


def _gate_rows(fx: torch.Tensor, r: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """Fixed gates on ``K B`` rows: ``g[k,0] * fx + g[k,1] * r`` per task block of rows."""
    shape = (k, fx.shape[0] // k) + tuple(fx.shape[1:])
    g0 = g[:, 0].reshape(_task_view(fx))
    g1 = g[:, 1].reshape(_task_view(fx))
    return (g0 * fx.reshape(shape) + g1 * r.reshape(shape)).reshape(fx.shape)


def _head(head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    return aspp_head_forward(head, h) if isinstance(head, ASPPHead) else head(h)


@register("batched")
def run_batched(model, x: torch.Tensor, gates: Gates) -> dict[str, torch.Tensor]:
    """``{task: head_k(backbone_k(x))}`` with the shared prefix once and the tasks stacked after it.

    Args:
        model: an :class:`~fastshare.model.AdaShareNet`.
        x: ``(B, 3, H, W)``.
        gates: the forward's :class:`~fastshare.policy.Gates`.

    Returns:
        ``{task: (B, classes, h, w)}`` equal to the sequential reference's outputs (DESIGN.md §3).

    Raises:
        TypeError: a backbone BatchNorm that uses batch statistics is not a ``SegmentedBatchNorm2d``
            (see the module docstring).
    """
    bb = model.backbone
    check_batch_norms(bb, "batched", (SegmentedBatchNorm2d,),
                      "the tasks are stacked along the batch axis and only SegmentedBatchNorm2d normalises "
                      "each task's rows on their own")
    k, bsz, n_blocks = gates.num_tasks, x.shape[0], bb.num_blocks
    if bsz == 0:  # nothing to stack (and empty segments have no batch statistics): the reference's result
        return run_sequential(model, x, gates)
    prefix = gates.shared_prefix()
    with batch_segments([0, bsz], repeats=k):
        h = bb.stem(x)
        for l in range(prefix):
            r = bb.shortcut(l, h)
            fx = torch.relu(r + bb.residual_branch(l, h))
            if gates.kinds[l] == FIXED:
                # The reference's formula, so that an all-skip block still passes (zero) gradients to F.
                g = gates.fixed_values(l)[0].to(device=fx.device, dtype=fx.dtype)
                h = g[0] * fx + g[1] * r
            else:
                h = fx
        if prefix < n_blocks:
            r = bb.shortcut(prefix, h)
            f = bb.residual_branch(prefix, h)
    if prefix == n_blocks:
        return {task: _head(model.heads[task], h) for task in model.tasks}
    h = _fan_out(f, r, _block_gates(gates, prefix, f), k)
    seg = torch.arange(0, (k + 1) * bsz, bsz, dtype=torch.int64)
    with batch_segments(seg):
        for l in range(prefix + 1, n_blocks):
            r = bb.shortcut(l, h)
            f = bb.residual_branch(l, h)
            kind = gates.kinds[l]
            if kind == SAMPLED:
                alpha, u = gates.block_alpha(l)
                h = gated_residual(f, r, alpha, u, gates.tau, gates.hard, seg)
            elif kind == FIXED:
                h = _gate_rows(torch.relu(r + f), r, _block_gates(gates, l, f), k)
            else:
                h = torch.relu(r + f)
    return {task: _head(model.heads[task], h[i * bsz:(i + 1) * bsz]) for i, task in enumerate(model.tasks)}
