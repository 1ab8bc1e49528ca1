"""Metrics on tiny hand-computed cases; streaming equals one-shot; multi-task delta."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastshare.metrics import (
    DepthMetric,
    L1Metric,
    MultiTaskMetrics,
    NormalMetric,
    SegmentationMetric,
    multi_task_delta,
)


def test_segmentation_hand_computed():
    # target / prediction over 6 valid pixels (+1 ignored), 3 classes:
    # t: 0 0 1 1 2 2 255     p: 0 1 1 1 0 2 1
    t = torch.tensor([[[0, 0, 1, 1, 2, 2, 255]]])
    p = torch.tensor([[[0, 1, 1, 1, 0, 2, 1]]])
    m = SegmentationMetric(3)
    m.update(p, t)
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    out = m.compute()
    # IoU: c0 = 1/(2+2-1) = 1/3, c1 = 2/(2+3-2) = 2/3, c2 = 1/(2+1-1) = 1/2
    assert out["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["mIoU_adashare"] == pytest.approx(out["mIoU"])
    assert out["pixel_acc"] == pytest.approx(4 / 6)
    assert "err" not in out


def test_segmentation_miou_classes_and_adashare_variant():
    # class 2 appears only in the prediction (IoU 0, counted by mIoU, dropped by mIoU_adashare);
    # class 3 appears nowhere (dropped by both).
    t = torch.tensor([[[0, 0, 1, 1]]])
    p = torch.tensor([[[0, 2, 1, 1]]])
    m = SegmentationMetric(4)
    m.update(p, t)
    out = m.compute()
    assert out["mIoU"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert out["mIoU_adashare"] == pytest.approx((1 / 2 + 1) / 2)


def test_segmentation_streaming_equals_one_shot_and_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, 7, generator=g)
    target = torch.randint(0, 5, (4, 6, 7), generator=g)
    target[0, 0, :3] = 255
    whole, parts = SegmentationMetric(5), SegmentationMetric(5)
    whole.update(logits, target)
    for i in range(4):
        parts.update(logits[i : i + 1], target[i : i + 1, None])  # (B, 1, H, W) targets accepted
    assert torch.equal(whole.confusion, parts.confusion)
    a, b = whole.compute(), parts.compute()
    assert a == pytest.approx(b)
    valid = target != 255
    ce = torch.nn.functional.cross_entropy(logits.double(), target.clamp(max=4), reduction="none")[valid].mean()
    assert a["err"] == pytest.approx(float(ce))


def test_segmentation_weighted_err_matches_torch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    target[1, 1] = 255
    w = torch.tensor([0.5, 2.0, 1.0])
    m = SegmentationMetric(3, class_weights=w)
    m.update(logits, target)
    ref = torch.nn.functional.cross_entropy(logits.double(), target, weight=w.double(), ignore_index=255)
    assert m.compute()["err"] == pytest.approx(float(ref))


def test_segmentation_bad_labels():
    m = SegmentationMetric(3)
    with pytest.raises(ValueError, match="target label 7"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 2]]]))
    with pytest.raises(ValueError, match="no valid pixel"):
        SegmentationMetric(3).compute()


def _normals(angles_deg):
    """(1, 3, 1, N) predictions at the given angles from the target (0, 0, 1)."""
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    pred = torch.stack([torch.sin(a), torch.zeros_like(a), torch.cos(a)]).view(1, 3, 1, -1)
    target = torch.zeros_like(pred)
    target[:, 2] = 1.0
    return pred, target


def test_normal_hand_computed():
    pred, target = _normals([0.0, 10.0, 20.0, 25.0, 40.0, 90.0])
    pred = pred * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 7.0], dtype=torch.float64)  # scale does not matter
    m = NormalMetric()
    m.update(pred, target)
    out = m.compute()
    assert out["mean_angle"] == pytest.approx(185 / 6)
    assert out["median_angle"] == pytest.approx(22.5, abs=0.01)
    assert out["within_11.25"] == pytest.approx(100 * 2 / 6)
    assert out["within_22.5"] == pytest.approx(100 * 3 / 6)
    assert out["within_30"] == pytest.approx(100 * 4 / 6)
    assert out["within_45"] == pytest.approx(100 * 5 / 6)


def test_normal_invalid_pixels_and_mask_ignored():
    pred, target = _normals([10.0, 50.0, 170.0])
    target[..., 2] = 0.0  # third pixel invalid (zero target)
    mask = torch.tensor([[[True, False, True]]])
    m = NormalMetric()
    m.update(pred, target, mask)
    assert m.count == 1
    assert m.compute()["mean_angle"] == pytest.approx(10.0)
    assert m.compute()["median_angle"] == pytest.approx(10.0, abs=1e-9)


def test_normal_median_matches_numpy_on_random_data():
    g = torch.Generator().manual_seed(2)
    m, angles = NormalMetric(), []
    for _ in range(3):
        p, t = torch.randn(2, 3, 9, 11, generator=g), torch.randn(2, 3, 9, 11, generator=g)
        m.update(p, t)
        c = torch.nn.functional.cosine_similarity(p.double(), t.double(), dim=1).clamp(-1, 1)
        angles.append(np.degrees(np.arccos(c.numpy())).ravel())
    a = np.concatenate(angles)
    out = m.compute()
    assert out["median_angle"] == pytest.approx(np.median(a), abs=0.01)
    assert out["mean_angle"] == pytest.approx(a.mean())


def test_depth_hand_computed():
    # valid pairs (pred, gt): (1, 1), (2, 1), (3, 4), (-1, 2); gt 0 is invalid
    pred = torch.tensor([1.0, 2.0, 3.0, -1.0, 5.0]).view(1, 1, 1, 5)
    gt = torch.tensor([1.0, 1.0, 4.0, 2.0, 0.0]).view(1, 1, 1, 5)
    m = DepthMetric()
    m.update(pred, gt)
    out = m.compute()
    assert out["abs_err"] == pytest.approx((0 + 1 + 1 + 3) / 4)
    assert out["rel_err"] == pytest.approx((0 + 1 + 1 / 4 + 3 / 2) / 4)
    assert out["sq_rel_err"] == pytest.approx((0 + 1 + 1 / 4 + 9 / 2) / 4)
    assert out["rmse"] == pytest.approx(math.sqrt((0 + 1 + 1 + 9) / 4))
    # ratios 1, 2, 4/3, invalid(pred <= 0): <= 1.25: 1 ; <= 1.5625: 2 ; <= 1.953: 2
    assert out["delta_1.25"] == pytest.approx(25.0)
    assert out["delta_1.25^2"] == pytest.approx(50.0)
    assert out["delta_1.25^3"] == pytest.approx(50.0)


def test_depth_streaming_and_mask():
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(4, 1, 5, 5, generator=g) + 0.5
    gt = torch.rand(4, 1, 5, 5, generator=g) + 0.5
    gt[0, 0, 0] = 0.0
    mask = torch.rand(4, 1, 5, 5, generator=g) > 0.3
    whole, parts = DepthMetric(), DepthMetric()
    whole.update(pred, gt, mask)
    for i in range(4):
        parts.update(pred[i : i + 1], gt[i : i + 1], mask[i : i + 1])
    assert whole.compute() == pytest.approx(parts.compute())
    assert whole.count == int(((gt > 0) & mask).sum())


def test_l1_ignores_255():
    pred = torch.tensor([0.5, -1.0, 0.0]).view(1, 1, 1, 3)
    target = torch.tensor([0.0, 1.0, 255.0]).view(1, 1, 1, 3)
    m = L1Metric()
    m.update(pred, target)
    assert m.compute() == {"err": pytest.approx(1.25)}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must equal the target"):
        DepthMetric().update(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 4, 4))


def test_multi_task_metrics_reads_batch_keys():
    batch = {
        "seg": torch.tensor([[[0, 1], [1, 255]]]),
        "normal": torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]]]),
        "depth": torch.full((1, 1, 2, 2), 2.0),
    }
    preds = {
        "seg": torch.tensor([[[0, 1], [0, 1]]]),
        "sn": batch["normal"].clone(),
        "depth": torch.full((1, 1, 2, 2), 1.0),
    }
    mtm = MultiTaskMetrics(["seg", "sn", "depth"], [2, 3, 1])
    mtm.update(preds, batch)
    out = mtm.compute()
    assert out["seg"]["pixel_acc"] == pytest.approx(2 / 3)
    assert out["sn"]["mean_angle"] == pytest.approx(0.0, abs=1e-6)
    assert out["depth"]["abs_err"] == pytest.approx(1.0)


def test_multi_task_delta():
    st = {"seg": {"mIoU": 0.40, "pixel_acc": 0.80}, "depth": {"abs_err": 0.50}}
    mt = {"seg": {"mIoU": 0.44, "pixel_acc": 0.76}, "depth": {"abs_err": 0.45}}
    # per metric: +10 %, -5 %, +10 % (lower is better: 0.45 < 0.5)
    assert multi_task_delta(mt, st) == pytest.approx((10 - 5 + 10) / 3)
    assert multi_task_delta(mt, st, average="tasks") == pytest.approx(((10 - 5) / 2 + 10) / 2)
    assert multi_task_delta(mt, st, metrics={"depth": ["abs_err"]}) == pytest.approx(10.0)
    assert multi_task_delta(st, st) == 0.0
    with pytest.raises(KeyError, match="direction"):
        multi_task_delta({"x": {"score": 1.0}}, {"x": {"score": 2.0}})
    lower = multi_task_delta({"x": {"score": 1.0}}, {"x": {"score": 2.0}}, lower_is_better={"score": True})
    assert lower == pytest.approx(50.0)
    with pytest.raises(KeyError, match="multi-task results lack depth/abs_err"):
        multi_task_delta({"seg": mt["seg"]}, st)
