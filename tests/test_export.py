"""``fastshare.export``: the compact model equals the tree executor in eval mode, holds only used blocks,
round-trips through its config + state_dict without fastshare, ``torch.export`` and ``torch.compile``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastshare
from conftest import assert_close_verbose, without_running_stats
from fastshare.compact import CompactNet
from fastshare.model import AdaShareNet

F32 = (1e-5, 1e-5)
POLICY = torch.tensor([[1, 1, 0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1, 1, 1]],
                      dtype=torch.float32)  # block 2 is skipped by every task


@pytest.fixture(scope="module")
def model() -> AdaShareNet:
    torch.manual_seed(0)
    net = AdaShareNet("resnet18", {"seg": 4, "sn": 3, "depth": 1}, head_width=16, dropout=0.0)
    # Distinct BatchNorm parameters and statistics everywhere, so that a BatchNorm's state copied to the
    # wrong place changes the output.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 41, 41, generator=torch.Generator().manual_seed(1))


def _tree(model, x, policy=POLICY):
    with torch.no_grad():
        return model(x, model.gates("fixed", policy=policy), executor="tree")


def _assert_same(got, want):
    assert list(got) == list(want)
    for t in want:
        assert_close_verbose(got[t], want[t], *F32, name=t)


@pytest.mark.parametrize("policy", [POLICY, torch.ones(3, 8), torch.zeros(3, 8)], ids=["mixed", "all", "none"])
def test_compact_equals_tree_executor(model, x, policy):
    compact = fastshare.export(model, policy)
    with torch.no_grad():
        _assert_same(compact(x), _tree(model, x, policy))


def test_only_used_blocks_are_kept(model):
    compact = fastshare.export(model, POLICY)
    assert sorted(int(k) for k in compact.blocks) == [0, 1, 3, 4, 5, 6, 7]
    assert sorted(int(k) for k in compact.ds) == [2, 4, 6]  # projections stay on skipped paths
    keys = set(compact.state_dict())
    assert not any(k.startswith("blocks.2.") for k in keys)
    full = sum(p.numel() for p in model.network_parameters())
    block2 = sum(p.numel() for p in model.backbone.blocks[1][0].parameters())
    assert sum(p.numel() for p in compact.parameters()) == full - block2


def test_state_dict_round_trip_without_fastshare(model, x, tmp_path):
    """Rebuild from (config JSON, state_dict) in a fresh interpreter that loads only compact.py."""
    compact = fastshare.export(model, POLICY)
    (tmp_path / "config.json").write_text(json.dumps(compact.config))
    torch.save(compact.state_dict(), tmp_path / "weights.pt")
    torch.save({"x": x, "out": compact(x)}, tmp_path / "io.pt")
    source = Path(fastshare.__file__).with_name("compact.py")
    script = f"""
import importlib.util, json, sys, torch
spec = importlib.util.spec_from_file_location("compact_standalone", {str(source)!r})
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
net = mod.CompactNet(json.load(open({str(tmp_path / 'config.json')!r})))
net.load_state_dict(torch.load({str(tmp_path / 'weights.pt')!r}))
io = torch.load({str(tmp_path / 'io.pt')!r})
out = net.eval()(io["x"])
assert not any(m.split(".")[0] == "fastshare" for m in sys.modules), "fastshare was imported"
err = max((out[t] - io["out"][t]).abs().max().item() for t in out)
assert err <= 1e-6, err
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_torch_export_round_trip(model, x, tmp_path):
    compact = fastshare.export(model, POLICY)
    program = torch.export.export(compact, (x,))
    torch.export.save(program, tmp_path / "compact.pt2")
    loaded = torch.export.load(tmp_path / "compact.pt2")
    with torch.no_grad():
        want = compact(x)
        _assert_same(program.module()(x), want)
        _assert_same(loaded.module()(x), want)


def test_torch_compile(model, x):
    compact = fastshare.export(model, POLICY)
    compiled = torch.compile(compact, fullgraph=True)
    with torch.no_grad():
        _assert_same(compiled(x), compact(x))


