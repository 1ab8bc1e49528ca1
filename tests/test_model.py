"""Backbones, heads, AdaShareNet and the sequential reference executor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_verbose
from fastshare.model import AdaShareNet, deeplab_resnet
from fastshare.policy import FORCED, SAMPLED, Gates


def _feature_side(n: int) -> int:
    """Output-stride-8 feature size: conv1 (k7 s2 p3), ceil-mode max-pool (k3 s2 p1), stage-2 conv (k3 s2 p1)."""
    n = (n + 2 * 3 - 7) // 2 + 1
    pooled = -(-(n + 2 - 3) // 2) + 1
    if (pooled - 1) * 2 >= n + 1:  # a ceil-mode window may not start in the right padding
        pooled -= 1
    return (pooled + 2 - 3) // 2 + 1


@pytest.mark.parametrize("name,num_blocks,channels", [("resnet18", 8, 512), ("resnet34", 16, 512),
                                                      ("resnet101", 33, 2048)])
def test_backbone_block_counts_and_width(name, num_blocks, channels):
    bb = deeplab_resnet(name)
    assert bb.num_blocks == num_blocks
    assert bb.out_channels == channels
    # stage 0 of BasicBlock nets has no projection; every other stage's first block has one.
    has_ds = [d is not None for d in bb.ds]
    assert has_ds == ([False, True, True, True] if name != "resnet101" else [True, True, True, True])


@pytest.mark.parametrize("size", [33, 64, 65, 97])
@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_backbone_output_shape_and_stride(name, size):
    bb = deeplab_resnet(name).eval()
    x = torch.randn(1, 3, size, size + 8)
    with torch.no_grad():
        y = bb(x)
    assert y.shape == (1, 512, _feature_side(size), _feature_side(size + 8))


def test_resnet101_output_shape():
    bb = deeplab_resnet("resnet101").eval()
    with torch.no_grad():
        y = bb(torch.randn(1, 3, 33, 33))
    assert y.shape == (1, 2048, 5, 5)
    # Bottleneck BN affine parameters are frozen, as in AdaShare.
    assert not bb.blocks[0][0].bn1.weight.requires_grad
    assert bb.blocks[0][0].conv1.weight.requires_grad


def test_dilations_and_strides_follow_deeplab():
    bb = deeplab_resnet("resnet34")
    assert [bb.blocks[s][0].conv1.stride[0] for s in range(4)] == [1, 2, 1, 1]
    assert [bb.blocks[s][0].conv1.dilation[0] for s in range(4)] == [1, 1, 2, 4]
    assert [bb.blocks[s][-1].conv2.padding[0] for s in range(4)] == [1, 1, 2, 4]
    assert bb.maxpool.ceil_mode


def test_state_dict_names_follow_adashare():
    m = AdaShareNet("resnet18", {"seg": 40, "sn": 3}, head_width=8)
    names = set(m.state_dict())
    for expected in ("backbone.conv1.weight", "backbone.bn1.running_mean", "backbone.blocks.0.0.conv1.weight",
                     "backbone.blocks.3.1.bn2.bias", "backbone.ds.1.0.weight", "backbone.ds.3.1.running_var",
                     "heads.seg.fc1_c0.conv1.weight", "heads.sn.fc1_c3.conv3.bias", "logits"):
        assert expected in names, expected
    assert m.logits.shape == (2, 8, 2)
    assert m.heads["seg"].fc1_c2.conv1.dilation == (18, 18)


def test_logit_initialisation():
    equal = AdaShareNet("resnet18", {"a": 2}, head_width=8, skip_layer=2)
    assert equal.logits.shape == (1, 6, 2) and bool((equal.logits == 0.5).all())
    chosen = AdaShareNet("resnet18", {"a": 2}, head_width=8, init_method="all_chosen", init_neg_logits=-4.0)
    assert bool((chosen.logits[..., 0] == 0).all()) and bool((chosen.logits[..., 1] == -4).all())
    with pytest.raises(ValueError, match="init_neg_logits"):
        AdaShareNet("resnet18", {"a": 2}, head_width=8, init_method="all_chosen")
    with pytest.raises(ValueError, match="unknown init_method"):
        AdaShareNet("resnet18", {"a": 2}, head_width=8, init_method="zeros")


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        AdaShareNet("resnet50", {"a": 2})
    with pytest.raises(ValueError, match="at least one task"):
        AdaShareNet("resnet18", {})
    with pytest.raises(ValueError, match="skip_layer"):
        AdaShareNet("resnet18", {"a": 2}, skip_layer=8)
    with pytest.raises(ValueError, match="unknown executor"):
        AdaShareNet("resnet18", {"a": 2}, executor="parallel")
    m = AdaShareNet("resnet18", {"seg": 4, "sn": 3}, head_width=8)
    with pytest.raises(ValueError, match="unknown task 'depth'; this model has seg, sn"):
        m.task_index("depth")
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        m(torch.randn(1, 1, 33, 33))
    with pytest.raises(ValueError, match="policy must have shape"):
        m.gates("fixed", policy=torch.ones(2, 5))
    with pytest.raises(ValueError, match="tau"):
        m.gates("sample", tau=0.0)
    bad = m.logits.detach().clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="policy logits holds NaN"):
        Gates.sample(bad, 1.0, False, m.num_blocks)


def _tiny(tasks=None, backbone="resnet18", seed=0):
    torch.manual_seed(seed)
    m = AdaShareNet(backbone, tasks or {"seg": 5, "sn": 3, "depth": 1}, head_width=8, dropout=0.0,
                    executor="sequential")
    with torch.no_grad():  # move the logits away from 'equal' so tasks differ
        m.logits.normal_(0, 1)
    return m


def test_all_select_fixed_policy_equals_ungated_network():
    m = _tiny().eval()
    x = torch.randn(2, 3, 41, 41)
    with torch.no_grad():
        out = m(x, m.gates("fixed", policy=torch.ones(m.num_tasks, m.num_blocks)))
        feat = m.backbone(x)
    for task in m.tasks:
        assert_close_verbose(out[task], m.heads[task](feat), 1e-6, 1e-5, task)


def test_all_skip_fixed_policy_equals_shortcuts_only():
    m = _tiny().eval()
    x = torch.randn(2, 3, 41, 41)
    with torch.no_grad():
        out = m(x, m.gates("fixed", policy=torch.zeros(m.num_tasks, m.num_blocks)))
        h = m.backbone.stem(x)
        for l in range(m.num_blocks):
            h = m.backbone.shortcut(l, h)
    for task in m.tasks:
        assert_close_verbose(out[task], m.heads[task](h), 1e-6, 1e-5, task)


def test_gated_block_one_zero_is_residual_block_and_zero_one_is_shortcut():
    m = _tiny().eval()
    x = torch.randn(2, 3, 33, 33)
    policy = torch.ones(m.num_tasks, m.num_blocks)
    policy[1, 3] = 0  # task 1 skips block 3 only
    with torch.no_grad():
        out = m(x, m.gates("fixed", policy=policy))
        bb = m.backbone
        h = bb.stem(x)
        for l in range(bb.num_blocks):
            r = bb.shortcut(l, h)
            h = r if l == 3 else F.relu(r + bb.residual_branch(l, h))
    assert_close_verbose(out["sn"], m.heads["sn"](h), 1e-6, 1e-5, "sn")


@pytest.mark.parametrize("stage", [1, 4, 8])
def test_curriculum_forces_leading_blocks(stage):
    m = _tiny()
    gates = m.gates("sample", tau=1.0, hard=False, num_train_layers=stage,
                    generator=torch.Generator().manual_seed(0))
    assert gates.kinds == (FORCED,) * (8 - stage) + (SAMPLED,) * stage
    out = m(torch.randn(2, 3, 33, 33), gates)
    sum(o.mean() for o in out.values()).backward()
    grad = m.logits.grad
    assert bool((grad[:, : 8 - stage] == 0).all())
    assert bool((grad[:, 8 - stage:].abs().sum(-1) > 0).all())


def test_curriculum_with_skip_layer_and_stage_beyond_logits():
    m = AdaShareNet("resnet18", {"a": 2, "b": 3}, skip_layer=3, head_width=8)
    gates = m.gates("sample", num_train_layers=100)  # clamped to Lp = 5, as AdaShare's min()
    assert gates.kinds == (FORCED,) * 3 + (SAMPLED,) * 5
    assert gates.offset == 3
    with pytest.raises(ValueError, match="num_train_layers must be >= 1"):
        m.gates("sample", num_train_layers=0)


def test_sequential_reference_matches_hand_written_pass_with_sampled_gates():
    m = _tiny()
    x = torch.randn(2, 3, 33, 33)
    gen = torch.Generator().manual_seed(3)
    gates = m.gates("sample", tau=2.0, hard=True, num_train_layers=5, generator=gen)
    m.eval()
    with torch.no_grad():
        out = m(x, gates)
        bb = m.backbone
        for k, task in enumerate(m.tasks):
            h = bb.stem(x)
            for l in range(bb.num_blocks):
                r = bb.shortcut(l, h)
                fx = F.relu(r + bb.residual_branch(l, h))
                if l < 3:
                    h = fx
                    continue
                z = (m.logits[k, l] - torch.log(-torch.log(gates.u[k, l]))) / 2.0
                y = torch.softmax(z, 0)
                g = torch.tensor([1.0, 0.0]) if y[0] >= y[1] else torch.tensor([0.0, 1.0])
                h = g[0] * fx + g[1] * r
            assert_close_verbose(out[task], m.heads[task](h), 1e-6, 1e-5, task)


def test_sequential_updates_batch_norm_once_per_task():
    m = _tiny()
    m.train()
    before = m.backbone.blocks[0][0].bn1.num_batches_tracked.item()
    m(torch.randn(2, 3, 33, 33))
    assert m.backbone.blocks[0][0].bn1.num_batches_tracked.item() == before + m.num_tasks


def test_bad_forward_inputs_name_the_problem():
    m = _tiny().eval()
    x = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TypeError, match="x must be a floating-point tensor .* got torch.uint8"):
        m((x * 50).to(torch.uint8))
    with pytest.raises(TypeError, match="x must be a floating-point tensor .* got torch.int64"):
        m((x * 50).long())
    with pytest.raises(TypeError, match="x is torch.float64 but the model's weights are torch.float32"):
        m(x.double())
    with pytest.raises(ValueError, match="x is on meta but the model is on cpu"):
        m(x.to("meta"))
    with pytest.raises(TypeError, match="x must be a .* image tensor, got list"):
        m(x.tolist())
    with pytest.raises(TypeError, match="gates must be a fastshare.policy.Gates .* got str"):
        m(x, "sample")
    with pytest.raises(ValueError, match="unknown executor ''"):
        m(x, executor="")
    # Under autocast the input may be in another floating dtype than the weights.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16())
    assert all(o.dtype == torch.bfloat16 for o in out.values())


def test_fixed_gates_from_lists_and_plans():
    from fastshare.plan import Plan

    m = _tiny()  # tasks seg, sn, depth
    g = torch.Generator().manual_seed(2)
    policy = (torch.rand(3, 8, generator=g) < 0.6).float()
    want = m.gates("fixed", policy=policy).policy
    assert torch.equal(m.gates("fixed", policy=policy.int().tolist()).policy, want)
    assert torch.equal(m.gates("fixed", policy=Plan(policy)).policy, want)  # unnamed: positional
    assert torch.equal(m.gates("fixed", policy=Plan(policy, m.tasks)).policy, want)
    # Named rows in another order are matched to the model's tasks by name.
    assert torch.equal(m.gates("fixed", policy=Plan(policy[[2, 0, 1]], ["depth", "seg", "sn"])).policy, want)
    with pytest.raises(ValueError, match="the plan is for tasks a, b, c, the model has seg, sn, depth"):
        m.gates("fixed", policy=Plan(policy, ["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"policy must have shape \(3, 8\)"):
        m.gates("fixed", policy=[[1] * 8] * 2)
    with pytest.raises(ValueError, match="only 0"):
        m.gates("fixed", policy=[[1] * 7 + [2]] * 3)
    with pytest.raises(TypeError, match="a fixed policy must be .* got str"):
        m.gates("fixed", policy="11111111")
