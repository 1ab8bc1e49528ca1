"""Triton backend of ``fastshare::relu_dropout`` against the reference, bit for bit (masks, outputs, dx),
and its scale 1 / (1 - p) at p = 0.1 and 0.9 without the reference.

Compiled on a CUDA machine, else under the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported, as in CI); without either the module is skipped, unless ``FASTSHARE_REQUIRE_BACKENDS`` names
``triton``, where that is an error. The interpreter truncates float32 -> bfloat16 conversions, so the
kernel rounds bfloat16 to nearest even by hand; these tests hold it to the reference's rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import require_triton_module

pytestmark = pytest.mark.triton

require_triton_module()

from fastshare.kernels import relu_dropout as tk  # noqa: E402
from fastshare.ops import relu_dropout, use_backend  # noqa: E402
from fastshare.ops.relu_dropout import relu_dropout_backward_ref, relu_dropout_ref  # noqa: E402

from test_relu_dropout import (_special_input, assert_bitwise,  # noqa: E402
                               assert_scaled_by_one_over_keep_probability)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW_F16 = torch.int16

# (shape, offset): one element; odd sizes; more than one tile; counters crossing 2^32; near 2^63.
CASES = [
    ((1,), 0),
    ((7, 13), 5),
    ((3, 5, 9, 11), 123456789),
    ((40, 100), (1 << 32) - 2000),
    ((17, 19), (1 << 63) - 17 * 19),
]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference_bitwise(case, dtype, p):
    shape, offset = CASES[case]
    x = (_special_input(shape, torch.float32, seed=case) * 3).to(dtype).to(DEVICE)
    seed = 2654435769 + case
    out, mask = tk.relu_dropout_fwd(x, seed, offset, p)
    ref_out, ref_mask = relu_dropout_ref(x, torch.tensor(seed), offset, p)
    assert out.is_contiguous() and mask.dtype == torch.bool
    assert_bitwise(mask, ref_mask, "mask")
    if dtype == torch.float16:  # assert_bitwise has no float16 view; compare the bits here
        assert torch.equal(out.isnan(), ref_out.isnan())
        assert torch.equal(out.view(_INT_VIEW_F16)[~out.isnan()], ref_out.view(_INT_VIEW_F16)[~ref_out.isnan()])
    else:
        assert_bitwise(out, ref_out, "out")
    grad = (_special_input(shape, torch.float32, seed=100 + case) * 3).to(dtype).to(DEVICE)
    dx, ref_dx = tk.relu_dropout_bwd(grad, mask, p), relu_dropout_backward_ref(grad, ref_mask, p)
    if dtype == torch.float16:
        assert torch.equal(dx.isnan(), ref_dx.isnan())
        assert torch.equal(dx.view(_INT_VIEW_F16)[~dx.isnan()], ref_dx.view(_INT_VIEW_F16)[~ref_dx.isnan()])
    else:
        assert_bitwise(dx, ref_dx, "dx")


def test_op_dispatches_to_triton_and_matches_reference_with_autograd():
    x = torch.randn(6, 50, device=DEVICE, requires_grad=True)
    out = relu_dropout(x, 0.3, seed=77, offset=9, backend="triton")
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x_ref = x.detach().clone().requires_grad_(True)
    ref = relu_dropout(x_ref, 0.3, seed=77, offset=9, backend="reference")
    (gx_ref,) = torch.autograd.grad(ref, x_ref, torch.ones_like(ref))
    assert torch.equal(out, ref) and torch.equal(gx, gx_ref)


@pytest.mark.parametrize("p", [0.1, 0.9])
def test_kept_elements_scaled_by_one_over_keep_probability(p):
    assert_scaled_by_one_over_keep_probability("triton", p, DEVICE)


def test_opcheck():
    x = torch.randn(4, 33, device=DEVICE, requires_grad=True)
    seed = torch.tensor(5, dtype=torch.int64)
    torch.library.opcheck(torch.ops.fastshare.relu_dropout.default, (x, seed, 3, 0.25, "triton"))
    _, mask = torch.ops.fastshare.relu_dropout.default(x.detach(), seed, 3, 0.25, "triton")
    torch.library.opcheck(torch.ops.fastshare.relu_dropout_backward.default,
                          (torch.randn(4, 33, device=DEVICE), mask, 0.25, "triton"))


@pytest.mark.skipif(DEVICE != "cuda", reason="auto picks triton for CUDA tensors only")
def test_auto_picks_triton_on_cuda():
    from fastshare.ops.relu_dropout import _resolve_backend

    with use_backend("cuda"):  # the gated residual's backend: relu_dropout has no CUDA kernel
        assert _resolve_backend(None, torch.device("cuda"), torch.float32) == "triton"


def test_bad_dtype_raises():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tk.relu_dropout_fwd(torch.randn(3, dtype=torch.float64, device=DEVICE), 1, 0, 0.5)
    with pytest.raises(ValueError, match="mask must be bool"):
        tk.relu_dropout_bwd(torch.randn(3, device=DEVICE), torch.ones(3, dtype=torch.uint8, device=DEVICE), 0.5)


@pytest.mark.parametrize("seed", [0, 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1])
def test_seed_edge_values(seed):
    """Compiled, Triton specialises an int argument equal to 1 unless told not to (seed = 1 failed to
    compile); 2^31 changes the argument's type from i32 to i64."""
    x = _special_input((9, 31), torch.float32, seed=seed % 1000).to(DEVICE)
    out, mask = tk.relu_dropout_fwd(x, seed, 1, 0.5)
    ref_out, ref_mask = relu_dropout_ref(x, torch.tensor(seed), 1, 0.5)
    assert torch.equal(mask, ref_mask)
    assert_bitwise(out, ref_out, "out")


def test_seed_tensor_out_of_range_raises():
    x = torch.randn(4, 4, device=DEVICE)
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\^32\)"):
            relu_dropout(x, 0.5, seed=torch.tensor(bad), backend="triton")
