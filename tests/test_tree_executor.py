"""Tree executor vs the sequential reference with the same fixed policy (DESIGN.md §3 equivalence contract).

Outputs (train and eval mode), losses and the gradient of every used weight must match; BatchNorm running
statistics must match for the stem, the projection shortcuts and the blocks every task executes. Blocks
executed by only some tasks follow the documented rule (updated once per executing task, in task order),
checked against the reference run with just those tasks; skipped blocks are never computed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from conftest import (assert_close_verbose, assert_scale_close, compare_grads, plain_batch_norms,
                      record_split_conv_calls, without_running_stats)
from fastshare import executors
from fastshare.losses import task_loss
from fastshare.model import AdaShareNet
from fastshare.plan import Plan

F64 = (1e-10, 1e-8)  # (atol, rtol) for float64 outputs
F32_OUT = (1e-5, 1e-5)
# Gradients: max|got - ref| <= rtol * max|ref| per parameter (the contract's 1e-4 in float32), with a floor
# of GRAD_FLOOR[dtype] x the largest gradient of the model for a parameter whose gradient is 0 up to
# rounding. Such a gradient is a sum of terms of the model's gradient scale that cancel exactly: with every
# block skipped, a projection shortcut's BatchNorm output reaches only the next projection (a 1x1
# convolution, then a training-mode BatchNorm, whose input gradient sums to 0 per channel), so its bias
# gradient is rounding noise. On an H100 float32 left 5e-10 of the largest gradient on each side, beyond
# the 1e-10 that a float32 floor of 1e-6 allows; 1e-4 allows 1e-8.
F64_GRAD, F32_GRAD = 1e-8, 1e-4
GRAD_FLOOR = {torch.float64: 1e-6, torch.float32: 1e-4}


def _policy(case: str, k: int, l: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if case == "random":
        return (torch.rand(k, l, generator=g) < 0.6).float()
    if case == "identical":
        return (torch.rand(1, l, generator=g) < 0.6).float().expand(k, l).clone()
    if case == "all_skip":
        return torch.zeros(k, l)
    if case == "all_select":
        return torch.ones(k, l)
    if case == "rejoin":  # paths diverge at one block and agree again on every later one
        p = torch.ones(k, l)
        p[torch.arange(k), torch.arange(k) % l] = 0
        return p
    raise ValueError(case)


def _model(backbone: str, k: int, dtype: torch.dtype, seed: int = 0) -> AdaShareNet:
    torch.manual_seed(seed)
    tasks = {f"t{i}": (3, 2, 1, 4, 5)[i % 5] for i in range(k)}
    model = AdaShareNet(backbone, tasks, head_width=16, dropout=0.0).to(dtype)
    # Non-trivial BN affine parameters and running statistics, so that mistakes in either show up.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((i + 1) * (out.sin() ** 2).mean() for i, out in enumerate(outputs.values()))


def _bn_owner(name: str) -> tuple[str, int | None]:
    """("stem" | "ds" | "block", l) of a backbone BatchNorm's qualified name."""
    parts = name.split(".")
    if parts[1] == "bn1":
        return "stem", None
    if parts[1] == "ds":
        return "ds", None
    return "block", (int(parts[2]), int(parts[3]))


def _run_pair(ref, tree, policy, x, train):
    """One forward + backward of both models in the given mode; returns outputs and losses."""
    ref.train(train)
    tree.train(train)
    ref.zero_grad(set_to_none=True)
    tree.zero_grad(set_to_none=True)
    gates = ref.gates("fixed", policy=policy)
    out_ref = ref(x, gates, executor="sequential")
    out_tree = tree(x, gates, executor="tree")
    loss_ref, loss_tree = _loss(out_ref), _loss(out_tree)
    loss_ref.backward()
    loss_tree.backward()
    return out_ref, out_tree, loss_ref, loss_tree


