"""Boolean switches read from the environment (``FASTSHARE_DATA_CHECKS``, ``FASTSHARE_DETERMINISTIC``)."""

from __future__ import annotations

import os

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_flag(name: str, default: bool) -> bool:
    """The switch ``name``: ``1/true/yes/on`` or ``0/false/no/off`` (any case); ``default`` when unset or empty.

    Raises:
        ValueError: any other value, naming the variable (a typo must not silently mean "off").
    """
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected 1/0, true/false, yes/no or on/off")
