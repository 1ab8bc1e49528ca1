"""The batched executor against the sequential reference (DESIGN.md §3, equivalence contract).

Both models start from one ``deepcopy``; each step draws one Gumbel noise tensor that both ``Gates`` use;
then we compare task outputs, losses, the gradient of every parameter and logit, and every buffer (BN
running statistics, ``num_batches_tracked``), and take the same SGD step on both. The big grid runs in
float64 (exact up to summation order, so float32 ReLU flips near 0 cannot make it flaky); a smaller
float32 set checks the contract's 1e-5 / 1e-4 tolerances, and bf16 autocast is compared with the float32
reference. Small inputs (33x33 images, B = 2, head width 16) keep the file cheap on a shared CPU.
Further down: the fast heads against the module (dropout as each ``nn.Dropout`` applies it, empty
batches), BatchNorms the executor cannot segment (refused), and empty batches through the executor.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

from fastshare import executors
from fastshare.model import AdaShareNet
from fastshare.model.fast_heads import aspp_head_forward
from fastshare.model.heads import ASPPHead
from fastshare.policy import Gates

from conftest import assert_scale_close, compare_grads, plain_batch_norms, record_split_conv_calls

CLASSES = (3, 2, 1, 4, 2)
IMAGE = 33
BATCH = 2


def _make_model(backbone: str, k: int, dtype: torch.dtype, seed: int = 0) -> AdaShareNet:
    torch.manual_seed(seed)
    tasks = {f"t{i}": CLASSES[i] for i in range(k)}
    model = AdaShareNet(backbone, tasks, head_width=16, dropout=0.0, init_method="random")
    # Bias the logits apart so that hard gates differ between tasks and blocks.
    with torch.no_grad():
        model.logits.normal_(0.0, 1.0)
    return model.to(dtype)


def _loss(outputs: dict[str, torch.Tensor], model: AdaShareNet) -> torch.Tensor:
    # Each task gets a different weighting so that a task mix-up cannot cancel out.
    total = sum((i + 1) * (out.float() if out.dtype == torch.bfloat16 else out).pow(2).mean()
                for i, out in enumerate(outputs.values()))
    return total + 0.1 * model.logits.pow(2).sum()


def _gates(model: AdaShareNet, mode: str, stage: int | None, hard: bool, u: torch.Tensor | None,
           policy: torch.Tensor | None) -> Gates:
    if mode == "sample":
        return model.gates("sample", tau=2.0, hard=hard, num_train_layers=stage, u=u)
    if mode == "fixed":
        return model.gates("fixed", policy=policy)
    return model.gates("full")


def _compare_steps(ref: AdaShareNet, fast: AdaShareNet, *, mode: str = "sample", stage: int | None = None,
                   hard: bool = False, train: bool = True, steps: int = 1, policy: torch.Tensor | None = None,
                   out_rtol: float = 1e-10, grad_rtol: float = 1e-9, grad_floor: float = 1e-6,
                   device: str = "cpu") -> None:
    """Run ``steps`` optimiser steps on both models (on ``device``; inputs drawn on the CPU) and compare
    everything after each. A parameter's gradient is compared relative to ``max(its largest entry,
    grad_floor * the largest gradient of the model)``."""
    ref.train(train)
    fast.train(train)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1234)
    dtype = ref.logits.dtype
    for step in range(steps):
        x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen).to(device=device, dtype=dtype)
        u = torch.rand(tuple(ref.logits.shape), generator=gen).clamp_(1e-6, 1 - 1e-6).to(device)
        out_ref = ref(x, _gates(ref, mode, stage, hard, u, policy), executor="sequential")
        out_fast = fast(x, _gates(fast, mode, stage, hard, u, policy), executor="batched")
        assert list(out_fast) == list(out_ref)
        for task in out_ref:
            assert_scale_close(out_fast[task], out_ref[task], out_rtol, name=f"step {step} output {task}")
        loss_ref, loss_fast = _loss(out_ref, ref), _loss(out_fast, fast)
        assert_scale_close(loss_fast.detach(), loss_ref.detach(), out_rtol, name=f"step {step} loss")
        opt_ref.zero_grad(set_to_none=True)
        opt_fast.zero_grad(set_to_none=True)
        loss_ref.backward()
        loss_fast.backward()
        grads_ref = dict(ref.named_parameters())
        grad_scale = max(float(p.grad.abs().max()) for p in grads_ref.values() if p.grad is not None)
        for name, p_fast in fast.named_parameters():
            g_ref = grads_ref[name].grad
            assert (g_ref is None) == (p_fast.grad is None), f"step {step} {name}: grad presence differs"
            if g_ref is not None:
                # Floor: a gradient that is 0 up to rounding in the reference is compared absolutely.
                assert_scale_close(p_fast.grad, g_ref, grad_rtol, grad_floor * grad_scale,
                                   name=f"step {step} grad {name}")
        opt_ref.step()
        opt_fast.step()
        bufs_ref = dict(ref.named_buffers())
        for name, b_fast in fast.named_buffers():
            if b_fast.dtype == torch.int64:
                assert int(b_fast) == int(bufs_ref[name]), f"step {step} {name}: {int(b_fast)} != " \
                                                           f"{int(bufs_ref[name])}"
            else:
                # Floor: running means that are 0 up to rounding are compared absolutely.
                assert_scale_close(b_fast, bufs_ref[name], out_rtol, 1e-4, name=f"step {step} buffer {name}")


def _pair(backbone: str, k: int, dtype: torch.dtype) -> tuple[AdaShareNet, AdaShareNet]:
    ref = _make_model(backbone, k, dtype)
    return ref, copy.deepcopy(ref)


# ----------------------------------------------------------------------------------------------------
# float64 grid: K x backbone x curriculum stage x soft/hard x train/eval.

@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("backbone,n_blocks", [("resnet18", 8), ("resnet34", 16)])
@pytest.mark.parametrize("stage_of", ["1", "L/2", "L"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_sampled_gates_float64_train(k, backbone, n_blocks, stage_of, hard):
    stage = {"1": 1, "L/2": n_blocks // 2, "L": n_blocks}[stage_of]
    ref, fast = _pair(backbone, k, torch.float64)
    _compare_steps(ref, fast, stage=stage, hard=hard, train=True, steps=1)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_sampled_gates_float64_train_quick(k, hard):
    """The not-slow slice of the grid above: ResNet-18, curriculum stage L/2."""
    ref, fast = _pair("resnet18", k, torch.float64)
    _compare_steps(ref, fast, stage=4, hard=hard, train=True, steps=1)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("backbone,n_blocks", [("resnet18", 8), ("resnet34", 16)])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_sampled_gates_float64_eval(k, backbone, n_blocks, hard):
    ref, fast = _pair(backbone, k, torch.float64)
    _compare_steps(ref, fast, stage=n_blocks // 2, hard=hard, train=False, steps=1)


@pytest.mark.parametrize("backbone,stage", [("resnet18", 1), ("resnet18", 4), ("resnet34", 16)])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_three_steps_float64(backbone, stage, hard):
    ref, fast = _pair(backbone, 3, torch.float64)
    _compare_steps(ref, fast, stage=stage, hard=hard, train=True, steps=3)


def _policies(k: int, n_blocks: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    mixed = torch.randint(0, 2, (k, n_blocks), generator=gen).float()
    agree_then_differ = mixed.clone()
    agree_then_differ[:, : n_blocks // 2] = 1.0
    agree_then_differ[:, 1] = 0.0  # an all-skip block inside the shared prefix
    return {"all_skip": torch.zeros(k, n_blocks), "all_select": torch.ones(k, n_blocks), "mixed": mixed,
            "agree_then_differ": agree_then_differ}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("which", ["all_skip", "all_select", "mixed", "agree_then_differ"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fixed_policies_float64(k, which, train):
    ref, fast = _pair("resnet18", k, torch.float64)
    _compare_steps(ref, fast, mode="fixed", policy=_policies(k, 8)[which], train=train, steps=2 if train else 1)


@pytest.mark.parametrize("k", [1, 3])
def test_full_gates_float64(k):
    ref, fast = _pair("resnet18", k, torch.float64)
    _compare_steps(ref, fast, mode="full", train=True, steps=3)


@pytest.mark.parametrize("skip_layer", [3, 6])
def test_skip_layer_float64(skip_layer):
    """AdaShare's skip_layer: the first blocks have no policy logits and always run (for every task)."""
    torch.manual_seed(0)
    ref = AdaShareNet("resnet18", {"t0": 3, "t1": 2, "t2": 1}, head_width=16, dropout=0.0, init_method="random",
                      skip_layer=skip_layer).double()
    with torch.no_grad():
        ref.logits.normal_(0.0, 1.0)
    assert ref.logits.shape[1] == 8 - skip_layer
    fast = copy.deepcopy(ref)
    _compare_steps(ref, fast, stage=2, hard=True, train=True, steps=2)


