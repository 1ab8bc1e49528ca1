"""Host-side pieces that keep steps free of per-call host-to-device copies and device reads (the CPU
twins of the CUDA-graph tests in test_cuda_graph_steps.py)."""

from __future__ import annotations

import torch

from fastshare.ops._constants import device_constant
from fastshare.policy import Gates


def test_device_constant_is_cached_and_exact():
    a = device_constant((0, 4, 8), torch.int64, torch.device("cpu"))
    b = device_constant((0, 4, 8), torch.int64, torch.device("cpu"))
    assert a is b
    assert a.tolist() == [0, 4, 8] and a.dtype == torch.int64
    c = device_constant((0, 4, 9), torch.int64, torch.device("cpu"))
    assert c is not a and c.tolist() == [0, 4, 9]


def test_device_constant_made_in_inference_mode_is_a_normal_tensor():
    with torch.inference_mode():
        t = device_constant((0.25, 0.5, 123.0), torch.float64, torch.device("cpu"))
    assert not t.is_inference()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (w * t).sum().backward()  # saving it for backward would fail for an inference tensor
    assert torch.equal(w.grad, t)


def test_fixed_gates_keep_a_host_copy_of_the_policy():
    policy = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.float32)
    gates = Gates.fixed(policy)
    assert gates.policy_rows == ((1, 0, 1), (1, 1, 0))
    assert gates.is_shared(0) and not gates.is_shared(1) and not gates.is_shared(2)
    assert gates.shared_prefix() == 1
