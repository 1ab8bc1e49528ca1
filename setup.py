"""Build script for fastshare.

The extension ``fastshare._C`` holds the C++ CPU kernels and, where a CUDA toolkit and a CUDA build of
torch are present, the CUDA kernels. Environment variables:

- ``FASTSHARE_SKIP_EXT=1``: build no extension; fastshare runs on its reference and Triton paths.
- ``FASTSHARE_BUILD_CUDA=1`` / ``0``: force the CUDA sources on / off (default: on when torch has CUDA
  and ``nvcc`` is found).
- ``FASTSHARE_CUDA_ARCHS``: ``;``-separated compute capabilities (default ``8.0;9.0``).
- ``FASTSHARE_DEBUG=1``: ``-O0 -g`` instead of ``-O3``.
- ``MAX_JOBS``: parallel compile jobs (default: from free memory, at most the number of cores).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def _default_max_jobs() -> str:
    # Each nvcc / g++ job on torch headers peaks near 2 GB; leave room for the rest of the machine.
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) for line in fh}
        free_gb = info.get("MemAvailable", 4 << 20) / (1 << 20)
    except OSError:
        free_gb = 4.0
    return str(max(1, min(os.cpu_count() or 1, int(free_gb // 2))))


def get_extensions():
    if _env_flag("FASTSHARE_SKIP_EXT"):
        print("fastshare: FASTSHARE_SKIP_EXT=1, building no extension")
        return []
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, CUDA_HOME

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    debug = bool(_env_flag("FASTSHARE_DEBUG"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std flag: torch's BuildExtension picks the standard its headers need (C++17 up to torch 2.12,
    # C++20 from 2.13), and a fixed one breaks the other.
    # -ffp-contract=off: no fused multiply-adds the source does not write, so the CPU kernels round like
    # the reference (same result in the AVX-512, AVX2 and baseline copies, whatever the -std mode).
    cxx_flags = opt + ["-ffp-contract=off"]
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    cpu_sources.append("csrc/extension.cpp")

    want_cuda = _env_flag("FASTSHARE_BUILD_CUDA")
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    torch_cuda = torch.version.cuda is not None
    if want_cuda is None:
        build_cuda = torch_cuda and has_nvcc
        if not build_cuda:
            why = "torch is a CPU build" if not torch_cuda else "no CUDA toolkit (nvcc) found"
            print(f"fastshare: building the CPU extension only ({why}); set FASTSHARE_BUILD_CUDA=1 to force")
    else:
        build_cuda = want_cuda
    if not build_cuda:
        return [CppExtension("fastshare._C", cpu_sources, extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
                             extra_link_args=["-fopenmp"])]

    if CUDA_HOME is None or not (Path(CUDA_HOME) / "include" / "cuda_runtime.h").is_file():
        # torch guesses CUDA_HOME from `which nvcc`; an nvcc linked into /usr/local/bin gives /usr/local.
        raise SystemExit(f"fastshare: building the CUDA kernels needs the toolkit's headers, but CUDA_HOME="
                         f"{CUDA_HOME!r} has no include/cuda_runtime.h; set CUDA_HOME (e.g. /usr/local/cuda) "
                         "or FASTSHARE_BUILD_CUDA=0")
    archs = os.environ.get("FASTSHARE_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs)):
        num = arch.replace(".", "")
        gencode += [f"-gencode=arch=compute_{num},code=sm_{num}"]
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    cuda_sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
    nvcc_flags = opt + ["--use_fast_math", "-lineinfo"] + gencode
    return [CUDAExtension(
        "fastshare._C", cpu_sources + cuda_sources,
        define_macros=[("FASTSHARE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags + ["-fopenmp"], "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )]


def get_cmdclass():
    if _env_flag("FASTSHARE_SKIP_EXT"):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=["fastshare", "fastshare.ops", "fastshare.model", "fastshare.executors",
              "fastshare.train", "fastshare.data", "fastshare.bench", "fastshare.kernels"],
    package_dir={"fastshare.kernels": "kernels"},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
)
