"""The execution plan of a fixed hard policy: the prefix tree of the tasks' paths (DESIGN.md §3).

A hard policy ``p`` of shape ``(K, L)`` holds ``p[k, l] = 1`` where task ``k`` executes block ``l`` and
``0`` where it skips it. Task ``k``'s activation after block ``l`` depends only on its decisions
``p[k, 0..l]`` (the same stem, then ``x <- relu(shortcut(x) + F_l(x))`` or ``x <- shortcut(x)``), so two
tasks with the same prefix ``p[k, :l+1]`` hold the same tensor there. The plan has one node per distinct
``(prefix p[k, :l+1], block l)``:

- the root is the stem, shared by all tasks;
- node ``(P, l)`` has parent ``(P[:-1], l - 1)`` (the root for ``l = 0``), runs block ``l`` on its parent's
  output if ``P[-1] = 1`` (``execute``) and applies only the shortcut otherwise (a no-op unless the block
  has a 1x1 projection shortcut), and lists the tasks whose path goes through it;
- task ``k``'s head reads the leaf ``(p[k], L - 1)``.

The number of nodes is ``sum_l |{p[k, :l+1] : k}|`` (at most ``K * L``, the sequential reference's count).
Nodes at the same depth that execute block ``l`` are *siblings* in the sense of the tree executor: they run
the same weights on different inputs, so they can be stacked along the batch axis into one call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["Plan", "PlanNode", "default_task_names"]

PLAN_FORMAT = 1


def default_task_names(num_tasks: int) -> tuple[str, ...]:
    """The names of a plan's tasks when none are given: ``task0, task1, ...``."""
    return tuple(f"task{k}" for k in range(num_tasks))


@dataclass(frozen=True)
class PlanNode:
    """One node of the prefix tree.

    Attributes:
        index: position in :attr:`Plan.nodes` (nodes are sorted by block, then by their first task).
        block: the block ``l`` this node applies.
        parent: index of the parent node; ``-1`` for the stem (nodes of block 0).
        execute: whether ``F_l`` runs (``True``) or the node is the shortcut only (skip).
        tasks: the tasks (indices, ascending) whose paths go through this node.
    """

    index: int
    block: int
    parent: int
    execute: bool
    tasks: tuple[int, ...]


