"""Checkpoints: one file per snapshot, written atomically, loaded with errors that name the file.

A fastshare checkpoint is a ``torch.save`` dict::

    {"format": "fastshare-checkpoint", "version": 1,
     "model": model.state_dict(),            # includes the policy logits ("logits", (K, Lp, 2))
     "optimizers": {name: state_dict}, "schedulers": {name: state_dict},
     "trainer": {...},                        # phase, iteration counters, temperature, policies, ...
     "rng": {...},                            # torch / CUDA / numpy / python RNGs and named generators
     "config": {...}}                         # the run's configuration, plain YAML types

Everything in it is a tensor or a plain Python value (no pickled objects), so it loads with
``torch.load(..., weights_only=True)``.

Atomic write: the file is written to a temporary file in the destination folder, created with the mode a
new file gets (``0o666`` less the umask), flushed and fsync'ed, then moved over the destination with
``os.replace`` (atomic on POSIX), and the folder is fsync'ed. A crash at any moment leaves either the old
file or the new one, never a truncated one.

:func:`load_checkpoint` checks the entries that its readers (``Trainer.load``, ``fastshare retrain``,
``eval`` and ``policy show``) use: ``model`` with the policy ``logits``, ``trainer`` with a known ``phase``
(and, once the search is over, the architectures ``policies`` with ``arch`` and ``retrain_iter``), and
``config`` with the ``tasks``.

:func:`import_adashare` converts a checkpoint written by AdaShare's published code
(``<label>_model.pth.tar``, the network under ``"mtl-net"``) into a fastshare model state dict.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "atomic_save",
    "load_checkpoint",
    "capture_rng",
    "restore_rng",
    "import_adashare",
    "load_adashare_checkpoint",
]

FORMAT = "fastshare-checkpoint"
VERSION = 1

PathLike = str | os.PathLike[str]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not a fastshare/AdaShare checkpoint; ``path`` names it."""

    def __init__(self, path: PathLike | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    The folder is created if missing; the file gets the mode of any new file (``0o666`` less the umask,
    applied by the OS when the temporary file is created). If saving fails, the temporary file is removed
    and any previous file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the destination folder (same file system, so os.replace is a rename); O_EXCL never
    # opens an existing file.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _torch_load(path: Path, map_location: str | torch.device | None, weights_only: bool) -> Any:
    if not path.exists():
        raise CheckpointError(path, "no such file")
    if not path.is_file():
        raise CheckpointError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file (truncated checkpoint?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError, IndexError,
            TypeError, AttributeError) as exc:
        raise CheckpointError(path, f"cannot read checkpoint, the file is corrupt or truncated "
                                    f"({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # pickle.UnpicklingError and others from a damaged stream
        raise CheckpointError(path, f"cannot read checkpoint ({type(exc).__name__}: {exc})") from exc


#: Entries every fastshare checkpoint has, and the keys each holds that the checkpoint's readers use.
_REQUIRED: dict[str, tuple[str, ...]] = {"model": ("logits",), "trainer": ("phase",), "config": ("tasks",)}
#: The trainer's phases; once the search is over, its state also holds the architectures to re-train.
_PHASES = ("warmup", "policy", "retrain", "done")
_RETRAIN_STATE = ("policies", "arch", "retrain_iter")


def _check_entries(path: Path, ckpt: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the first required entry or key (see ``_REQUIRED``) missing."""
    for entry, keys in _REQUIRED.items():
        if entry not in ckpt:
            raise CheckpointError(path, f"checkpoint has no {entry!r} entry")
        if not isinstance(ckpt[entry], Mapping):
            raise CheckpointError(path, f"checkpoint entry {entry!r} is a {type(ckpt[entry]).__name__}, not a dict")
        for key in keys:
            if key not in ckpt[entry]:
                raise CheckpointError(path, f"checkpoint entry {entry!r} has no {key!r}")
    state = ckpt["trainer"]
    if state["phase"] not in _PHASES:
        raise CheckpointError(path, f"trainer phase {state['phase']!r} is not one of {', '.join(_PHASES)}")
    if state["phase"] in ("retrain", "done"):
        for key in _RETRAIN_STATE:
            if key not in state:
                raise CheckpointError(path, f"checkpoint entry 'trainer' (phase {state['phase']!r}) has no {key!r}")
        if not isinstance(state["policies"], list) or not state["policies"]:
            raise CheckpointError(path, f"checkpoint entry 'trainer' (phase {state['phase']!r}) has no "
                                        f"architecture in 'policies' (got {state['policies']!r})")


def load_checkpoint(path: PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a fastshare checkpoint written by :func:`atomic_save`; raises :class:`CheckpointError` naming
    the file when it is missing, truncated, corrupt, of another format/version, or lacks an entry its
    readers use (see the module docstring)."""
    path = Path(path)
    ckpt = _torch_load(path, map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = " (an AdaShare checkpoint? load it with fastshare.train.load_adashare_checkpoint)" \
            if isinstance(ckpt, dict) and "mtl-net" in ckpt else ""
        raise CheckpointError(path, f"not a fastshare checkpoint{hint}")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(path, f"checkpoint version {ckpt.get('version')!r} is not supported "
                                    f"(this fastshare reads version {VERSION})")
    _check_entries(path, ckpt)
    return ckpt


# ---------------------------------------------------------------------------------------------- RNG state

def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state a run depends on, as tensors and plain values: torch (CPU and each CUDA device),
    numpy's global generator, Python's ``random``, and the named ``generators`` (e.g. Gumbel noise)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss": py_gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`capture_rng` captured (the named ``generators`` in place)."""
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        # CPU byte tensors, as torch requires: a checkpoint loaded with map_location="cuda" holds them there.
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"checkpoint has no state for RNG generator {name!r} (has {sorted(saved)})")
        g.set_state(saved[name].cpu())


# ------------------------------------------------------------------------------------- AdaShare import

_HEAD_KEY = re.compile(r"^task(\d+)_(fc1_c\d+\..+)$")
_LOGITS_KEY = re.compile(r"^task(\d+)_logits$")


def import_adashare(state: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """Rename an AdaShare ``MTL2`` state dict to fastshare's :class:`~fastshare.model.AdaShareNet` names.

    Args:
        state: AdaShare's network state dict, or a whole ``<label>_model.pth.tar`` dict (the network is
            then read from its ``"mtl-net"`` entry).
        tasks: fastshare's task names in AdaShare's task order (``task1`` is ``tasks[0]``).

    Returns:
        a state dict for ``AdaShareNet.load_state_dict``: ``backbone.*`` unchanged,
        ``task<i>_fc1_c<j>.*`` -> ``heads.<tasks[i-1]>.fc1_c<j>.*``, and the ``task<i>_logits`` ``(Lp, 2)``
        stacked into ``logits`` ``(K, Lp, 2)``.

    Raises:
        ValueError: a key that is neither backbone, head nor logits, a task index out of range, or
            missing/inconsistent logits.
    """
    if "mtl-net" in state and isinstance(state["mtl-net"], Mapping):
        state = state["mtl-net"]
    tasks = list(tasks)
    out: dict[str, torch.Tensor] = {}
    logits: dict[int, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("backbone."):
            out[key] = value
            continue
        m = _LOGITS_KEY.match(key)
        if m:
            logits[int(m.group(1))] = value
            continue
        m = _HEAD_KEY.match(key)
        if m:
            i = int(m.group(1))
            if not 1 <= i <= len(tasks):
                raise ValueError(f"AdaShare key {key!r} is for task{i}, but only {len(tasks)} task(s) were given "
                                 f"({', '.join(tasks)})")
            out[f"heads.{tasks[i - 1]}.{m.group(2)}"] = value
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"unrecognised AdaShare state-dict keys: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    expected = set(range(1, len(tasks) + 1))
    if set(logits) != expected:
        raise ValueError(f"AdaShare state dict has logits for tasks {sorted(logits)}; expected task1..task{len(tasks)}")
    rows = [logits[i] for i in sorted(logits)]
    if any(r.ndim != 2 or r.shape[-1] != 2 or r.shape != rows[0].shape for r in rows):
        raise ValueError(f"AdaShare task logits must all be (Lp, 2), got {[tuple(r.shape) for r in rows]}")
    out["logits"] = torch.stack(rows)
    return out


def load_adashare_checkpoint(path: PathLike, model: torch.nn.Module, tasks: Sequence[str] | None = None,
                             strict: bool = True) -> dict[str, Any]:
    """Load AdaShare's ``<label>_model.pth.tar`` into ``model`` (an :class:`~fastshare.model.AdaShareNet`).

    Shapes are checked against the model and reported by key. Returns ``{"iter": ..., "temp": ...}`` from
    the file where present (AdaShare's optimiser states are not imported: their parameter order differs).
    The file is a pickle written by AdaShare, so it is loaded with ``weights_only=False``: only load
    checkpoints you trust.
    """
    path = Path(path)
    raw = _torch_load(path, "cpu", weights_only=False)
    if not isinstance(raw, Mapping):
        raise CheckpointError(path, f"expected a dict, got {type(raw).__name__}")
    try:
        state = import_adashare(raw, tasks if tasks is not None else model.tasks)
    except ValueError as exc:
        raise CheckpointError(path, f"not an AdaShare MTL2 checkpoint: {exc}") from exc
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(path, "shape mismatch with the model: " + "; ".join(bad[:6]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if strict and (missing or unexpected):
        raise CheckpointError(path, f"AdaShare checkpoint does not match the model: missing {missing[:6]}, "
                                    f"unexpected {unexpected[:6]}")
    return {k: raw[k] for k in ("iter", "temp") if k in raw}
