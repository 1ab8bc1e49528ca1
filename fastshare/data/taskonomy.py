"""Tiny-Taskonomy in AdaShare's layout (tasks ``seg``, ``sn``, ``depth``, ``keypoint``, ``edge``).

Layout: ``root/taskonomy.json`` maps each split (``train``, ``train1``, ``train2``, ``test``,
``test_small``) to a list of ``[img, seg, normal, depth, keypoint, edge]`` PNG paths relative to ``root``;
``root/semseg_prior_factor.npy`` holds the 17 class weights (finite, >= 0) of AdaShare's segmentation loss.

Every map is first resized to 256x256 (nearest neighbour, as AdaShare does for the image too), then
decoded as AdaShare decodes it:

- ``img``: RGB -> BGR, 0..255 minus the BGR mean; float32 ``(3, H, W)``;
- ``seg``: stored label ``c`` -> class ``c - 1`` (17 classes); int64 ``(H, W)``. A stored 0 is
  "unlabelled": AdaShare maps it to class 0 and zeroes its weight in an (unused) mask; here it becomes
  255 = ignore by default (``unlabelled_as_ignore=False`` gives AdaShare's class 0);
- ``normal``: 8-bit RGB ``v`` -> ``2 v / 255 - 1``, then unit length; float32 ``(3, H, W)``, exactly 0 where
  the depth is invalid (AdaShare's normal mask) or in padding. A flip negates channel 0, as in AdaShare;
- ``depth``: 16-bit ``d`` -> ``log(1 + d) / log(2^16)``; float32 ``(1, H, W)``, 0 where ``d >= 64500``
  (AdaShare's depth mask) or in padding;
- ``keypoint`` / ``edge``: 16-bit ``k`` -> ``k / 2^16`` clipped to [0, 0.005] / [0, 0.08] and rescaled to
  [-1, 1]; float32 ``(1, H, W)``; 255 marks padding (ignored by the metric), as in AdaShare.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fastshare.data.base import SplitFileDataset
from fastshare.data.io import (
    DataFileError,
    PathLike,
    check_numeric,
    read_color_image,
    read_label_image,
    read_npy,
    read_split_file,
)
from fastshare.data.transforms import (
    IGNORE_INDEX,
    random_scale_flip_crop,
    resize,
    rgb_to_bgr_tensor,
    subtract_mean,
    unit_normals,
)

SPLIT_FILE = "taskonomy.json"
PRIOR_FILE = "semseg_prior_factor.npy"
BASE_SIZE = (256, 256)
DEPTH_INVALID_FROM = 64500
_KEYPOINT_MAX = 0.005
_EDGE_MAX = 0.08


def _rescale_unit(x: np.ndarray, high: float) -> np.ndarray:
    return (np.clip(x, 0.0, high) / high * 2.0 - 1.0).astype(np.float32)


def _read_class_weights(path: Path) -> torch.Tensor:
    """The segmentation class weights of ``semseg_prior_factor.npy``: 17 finite numbers >= 0."""
    weights = read_npy(path, ndim=(1,))
    if weights.shape != (Taskonomy.NUM_SEG_CLASSES,):
        raise DataFileError(path, f"expected {Taskonomy.NUM_SEG_CLASSES} class weights, got {weights.shape[0]}")
    check_numeric(path, weights)
    if (weights < 0).any():
        raise DataFileError(path, f"class weights must be >= 0, found {float(weights.min())}")
    return torch.from_numpy(weights.astype(np.float32))


class Taskonomy(SplitFileDataset):
    """Tiny-Taskonomy, five tasks, as AdaShare loads it (see the module docstring for the encodings).

    Args:
        root: data root holding ``taskonomy.json`` (and ``semseg_prior_factor.npy``).
        split: a split of the JSON (AdaShare validates on ``'test_small'``).
        crop_h, crop_w: training crop (AdaShare's YAML: 224x224); ``None``: 256x256.
        augment: random scale/flip/pad/crop; default ``True`` for the train splits.
        unlabelled_as_ignore: map stored label 0 to 255 (default) instead of class 0.
        generator: randomness for augmentation (default: torch's global generator).

    Attributes:
        class_weights: float32 ``(17,)`` segmentation loss weights from ``semseg_prior_factor.npy``, or
            ``None`` when that file is absent.
    """

    TASKS: tuple[str, ...] = ("seg", "sn", "depth", "keypoint", "edge")
    NUM_SEG_CLASSES = 17

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        crop_h: int | None = None,
        crop_w: int | None = None,
        *,
        augment: bool | None = None,
        unlabelled_as_ignore: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(root, split, read_split_file(Path(root), SPLIT_FILE, split),
                         ("img", "seg", "normal", "depth", "keypoint", "edge"), crop_h, crop_w,
                         BASE_SIZE, augment, generator)
        self.unlabelled_as_ignore = unlabelled_as_ignore
        prior = self.root / PRIOR_FILE
        self.class_weights = _read_class_weights(prior) if prior.is_file() else None

    def _map(self, arr: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        return resize(t, BASE_SIZE, "nearest")

    def name(self, index: int) -> str:
        """AdaShare's sample name: the image path with ``/`` replaced by ``-``."""
        return "-".join(self.groups[index][0].strip().split("/"))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        img_p, seg_p, sn_p, depth_p, kp_p, edge_p = (self.root / p for p in self.groups[index])
        img = resize(rgb_to_bgr_tensor(read_color_image(img_p)), BASE_SIZE, "nearest")

        seg_raw = read_label_image(seg_p).astype(np.int64)
        seg = seg_raw - 1
        seg[seg_raw == 0] = IGNORE_INDEX if self.unlabelled_as_ignore else 0
        bad = (seg != IGNORE_INDEX) & ((seg < 0) | (seg >= self.NUM_SEG_CLASSES))
        if bad.any():
            raise DataFileError(seg_p, f"labels must be 0..{self.NUM_SEG_CLASSES}; found {int(seg_raw[bad][0])}")
        seg_t = self._map(seg)

        depth_raw = read_label_image(depth_p).astype(np.float64)
        depth_ok = depth_raw < DEPTH_INVALID_FROM
        depth = np.where(depth_ok, np.log1p(depth_raw) / math.log(2.0**16), 0.0)
        depth_t = self._map(depth)
        valid = self._map(depth_ok.astype(np.float32))[0] > 0.5

        sn = read_color_image(sn_p, three_channel=True).astype(np.float32) / 255.0 * 2.0 - 1.0
        sn_t = self._map(sn) * valid

        kp_t = self._map(_rescale_unit(read_label_image(kp_p).astype(np.float64) / 2.0**16, _KEYPOINT_MAX))
        edge_t = self._map(_rescale_unit(read_label_image(edge_p).astype(np.float64) / 2.0**16, _EDGE_MAX))

        maps = {"img": img, "seg": seg_t, "normal": sn_t, "depth": depth_t, "keypoint": kp_t, "edge": edge_t}
        if self.augment:
            maps = random_scale_flip_crop(
                maps,
                *self.crop,
                interpolation={k: ("bilinear" if k == "img" else "nearest") for k in maps},
                pad_value={
                    "img": 0.0,
                    "seg": IGNORE_INDEX,
                    "normal": 0.0,
                    "depth": 0.0,
                    "keypoint": 255.0,
                    "edge": 255.0,
                },
                flip_negate_channel={"normal": 0},
                generator=self.generator,
            )
        normal = maps["normal"]
        return {
            "img": subtract_mean(maps["img"]),
            "seg": maps["seg"].squeeze(0).round().to(torch.int64),
            "normal": unit_normals(normal, normal.abs().sum(dim=0) > 0),
            "depth": maps["depth"],
            "keypoint": maps["keypoint"],
            "edge": maps["edge"],
        }
