"""Evaluation metrics as AdaShare reports them, as streaming accumulators over a data set.

Each accumulator has ``update(pred, target)`` (one batch), ``compute() -> dict[str, float]`` (over
everything seen) and ``reset()``. Targets follow :mod:`fastshare.data`'s conventions (seg 255 = ignore,
normal 0-vector = invalid, depth 0 = invalid, keypoint/edge 255 = ignore). Predictions must already have
the target's spatial size (AdaShare upsamples them to the image size first).

Where this differs from AdaShare's ``test.py`` (all choices make the result independent of batching):

- pixel accuracy, depth errors and Taskonomy errors are means over all valid pixels of the data set;
  AdaShare averages per-batch means weighted by batch size (the same when every batch has equally many
  valid pixels);
- ``mIoU`` averages the IoU over classes that occur in the target or the prediction (union > 0).
  AdaShare averages over classes with at least one true positive, which is reported as
  ``mIoU_adashare``;
- the median normal angle comes from a histogram with 0.01 degree bins (each order statistic taken as the
  mean angle of its bin), so it is within 0.01 degree of numpy's median, and exact when the middle
  angles have bins of their own, without storing every angle; mean angle and threshold percentages are
  exact.

Percentages (``within_*``, ``delta_*``) are in percent, as AdaShare prints them; ``mIoU`` and ``pixel_acc``
are fractions in [0, 1]. Accumulators compute on the prediction's device (float64 for normals and
depth; float32 cross-entropy for segmentation) and keep their running sums on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0, 45.0)
DEPTH_THRESHOLDS: tuple[float, ...] = (1.25, 1.25**2, 1.25**3)
_DELTA_NAMES = ("delta_1.25", "delta_1.25^2", "delta_1.25^3")
_HIST_BIN_DEG = 0.01

#: Metric name -> True if lower is better (the l_j of the multi-task delta).
LOWER_IS_BETTER: dict[str, bool] = {
    "mIoU": False,
    "mIoU_adashare": False,
    "pixel_acc": False,
    "err": True,
    "mean_angle": True,
    "median_angle": True,
    **{f"within_{t:g}": False for t in NORMAL_THRESHOLDS},
    "abs_err": True,
    "rel_err": True,
    "sq_rel_err": True,
    "rmse": True,
    **{name: False for name in _DELTA_NAMES},
}


def _check_pair(pred: torch.Tensor, target: torch.Tensor, channels: int, what: str) -> None:
    if target.ndim != 4 or target.shape[1] != channels:
        raise ValueError(f"{what} target must be (B, {channels}, H, W), got {tuple(target.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{what} prediction shape {tuple(pred.shape)} must equal the target's {tuple(target.shape)}")


class SegmentationMetric:
    """mIoU and pixel accuracy from a confusion matrix accumulated over the data set; 255 is ignored.

    ``update(pred, target)``: ``pred`` is ``(B, C, H, W)`` logits or ``(B, H, W)`` class indices;
    ``target`` is ``(B, H, W)`` (or ``(B, 1, H, W)``) int with values in ``[0, C)`` or ``ignore_index``.
    With logits, the mean cross-entropy over valid pixels is also accumulated (``err``, AdaShare's
    segmentation error; weighted by ``class_weights`` as AdaShare weights Taskonomy's loss).

    ``compute()`` -> ``mIoU``, ``mIoU_adashare``, ``pixel_acc`` (+ ``err`` if logits were seen).
    ``confusion`` is the ``(C, C)`` int64 matrix, rows = target, columns = prediction.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_weights: torch.Tensor | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_weights is not None and class_weights.shape != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(class_weights.shape)}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_weights = None if class_weights is None else class_weights.detach().double().cpu()
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._ce_sum = 0.0
        self._ce_weight = 0.0
        self._ce_seen = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.ndim != 3:
            raise ValueError(f"segmentation target must be (B, H, W), got {tuple(target.shape)}")
        if target.dtype.is_floating_point:
            raise TypeError(f"segmentation target must be an integer tensor, got {target.dtype}")
        pred = pred.detach()
        target = target.detach().to(pred.device).long()
        logits = None
        if pred.ndim == 4:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"logits have {pred.shape[1]} channels, expected num_classes={self.num_classes}")
            logits = pred
            labels = pred.argmax(dim=1)
        elif pred.ndim == 3:
            labels = pred.long()
        else:
            raise ValueError(
                f"segmentation prediction must be (B, C, H, W) logits or (B, H, W) labels, got {tuple(pred.shape)}"
            )
        if labels.shape != target.shape:
            raise ValueError(f"prediction {tuple(labels.shape)} and target {tuple(target.shape)} differ in size")
        valid = target != self.ignore_index
        t, p = target[valid], labels[valid]
        if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
            bad = t[(t < 0) | (t >= self.num_classes)][0]
            raise ValueError(
                f"target label {int(bad)} outside [0, {self.num_classes}) and not ignore_index={self.ignore_index}"
            )
        if p.numel() and (p.min() < 0 or p.max() >= self.num_classes):
            raise ValueError(f"predicted labels must lie in [0, {self.num_classes})")
        counts = torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        self.confusion += counts.cpu().view(self.num_classes, self.num_classes)
        if logits is not None:
            self._ce_seen = True
            safe = target.clamp(0, self.num_classes - 1)  # ignored pixels get weight 0 below
            nll = F.cross_entropy(logits.float(), safe, reduction="none").double()
            if self.class_weights is None:
                w = valid.double()
            else:
                w = self.class_weights.to(pred.device)[safe] * valid
            self._ce_sum += float((w * nll).sum())
            self._ce_weight += float(w.sum())

    def compute(self) -> dict[str, float]:
        cm = self.confusion.double()
        total = cm.sum()
        if total == 0:
            raise ValueError("SegmentationMetric.compute(): no valid pixel seen")
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        out = {
            "mIoU": float((tp[union > 0] / union[union > 0]).mean()),
            "mIoU_adashare": float((tp[tp > 0] / union[tp > 0]).mean()) if (tp > 0).any() else 0.0,
            "pixel_acc": float(tp.sum() / total),
        }
        if self._ce_seen:
            out["err"] = self._ce_sum / self._ce_weight if self._ce_weight > 0 else math.nan
        return out