def _compare_both_modes(backbone, k, policy, dtype, out_tol, grad_tol, x_size=33, seed=0, device="cpu"):
    """Eval mode first (no running-statistics updates), then a training step (on ``device``)."""
    ref = _model(backbone, k, dtype, seed).to(device)
    tree = copy.deepcopy(ref)
    x = torch.randn(2, 3, x_size, x_size, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    for train in (False, True):
        outs = _run_pair(ref, tree, policy, x, train)
        _check(ref, tree, policy, *outs, out_tol, grad_tol, train)


def _check(ref, tree, policy, out_ref, out_tree, loss_ref, loss_tree, out_tol, grad_rtol, train, steps=1):
    """Outputs, loss, every gradient and (``train``) BatchNorm state after ``steps`` training steps."""
    for task in out_ref:
        assert_close_verbose(out_tree[task], out_ref[task], *out_tol, name=f"output {task}")
    assert_close_verbose(loss_tree, loss_ref, *out_tol, name="loss")
    grads = [p.grad for p in ref.parameters() if p.grad is not None]
    floor = GRAD_FLOOR[grads[0].dtype] * max(float(g.abs().max()) for g in grads)
    compare_grads(ref, tree, lambda got, want, name: assert_scale_close(got, want, grad_rtol, floor, name))
    if not train:
        return
    bb = tree.backbone
    everyone = set(range(policy.shape[0]))
    for (name, m_ref), (_, m_tree) in zip(ref.backbone.named_modules(prefix="backbone"),
                                          tree.backbone.named_modules(prefix="backbone")):
        if not isinstance(m_tree, nn.BatchNorm2d):
            continue
        owner, where = _bn_owner(name)
        if owner == "block":
            l = bb.block_index.index(where)
            running = {k for k in everyone if policy[k, l] == 1}
            if running != everyone:
                assert int(m_tree.num_batches_tracked) == steps * len(running), name
                continue
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close_verbose(getattr(m_tree, buf), getattr(m_ref, buf), *out_tol, name=f"{name}.{buf}")


CASES = [(1, "random"), (2, "random"), (3, "random"), (5, "random"), (3, "identical"), (2, "all_skip"),
         (3, "all_select"), (3, "rejoin")]


@pytest.mark.parametrize("k, case", CASES, ids=[f"K{k}-{c}" for k, c in CASES])
def test_resnet18_float64(k, case):
    _compare_both_modes("resnet18", k, _policy(case, k, 8, seed=10 * k), torch.float64, F64, F64_GRAD)


def test_resnet18_float64_heads_split_in_bands(monkeypatch):
    # 65x65 images give 9x9 features: the heads' rate-6 branch splits into bands (eval and train).
    calls = record_split_conv_calls(monkeypatch)
    monkeypatch.setenv("FASTSHARE_CONV_SPLIT", "always")
    _compare_both_modes("resnet18", 3, _policy("random", 3, 8, seed=30), torch.float64, F64, F64_GRAD,
                        x_size=65)
    assert calls and set(calls) == {6}, "the fast heads must have run the split"


@pytest.mark.parametrize("backbone,k,case", [("resnet18", 3, "random"), ("resnet18", 5, "rejoin"),
                                             ("resnet34", 3, "random")])
def test_three_optimiser_steps_float64(backbone, k, case):
    """Weights, momentum buffers and BatchNorm state evolve as under the reference over three SGD steps."""
    policy = _policy(case, k, 8 if backbone == "resnet18" else 16, seed=7)
    ref = _model(backbone, k, torch.float64)
    tree = copy.deepcopy(ref)
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, tree)]
    gen = torch.Generator().manual_seed(5)
    for step in range(1, 4):
        x = torch.randn(2, 3, 33, 33, generator=gen, dtype=torch.float64)
        outs = _run_pair(ref, tree, policy, x, True)
        _check(ref, tree, policy, *outs, F64, F64_GRAD, True, steps=step)
        for opt in optimisers:
            opt.step()


def test_resnet34_float32():
    _compare_both_modes("resnet34", 3, _policy("random", 3, 16, seed=1), torch.float32, F32_OUT, F32_GRAD,
                        x_size=65)


