"""``fastshare.export``: a trained :class:`~fastshare.model.AdaShareNet` + a fixed policy -> compact model.

The result is a :class:`fastshare.compact.CompactNet` (plain ``nn.Module`` classes from a torch-only file)
holding the stem, the residual branches some task executes, the projection shortcuts on the tasks' paths
and the heads, with weights and BatchNorm buffers copied from the model. In eval mode it computes what the
tree executor computes (each node once, skipped blocks not at all). Save ``compact.config`` (JSON) with
``compact.state_dict()``; ``CompactNet(config).load_state_dict(sd)`` rebuilds it without fastshare.
"""

from __future__ import annotations

import torch

from fastshare.compact import COMPACT_FORMAT, CompactNet
from fastshare.model.backbone import Bottleneck
from fastshare.plan import Plan

__all__ = ["export", "compact_config"]


def compact_config(model, plan: Plan) -> dict:
    """The JSON-able :class:`CompactNet` config of ``model`` under ``plan`` (see ``CompactNet``'s docstring)."""
    bb = model.backbone
    blocks = []
    for l, (stage, b) in enumerate(bb.block_index):
        block = bb.blocks[stage][b]
        conv = block.conv1 if not isinstance(block, Bottleneck) else block.conv2
        blocks.append([l, block.conv1.in_channels, block.bn1.num_features, block.conv1.stride[0],
                       conv.dilation[0], bb.has_projection(l)])
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
    }


def export(model, policy: torch.Tensor | Plan) -> CompactNet:
    """Compact deployment model of ``model`` under a fixed hard ``policy``.

    Args:
        model: an :class:`~fastshare.model.AdaShareNet`.
        policy: ``(K, L)`` 0/1 tensor (1 = execute), or a :class:`~fastshare.plan.Plan`.

    Returns a :class:`~fastshare.compact.CompactNet` on the model's device and dtype, in eval mode, whose
    ``state_dict`` holds copies of exactly the used weights and buffers; ``report(input_size)`` gives its
    parameters and FLOPs against the full multi-task network and K single-task networks.
    """
    plan = policy if isinstance(policy, Plan) else Plan(policy)
    if (plan.num_tasks, plan.num_blocks) != (model.num_tasks, model.num_blocks):
        raise ValueError(f"policy is {plan.num_tasks} x {plan.num_blocks}, the model has "
                         f"{model.num_tasks} tasks x {model.num_blocks} blocks")
    plan = Plan(plan.policy, model.tasks)
    bb = model.backbone
    with torch.device("meta"):
        compact = CompactNet(compact_config(model, plan))
    state = {"conv1.weight": bb.conv1.weight}
    state.update({f"bn1.{k}": v for k, v in bb.bn1.state_dict(keep_vars=True).items()})
    for key in compact.blocks:
        stage, b = bb.block_index[int(key)]
        state.update({f"blocks.{key}.{k}": v for k, v in bb.blocks[stage][b].state_dict(keep_vars=True).items()})
    for key in compact.ds:
        stage, _ = bb.block_index[int(key)]
        state.update({f"ds.{key}.{k}": v for k, v in bb.ds[stage].state_dict(keep_vars=True).items()})
    for t in model.tasks:
        state.update({f"heads.{t}.{k}": v for k, v in model.heads[t].state_dict(keep_vars=True).items()})
    state = {k: v.detach().clone() for k, v in state.items()}
    compact.load_state_dict(state, strict=True, assign=True)
    return compact.eval()
