"""Compact deployment model of a fixed AdaShare policy; self-contained (imports only torch).

:func:`fastshare.export` writes a :class:`CompactNet`: the stem, the residual branches that some task
executes, the projection shortcuts on the tasks' paths and the task heads, plus a static *program*: the
nodes of the policy's prefix tree (see :mod:`fastshare.plan`) in execution order. Everything needed to
rebuild the module is in the JSON-able :attr:`CompactNet.config`, so this file can be copied on its own
next to a checkpoint::

    net = CompactNet(config)            # config: the dict saved with the checkpoint
    net.load_state_dict(state_dict)
    outputs = net(images)               # {task: (B, classes, h, w)}

The forward is plain ``nn.Module`` calls in a Python loop over the static program, so it traces with
``torch.export.export`` and compiles with ``torch.compile(fullgraph=True)``. The module is meant for
inference: in training mode each node's BatchNorm is updated once per call (not once per task, as the
tree executor does to match AdaShare's code).

Maths, with ``h`` the parent node's output (the stem's for block 0) and ``r = ds_l(h)`` (1x1 conv + BN)
for a stage's first block with a projection, else ``r = h``:
``out = relu(r + F_l(h))`` for an executing node, ``out = r`` for a skipping one.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CompactNet", "CompactReport", "COMPACT_FORMAT"]

COMPACT_FORMAT = 1


def _conv3x3(cin: int, cout: int, stride: int, dilation: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class CompactBasicBlock(nn.Module):
    """``F(x) = bn2(conv2(relu(bn1(conv1(x)))))`` (3x3 convs); same parameter names as AdaShare's.
    ``track_running_stats``: that of every BatchNorm."""

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 track_running_stats: bool = True) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes, track_running_stats=track_running_stats)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes, track_running_stats=track_running_stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class CompactBottleneck(nn.Module):
    """``F(x)``: 1x1 (stride) -> 3x3 (dilated) -> 1x1 (x4), BN after each, ReLU between; BN affine
    parameters frozen (``requires_grad=False``) as in AdaShare's Deeplab-ResNet-101."""

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int,
                 track_running_stats: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, track_running_stats=track_running_stats)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, track_running_stats=track_running_stats)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4, track_running_stats=track_running_stats)
        for bn in (self.bn1, self.bn2, self.bn3):
            for p in bn.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))


class CompactASPPBranch(nn.Module):
    """``conv3x3(dilation d, bias) -> ReLU -> Dropout -> conv1x1 -> ReLU -> Dropout -> conv1x1``."""

    def __init__(self, inplanes: int, classes: int, rate: int, width: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 3, padding=rate, dilation=rate, bias=True)
        self.conv2 = nn.Conv2d(width, width, 1)
        self.conv3 = nn.Conv2d(width, classes, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.relu(self.conv1(x)))
        x = self.dropout(torch.relu(self.conv2(x)))
        return self.conv3(x)