def test_resnet34_nyu_policy_real_losses():
    policy = torch.ones(3, 16)
    policy[0, 6] = 0
    policy[1, [9, 10, 11]] = 0
    policy[2, [5, 10, 11]] = 0
    torch.manual_seed(0)
    ref = AdaShareNet("resnet34", {"seg": 40, "sn": 3, "depth": 1}, head_width=16, dropout=0.0).double()
    tree = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 49, 49, generator=g, dtype=torch.float64)
    targets = {"seg": torch.randint(0, 40, (2, 49, 49), generator=g),
               "sn": torch.randn(2, 3, 49, 49, generator=g, dtype=torch.float64),
               "depth": torch.rand(2, 1, 49, 49, generator=g, dtype=torch.float64) + 0.1}
    gates = ref.gates("fixed", policy=policy)
    losses = []
    for model, name in ((ref, "sequential"), (tree, "tree")):
        out = model(x, gates, executor=name)
        loss = sum(task_loss(t, out[t], targets[t]) for t in model.tasks)
        loss.backward()
        losses.append(loss)
    assert_close_verbose(losses[1], losses[0], *F64, name="loss")
    compare_grads(ref, tree, lambda got, want, name: assert_close_verbose(got, want, 1e-10, 1e-7, name=name))


def test_partial_blocks_follow_the_documented_rule():
    """A block run by tasks T: its BN is updated once per task of T, in task order, with T's statistics,
    i.e. exactly as the reference run with only the tasks T."""
    policy = torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1], [1, 1, 1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1, 0, 1]],
                          dtype=torch.float32)
    base = _model("resnet18", 3, torch.float64)
    tree = copy.deepcopy(base).train()
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    tree(x, tree.gates("fixed", policy=policy), executor="tree")
    for l in range(8):
        running = [k for k in range(3) if policy[k, l] == 1]
        if len(running) in (0, 3):
            continue
        sub = AdaShareNet("resnet18", {f"t{k}": 1 for k in running}, head_width=16, dropout=0.0).double()
        sub.backbone.load_state_dict(base.backbone.state_dict())
        sub.train()(x, sub.gates("fixed", policy=policy[running]), executor="sequential")
        stage, b = sub.backbone.block_index[l]
        for bn in ("bn1", "bn2"):
            got = getattr(tree.backbone.blocks[stage][b], bn)
            want = getattr(sub.backbone.blocks[stage][b], bn)
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close_verbose(getattr(got, buf), getattr(want, buf), *F64, name=f"block {l} {bn}.{buf}")


def _count_conv_calls(model: AdaShareNet) -> dict[int, int]:
    calls = {l: 0 for l in range(model.num_blocks)}
    for l, (stage, b) in enumerate(model.backbone.block_index):
        def hook(*_, l=l):
            calls[l] += 1
        model.backbone.blocks[stage][b].conv1.register_forward_hook(hook)
    return calls


def test_skipped_blocks_are_not_computed_and_siblings_are_batched():
    policy = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1], [1, 0, 0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1, 1, 0]],
                          dtype=torch.float32)
    model = _model("resnet18", 3, torch.float64)
    before = copy.deepcopy(model.backbone.blocks[1][0].state_dict())  # block 2, skipped by every task
    calls = _count_conv_calls(model)
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    gates = model.gates("fixed", policy=policy)
    plan = Plan(policy)
    one_call_per_block = {l: int(any(n.execute for n in plan.level(l))) for l in range(8)}
    assert sum(n.execute for n in plan.level(3)) == 2  # block 3: sibling nodes {0, 2} and {1}
    model.train()(x, gates, executor="tree")
    assert calls == one_call_per_block  # siblings stacked into one call in training too
    for key, value in model.backbone.blocks[1][0].state_dict().items():
        assert torch.equal(value, before[key]), key
    calls.update({l: 0 for l in calls})
    with torch.no_grad():
        model.eval()(x, gates, executor="tree")
    assert calls == one_call_per_block