# ----------------------------------------------------------------------------------------------------
# float32: the contract's tolerances.

@pytest.mark.parametrize("stage", [1, 8])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("k", [2, 3])
def test_sampled_gates_float32(stage, hard, k):
    ref, fast = _pair("resnet18", k, torch.float32)
    # One step: after it the two float32 models differ by rounding, and a later max-pool near-tie or ReLU
    # flip can route a gradient differently (the float64 tests check three steps).
    _compare_steps(ref, fast, stage=stage, hard=hard, train=True, steps=1, out_rtol=1e-5, grad_rtol=1e-4)


# The rest of the contract's grid in float32 (the float64 grid above holds all of it at 1e-10). The floor is
# 1e-5 of the model's largest gradient: gradients that are exactly 0 in float64 (e.g. a projection's bias
# under a skipped block) come out at ~1e-10 of it in either float32 execution.
F32_GRID = [
    ("resnet18", 1, 4, True, "sample"), ("resnet18", 5, 4, False, "sample"), ("resnet18", 5, 8, True, "sample"),
    ("resnet34", 3, 1, False, "sample"), ("resnet34", 3, 8, False, "sample"), ("resnet34", 3, 16, True, "sample"),
    ("resnet18", 3, None, False, "all_skip"), ("resnet18", 3, None, False, "all_select"),
]