class CompactASPPHead(nn.Module):
    """Sum of the branches ``fc1_c0..fc1_c{n-1}``, one per dilation rate."""

    def __init__(self, inplanes: int, classes: int, rates: list[int], width: int, dropout: float) -> None:
        super().__init__()
        self.num_branches = len(rates)
        for j, rate in enumerate(rates):
            self.add_module(f"fc1_c{j}", CompactASPPBranch(inplanes, classes, rate, width, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc1_c0(x)
        for j in range(1, self.num_branches):
            out = out + getattr(self, f"fc1_c{j}")(x)
        return out


_BLOCKS = {"basic": (CompactBasicBlock, 1), "bottleneck": (CompactBottleneck, 4)}


@dataclass
class CompactReport:
    """Parameters and FLOPs of a compact model against AdaShare's baselines (as the paper reports them).

    ``flops`` are ``torch.utils.flop_counter.FlopCounterMode`` counts (2 per multiply-add; convolutions and
    matrix products only) of one forward at ``input_size``. Baselines: ``full_multitask`` = one backbone
    with every block executed and shared by all tasks, plus the K heads (hard sharing);
    ``single_task`` = K separate single-task networks (a full backbone and one head each), which is also
    what the sequential reference computes.
    """

    input_size: tuple[int, int, int, int]
    params_per_task: dict[str, int]
    params_total: int
    params_full_multitask: int
    params_single_task: int
    flops_per_task: dict[str, int]
    flops_total: int
    flops_full_multitask: int
    flops_single_task: int
    backbone_flops_total: int
    backbone_flops_single_task: int
    ratios: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"compact model at input {self.input_size}",
                 f"{'':24}{'params':>14}{'GFLOPs':>12}"]
        for task in self.params_per_task:
            lines.append(f"{'task ' + task:24}{self.params_per_task[task]:>14,}"
                         f"{self.flops_per_task[task] / 1e9:>12.3f}")
        for name, p, f in (("compact (all tasks)", self.params_total, self.flops_total),
                           ("full multi-task", self.params_full_multitask, self.flops_full_multitask),
                           ("K single-task nets", self.params_single_task, self.flops_single_task)):
            lines.append(f"{name:24}{p:>14,}{f / 1e9:>12.3f}")
        lines += [f"{k}: {v:.4f}" for k, v in self.ratios.items()]
        return "\n".join(lines)


class CompactNet(nn.Module):
    """Stem, used blocks, shortcuts and heads of one fixed policy, run by a static program.

    Args:
        config: JSON-able dict (written by :func:`fastshare.export`):

            - ``format``: :data:`COMPACT_FORMAT`;
            - ``block``: ``"basic"`` or ``"bottleneck"``;
            - ``blocks``: ``[[l, inplanes, planes, stride, dilation, has_projection], ...]`` for every block
              ``l`` of the full backbone; only those the program executes get a residual branch, only
              projections on some task's path are kept;
            - ``out_channels``: channels of the backbone's output (the heads' input);
            - ``program``: ``[[parent, l, execute], ...]``: node ``i`` (0-based, in execution order) applies
              block ``l`` to node ``parent``'s output (``-1`` = the stem);
            - ``tasks``: ``[[name, classes, leaf], ...]`` (the head of ``name`` reads node ``leaf``);
            - ``policy``: the ``(K, L)`` 0/1 policy, for reference;
            - ``head``: ``{"width", "rates", "dropout"}``;
            - ``track_running_stats`` (optional, default True): that of every backbone BatchNorm (False:
              no running-statistics buffers, batch statistics in eval mode too);
            - ``frozen`` (optional): names of the parameters with ``requires_grad=False`` (every other
              parameter is trainable); without it, the modules' defaults (Bottleneck BN frozen).

    Forward: ``(B, 3, H, W) -> {task: (B, classes, h, w)}``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        if config.get("format") != COMPACT_FORMAT:
            raise ValueError(f"unsupported compact-model format {config.get('format')!r}; "
                             f"this file reads {COMPACT_FORMAT}")
        self.config = copy.deepcopy(config)
        block_cls, expansion = _BLOCKS[config["block"]]
        track = bool(config.get("track_running_stats", True))
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, track_running_stats=track)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.blocks = nn.ModuleDict()
        self.ds = nn.ModuleDict()
        self.program = tuple((int(p), int(l), bool(e)) for p, l, e in config["program"])
        on_path = {l for _, l, _ in self.program}
        executed = {l for _, l, e in self.program if e}
        for l, inplanes, planes, stride, dilation, has_projection in config["blocks"]:
            if l in executed:
                self.blocks[str(l)] = block_cls(inplanes, planes, stride, dilation, track)
            if has_projection and l in on_path:
                self.ds[str(l)] = nn.Sequential(
                    nn.Conv2d(inplanes, planes * expansion, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes * expansion, track_running_stats=track))
        head = config["head"]
        self.task_names = tuple(name for name, _, _ in config["tasks"])
        self.leaves = tuple(int(leaf) for _, _, leaf in config["tasks"])
        self.heads = nn.ModuleDict({
            name: CompactASPPHead(int(config["out_channels"]), int(classes), list(head["rates"]),
                                  int(head["width"]), float(head["dropout"]))
            for name, classes, _ in config["tasks"]})
        if config.get("frozen") is not None:
            frozen = set(config["frozen"])
            for name, p in self.named_parameters():
                p.requires_grad_(name not in frozen)

    def trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone part: ``(B, 3, H, W) ->`` each task's leaf features ``(B, C, h, w)``, in task order."""
        stem = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        acts: list[torch.Tensor] = []
        shortcuts: dict[tuple[int, int], torch.Tensor] = {}
        for parent, l, execute in self.program:
            h = stem if parent < 0 else acts[parent]
            key = str(l)
            if key in self.ds:
                if (parent, l) not in shortcuts:  # one projection per parent, shared by its children
                    shortcuts[(parent, l)] = self.ds[key](h)
                r = shortcuts[(parent, l)]
            else:
                r = h
            acts.append(torch.relu(r + self.blocks[key](h)) if execute else r)
        return [acts[leaf] for leaf in self.leaves]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.trunk(x)
        return {name: self.heads[name](f) for name, f in zip(self.task_names, feats)}

    # Reporting -----------------------------------------------------------------------------------------
    def _variant(self, tasks: list[list[Any]], program: list[list[Any]]) -> "CompactNet":
        """A network of the same backbone with other tasks/program, on the meta device (for counting)."""
        with torch.device("meta"):
            return CompactNet(dict(self.config, tasks=tasks, program=program))

    @staticmethod
    def _count(net: "CompactNet", input_size: tuple[int, ...]) -> tuple[int, int, int]:
        """(parameters, FLOPs of the forward, FLOPs of the trunk) at ``input_size``, on meta tensors."""
        from torch.utils.flop_counter import FlopCounterMode

        params = sum(p.numel() for p in net.parameters())
        x = torch.empty(input_size, device="meta")
        net.eval()
        with FlopCounterMode(display=False) as trunk:
            feats = net.trunk(x)
        with FlopCounterMode(display=False) as heads:
            for name, f in zip(net.task_names, feats):
                net.heads[name](f)
        return params, trunk.get_total_flops() + heads.get_total_flops(), trunk.get_total_flops()

    def report(self, input_size: tuple[int, int, int, int] = (1, 3, 321, 321)) -> CompactReport:
        """Parameters and FLOPs per task and in total, against the full multi-task network and K single-task
        networks (see :class:`CompactReport`). Computed on meta tensors: no memory, no compute."""
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != 4 or input_size[1] != 3:
            raise ValueError(f"input_size must be (B, 3, H, W), got {input_size}")
        cfg, tasks = self.config, self.config["tasks"]
        params_total, flops_total, bb_total = self._count(self._variant(tasks, cfg["program"]), input_size)
        params_task, flops_task = {}, {}
        for name, classes, leaf in tasks:
            path, i = [], int(leaf)
            while i >= 0:
                path.append(i)
                i = cfg["program"][i][0]
            remap = {old: new for new, old in enumerate(reversed(path))}
            program = [[remap.get(cfg["program"][i][0], -1), cfg["program"][i][1], cfg["program"][i][2]]
                       for i in reversed(path)]
            p, f, _ = self._count(self._variant([[name, classes, len(path) - 1]], program), input_size)
            params_task[name], flops_task[name] = p, f
        full_program = [[l - 1, l, True] for l in range(len(cfg["blocks"]))]
        leaf = len(full_program) - 1
        p_full, f_full, _ = self._count(self._variant([[n, c, leaf] for n, c, _ in tasks], full_program),
                                        input_size)
        p_single = f_single = bb_single = 0
        for name, classes, _ in tasks:
            p, f, b = self._count(self._variant([[name, classes, leaf]], full_program), input_size)
            p_single, f_single, bb_single = p_single + p, f_single + f, bb_single + b
        ratios = {
            "params_vs_full_multitask": params_total / p_full,
            "params_vs_single_task": params_total / p_single,
            "flops_vs_full_multitask": flops_total / f_full,
            "flops_vs_single_task": flops_total / f_single,
            "backbone_flops_vs_single_task": bb_total / bb_single,
        }
        return CompactReport(input_size, params_task, params_total, p_full, p_single, flops_task, flops_total,
                             f_full, f_single, bb_total, bb_single, ratios)
