"""Whole steps captured in a CUDA graph (static shapes): replays equal eager steps.

The batched policy step (sampled gates, segmented BatchNorm, the fused gated residual) and the tree
executor's re-train step and inference, each captured with :func:`fastshare.bench.capture_cuda_graph`
after eager warm-up; a replay must give the eager step's outputs and gradients. The host-side pieces
that make capture possible (cached device constants, host copies of fixed policies) have CPU tests in
test_device_constants.py.
"""

from __future__ import annotations

import pytest
import torch

from fastshare import use_backend
from fastshare.bench import capture_cuda_graph, step_policy
from fastshare.model import AdaShareNet

from conftest import assert_close_verbose

pytestmark = pytest.mark.gpu
TASKS = {"seg": 5, "sn": 3, "depth": 1}


def _setup(step: str):
    torch.manual_seed(0)
    model = AdaShareNet("resnet18", TASKS, head_width=32, dropout=0.0).cuda().train(step != "inference")
    x = torch.randn(2, 3, 65, 65, device="cuda")
    if step == "policy":
        u = torch.rand(model.logits.shape, device="cuda").clamp_(1e-6, 1 - 1e-6)
        gates = model.gates("sample", tau=2.0, hard=False, num_train_layers=3, u=u)
    else:
        gates = model.gates("fixed", policy=step_policy(3, model.num_blocks))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, x, gates, params


@pytest.mark.parametrize("step,executor,backend", [("policy", "batched", "cuda"), ("policy", "batched", "triton"),
                                                   ("retrain", "tree", "reference"),
                                                   ("inference", "tree", "reference")])
def test_graph_replay_equals_eager(step, executor, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, x, gates, params = _setup(step)

    def run():
        with use_backend(backend):
            if step == "inference":
                with torch.no_grad():
                    return list(model(x, gates, executor=executor).values())
            for p in params:
                p.grad = None
            outs = model(x, gates, executor=executor)
            sum(o.square().mean() for o in outs.values()).backward()
            return [p.grad for p in params]

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the same float32 arithmetic twice
        eager = [None if t is None else t.clone() for t in run()]  # None: a parameter the step does not use
        replay, static = capture_cuda_graph(run)
        with torch.no_grad():  # the replay must recompute, not keep what capture left behind
            for t in static:
                if t is not None:
                    t.fill_(float("nan"))
        replay()
        torch.cuda.synchronize()
    assert len(static) == len(eager)
    assert [t is None for t in static] == [t is None for t in eager]
    assert any(t is not None for t in eager)
    for i, (got, want) in enumerate(zip(static, eager)):
        if want is not None:
            assert_close_verbose(got, want, atol=1e-5, rtol=1e-4, name=f"{step} result {i}")
