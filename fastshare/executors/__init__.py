"""Executors: how an :class:`~fastshare.model.AdaShareNet` runs its tasks through the shared backbone.

- ``sequential``: the specification — one backbone pass per task in task order, every block computed and
  gated with pure-PyTorch ops, exactly as AdaShare's published code (DESIGN.md §3).
- ``batched``: policy learning — shared prefix once, then all tasks stacked along the batch axis.
- ``tree``: fixed hard policies — each distinct (path prefix, block) once, skipped blocks not computed.
- ``auto``: ``tree`` for fixed gates, ``batched`` otherwise, each only where registered.

An executor is a function ``(model, x, gates) -> {task: output}`` registered with :func:`register`.
"""

from __future__ import annotations

from typing import Callable

import torch

_EXECUTORS: dict[str, Callable] = {}
NAMES = ("auto", "sequential", "batched", "tree")


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering an executor function under ``name``."""
    if name not in NAMES[1:]:
        raise ValueError(f"unknown executor name {name!r}")

    def deco(fn: Callable) -> Callable:
        _EXECUTORS[name] = fn
        return fn

    return deco


def check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(NAMES)}")


def resolve(name: str, gates) -> str:
    """The concrete executor for ``name`` and these gates."""
    check_name(name)
    if name != "auto":
        if name not in _EXECUTORS:
            raise ValueError(f"executor {name!r} is not available in this build")
        return name
    from fastshare.policy import FIXED

    preferred = ("tree", "batched") if FIXED in gates.kinds else ("batched",)
    for candidate in preferred:
        if candidate in _EXECUTORS:
            return candidate
    return "sequential"


def uses_batch_stats(m: torch.nn.Module) -> bool:
    """Whether the BatchNorm ``m`` normalises with batch statistics: training mode, or no running statistics
    (``track_running_stats=False``) in either mode."""
    return m.training or m.running_mean is None


def check_batch_norms(module: torch.nn.Module, executor: str, supported: tuple[type, ...], why: str,
                      prefix: str = "backbone") -> None:
    """Raise ``TypeError`` naming the first BatchNorm under ``module`` that normalises with batch statistics
    (training mode, or no running statistics) and is not an instance of one of ``supported``.

    The batched and tree executors run several tasks' (or paths') rows through one BatchNorm call and
    normalise each task's rows with that task's own statistics; a BatchNorm they do not drive that way
    (e.g. ``torch.nn.SyncBatchNorm`` after ``wrap_model(sync_bn=True)``) would pool the statistics of all
    tasks and silently compute something else than the sequential reference. BatchNorms on running
    statistics (eval mode) are per-channel affine maps and are accepted whatever their class.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, _BatchNorm) and uses_batch_stats(m) and not isinstance(m, supported):
            allowed = " or ".join(c.__name__ for c in supported)
            raise TypeError(
                f"the {executor} executor needs {allowed} for every backbone BatchNorm that uses batch "
                f"statistics, but {name} is a {type(m).__name__} ({why}). Use executor='sequential', which "
                f"calls every BatchNorm module as it is (e.g. torch.nn.SyncBatchNorm), or eval mode")


def run(name: str, model, x: torch.Tensor, gates) -> dict[str, torch.Tensor]:
    return _EXECUTORS[resolve(name, gates)](model, x, gates)


from fastshare.executors import sequential  # noqa: E402,F401  (registers "sequential")
from fastshare.executors import tree  # noqa: E402,F401  (registers "tree")
from fastshare.executors import batched  # noqa: E402,F401  (registers "batched")