@pytest.mark.parametrize("backbone,k,stage,hard,mode", F32_GRID,
                         ids=["-".join(map(str, c)) for c in F32_GRID])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float32_contract_grid(backbone, k, stage, hard, mode, train):
    ref, fast = _pair(backbone, k, torch.float32)
    if mode == "sample":
        _compare_steps(ref, fast, stage=stage, hard=hard, train=train, steps=1, out_rtol=1e-5, grad_rtol=1e-4,
                       grad_floor=1e-5)
    else:
        _compare_steps(ref, fast, mode="fixed", policy=_policies(k, ref.num_blocks)[mode], train=train, steps=1,
                       out_rtol=1e-5, grad_rtol=1e-4, grad_floor=1e-5)


def test_fixed_policy_float32():
    ref, fast = _pair("resnet18", 3, torch.float32)
    _compare_steps(ref, fast, mode="fixed", policy=_policies(3, 8)["agree_then_differ"], train=True, steps=1,
                   out_rtol=1e-5, grad_rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# bf16 autocast against the float32 reference.

@pytest.mark.parametrize("stage", [1, 8])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_bf16_autocast_close_to_float32_reference(stage, hard):
    """Outputs, loss and logit gradients within bf16 tolerance of the float32 reference; every weight
    gradient no further from it (norm-relative) than twice the sequential bf16 step's own distance plus
    5e-2 (bf16 weight gradients are noisy in either execution order, so a fixed tolerance would not do)."""
    ref, fast = _pair("resnet18", 3, torch.float32)
    seq = copy.deepcopy(ref)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    u = torch.rand(tuple(ref.logits.shape), generator=torch.Generator().manual_seed(4)).clamp_(1e-6, 1 - 1e-6)

    def gates(m: AdaShareNet) -> Gates:
        return m.gates("sample", tau=2.0, hard=hard, num_train_layers=stage, u=u)

    out_ref = ref(x, gates(ref), executor="sequential")
    loss_ref = _loss(out_ref, ref)
    loss_ref.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_fast = fast(x, gates(fast), executor="batched")
        loss = _loss(out_fast, fast)
        loss_seq = _loss(seq(x, gates(seq), executor="sequential"), seq)
    loss.backward()
    loss_seq.backward()
    for task in out_ref:
        assert out_fast[task].dtype == torch.bfloat16
        assert_scale_close(out_fast[task].float(), out_ref[task], 5e-2, name=f"bf16 output {task}")
    assert_scale_close(loss.detach(), loss_ref.detach(), 2e-2, name="bf16 loss")
    assert_scale_close(fast.logits.grad, ref.logits.grad, 1e-2, name="bf16 logit grad")
    for (name, p_ref), p_fast, p_seq in zip(ref.named_parameters(), fast.parameters(), seq.parameters()):
        assert (p_ref.grad is None) == (p_fast.grad is None), f"{name}: grad presence differs"
        if p_ref.grad is None:
            continue
        norm = max(float(p_ref.grad.norm()), 1e-30)
        err_fast = float((p_fast.grad - p_ref.grad).norm()) / norm
        err_seq = float((p_seq.grad - p_ref.grad).norm()) / norm
        assert err_fast <= 2 * err_seq + 5e-2, f"bf16 grad {name}: {err_fast:.3e} vs sequential bf16 {err_seq:.3e}"


# ----------------------------------------------------------------------------------------------------
# Selection, heads and inputs.

def test_batched_is_the_default_for_sampled_gates():
    model = _make_model("resnet18", 2, torch.float32)
    assert model.executor == "auto"
    gates = model.gates("sample", tau=5.0, hard=False, num_train_layers=2)
    assert executors.resolve("auto", gates) == "batched"
    assert executors.resolve("auto", model.gates("full")) == "batched"
    explicit = AdaShareNet("resnet18", {"a": 2}, head_width=16, executor="batched")
    assert explicit.executor == "batched"


def test_dropout_runs_in_training():
    torch.manual_seed(0)
    model = AdaShareNet("resnet18", {"a": 2, "b": 3}, head_width=16, dropout=0.5).train()
    x = torch.randn(BATCH, 3, IMAGE, IMAGE)
    out = model(x, model.gates("sample", tau=5.0, hard=True, num_train_layers=4), executor="batched")
    _loss(out, model).backward()
    assert model.logits.grad is not None and torch.isfinite(model.logits.grad).all()


@pytest.mark.parametrize("split", ["never", "always"])
@pytest.mark.parametrize("size", [(5, 5), (8, 20), (14, 14), (16, 16), (30, 7)])
def test_fast_aspp_head_matches_module(size, split, monkeypatch):
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", split)  # the dilated branches as one conv or split in bands
    torch.manual_seed(0)
    head = ASPPHead(24, 5, width=12, dropout=0.0).double()
    x = torch.randn(2, 24, *size, dtype=torch.float64, requires_grad=True)
    ref = head(x)
    got = aspp_head_forward(head, x)
    assert got.is_contiguous()
    assert_scale_close(got, ref, 1e-12, name="head output")
    grad = torch.randn_like(ref)
    params = [x] + list(head.parameters())
    g_ref = torch.autograd.grad(ref, params, grad)
    g_got = torch.autograd.grad(got, params, grad)
    for (name, _), a, b in zip([("x", None)] + list(head.named_parameters()), g_ref, g_got):
        assert_scale_close(b, a, 1e-11, name=f"head grad {name}")


@pytest.mark.parametrize("stage", [1, None], ids=["stage1", "stageL"])
def test_contract_with_heads_split_in_bands(monkeypatch, stage):
    # 65x65 images give 9x9 features: the rate-6 branch splits into bands (the others are 1x1).
    calls = record_split_conv_calls(monkeypatch)
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "always")
    monkeypatch.setattr(sys.modules[__name__], "IMAGE", 65)
    ref, fast = _pair("resnet18", 3, torch.float64)
    _compare_steps(ref, fast, stage=stage, steps=2)
    assert calls and set(calls) == {6}, "the fast heads must have run the split"