def test_report_counts(model):
    compact = fastshare.export(model, POLICY)
    size = (2, 3, 41, 41)
    rep = compact.report(size)
    assert rep.params_total == sum(p.numel() for p in compact.parameters())
    assert rep.params_full_multitask == sum(p.numel() for p in model.network_parameters())
    assert rep.params_single_task == sum(
        sum(p.numel() for p in model.backbone.parameters()) + sum(p.numel() for p in model.heads[t].parameters())
        for t in model.tasks)
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the compact model on real tensors
        compact(x)
    assert rep.flops_total == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # K full backbones, as the reference
        model(x, model.gates("fixed", policy=torch.ones(3, 8)), executor="sequential")
    assert rep.flops_single_task == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # hard sharing: one backbone, K heads
        feats = model.backbone(x)
        for t in model.tasks:
            model.heads[t](feats)
    assert rep.flops_full_multitask == counter.get_total_flops()
    single = fastshare.export(model, torch.ones(3, 8)).report(size)
    assert single.flops_total == single.flops_full_multitask
    assert 0 < rep.ratios["flops_vs_single_task"] < 1
    assert json.loads(json.dumps(rep.to_dict()))["params_total"] == rep.params_total
    assert "task seg" in str(rep)
    with pytest.raises(ValueError, match="input_size"):
        compact.report((1, 1, 8, 8))


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="policy is"):
        fastshare.export(model, torch.ones(2, 8))
    with pytest.raises(ValueError, match="only 0"):
        fastshare.export(model, torch.full((3, 8), 0.5))
    with pytest.raises(ValueError, match="format"):
        CompactNet({"format": 0})


def test_plan_rows_are_matched_to_the_tasks_by_name(model, x):
    from fastshare.plan import Plan

    want = fastshare.export(model, POLICY)
    order = [2, 0, 1]
    named = fastshare.export(model, Plan(POLICY[order], [model.tasks[i] for i in order]))
    assert named.config["policy"] == want.config["policy"]
    with torch.no_grad():
        _assert_same(named(x), want(x))
    assert fastshare.export(model, Plan(POLICY)).config["policy"] == want.config["policy"]  # unnamed
    assert fastshare.export(model, POLICY.int().tolist()).config["policy"] == want.config["policy"]
    with pytest.raises(ValueError, match="the plan is for tasks a, b, c, the model has seg, sn, depth"):
        fastshare.export(model, Plan(POLICY, ["a", "b", "c"]))


def test_requires_grad_is_copied(model):
    import copy

    frozen = copy.deepcopy(model)
    frozen.backbone.bn1.weight.requires_grad_(False)
    frozen.backbone.blocks[0][1].bn2.bias.requires_grad_(False)
    frozen.heads["sn"].fc1_c1.conv2.weight.requires_grad_(False)
    compact = fastshare.export(frozen, POLICY)
    names = {"bn1.weight", "blocks.1.bn2.bias", "heads.sn.fc1_c1.conv2.weight"}
    assert {n for n, p in compact.named_parameters() if not p.requires_grad} == names
    rebuilt = CompactNet(json.loads(json.dumps(compact.config)))
    assert {n for n, p in rebuilt.named_parameters() if not p.requires_grad} == names


def test_bottleneck_batch_norms_stay_frozen():
    net = AdaShareNet("resnet101", {"a": 2}, head_width=8, dropout=0.0)
    policy = torch.ones(1, net.num_blocks)
    policy[0, 5] = 0
    compact = fastshare.export(net, policy)
    # As in the model: the Bottleneck blocks' BN affine parameters are frozen, the stem's and shortcuts' not.
    want = {n for n, _ in compact.named_parameters() if n.startswith("blocks.") and ".bn" in n}
    got = {n for n, p in compact.named_parameters() if not p.requires_grad}
    assert got == want and any(".bn3." in n for n in got)
    config = {k: v for k, v in compact.config.items() if k != "frozen"}  # a config written before "frozen"
    with torch.device("meta"):
        assert {n for n, p in CompactNet(config).named_parameters() if not p.requires_grad} == got


def test_batch_norm_without_running_stats(model, x):
    import copy

    net = without_running_stats(copy.deepcopy(model))
    compact = fastshare.export(net, POLICY)
    assert not any("running_" in k or "num_batches" in k for k in compact.state_dict())
    with torch.no_grad():
        _assert_same(compact(x), _tree(net, x))
    rebuilt = CompactNet(json.loads(json.dumps(compact.config)))
    rebuilt.load_state_dict(compact.state_dict())
    with torch.no_grad():
        _assert_same(rebuilt.eval()(x), compact(x))
