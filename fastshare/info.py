"""``python -m fastshare.info``: versions, and which backends can run here and why the others cannot."""

from __future__ import annotations

import importlib.util
import platform

import torch

from fastshare.ops.backends import available_backends


def collect() -> dict[str, object]:
    """Versions and per-device backend availability (reasons for each unavailable backend)."""
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    info: dict[str, object] = {
        "fastshare": __import__("fastshare").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {"cpu": available_backends("cpu")},
    }
    if torch.cuda.is_available():
        info["backends"]["cuda"] = available_backends("cuda")
    return info


def format_info(info: dict[str, object]) -> str:
    lines = [f"{key:12s} {info[key]}" for key in
             ("fastshare", "python", "torch", "torch_cuda", "triton", "cuda_device")]
    for device, table in info["backends"].items():
        lines.append(f"backends for {device} tensors:")
        for name, reasons in table.items():
            lines.append(f"  {name:10s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    return "\n".join(lines)


def main() -> int:
    print(format_info(collect()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