def _as_rows(policy: torch.Tensor | Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    """Validate a ``(K, L)`` 0/1 policy and return it as nested int tuples."""
    if isinstance(policy, torch.Tensor):
        if policy.ndim != 2:
            raise ValueError(f"a policy must have shape (K, L), got {tuple(policy.shape)}")
        if policy.is_floating_point() or policy.dtype == torch.bool:
            values = policy.detach().to("cpu", torch.float64)
        else:
            values = policy.detach().to("cpu", torch.int64)
        rows = values.tolist()
    else:
        rows = [list(r) for r in policy]
    if not rows or not rows[0]:
        raise ValueError("a policy needs at least one task and one block")
    width = len(rows[0])
    out = []
    for k, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(f"policy row {k} has {len(row)} blocks, row 0 has {width}")
        for l, v in enumerate(row):
            if v not in (0, 1):  # 0.0 == 0 and True == 1 also pass
                raise ValueError(f"policy[{k}, {l}] = {v!r}; a hard policy holds only 0 (skip) and 1 (execute)")
        out.append(tuple(int(v) for v in row))
    return tuple(out)


class Plan:
    """Prefix tree of a ``(K, L)`` hard policy (see the module docstring).

    Args:
        policy: ``(K, L)`` 0/1 tensor or nested sequence (1 = execute).
        task_names: optional names of the K tasks, used when printing.

    Example::

        >>> plan = Plan(torch.tensor([[1, 1, 0], [1, 0, 1]]), ["seg", "sn"])
        >>> plan.num_nodes  # (1,) ; (1,1) (1,0) ; (1,1,0) (1,0,1)
        5
    """

    def __init__(self, policy: torch.Tensor | Sequence[Sequence[int]],
                 task_names: Sequence[str] | None = None) -> None:
        self.policy = _as_rows(policy)
        self.num_tasks = len(self.policy)
        self.num_blocks = len(self.policy[0])
        if task_names is None:
            task_names = default_task_names(self.num_tasks)
        self.task_names = tuple(str(t) for t in task_names)
        if len(self.task_names) != self.num_tasks:
            raise ValueError(f"{len(self.task_names)} task names for a policy of {self.num_tasks} tasks")
        nodes: list[PlanNode] = []
        levels: list[tuple[int, ...]] = []
        # index of the node holding each task's current prefix; -1 = the stem.
        current = [-1] * self.num_tasks
        for l in range(self.num_blocks):
            groups: dict[tuple[int, int], list[int]] = {}
            for k in range(self.num_tasks):  # ascending k: groups are ordered by their first task
                groups.setdefault((current[k], self.policy[k][l]), []).append(k)
            level = []
            for (parent, decision), tasks in groups.items():
                node = PlanNode(len(nodes), l, parent, bool(decision), tuple(tasks))
                nodes.append(node)
                level.append(node.index)
                for k in tasks:
                    current[k] = node.index
            levels.append(tuple(level))
        self.nodes: tuple[PlanNode, ...] = tuple(nodes)
        self._levels = tuple(levels)
        self.leaves: tuple[int, ...] = tuple(current)

    @property
    def num_nodes(self) -> int:
        """Number of ``(prefix, block)`` nodes (the stem excluded)."""
        return len(self.nodes)

    @property
    def num_executed(self) -> int:
        """Number of nodes that run a residual branch ``F_l``."""
        return sum(n.execute for n in self.nodes)

    def level(self, l: int) -> tuple[PlanNode, ...]:
        """The nodes of block ``l``, ordered by their first task."""
        if not 0 <= l < self.num_blocks:
            raise IndexError(f"block {l} out of range for a plan of {self.num_blocks} blocks")
        return tuple(self.nodes[i] for i in self._levels[l])

    def executing_tasks(self, l: int) -> tuple[int, ...]:
        """Tasks that execute block ``l``, ascending."""
        return tuple(k for k in range(self.num_tasks) if self.policy[k][l])

    def path(self, k: int) -> tuple[int, ...]:
        """Node indices of task ``k``'s path, block 0 first."""
        out, i = [], self.leaves[k]
        while i >= 0:
            out.append(i)
            i = self.nodes[i].parent
        return tuple(reversed(out))

    def policy_tensor(self) -> torch.Tensor:
        """The policy as a ``(K, L)`` float32 0/1 tensor (the form :meth:`Gates.fixed` takes)."""
        return torch.tensor(self.policy, dtype=torch.float32)

    # Serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description: the policy, the task names and (for readers) the node list.

        :meth:`from_dict` rebuilds the tree from the policy and checks the stored nodes against it.
        """
        return {
            "format": PLAN_FORMAT,
            "task_names": list(self.task_names),
            "policy": [list(r) for r in self.policy],
            "nodes": [{"block": n.block, "parent": n.parent, "execute": n.execute, "tasks": list(n.tasks)}
                      for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on an unknown format or inconsistent nodes."""
        if not isinstance(data, dict) or "policy" not in data:
            raise ValueError("a plan dict needs a 'policy' entry (see Plan.to_dict)")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise ValueError(f"unsupported plan format {data.get('format')!r}; this build reads {PLAN_FORMAT}")
        plan = cls(data["policy"], data.get("task_names"))
        if "nodes" in data and data["nodes"] != plan.to_dict()["nodes"]:
            raise ValueError("the plan's stored nodes do not match the prefix tree of its policy")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and (self.policy, self.task_names) == (other.policy, other.task_names)

    def __hash__(self) -> int:
        return hash((self.policy, self.task_names))

    # Printing --------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (f"Plan(num_tasks={self.num_tasks}, num_blocks={self.num_blocks}, num_nodes={self.num_nodes}, "
                f"num_executed={self.num_executed})")

    def __str__(self) -> str:
        """One line per block: each node as ``{tasks} run`` or ``{tasks} skip``, siblings side by side.

        Tasks in the same braces share that block's computation (same input, same weights).
        """
        k, l = self.num_tasks, self.num_blocks
        ref_blocks = k * l
        lines = [f"Plan: {k} task(s) x {l} blocks; {self.num_nodes} nodes, {self.num_executed} run a "
                 f"residual branch (sequential reference: {ref_blocks} block passes)",
                 "stem      {" + ",".join(self.task_names) + "} run"]
        width = len(str(l - 1))
        for b in range(l):
            cells = ["{" + ",".join(self.task_names[t] for t in n.tasks) + "} " + ("run" if n.execute else "skip")
                     for n in self.level(b)]
            lines.append(f"block {b:>{width}}  " + "   ".join(cells))
        return "\n".join(lines)