def test_channels_last_input_and_state_dict_unchanged():
    ref, fast = _pair("resnet18", 2, torch.float64)
    assert list(ref.state_dict()) == list(fast.state_dict())
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, dtype=torch.float64)
    u = torch.rand(tuple(ref.logits.shape)).clamp_(1e-6, 1 - 1e-6)
    ref.eval()
    fast.eval()
    out_ref = ref(x, ref.gates("sample", tau=1.0, hard=True, u=u), executor="sequential")
    out_fast = fast(x.contiguous(memory_format=torch.channels_last),
                    fast.gates("sample", tau=1.0, hard=True, u=u), executor="batched")
    for task in out_ref:
        assert_scale_close(out_fast[task], out_ref[task], 1e-10, name=task)


# ----------------------------------------------------------------------------------------------------
# Dropout as each nn.Dropout module applies it (its own training flag and p, not the head's).

def _dropout_eval(model: torch.nn.Module) -> torch.nn.Module:
    """Training mode with every nn.Dropout in eval mode (BN on batch statistics, no dropout)."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    return model


@pytest.mark.parametrize("size", [(5, 5), (9, 9)], ids=["all-1x1", "dilated-and-1x1"])
def test_fast_head_follows_the_dropout_modules_training_flag(size):
    torch.manual_seed(0)
    head = _dropout_eval(ASPPHead(24, 5, width=12, dropout=0.5).double())
    x = torch.randn(2, 24, *size, dtype=torch.float64, requires_grad=True)
    ref = head(x)  # no dropout: every nn.Dropout is in eval mode
    got = aspp_head_forward(head, x)
    assert_scale_close(got, ref, 1e-12, name="head output")
    grad = torch.randn_like(ref)
    params = [x] + list(head.parameters())
    for a, b in zip(torch.autograd.grad(ref, params, grad), torch.autograd.grad(got, params, grad)):
        assert_scale_close(b, a, 1e-11, name="head grad")


@pytest.mark.parametrize("size,dropped", [((5, 5), 0), ((9, 9), 1)], ids=["all-1x1", "dilated-and-1x1"])
def test_fast_head_uses_each_branch_dropout_p(size, dropped):
    """The first 1x1 branch drops (p = 0.9) but contributes nothing (zero last convolution); the others
    have p = 0, so head(x) is deterministic and the fast forward must not apply the dropping branch's p to
    the other 1x1 branches (nor theirs to it)."""
    torch.manual_seed(0)
    head = ASPPHead(24, 5, width=12, dropout=0.0).double().train()
    branch = head.branches()[dropped]
    branch.dropout.p = 0.9
    with torch.no_grad():
        branch.conv3.weight.zero_()
        branch.conv3.bias.zero_()
    x = torch.randn(2, 24, *size, dtype=torch.float64, requires_grad=True)
    ref = head(x)
    got = aspp_head_forward(head, x)
    assert_scale_close(got, ref, 1e-12, name="head output")
    grad = torch.randn_like(ref)
    params = [x] + [p for j, b in enumerate(head.branches()) if j != dropped for p in b.parameters()]
    for a, b in zip(torch.autograd.grad(ref, params, grad), torch.autograd.grad(got, params, grad)):
        assert_scale_close(b, a, 1e-11, name="head grad")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_head_drops_both_layers_of_each_branch_with_its_p(p):
    """Branches 1 and 3 have dropout p, branches 0 and 2 p = 0 (two groups of 1x1 branches). Branch 1 is
    made the identity after its first convolution and the only contributor, so the output is
    ``mask1 * mask2 * relu(conv1(x)) / (1 - p)^2``: about (1 - p)^2 of the positive units survive (5 sigma;
    1 - p if one of its two dropouts were skipped), each scaled by exactly 1 / (1 - p)^2."""
    torch.manual_seed(0)
    width = 16
    head = ASPPHead(8, width, width=width, dropout=0.0).double().train()
    for j in (1, 3):
        head.branches()[j].dropout.p = p
    with torch.no_grad():
        for j, b in enumerate(head.branches()):
            b.conv3.bias.zero_()
            if j == 1:
                b.conv2.weight.copy_(torch.eye(width)[:, :, None, None])
                b.conv2.bias.zero_()
                b.conv3.weight.copy_(torch.eye(width)[:, :, None, None])
            else:
                b.conv3.weight.zero_()
    x = torch.randn(16, 8, 5, 5, dtype=torch.float64)  # 5x5 features: every branch is 1x1
    with torch.no_grad():
        got = aspp_head_forward(head, x)
        hidden = torch.relu(head.fc1_c1.conv1(x))
    positive = hidden > 0
    kept = (got != 0) & positive
    assert not bool(((got != 0) & ~positive).any())
    survive, n_pos = (1 - p) ** 2, int(positive.sum())
    frac = int(kept.sum()) / n_pos
    assert abs(frac - survive) < 5 * math.sqrt(survive * (1 - survive) / n_pos), \
        f"{frac:.3f} of the units survive, expected about {survive:.3f}"
    assert_scale_close(got[kept], hidden[kept] / (1 - p) ** 2, 1e-12, name="kept units")


@pytest.mark.parametrize("executor", ["batched", "tree"])
def test_model_with_dropout_modules_in_eval_mode_equals_reference(executor):
    torch.manual_seed(0)
    ref = AdaShareNet("resnet18", {"t0": 3, "t1": 2}, head_width=16, dropout=0.5, init_method="random").double()
    with torch.no_grad():
        ref.logits.normal_(0.0, 1.0)
    fast = copy.deepcopy(ref)
    x = torch.randn(BATCH, 3, 41, 41, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    u = torch.rand(tuple(ref.logits.shape), generator=torch.Generator().manual_seed(3)).clamp_(1e-6, 1 - 1e-6)
    policy = torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1, 0, 1]], dtype=torch.float64)
    outs = []
    for model, name in ((ref, "sequential"), (fast, executor)):
        _dropout_eval(model)
        gates = (model.gates("fixed", policy=policy) if executor == "tree"
                 else model.gates("sample", tau=2.0, num_train_layers=4, u=u))
        out = model(x, gates, executor=name)
        _loss(out, model).backward()
        outs.append(out)
    for task in outs[0]:
        assert_scale_close(outs[1][task], outs[0][task], 1e-10, name=f"output {task}")
    # A block no task runs (tree) has no gradient: the reference's must be None or zero.
    compare_grads(ref, fast, lambda got, want, name: assert_scale_close(got, want, 1e-9, 1e-6, name))


# ----------------------------------------------------------------------------------------------------
# BatchNorms the batched executor cannot segment; empty batches.

def test_batched_rejects_batch_norms_that_pool_the_tasks():
    ref, fast = _pair("resnet18", 3, torch.float64)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    gates = fast.gates("sample", tau=2.0, hard=True, num_train_layers=4)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fast)).train()
    with pytest.raises(TypeError, match=r"SegmentedBatchNorm2d .*backbone\.bn1 is a SyncBatchNorm"):
        synced(x, gates, executor="batched")
    plain = plain_batch_norms(copy.deepcopy(fast)).train()
    with pytest.raises(TypeError, match=r"backbone\.bn1 is a BatchNorm2d"):
        plain(x, gates, executor="batched")
    # On running statistics a BatchNorm of any class is an affine map: eval mode is accepted and exact.
    plain_batch_norms(ref).eval()
    plain.eval()
    out_ref = ref(x, gates, executor="sequential")
    out = plain(x, gates, executor="batched")
    for task in out_ref:
        assert_scale_close(out[task], out_ref[task], 1e-10, name=f"eval output {task}")


def test_sync_bn_needs_the_sequential_executor():
    from fastshare.train.distributed import DistContext, wrap_model

    model = _make_model("resnet18", 2, torch.float32)
    ctx = DistContext(rank=0, world_size=2)  # never reaches the process group: refused before
    with pytest.raises(ValueError, match="sync_bn=True needs executor='sequential'.*'auto'"):
        wrap_model(model, ctx, sync_bn=True)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_equals_reference(train):
    ref, fast = _pair("resnet18", 2, torch.float32)
    ref.train(train)
    fast.train(train)
    x = torch.randn(0, 3, IMAGE, IMAGE)
    u = torch.rand(tuple(ref.logits.shape), generator=torch.Generator().manual_seed(6)).clamp_(1e-6, 1 - 1e-6)
    out_ref = ref(x, ref.gates("sample", tau=2.0, num_train_layers=4, u=u), executor="sequential")
    out = fast(x, fast.gates("sample", tau=2.0, num_train_layers=4, u=u), executor="batched")
    for task in out_ref:
        assert out[task].shape == out_ref[task].shape == (0, CLASSES[ref.task_index(task)], 5, 5)
    bufs_ref = dict(ref.named_buffers())
    for name, b in fast.named_buffers():
        assert torch.equal(b, bufs_ref[name]), name


def test_fast_head_empty_batch():
    torch.manual_seed(0)
    head = ASPPHead(24, 5, width=12, dropout=0.5).train()
    for size in ((5, 5), (9, 9)):
        x = torch.randn(0, 24, *size)
        out = aspp_head_forward(head, x)
        assert out.shape == head(x).shape == (0, 5, *size)
