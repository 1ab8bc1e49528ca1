"""What a result file records about where it ran: device, versions, commit, source digest, load."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch


#: The repository root (``fastshare/bench/environment.py`` -> three levels up).
REPO_ROOT = Path(__file__).resolve().parents[2]


def device_name(device: torch.device | str) -> str:
    """Human-readable device name: the GPU's name or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device | str, name: str | None = None) -> str:
    """File-name-safe device id: ``<type>-<lowercased name, non-alphanumerics as '-'>``, e.g.
    ``cuda-nvidia-h100-80gb-hbm3`` or ``cpu-intel-r-xeon-r-processor``."""
    device = torch.device(device)
    name = device_name(device) if name is None else name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{device.type}-{slug}" if slug else device.type


def git_commit(root: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD`` of the source tree, or ``"unknown"`` (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else "unknown"


#: The files whose content decides what a benchmark runs (hashed by :func:`source_digest`).
SOURCE_GLOBS = ("setup.py", "fastshare/**/*.py", "kernels/**/*.py", "csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu")


def source_digest(root: Path = REPO_ROOT) -> str:
    """SHA-256 over the paths and contents of the :data:`SOURCE_GLOBS` files: identifies the code that ran
    even where the checkout's ``.git`` does not match its files (a copied working tree, say). Compare with
    ``python -c "from fastshare.bench import source_digest; print(source_digest())"`` on a checkout."""
    h = hashlib.sha256()
    files = sorted({f for g in SOURCE_GLOBS for f in root.glob(g) if f.is_file()})
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _git_dirty(root: Path = REPO_ROOT) -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def environment(device: torch.device | str) -> dict[str, Any]:
    """Device, versions, commit and machine load recorded with every result file."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {
        "device": {"type": device.type, "name": device_name(device), "slug": device_slug(device)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
                     if torch.backends.cudnn.is_available() else None},
        "git_commit": git_commit(),
        "git_dirty": _git_dirty(),
        "source_sha256": source_digest(),
        "machine": {"hostname_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"].update({"capability": f"{props.major}.{props.minor}",
                              "memory_gib": round(props.total_memory / (1 << 30), 1),
                              "sm_count": props.multi_processor_count})
    return env
