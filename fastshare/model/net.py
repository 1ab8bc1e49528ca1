"""``AdaShareNet``: a shared Deeplab-ResNet backbone, per-task ASPP heads, and per-task policy logits."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from fastshare.model.backbone import DeeplabResNet, deeplab_resnet
from fastshare.model.heads import ASPPHead
from fastshare.policy import Gates

INIT_METHODS = ("equal", "random", "all_chosen")


class AdaShareNet(nn.Module):
    """AdaShare's multi-task network (their ``MTL2``), executed by a pluggable executor.

    Args:
        backbone: ``"resnet18"``, ``"resnet34"``, ``"resnet101"`` or a :class:`DeeplabResNet`.
        tasks: ordered ``{task name: output channels}``, e.g. ``{"seg": 40, "sn": 3, "depth": 1}``.
        skip_layer: the first ``skip_layer`` blocks always execute and have no logits.
        init_method: logits init: ``"equal"`` (0.5 in both columns), ``"random"`` (N(0, 1e-3)),
            ``"all_chosen"`` (column 0 = 0, column 1 = ``init_neg_logits``).
        init_neg_logits: the skip logit of ``"all_chosen"``.
        head_width: ASPP branch width (1024 in the paper).
        dropout: head dropout probability.
        executor: ``"auto"``, ``"sequential"`` (the paper's execution order, the reference),
            ``"batched"`` or ``"tree"`` (see :mod:`fastshare.executors`).

    Attributes:
        logits: ``(K, Lp, 2)`` policy logits, ``Lp = L - skip_layer``; column 0 = execute, 1 = skip.
    """

    def __init__(self, backbone: str | DeeplabResNet = "resnet18", tasks: Mapping[str, int] | None = None,
                 skip_layer: int = 0, init_method: str = "equal", init_neg_logits: float | None = None,
                 head_width: int = 1024, dropout: float = 0.5, executor: str = "auto") -> None:
        super().__init__()
        if not tasks:
            raise ValueError("tasks must name at least one task, e.g. {'seg': 40, 'sn': 3}")
        for name, classes in tasks.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"task names must be identifiers, got {name!r}")
            if int(classes) < 1:
                raise ValueError(f"task {name!r} needs >= 1 output channel, got {classes}")
        self.backbone = deeplab_resnet(backbone) if isinstance(backbone, str) else backbone
        self.tasks = tuple(tasks)
        self.task_classes = {t: int(c) for t, c in tasks.items()}
        n_blocks = self.backbone.num_blocks
        if not 0 <= skip_layer < n_blocks:
            raise ValueError(f"skip_layer must be in [0, {n_blocks}), got {skip_layer}")
        self.skip_layer = int(skip_layer)
        self.heads = nn.ModuleDict({
            t: ASPPHead(self.backbone.out_channels, c, width=head_width, dropout=dropout)
            for t, c in self.task_classes.items()})
        self.logits = nn.Parameter(self._init_logits(init_method, init_neg_logits))
        from fastshare import executors

        executors.check_name(executor)
        self.executor = executor

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_blocks(self) -> int:
        return self.backbone.num_blocks

    def _init_logits(self, method: str, neg: float | None) -> torch.Tensor:
        shape = (len(self.tasks), self.num_blocks - self.skip_layer, 2)
        if method == "equal":
            return torch.full(shape, 0.5)
        if method == "random":
            return 1e-3 * torch.randn(shape)
        if method == "all_chosen":
            if neg is None:
                raise ValueError("init_method 'all_chosen' needs init_neg_logits")
            logits = torch.full(shape, float(neg))
            logits[..., 0] = 0
            return logits
        raise ValueError(f"unknown init_method {method!r}; choose one of {', '.join(INIT_METHODS)}")

    def task_index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ValueError(f"unknown task {task!r}; this model has {', '.join(self.tasks)}") from None

    # Parameter groups, as AdaShare's optimisers use them.
    def policy_parameters(self) -> list[nn.Parameter]:
        return [self.logits]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def network_parameters(self) -> list[nn.Parameter]:
        return self.backbone_parameters() + self.head_parameters()

    def gates(self, mode: str = "full", *, tau: float = 5.0, hard: bool = False,
              num_train_layers: int | None = None, u: torch.Tensor | None = None,
              generator: torch.Generator | None = None, policy: torch.Tensor | None = None) -> Gates:
        """Gates for one forward: ``"full"`` (all blocks), ``"sample"`` (Gumbel, curriculum stage
        ``num_train_layers``) or ``"fixed"`` (``policy``: ``(K, L)`` 0/1)."""
        if mode == "full":
            return Gates.full(self.num_tasks, self.num_blocks)
        if mode == "sample":
            return Gates.sample(self.logits, tau, hard, self.num_blocks, num_train_layers, u, generator)
        if mode == "fixed":
            if policy is None:
                raise ValueError("mode 'fixed' needs policy=(K, L) 0/1 tensor")
            if tuple(policy.shape) != (self.num_tasks, self.num_blocks):
                raise ValueError(f"policy must have shape ({self.num_tasks}, {self.num_blocks}), "
                                 f"got {tuple(policy.shape)}")
            return Gates.fixed(policy.to(self.logits.device))
        raise ValueError(f"unknown gate mode {mode!r}; choose 'full', 'sample' or 'fixed'")

    def forward(self, x: torch.Tensor, gates: Gates | None = None,
                executor: str | None = None) -> dict[str, torch.Tensor]:
        """Run every task: ``(B, 3, H, W) -> {task: (B, classes, h, w)}`` at output stride 8.

        Args:
            x: input images.
            gates: from :meth:`gates`; None = every block executed.
            executor: overrides ``self.executor`` for this call.
        """
        from fastshare import executors

        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, H, W) images, got {tuple(x.shape)}")
        if gates is None:
            gates = Gates.full(self.num_tasks, self.num_blocks)
        if gates.num_tasks != self.num_tasks or gates.num_blocks != self.num_blocks:
            raise ValueError(f"gates are for {gates.num_tasks} tasks x {gates.num_blocks} blocks, the model "
                             f"has {self.num_tasks} x {self.num_blocks}")
        return executors.run(executor or self.executor, self, x, gates)
