"""The tree executor: a fixed hard policy run as the prefix tree of the tasks' paths (DESIGN.md §3).

For gates that are all ``"fixed"`` (or ``"forced"``, i.e. executed) the tasks' paths form the tree of
:class:`fastshare.plan.Plan`. The executor

1. runs the stem once for all tasks;
2. for each block ``l``: computes the shortcut ``r = ds_l(h)`` once per distinct parent ``h`` (a projection
   is applied even where the block is skipped, since the skip path is ``x <- r``); runs the residual branch
   ``F_l`` once per executing node, ``out = relu(r + F_l(h))``; a skipping node's output is ``r`` and costs
   nothing when the shortcut is the identity (no compute, no BatchNorm update);
3. runs each task's head on its leaf, through :func:`fastshare.model.fast_heads.aspp_head_forward` (exact
   tap pruning of the dilated convolutions, fused matmuls: ``head(x)`` up to float rounding) where that
   module is present in the build, else through the head's own forward.

**Sibling batching.** Executing nodes of the same block run the same weights on different inputs: their
inputs are stacked along the batch axis into one call per layer and split afterwards. In eval mode
(BatchNorm with running statistics: a per-channel affine map) the stacked rows go through every layer as
one batch. Wherever a BatchNorm uses batch statistics (training mode, or a BatchNorm without running
statistics, ``track_running_stats=False``, in either mode) it normalises every node's rows with that
node's own batch statistics (the convolutions run once on all rows), which is what the reference computes
per task. The executor computes those statistics itself (``F.batch_norm`` on each node's rows), so such
a BatchNorm must be an ``nn.BatchNorm2d`` (fastshare's ``SegmentedBatchNorm2d`` is one); another class,
e.g. ``torch.nn.SyncBatchNorm`` after ``wrap_model(sync_bn=True)``, raises ``TypeError`` naming the module
instead of being bypassed. An empty batch (``B = 0``) gives empty outputs; in training each BatchNorm's
``num_batches_tracked`` advances as in the reference and its running statistics stay as they are.

**BatchNorm running statistics (the equivalence contract for fixed policies).** The sequential reference
runs block ``l`` once per task in task order, so a node shared by ``n`` tasks updates its BatchNorm ``n``
times with identical batch statistics. The tree executor computes each node once but applies the same
updates: for every BatchNorm it collects each node's batch mean and unbiased variance, then, in task order
over the tasks that ran the node,

    num_batches_tracked += 1;  f = momentum (or 1 / num_batches_tracked if momentum is None)
    running_mean <- (1 - f) running_mean + f mean_node(k);  same for running_var,

i.e. ``rm <- (1-m)^n rm + sum_k m (1-m)^(n-k) mean_k`` for momentum ``m``. The running statistics of the
stem, of every projection shortcut and of every block that all tasks execute therefore equal the
reference's. **Deliberate difference from AdaShare's code:** the reference also computes skipped blocks
(and multiplies them by a zero gate), so their BatchNorms are updated by the tasks that skip them, with
those tasks' statistics; the tree executor does not compute skipped blocks, so a block's BatchNorms see
only the tasks that execute it (a block skipped by every task keeps its statistics unchanged). Outputs,
losses and gradients are unaffected (a skipped block's weights get zero gradient in the reference and no
gradient here).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastshare.executors import check_batch_norms, register, uses_batch_stats
from fastshare.model.backbone import BasicBlock, Bottleneck
from fastshare.plan import Plan, default_task_names
from fastshare.policy import FIXED, FORCED, Gates

try:  # the fast ASPP forward (fastshare/model/fast_heads.py), where that module is part of the build
    from fastshare.model.fast_heads import aspp_head_forward as _head_forward
except ImportError:
    _head_forward = None

__all__ = ["run_tree", "plan_for_gates"]

# BatchNorm -> list of (tasks, batch mean, unbiased batch variance) collected during one forward; mean and
# variance are None for an empty batch (no statistics: only num_batches_tracked advances, as in nn.BatchNorm2d).
_Pending = dict[nn.BatchNorm2d, list[tuple[tuple[int, ...], torch.Tensor | None, torch.Tensor | None]]]


@lru_cache(maxsize=64)
def _cached_plan(policy: tuple[tuple[int, ...], ...], task_names: tuple[str, ...]) -> Plan:
    return Plan(policy, task_names)


def plan_for_gates(gates: Gates, task_names: tuple[str, ...] | None = None) -> Plan:
    """The :class:`Plan` of fixed gates (forced blocks count as executed by every task).

    Raises ``ValueError`` when some block's gate is sampled: the tree executor needs a hard, fixed policy.
    """
    sampled = [l for l, kind in enumerate(gates.kinds) if kind not in (FIXED, FORCED)]
    if sampled:
        raise ValueError(
            f"the tree executor needs a fixed hard policy (Gates.fixed / model.gates('fixed', policy=...)), but "
            f"block(s) {sampled} have {gates.kinds[sampled[0]]!r} gates; use executor='sequential' or "
            f"'batched' while the policy is being learned")
    values = gates.policy_rows
    rows = tuple(tuple(1 if kind == FORCED else int(values[k][l] != 0) for l, kind in enumerate(gates.kinds))
                 for k in range(gates.num_tasks))
    names = task_names if task_names is not None else default_task_names(gates.num_tasks)
    return _cached_plan(rows, tuple(names))


def _norm(bn: nn.BatchNorm2d, x: torch.Tensor, tasks: tuple[int, ...] | list[tuple[int, ...]],
          pending: _Pending, rows: list[int] | None = None) -> torch.Tensor:
    """``bn(x)`` for one node's rows; in training with running statistics, the update is deferred to
    :func:`_flush`.

    With ``rows`` (stacked siblings), ``x`` holds one block of rows per node and ``tasks`` one task tuple
    per node: where batch statistics are used (training, or no running statistics), each block is
    normalised with its own statistics; on running statistics the stack is one affine map.
    The batch mean and unbiased variance come out of ``F.batch_norm`` itself: with fresh buffers (0, 1)
    and momentum 1, its running-statistics update writes exactly ``mean`` and ``var * N / (N - 1)``.
    """
    if not uses_batch_stats(bn):  # running statistics: per-channel affine map
        return bn(x)
    if rows is not None:
        return torch.cat([_norm(bn, part, t, pending) for part, t in zip(x.split(rows, 0), tasks)], 0)
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        # Batch statistics, nothing to update (nn.BatchNorm2d passes no buffers then).
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    if x.numel() == 0:  # no statistics; nn.BatchNorm2d still counts the batch
        pending.setdefault(bn, []).append((tasks, None, None))
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    mean = torch.zeros_like(bn.running_mean)
    var = torch.ones_like(bn.running_var)
    y = F.batch_norm(x, mean, var, bn.weight, bn.bias, True, 1.0, bn.eps)
    pending.setdefault(bn, []).append((tasks, mean, var))
    return y


@torch.no_grad()
def _flush(pending: _Pending) -> None:
    """Apply the collected BatchNorm updates once per task, in task order (see the module docstring)."""
    for bn, items in pending.items():
        per_task = sorted(((k, mean, var) for tasks, mean, var in items for k in tasks), key=lambda t: t[0])
        for _, mean, var in per_task:
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
            if mean is None:
                continue
            f = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked.item())
            bn.running_mean.mul_(1 - f).add_(mean, alpha=f)
            bn.running_var.mul_(1 - f).add_(var, alpha=f)


def _branch(block: nn.Module, x: torch.Tensor, tasks, pending: _Pending,
            rows: list[int] | None = None) -> torch.Tensor:
    """Residual branch ``F_l(x)`` of a :class:`BasicBlock` or :class:`Bottleneck` with deferred BN updates
    (``rows``: stacked siblings, see :func:`_norm`)."""
    if isinstance(block, BasicBlock):
        h = block.relu(_norm(block.bn1, block.conv1(x), tasks, pending, rows))
        return _norm(block.bn2, block.conv2(h), tasks, pending, rows)
    if isinstance(block, Bottleneck):
        h = block.relu(_norm(block.bn1, block.conv1(x), tasks, pending, rows))
        h = block.relu(_norm(block.bn2, block.conv2(h), tasks, pending, rows))
        return _norm(block.bn3, block.conv3(h), tasks, pending, rows)
    raise TypeError(f"the tree executor runs BasicBlock and Bottleneck blocks, got {type(block).__name__}")


def _projection(ds: nn.Sequential, x: torch.Tensor, tasks, pending: _Pending,
                rows: list[int] | None = None) -> torch.Tensor:
    conv, bn = ds
    return _norm(bn, conv(x), tasks, pending, rows)


def _stackable(module: nn.Module) -> bool:
    """Whether rows of different inputs may share one call: every BatchNorm uses its running statistics."""
    return all(not uses_batch_stats(m)
               for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def _apply(fn, module: nn.Module, inputs: list[torch.Tensor], tasks: list[tuple[int, ...]],
           pending: _Pending) -> list[torch.Tensor]:
    """``[fn(module, x_i)]`` as one call on the stacked rows (sibling batching)."""
    if len(inputs) == 1:
        return [fn(module, inputs[0], tasks[0], pending)]
    rows = [x.shape[0] for x in inputs]
    stacked = torch.cat(inputs, 0)
    if _stackable(module):
        merged = tuple(sorted(k for t in tasks for k in t))
        return list(fn(module, stacked, merged, pending).split(rows, 0))
    return list(fn(module, stacked, tasks, pending, rows).split(rows, 0))


@register("tree")
def run_tree(model, x: torch.Tensor, gates: Gates) -> dict[str, torch.Tensor]:
    """Run every task through the prefix tree of a fixed policy: ``{task: head_k(leaf_k)}``.

    Args:
        model: an :class:`~fastshare.model.AdaShareNet`.
        x: ``(B, 3, H, W)`` images (the same for all tasks).
        gates: fixed (or forced) gates, e.g. ``model.gates("fixed", policy=p)`` with ``p`` ``(K, L)`` 0/1.

    Returns ``{task: (B, classes, h, w)}``, equal to the sequential reference with the same gates (see the
    module docstring for BatchNorm running statistics).

    Raises ``ValueError`` for gates that are not fixed, ``TypeError`` for a backbone BatchNorm using batch
    statistics that is not an ``nn.BatchNorm2d`` (see the module docstring).
    """
    plan = plan_for_gates(gates, tuple(model.tasks))
    bb = model.backbone
    check_batch_norms(bb, "tree", (nn.BatchNorm2d,),
                      "it computes each node's batch statistics itself (nn.BatchNorm2d maths), which would "
                      "bypass this module's own normalisation")
    pending: _Pending = {}
    everyone = tuple(range(plan.num_tasks))
    stem = bb.maxpool(bb.relu(_norm(bb.bn1, bb.conv1(x), everyone, pending)))
    acts: dict[int, torch.Tensor] = {-1: stem}
    node_tasks = {-1: everyone}
    node_tasks.update({n.index: n.tasks for n in plan.nodes})
    for l in range(bb.num_blocks):
        level = plan.level(l)
        parents = list(dict.fromkeys(n.parent for n in level))
        if bb.has_projection(l):
            stage, _ = bb.block_index[l]
            shortcuts = _apply(_projection, bb.ds[stage], [acts[p] for p in parents],
                               [node_tasks[p] for p in parents], pending)
            r = dict(zip(parents, shortcuts))
        else:
            r = {p: acts[p] for p in parents}
        running = [n for n in level if n.execute]
        if running:
            stage, b = bb.block_index[l]
            fs = _apply(_branch, bb.blocks[stage][b], [acts[n.parent] for n in running],
                        [n.tasks for n in running], pending)
            for n, f in zip(running, fs):
                acts[n.index] = torch.relu(r[n.parent] + f)
        for n in level:
            if not n.execute:
                acts[n.index] = r[n.parent]
        for p in parents:  # a parent's only readers are the nodes of this block
            del acts[p]
    _flush(pending)
    if _head_forward is None:
        return {task: model.heads[task](acts[plan.leaves[k]]) for k, task in enumerate(model.tasks)}
    return {task: _head_forward(model.heads[task], acts[plan.leaves[k]]) for k, task in enumerate(model.tasks)}
