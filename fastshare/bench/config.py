"""The suite that fits the machine: shapes, dtypes, budgets (:class:`SuiteConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SuiteConfig:
    """Shapes and budgets of one suite run (see :func:`suite_config`)."""

    device: str
    quick: bool
    op_shapes: list[list[int]]
    op_dtypes: list[str]
    segments: int
    tau: float
    hard: bool
    block_shapes: list[list[int]]
    block_dtypes: list[str]
    step: dict[str, Any]
    warmup: int
    min_rounds: int
    max_rounds: int
    target_ms_per_variant: float
    copy_bytes: int
    matmul_n: int
    matmul_dtypes: list[str]
    compile_dynamic: bool
    step_rounds: int = 3
    data_checks_while_timing: bool = False


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


#: Short names of the dtypes in case names and result files.
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

#: Precisions of the step cases. ``fp32``: IEEE float32 everywhere (cuDNN's TF32 off, as in the
#: reference); ``tf32`` (CUDA only): float32 tensors with TF32 tensor-core math in cuDNN and cuBLAS (PyTorch's
#: default for convolutions); ``bf16cl``: bfloat16 autocast over float32 weights, model and images
#: channels_last.
STEP_PRECISIONS = ("fp32", "tf32", "bf16cl")


def suite_config(device: str, quick: bool) -> SuiteConfig:
    """The suite that fits the machine: GPU: ResNet-18/34 activation shapes of K=3, B=16 at 321x321, and
    whole steps of ResNet-34/18 at that size in fp32 and bf16 + channels_last, eager and CUDA-graphed;
    CPU: scaled-down shapes (including the issue-3 CPU target ``[12, 64, 64, 64]`` fp32, 3 segments)."""
    if device == "cuda":
        op_shapes = [[48, 256, 81, 81], [48, 64, 81, 81], [48, 128, 41, 41], [48, 256, 41, 41], [48, 512, 41, 41]]
        block_shapes = [[48, 64, 81, 81], [48, 256, 41, 41]]
        step = {"backbones": ["resnet34"] if quick else ["resnet34", "resnet18"],
                "tasks": {"seg": 40, "sn": 3, "depth": 1}, "batch": 16, "image": 321, "head_width": 1024,
                "precisions": list(STEP_PRECISIONS), "graph": True}
        cfg = SuiteConfig(device, quick, op_shapes[:1] if quick else op_shapes, ["bf16", "fp32"], 3, 5.0, False,
                          block_shapes[:1] if quick else block_shapes, ["bf16", "fp32"], step,
                          warmup=3, min_rounds=10, max_rounds=200, target_ms_per_variant=100.0,
                          copy_bytes=1 << 30, matmul_n=8192, matmul_dtypes=["bf16", "fp32"], compile_dynamic=True,
                          step_rounds=3 if quick else 5)
        return cfg
    op_shapes = [[12, 64, 64, 64], [12, 128, 32, 32], [12, 512, 16, 16]]
    step = {"backbones": ["resnet18"], "tasks": {"seg": 13, "sn": 3, "depth": 1}, "batch": 2, "image": 33,
            "head_width": 32, "precisions": ["fp32"], "graph": False}
    return SuiteConfig(device, quick, op_shapes[:1] if quick else op_shapes, ["fp32"] if quick else ["fp32", "bf16"],
                       3, 5.0, False, [[12, 64, 32, 32]], ["fp32"], step,
                       warmup=1 if quick else 2, min_rounds=3 if quick else 5, max_rounds=10 if quick else 15,
                       target_ms_per_variant=150.0 if quick else 600.0, copy_bytes=(64 if quick else 256) << 20,
                       matmul_n=1024, matmul_dtypes=["fp32"], compile_dynamic=False)


def timing_kwargs(cfg: SuiteConfig, n_variants: int) -> dict[str, Any]:
    return {"warmup": cfg.warmup, "min_rounds": cfg.min_rounds, "max_rounds": cfg.max_rounds,
            "target_ms": cfg.target_ms_per_variant * n_variants}
