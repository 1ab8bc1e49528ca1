"""Every Triton kernel compiles for sm_90 (Hopper) with the installed Triton, on this CPU-only machine.

The interpreter (``TRITON_INTERPRET=1``, the rest of the suite) runs kernels as Python, so it accepts code
that the compiler rejects: a ``constexpr`` branch returning bfloat16 followed by a fall-through returning
float32 ran under the interpreter and failed to compile (Triton 3.6 and 3.9). The compilation runs in a
subprocess without the interpreter; it needs Triton's NVIDIA backend (ptxas ships with Triton), not a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent('''
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kernels import gated_residual as gr, relu_dropout as rd

    TARGET = GPUTarget("cuda", 90, 32)
    SCALARS = {"numel": "i64", "row": "i32", "S": "i32", "tau": "fp32", "seed": "i64", "offset": "i64",
               "threshold": "i64", "scale": "fp32"}

    def compile_kernel(kernel, pointers, constexprs):
        """pointers: {name: element type}; every other non-constexpr argument is a scalar (SCALARS) or an
        int32 stride."""
        sig = {}
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + pointers[name]
            else:
                sig[name] = SCALARS.get(name, "i32")
        triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=TARGET)
        print("ok", kernel.__name__, constexprs, pointers.get("x_ptr") or pointers.get("f_ptr", ""))

    for dt in ("fp32", "fp16", "bf16"):
        bf16 = dt == "bf16"
        compile_kernel(rd._fwd_kernel, {"x_ptr": dt, "out_ptr": dt, "mask_ptr": "u8"},
                       {"BLOCK": 1024, "OUT_BF16": bf16})
        compile_kernel(rd._bwd_kernel, {"grad_ptr": dt, "mask_ptr": "u8", "dx_ptr": dt},
                       {"BLOCK": 1024, "OUT_BF16": bf16})
    for dt, hard in itertools.product(("fp32", "bf16"), (False, True)):
        gate = {"alpha_ptr": "fp32", "u_ptr": "fp32", "seg_ptr": "i64"}
        compile_kernel(gr._gated_residual_fwd_kernel, {"f_ptr": dt, "r_ptr": dt, "out_ptr": dt, **gate},
                       {"HARD": hard, "PRECISE": True, "SEG_BLOCK": 8, "BLOCK": 1024})
        for det in (False, True):
            part = "fp32" if det else "fp64"
            compile_kernel(gr._gated_residual_bwd_kernel,
                           {"grad_ptr": dt, "f_ptr": dt, "r_ptr": dt, "df_ptr": dt, "dr_ptr": dt, **gate,
                            "part_ptr": part, "start_ptr": part},
                           {"HARD": hard, "DETERMINISTIC": det, "PRECISE": True, "SEG_BLOCK": 8, "SLOTS": 32,
                            "BLOCK": 1024})
    for det in (False, True):
        part = "fp32" if det else "fp64"
        compile_kernel(gr._gated_residual_dalpha_kernel,
                       {"dalpha_ptr": "fp32", "alpha_ptr": "fp32", "u_ptr": "fp32", "seg_ptr": "i64",
                        "part_ptr": part, "start_ptr": part},
                       {"DETERMINISTIC": det, "PRECISE": True, "TILE": 1024 if det else 1, "REDUCE_BLOCK": 256,
                        "SLOTS": 32})
    print("compiled all")
''')


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this Triton has no NVIDIA backend to compile with")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(ROOT / ".pytest_cache" / "triton-sm90")  # kept between runs: fast re-runs
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 0 and "compiled all" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