def test_auto_prefers_tree_for_fixed_gates_and_tree_rejects_sampled_gates():
    model = _model("resnet18", 2, torch.float32)
    policy = torch.ones(2, 8)
    assert executors.resolve("auto", model.gates("fixed", policy=policy)) == "tree"
    x = torch.randn(2, 3, 33, 33)
    with pytest.raises(ValueError, match="fixed hard policy"):
        model(x, model.gates("sample", tau=1.0, hard=True), executor="tree")
    full = model.eval()(x, model.gates("full"), executor="tree")  # forced gates: every block executed
    fixed = model(x, model.gates("fixed", policy=policy), executor="sequential")
    for t in full:
        assert_close_verbose(full[t], fixed[t], *F32_OUT, name=t)


def test_gradient_check_is_relative_to_each_parameter():
    """A parameter whose gradients are ~1e-3: an error of 2e-3 x its scale is beyond the contract's 1e-4,
    though within the absolute 1e-5 this file used to allow."""
    ref = 1e-3 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    scale = float(ref.abs().max())
    assert_scale_close(ref + 1e-5 * scale, ref, F32_GRAD, 0.0, "small error")
    bad = ref + 2e-3 * scale
    assert_close_verbose(bad, ref, 1e-5 * max(scale, 1.0), 1e-4, name="the old, absolute check")
    with pytest.raises(AssertionError, match=r"relative error 2\.0+e-03"):
        assert_scale_close(bad, ref, F32_GRAD, 0.0, "grad")


def test_gradient_check_fails_on_nan_and_inf():
    """``assert_scale_close`` fails on one NaN or infinity in the result, and on NaN in both tensors."""
    ref = torch.randn(5, 5, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        got = ref.clone()
        got[2, 3] = bad
        with pytest.raises(AssertionError, match="finite in only one"):
            assert_scale_close(got, ref, 1e-8, 0.0, "grad")
    nan = torch.full_like(ref, float("nan"))
    with pytest.raises(AssertionError, match="relative error nan"):
        assert_scale_close(nan, nan, 1e-8, 0.0, "grad")


@pytest.mark.parametrize("case", ["random", "rejoin"])
def test_batch_norm_without_running_stats_float64(case):
    """BatchNorm with track_running_stats=False uses batch statistics in train and eval mode: stacked
    sibling nodes must each be normalised with their own rows' statistics."""
    policy = _policy(case, 3, 8, seed=3)
    ref = without_running_stats(_model("resnet18", 3, torch.float64))
    tree = copy.deepcopy(ref)
    x = torch.randn(2, 3, 41, 41, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for train in (False, True):
        outs = _run_pair(ref, tree, policy, x, train)
        _check(ref, tree, policy, *outs, F64, F64_GRAD, train=False)  # no running statistics to compare


def test_plain_batch_norm_is_supported_and_sync_batch_norm_refused():
    policy = _policy("random", 3, 8, seed=5)
    ref = plain_batch_norms(_model("resnet18", 3, torch.float64))
    tree = copy.deepcopy(ref)
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    _check(ref, tree, policy, *_run_pair(ref, tree, policy, x, True), F64, F64_GRAD, True)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(ref)).train()
    with pytest.raises(TypeError, match=r"tree executor needs BatchNorm2d .*backbone\.bn1 is a SyncBatchNorm"):
        synced(x, synced.gates("fixed", policy=policy), executor="tree")


def test_empty_batch_equals_reference():
    policy = torch.ones(3, 8)  # every block executed: the reference's running statistics apply everywhere
    ref = _model("resnet18", 3, torch.float64).train()
    tree = copy.deepcopy(ref)
    x = torch.randn(0, 3, 33, 33, dtype=torch.float64)
    gates = ref.gates("fixed", policy=policy)
    out_ref = ref(x, gates, executor="sequential")
    out = tree(x, gates, executor="tree")
    for task in out_ref:
        assert out[task].shape == out_ref[task].shape and out[task].shape[0] == 0
    bufs_ref = dict(ref.named_buffers())
    for name, b in tree.named_buffers():
        assert torch.equal(b, bufs_ref[name]), name
