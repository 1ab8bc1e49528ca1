"""``fastshare info`` / ``python -m fastshare.info``: versions (torch, Python and the packages of
:data:`PACKAGES`), and which backends and executors can run here, with the reason for each one that cannot."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform

import torch

from fastshare.ops.backends import available_backends

__all__ = ["PACKAGES", "SETTINGS", "collect", "format_info", "main"]

#: Packages whose version :func:`collect` reports, with what each one is for.
PACKAGES: dict[str, str] = {
    "triton": "triton backend; Linux x86_64 dependency",
    "numpy": "required",
    "matplotlib": "optional, fastshare[plot]: policy show --out",
    "tensorboard": "optional, fastshare[tensorboard]: --tensorboard",
}


#: Environment variables that change how fastshare executes: ``{name: (default, what it does)}``.
SETTINGS: dict[str, tuple[str, str]] = {
    "FASTSHARE_BACKEND": ("auto", "op backend: auto, reference, cpu, cuda, triton"),
    "FASTSHARE_CONV_SPLIT": ("auto", "heads' dilated convolutions in zero-padding-free bands: auto (timed per "
                                     "shape), always, never"),
    "FASTSHARE_DATA_CHECKS": ("1", "value checks that read tensors (host-device syncs on a GPU): 1/0, "
                                   "true/false, yes/no, on/off"),
    "FASTSHARE_DETERMINISTIC": ("0", "run-to-run deterministic gate-logit reductions: 1/0, true/false, "
                                     "yes/no, on/off"),
    "TRITON_INTERPRET": ("0", "run Triton kernels on CPU tensors in the interpreter: 1 or 0"),
}


def _version(module: str) -> str | None:
    """The installed version of ``module`` ("installed" when it has no ``__version__``), None if absent."""
    if importlib.util.find_spec(module) is None:
        return None
    return str(getattr(importlib.import_module(module), "__version__", "installed"))


def collect() -> dict[str, object]:
    """Versions, package versions, per-device backend availability (reasons for each unavailable
    backend) and the executors (registered or not in this build).

    Keys: ``fastshare``, ``python``, ``torch``, ``torch_cuda``, ``triton`` (version or None),
    ``cuda_device`` (name or None), ``packages`` (``{name: version or None}`` for
    :data:`PACKAGES`), ``backends`` (``{device: {backend: [reasons]}}``, empty list = available),
    ``executors`` (``{name: registered}``), ``settings`` (``{name: value}`` for :data:`SETTINGS`, the
    default where unset).
    """
    from fastshare import executors

    packages = {name: _version(name) for name in PACKAGES}
    info: dict[str, object] = {
        "fastshare": __import__("fastshare").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": packages["triton"],
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": packages,
        "backends": {"cpu": available_backends("cpu")},
        "executors": {name: name in executors._EXECUTORS for name in executors.NAMES[1:]},
        "settings": {name: os.environ.get(name, default) for name, (default, _) in SETTINGS.items()},
    }
    if torch.cuda.is_available():
        info["backends"]["cuda"] = available_backends("cuda")
    return info


def format_info(info: dict[str, object]) -> str:
    """The text report of :func:`collect`'s dictionary."""
    lines = [f"{key:12s} {info[key]}" for key in
             ("fastshare", "python", "torch", "torch_cuda", "triton", "cuda_device")]
    lines.append("packages:")
    for name, version in info["packages"].items():
        state = version if version is not None else "not installed"
        lines.append(f"  {name:12s} {state}  ({PACKAGES.get(name, '')})")
    for device, table in info["backends"].items():
        lines.append(f"backends for {device} tensors:")
        for name, reasons in table.items():
            lines.append(f"  {name:10s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    lines.append("executors:")
    for name, registered in info["executors"].items():
        lines.append(f"  {name:10s} " + ("registered" if registered else "not registered in this build"))
    lines.append("settings (environment):")
    for name, value in info["settings"].items():
        lines.append(f"  {name:24s} {value:6s} ({SETTINGS[name][1]})")
    return "\n".join(lines)


def main() -> int:
    """Print the report; exit status 0."""
    print(format_info(collect()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