class NormalMetric:
    """Surface-normal angle error on valid pixels: mean, median, % within 11.25/22.5/30/45 degrees.

    ``update(pred, target, mask=None)``: ``(B, 3, H, W)`` each; both are normalised per pixel (as in
    AdaShare), the angle is ``acos`` of their clipped dot product. Valid pixels: target vector non-zero,
    and ``mask`` ``(B, H, W)`` bool where given. A zero prediction scores 90 degrees.

    ``compute()`` -> ``mean_angle``, ``median_angle``, ``within_11.25``, ``within_22.5``, ``within_30``,
    ``within_45`` (degrees; percent).
    """

    def __init__(self) -> None:
        self._nbins = int(round(180.0 / _HIST_BIN_DEG))
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._sum = 0.0
        self._within = [0] * len(NORMAL_THRESHOLDS)
        self._hist = torch.zeros(self._nbins, dtype=torch.int64)
        self._bin_sum = torch.zeros(self._nbins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        _check_pair(pred, target, 3, "normal")
        p, t = pred.detach().double(), target.detach().to(pred.device).double()
        valid = t.abs().sum(dim=1) > 0
        if mask is not None:
            valid = valid & mask.detach().to(pred.device).bool()
        cos = (F.normalize(p, dim=1) * F.normalize(t, dim=1)).sum(dim=1)[valid].clamp(-1.0, 1.0)
        deg = torch.rad2deg(torch.acos(cos))
        self.count += deg.numel()
        self._sum += float(deg.sum())
        for i, thr in enumerate(NORMAL_THRESHOLDS):
            self._within[i] += int((deg <= thr).sum())
        bins = (deg / _HIST_BIN_DEG).floor().long().clamp(0, self._nbins - 1)
        self._hist += torch.bincount(bins, minlength=self._nbins).cpu()
        self._bin_sum += torch.bincount(bins, weights=deg, minlength=self._nbins).cpu()

    def _order_statistic(self, i: int) -> float:
        # The i-th smallest angle (0-based), approximated by the mean angle of its histogram bin.
        b = int(torch.searchsorted(self._hist.cumsum(0), torch.tensor(i), right=True))
        return float(self._bin_sum[b]) / int(self._hist[b])

    def _median(self) -> float:
        return 0.5 * (self._order_statistic((self.count - 1) // 2) + self._order_statistic(self.count // 2))

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("NormalMetric.compute(): no valid pixel seen")
        out = {"mean_angle": self._sum / self.count, "median_angle": self._median()}
        for thr, n in zip(NORMAL_THRESHOLDS, self._within):
            out[f"within_{thr:g}"] = 100.0 * n / self.count
        return out


class DepthMetric:
    """Depth errors on valid pixels: absolute, relative, squared relative, RMSE and delta < 1.25^k.

    ``update(pred, target, mask=None)``: ``(B, 1, H, W)`` each. Valid pixels: ``target > min_depth``
    (AdaShare's test is ``> 3e-5``), and ``mask`` ``(B, 1, H, W)`` bool where given.
    ``delta_1.25^k`` is the percentage of valid pixels with ``max(p/g, g/p) <= 1.25^k``; a prediction
    ``<= 0`` counts as outside every threshold.

    ``compute()`` -> ``abs_err``, ``rel_err``, ``sq_rel_err``, ``rmse``, ``delta_1.25``, ``delta_1.25^2``,
    ``delta_1.25^3``.
    """

    def __init__(self, min_depth: float = 3e-5) -> None:
        self.min_depth = min_depth
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._abs = self._rel = self._sq_rel = self._sq = 0.0
        self._delta = [0] * len(DEPTH_THRESHOLDS)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        _check_pair(pred, target, 1, "depth")
        p, g = pred.detach().double(), target.detach().to(pred.device).double()
        valid = g > self.min_depth
        if mask is not None:
            valid = valid & mask.detach().to(pred.device).bool()
        p, g = p[valid], g[valid]
        diff = p - g
        self.count += g.numel()
        self._abs += float(diff.abs().sum())
        self._rel += float((diff.abs() / g).sum())
        self._sq_rel += float((diff * diff / g).sum())
        self._sq += float((diff * diff).sum())
        ratio = torch.where(p > 0, torch.maximum(p / g, g / p.clamp_min(1e-300)), torch.full_like(p, math.inf))
        for i, thr in enumerate(DEPTH_THRESHOLDS):
            self._delta[i] += int((ratio <= thr).sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("DepthMetric.compute(): no valid pixel seen")
        n = self.count
        out = {
            "abs_err": self._abs / n,
            "rel_err": self._rel / n,
            "sq_rel_err": self._sq_rel / n,
            "rmse": math.sqrt(self._sq / n),
        }
        for name, k in zip(_DELTA_NAMES, self._delta):
            out[name] = 100.0 * k / n
        return out


class L1Metric:
    """Mean absolute error over pixels whose target is not ``ignore_value`` (Taskonomy keypoint / edge).

    ``update(pred, target)``: ``(B, 1, H, W)`` each. ``compute()`` -> ``{'err': mean |pred - target|}``.
    """

    def __init__(self, ignore_value: float = 255.0) -> None:
        self.ignore_value = ignore_value
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self._abs = 0.0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        _check_pair(pred, target, 1, "L1")
        p, t = pred.detach().double(), target.detach().to(pred.device).double()
        valid = t != self.ignore_value
        self.count += int(valid.sum())
        self._abs += float((p - t).abs()[valid].sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("L1Metric.compute(): no valid pixel seen")
        return {"err": self._abs / self.count}


Metric = SegmentationMetric | NormalMetric | DepthMetric | L1Metric

_TARGET_KEY = {"seg": "seg", "sn": "normal", "depth": "depth", "keypoint": "keypoint", "edge": "edge"}


class MultiTaskMetrics:
    """One accumulator per AdaShare task, fed with a batch dict as the data sets produce it.

    Args:
        tasks: task names (``'seg'``, ``'sn'``, ``'depth'``, ``'keypoint'``, ``'edge'``).
        tasks_num_class: output channels per task (the number of classes for ``'seg'``).
        seg_class_weights: optional ``(C,)`` weights for the segmentation ``err`` (Taskonomy).

    ``update(preds, batch)``: ``preds`` maps task -> prediction at the target's size; ``batch`` is the
    collated sample dict. ``compute()`` -> ``{task: {metric: value}}``.
    """

    def __init__(
        self, tasks: Sequence[str], tasks_num_class: Sequence[int], seg_class_weights: torch.Tensor | None = None
    ) -> None:
        if len(tasks) != len(tasks_num_class):
            raise ValueError(f"tasks {list(tasks)} and tasks_num_class {list(tasks_num_class)} differ in length")
        self.metrics: dict[str, Metric] = {}
        for task, n in zip(tasks, tasks_num_class):
            if task == "seg":
                self.metrics[task] = SegmentationMetric(n, class_weights=seg_class_weights)
            elif task == "sn":
                self.metrics[task] = NormalMetric()
            elif task == "depth":
                self.metrics[task] = DepthMetric()
            elif task in ("keypoint", "edge"):
                self.metrics[task] = L1Metric()
            else:
                raise ValueError(f"unknown task {task!r}; known: {sorted(_TARGET_KEY)}")

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()

    def update(self, preds: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> None:
        for task, metric in self.metrics.items():
            if task not in preds:
                raise KeyError(f"no prediction for task {task!r}")
            metric.update(preds[task], batch[_TARGET_KEY[task]])

    def compute(self) -> dict[str, dict[str, float]]:
        return {task: m.compute() for task, m in self.metrics.items()}


def multi_task_delta(
    mt: Mapping[str, Mapping[str, float]],
    st: Mapping[str, Mapping[str, float]],
    *,
    metrics: Mapping[str, Iterable[str]] | None = None,
    lower_is_better: Mapping[str, bool] | None = None,
    average: str = "metrics",
) -> float:
    """Relative multi-task improvement over single-task baselines, in percent.

    ``delta_m = 100 * mean_j (-1)^{l_j} (M_mt,j - M_st,j) / M_st,j`` with ``l_j = 1`` where lower is better
    (Maninis et al. 2019; AdaShare's Delta_T). Positive means the multi-task model is better.

    Args:
        mt: ``{task: {metric: value}}`` of the multi-task model.
        st: the same for the single-task baselines (one per task).
        metrics: ``{task: metric names}`` to use; default: every metric of ``st``.
        lower_is_better: direction of metric names not in :data:`LOWER_IS_BETTER` (or overrides).
        average: ``'metrics'``: mean over all (task, metric) pairs; ``'tasks'``: mean over tasks of the
            per-task mean (the AdaShare paper's Delta_T).

    Raises ``KeyError`` for a metric missing from ``mt`` or of unknown direction, ``ValueError`` for a zero
    baseline or an unknown ``average``.
    """
    if average not in ("metrics", "tasks"):
        raise ValueError(f"average must be 'metrics' or 'tasks', got {average!r}")
    direction = {**LOWER_IS_BETTER, **(lower_is_better or {})}
    selected = {t: list(metrics[t]) for t in metrics} if metrics is not None else {t: list(m) for t, m in st.items()}
    per_task: dict[str, list[float]] = {}
    for task, names in selected.items():
        for name in names:
            if name not in direction:
                raise KeyError(f"direction of metric {task}/{name} unknown; pass lower_is_better={{{name!r}: ...}}")
            if task not in mt or name not in mt[task]:
                raise KeyError(f"multi-task results lack {task}/{name}")
            if task not in st or name not in st[task]:
                raise KeyError(f"single-task results lack {task}/{name}")
            base = st[task][name]
            if base == 0:
                raise ValueError(f"single-task baseline {task}/{name} is 0; the relative change is undefined")
            sign = -1.0 if direction[name] else 1.0
            per_task.setdefault(task, []).append(sign * (mt[task][name] - base) / abs(base))
    if not per_task:
        raise ValueError("no metric selected")
    if average == "tasks":
        values = [sum(v) / len(v) for v in per_task.values()]
    else:
        values = [x for v in per_task.values() for x in v]
    return 100.0 * sum(values) / len(values)
