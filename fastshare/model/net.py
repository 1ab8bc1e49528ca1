"""``AdaShareNet``: a shared Deeplab-ResNet backbone, per-task ASPP heads, and per-task policy logits."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn

from fastshare.model.backbone import DeeplabResNet, deeplab_resnet
from fastshare.model.heads import ASPPHead
from fastshare.plan import Plan, default_task_names
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

    def policy_tensor(self, policy: torch.Tensor | Plan | Sequence[Sequence[int]]) -> torch.Tensor:
        """A fixed hard policy as a ``(K, L)`` tensor whose row ``k`` is task ``self.tasks[k]``.

        Args:
            policy: ``(K, L)`` 0/1 tensor (rows in this model's task order; returned as it is), nested
                sequence of 0/1 (same), or a :class:`~fastshare.plan.Plan`. A plan's rows are matched to
                this model's tasks by name (reordered if its task names are a permutation of
                ``self.tasks``); a plan with the default names ``task0, task1, ...`` is read positionally.

        Raises ``TypeError`` for another type and ``ValueError`` for a wrong shape, values other than 0/1,
        or plan task names that are not this model's.
        """
        if isinstance(policy, Plan):
            names = tuple(policy.task_names)
            if len(names) == self.num_tasks and sorted(names) == sorted(self.tasks):
                tensor = policy.policy_tensor()[[names.index(t) for t in self.tasks]]
            elif names == default_task_names(policy.num_tasks):
                tensor = policy.policy_tensor()  # a plan built without names: positional
            else:
                raise ValueError(f"the plan is for tasks {', '.join(names)}, the model has "
                                 f"{', '.join(self.tasks)}")
        elif isinstance(policy, torch.Tensor):
            tensor = policy
        elif isinstance(policy, (list, tuple)):
            tensor = Plan(policy).policy_tensor()  # validates the nesting and the 0/1 values
        else:
            raise TypeError(f"a fixed policy must be a (K, L) 0/1 tensor, a nested list of 0/1 or a Plan, "
                            f"got {type(policy).__name__}")
        if tuple(tensor.shape) != (self.num_tasks, self.num_blocks):
            raise ValueError(f"policy must have shape ({self.num_tasks}, {self.num_blocks}), "
                             f"got {tuple(tensor.shape)}")
        return tensor

    def gates(self, mode: str = "full", *, tau: float = 5.0, hard: bool = False,
              num_train_layers: int | None = None, u: torch.Tensor | None = None,
              generator: torch.Generator | None = None,
              policy: torch.Tensor | Plan | Sequence[Sequence[int]] | None = None) -> Gates:
        """Gates for one forward: ``"full"`` (all blocks), ``"sample"`` (Gumbel, curriculum stage
        ``num_train_layers``) or ``"fixed"`` (``policy``: ``(K, L)`` 0/1 tensor, nested list or
        :class:`~fastshare.plan.Plan`, see :meth:`policy_tensor`)."""
        if mode == "full":
            return Gates.full(self.num_tasks, self.num_blocks)
        if mode == "sample":
            return Gates.sample(self.logits, tau, hard, self.num_blocks, num_train_layers, u, generator)
        if mode == "fixed":
            if policy is None:
                raise ValueError("mode 'fixed' needs policy=: a (K, L) 0/1 tensor, nested list or Plan")
            return Gates.fixed(self.policy_tensor(policy).to(self.logits.device))
        raise ValueError(f"unknown gate mode {mode!r}; choose 'full', 'sample' or 'fixed'")

    def forward(self, x: torch.Tensor, gates: Gates | None = None,
                executor: str | None = None) -> dict[str, torch.Tensor]:
        """Run every task: ``(B, 3, H, W) -> {task: (B, classes, h, w)}`` at output stride 8.

        Args:
            x: ``(B, 3, H, W)`` floating-point images on the model's device, in the dtype of its weights
                (or any floating dtype under ``torch.autocast``).
            gates: a :class:`~fastshare.policy.Gates` from :meth:`gates`; None = every block executed.
            executor: overrides ``self.executor`` for this call (None: ``self.executor``).

        Raises ``TypeError`` for an ``x`` that is not a floating-point tensor (or not in the weights'
        dtype outside autocast), ``gates`` that are not a ``Gates``; ``ValueError`` for a wrong shape, an
        ``x`` on another device than the model, gates of another model size or an unknown executor.
        """
        from fastshare import executors

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a (B, 3, H, W) image tensor, got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, H, W) images, got {tuple(x.shape)}")
        weight = self.backbone.conv1.weight
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (the model's weights are {weight.dtype}), got "
                            f"{x.dtype}; convert images first, e.g. x.to({weight.dtype}) / 255")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model is on {weight.device}; move one of them "
                             f"(x.to({str(weight.device)!r}) or model.to(x.device))")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the model's weights are {weight.dtype}; convert one of them "
                            f"(x.to({weight.dtype}) or model.to({x.dtype})), or run under torch.autocast")
        if gates is None:
            gates = Gates.full(self.num_tasks, self.num_blocks)
        elif not isinstance(gates, Gates):
            raise TypeError(f"gates must be a fastshare.policy.Gates (e.g. model.gates('sample', ...)) or None, "
                            f"got {type(gates).__name__}")
        if gates.num_tasks != self.num_tasks or gates.num_blocks != self.num_blocks:
            raise ValueError(f"gates are for {gates.num_tasks} tasks x {gates.num_blocks} blocks, the model "
                             f"has {self.num_tasks} x {self.num_blocks}")
        return executors.run(executor if executor is not None else self.executor, self, x, gates)
