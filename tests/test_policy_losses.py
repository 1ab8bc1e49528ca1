"""Policy utilities and losses on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from fastshare import losses, policy


def test_temperature_schedule():
    assert policy.temperature(5.0, 0.965, 0) == 5.0
    assert math.isclose(policy.temperature(5.0, 0.965, 3), 5.0 * 0.965 ** 3)
    with pytest.raises(ValueError, match="tau"):
        policy.temperature(0.0, 0.9, 1)
    with pytest.raises(ValueError, match="decay_temp"):
        policy.temperature(5.0, 1.5, 1)


def test_curriculum_stage():
    assert [policy.curriculum_stage(e, 2, 4) for e in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]
    assert policy.curriculum_stage(0, 2, 4, is_curriculum=False) == 4
    with pytest.raises(ValueError, match="curriculum_speed"):
        policy.curriculum_stage(1, 0, 4)


def test_argmax_policy_and_padding():
    alpha = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.3, 0.3]]])
    assert policy.argmax_policy(alpha).tolist() == [[1.0, 0.0, 1.0]]
    assert policy.argmax_policy(alpha, num_blocks=5).tolist() == [[1.0, 1.0, 1.0, 0.0, 1.0]]
    alpha[0, 1, 0] = float("nan")  # NaN >= x is False: would silently skip the block
    with pytest.raises(ValueError, match=r"policy logits holds NaN or Inf \(first at index \[0, 1, 0\]\)"):
        policy.argmax_policy(alpha)


def test_sample_architectures_follows_softmax():
    alpha = torch.tensor([[[2.0, 0.0], [-1.0, 1.0], [0.0, 0.0]]])
    draws = policy.sample_architectures(alpha, 4000, generator=torch.Generator().manual_seed(0))
    freq = torch.stack(draws).mean(0)[0]
    expect = torch.softmax(alpha, -1)[0, :, 0]
    assert torch.allclose(freq, expect, atol=0.03), (freq, expect)
    again = policy.sample_architectures(alpha, 3, generator=torch.Generator().manual_seed(1))
    same = policy.sample_architectures(alpha, 3, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(again, same))


def test_draw_uniform_is_strictly_inside_unit_interval():
    u = policy.draw_uniform((1000, 2), torch.Generator().manual_seed(0))
    assert bool(((u > 0) & (u < 1)).all())


def test_seg_loss_hand_computed():
    pred = torch.zeros(1, 2, 1, 2)
    pred[0, 0, 0, 0] = math.log(3.0)  # p(class 0) = 3/4 at pixel 0
    target = torch.tensor([[[0, 255]]])
    assert math.isclose(losses.seg_loss(pred, target).item(), -math.log(0.75), rel_tol=1e-6)


def test_seg_loss_resizes_labels_nearest():
    pred = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]])[None]
    small = torch.tensor([[[0, 1], [2, 255]]])
    assert torch.allclose(losses.seg_loss(pred, target), losses.seg_loss(pred, small))


def test_sn_loss_hand_computed():
    pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [5.0, 5.0, 5.0]]).T.reshape(1, 3, 1, 3)
    gt = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    # pixel 2 is invalid (all zero): mean cos over pixels 0, 1 = (1 + 0) / 2
    assert math.isclose(losses.sn_loss(pred, gt).item(), 0.5, rel_tol=1e-6)


def test_depth_loss_hand_computed():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    gt = torch.tensor([[[[1.5, 0.0], [2.0, 4.0]]]])  # pixel (0, 1) invalid
    assert math.isclose(losses.depth_loss(pred, gt).item(), (0.5 + 1.0 + 0.0) / 3, rel_tol=1e-6)


def test_seg_loss_class_weights_and_all_ignored():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(2, 4, 3, 5, generator=gen, requires_grad=True)
    target = torch.randint(0, 4, (2, 3, 5), generator=gen)
    target[0, 0, :2] = 255
    weights = torch.rand(4, generator=gen) + 0.2
    want = torch.nn.CrossEntropyLoss(weight=weights, ignore_index=255)(pred, target)  # AdaShare's Taskonomy loss
    assert torch.allclose(losses.seg_loss(pred, target, weights), want)
    assert torch.allclose(losses.task_loss("seg", pred, target, weights), want)
    with pytest.raises(ValueError, match=r"class_weights must have shape \(4,\)"):
        losses.seg_loss(pred, target, weights[:3])
    nothing = losses.seg_loss(pred, torch.full_like(target, 255))  # not cross_entropy's 0 / 0 = NaN
    assert nothing.item() == 0.0
    nothing.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("task", ["keypoint", "edge"])
def test_keypoint_and_edge_losses_are_l1_over_labelled_pixels(task):
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)
    gt = torch.tensor([[[[1.5, 255.0], [2.0, 0.0]]]])  # 255: unlabelled (Taskonomy)
    got = losses.task_loss(task, pred, gt)
    assert math.isclose(got.item(), (0.5 + 1.0 + 4.0) / 3, rel_tol=1e-6)
    assert math.isclose(losses.task_loss(task, pred, gt[:, 0]).item(), got.item(), rel_tol=1e-6)  # (B, H, W)
    assert losses.task_loss(task, pred, torch.full_like(gt, 255.0)).item() == 0.0
    with pytest.raises(ValueError, match="disagree"):
        losses.task_loss(task, pred, torch.zeros(2, 1, 2, 2))


def test_sparsity_loss_hand_computed():
    alpha = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]])
    ce = lambda a0, a1: -math.log(math.exp(a1) / (math.exp(a0) + math.exp(a1)))  # noqa: E731
    plain = (ce(0, 0) + ce(1, 0)) / 2 + (ce(0, 2) + ce(0, 0)) / 2
    assert math.isclose(losses.sparsity_loss(alpha).item(), plain, rel_tol=1e-6)
    # Only the last trained block at curriculum stage 1.
    assert math.isclose(losses.sparsity_loss(alpha, num_train_layers=1).item(), ce(1, 0) + ce(0, 0), rel_tol=1e-6)
    # AdaShare's weighted rule: 2 * mean(w_l * CE_l), w = (l + 1) / Lp.
    weighted = 2 * (0.5 * ce(0, 0) + 1.0 * ce(1, 0)) / 2 + 2 * (0.5 * ce(0, 2) + 1.0 * ce(0, 0)) / 2
    got = losses.sparsity_loss(alpha, diff_sparsity_weights=True, is_sharing=False).item()
    assert math.isclose(got, weighted, rel_tol=1e-6)
    assert math.isclose(losses.sparsity_loss(alpha, diff_sparsity_weights=True, is_sharing=True).item(), plain,
                        rel_tol=1e-6)


def test_sharing_loss_hand_computed():
    alpha = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.5, 0.0]], [[1.0, 9.0], [2.0, 9.0]]])
    # pairs (0,1): 0.5*1 + 1*1.5; (0,2): 0; (1,2): 0.5*1 + 1*1.5; (i,i): 0
    assert math.isclose(losses.sharing_loss(alpha).item(), 4.0, rel_tol=1e-6)
    assert math.isclose(losses.sharing_loss(alpha, diff_sparsity_weights=False).item(), 5.0, rel_tol=1e-6)


def test_task_loss_rejects_unknown_task():
    with pytest.raises(ValueError, match="no loss for task 'edges'"):
        losses.task_loss("edges", torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="no lambda"):
        losses.total_task_loss({"seg": torch.tensor(1.0)}, {"sn": 1.0})
