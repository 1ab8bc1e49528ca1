"""``fastshare.export``: a trained :class:`~fastshare.model.AdaShareNet` + a fixed policy -> compact model.

The result is a :class:`fastshare.compact.CompactNet` (plain ``nn.Module`` classes from a torch-only file)
holding the stem, the residual branches some task executes, the projection shortcuts on the tasks' paths
and the heads, with weights and BatchNorm buffers copied from the model. In eval mode it computes what the
tree executor computes (each node once, skipped blocks not at all). Save ``compact.config`` (JSON) with
``compact.state_dict()``; ``CompactNet(config).load_state_dict(sd)`` rebuilds it without fastshare.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastshare.compact import COMPACT_FORMAT, CompactNet
from fastshare.model.backbone import Bottleneck
from fastshare.plan import Plan

__all__ = ["export", "compact_config"]


def compact_config(model, plan: Plan, source_state: dict[str, torch.Tensor] | None = None) -> dict:
    """The JSON-able :class:`CompactNet` config of ``model`` under ``plan`` (see ``CompactNet``'s docstring).

    ``source_state``: ``_source_state(model, plan)`` when the caller has built it already; else built here."""
    bb = model.backbone
    blocks = []
    for l, (stage, b) in enumerate(bb.block_index):
        block = bb.blocks[stage][b]
        conv = block.conv1 if not isinstance(block, Bottleneck) else block.conv2
        blocks.append([l, block.conv1.in_channels, block.bn1.num_features, block.conv1.stride[0],
                       conv.dilation[0], bb.has_projection(l)])
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    track = bns[0].track_running_stats
    if any(m.track_running_stats != track or (m.running_mean is not None) != track for m in bns):
        raise ValueError("export needs the same track_running_stats (with or without running-statistics "
                         "buffers) for every backbone BatchNorm")
    if source_state is None:
        source_state = _source_state(model, plan)
    frozen = [name for name, v in source_state.items()
              if isinstance(v, torch.nn.Parameter) and not v.requires_grad]
    heads = [model.heads[t] for t in model.tasks]
    first = heads[0].branches()[0]
    dropout = first.dropout.p
    for head in heads:
        for branch in head.branches():
            if branch.dropout.p != dropout or branch.conv2.out_channels != first.conv2.out_channels:
                raise ValueError("export needs the same head width and dropout for every task")
    return {
        "format": COMPACT_FORMAT,
        "block": "bottleneck" if bb.expansion == 4 else "basic",
        "blocks": blocks,
        "out_channels": bb.out_channels,
        "program": [[n.parent, n.block, n.execute] for n in plan.nodes],
        "tasks": [[t, model.task_classes[t], plan.leaves[k]] for k, t in enumerate(model.tasks)],
        "policy": [list(r) for r in plan.policy],
        "plan": plan.to_dict(),
        "head": {"width": first.conv2.out_channels, "rates": list(heads[0].rates), "dropout": dropout},
        "track_running_stats": track,
        "frozen": frozen,
    }


def _source_state(model, plan: Plan) -> dict[str, torch.Tensor]:
    """``{CompactNet state-dict key: the model's tensor}`` (parameters and buffers, not copied) of the
    stem, the blocks some task of ``plan`` executes, the projections on the tasks' paths and the heads."""
    bb = model.backbone
    executed = sorted({n.block for n in plan.nodes if n.execute})
    on_path = sorted({n.block for n in plan.nodes if bb.has_projection(n.block)})
    state = {"conv1.weight": bb.conv1.weight}
    state.update({f"bn1.{k}": v for k, v in bb.bn1.state_dict(keep_vars=True).items()})
    for l in executed:
        stage, b = bb.block_index[l]
        state.update({f"blocks.{l}.{k}": v for k, v in bb.blocks[stage][b].state_dict(keep_vars=True).items()})
    for l in on_path:
        stage, _ = bb.block_index[l]
        state.update({f"ds.{l}.{k}": v for k, v in bb.ds[stage].state_dict(keep_vars=True).items()})
    for t in model.tasks:
        state.update({f"heads.{t}.{k}": v for k, v in model.heads[t].state_dict(keep_vars=True).items()})
    return state


def export(model, policy: torch.Tensor | Plan | Sequence[Sequence[int]]) -> CompactNet:
    """Compact deployment model of ``model`` under a fixed hard ``policy``.

    Args:
        model: an :class:`~fastshare.model.AdaShareNet`.
        policy: ``(K, L)`` 0/1 tensor or nested list (1 = execute; row ``k`` = ``model.tasks[k]``), or a
            :class:`~fastshare.plan.Plan`, whose rows are matched to the model's tasks by name (see
            :meth:`AdaShareNet.policy_tensor <fastshare.model.AdaShareNet.policy_tensor>`).

    Returns a :class:`~fastshare.compact.CompactNet` on the model's device and dtype, in eval mode, whose
    ``state_dict`` holds copies of exactly the used weights and buffers (``requires_grad`` as in the
    model, recorded in ``config["frozen"]``); ``report(input_size)`` gives its parameters and FLOPs
    against the full multi-task network and K single-task networks.

    Raises ``ValueError`` for a policy of another shape, values other than 0/1, or a plan whose task names
    are not the model's.
    """
    given = policy if isinstance(policy, Plan) else Plan(policy)
    if (given.num_tasks, given.num_blocks) != (model.num_tasks, model.num_blocks):
        raise ValueError(f"policy is {given.num_tasks} x {given.num_blocks}, the model has "
                         f"{model.num_tasks} tasks x {model.num_blocks} blocks")
    # A plan's rows are matched to the model's tasks by name; a tensor's or a list's are in task order.
    rows = model.policy_tensor(policy) if isinstance(policy, Plan) else given.policy
    plan = Plan(rows, model.tasks)
    source = _source_state(model, plan)
    with torch.device("meta"):
        compact = CompactNet(compact_config(model, plan, source_state=source))
    state = {k: v.detach().clone() for k, v in source.items()}
    compact.load_state_dict(state, strict=True, assign=True)
    return compact.eval()
