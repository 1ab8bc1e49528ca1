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


def run(name: str, model, x: torch.Tensor, gates) -> dict[str, torch.Tensor]:
    return _EXECUTORS[resolve(name, gates)](model, x, gates)


from fastshare.executors import sequential  # noqa: E402,F401  (registers "sequential")
from fastshare.executors import tree  # noqa: E402,F401  (registers "tree")
from fastshare.executors import batched  # noqa: E402,F401  (registers "batched")
