"""CityScapes in AdaShare's preprocessed ``.npy`` layout (tasks ``seg``, ``depth``).

Layout: ``root/cityscape.json`` maps each split (``train``, ``train1``, ``train2``, ``test``) to a list of
``[img, depth, label2, label7, label19]`` ``.npy`` paths relative to ``root``:

- ``img``: ``(H, W, 3)`` float RGB in [0, 1] (AdaShare: reversed to BGR and multiplied by 255);
- ``depth``: ``(H, W, 1)`` or ``(H, W)`` float, 0 = invalid;
- ``labelN``: ``(H, W)`` integer labels of the N-class (2, 7 or 19) segmentation, -1 = ignore.

A file that breaks this (values that are not finite real numbers, negative depth, a label out of range,
...) is a :class:`~fastshare.data.io.DataFileError` naming it.

A sample is a dict of tensors: ``img`` float32 ``(3, H, W)`` (BGR, 0..255 scale minus the mean),
``seg`` int64 ``(H, W)``, ``depth`` float32 ``(1, H, W)``.

Ignore label: AdaShare keeps -1 for CityScapes (and builds its loss with ``ignore_index=-1``). Here -1 is
mapped to **255**, the ignore value of every other data set, so one loss and one metric serve all data
sets; padding added by augmentation is 255 too. Only the segmentation chosen by ``num_class`` is returned
(AdaShare also returns all three label maps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastshare.data.base import SplitFileDataset
from fastshare.data.io import DataFileError, PathLike, check_numeric, read_depth_npy, read_npy, read_split_file
from fastshare.data.transforms import IGNORE_INDEX, random_scale_flip_crop, subtract_mean

SPLIT_FILE = "cityscape.json"
_LABEL_COLUMN = {2: 2, 7: 3, 19: 4}


class CityScapes(SplitFileDataset):
    """CityScapes (2/7/19-class segmentation and depth) as AdaShare loads it.

    Args:
        root: data root holding ``cityscape.json``.
        split: ``'train'``, ``'train1'``, ``'train2'`` or ``'test'``.
        crop_h, crop_w: training crop; ``None``: 128x256 if ``small_res`` else 256x512 (AdaShare's).
        num_class: 2, 7 or 19 (-1 means 19, as in AdaShare).
        small_res: selects the default crop, as in AdaShare.
        augment: random scale/flip/pad/crop; default ``True`` for the train splits.
        generator: randomness for augmentation (default: torch's global generator).
    """

    TASKS: tuple[str, ...] = ("seg", "depth")
    #: The numbers of segmentation classes stored (one label file each): ``num_class`` must be one of them.
    SEG_CLASS_CHOICES: tuple[int, ...] = tuple(_LABEL_COLUMN)

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        crop_h: int | None = None,
        crop_w: int | None = None,
        num_class: int = 19,
        small_res: bool = False,
        *,
        augment: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if num_class == -1:
            num_class = 19
        if num_class not in _LABEL_COLUMN:
            raise ValueError(f"CityScapes supports 2, 7 or 19 classes, got {num_class}")
        self.num_class = num_class
        super().__init__(root, split, read_split_file(Path(root), SPLIT_FILE, split),
                         ("img", "depth", "label2", "label7", "label19"), crop_h, crop_w,
                         (128, 256) if small_res else (256, 512), augment, generator)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        group = self.groups[index]
        img_p, depth_p = self.root / group[0], self.root / group[1]
        label_p = self.root / group[_LABEL_COLUMN[self.num_class]]
        img_arr = read_npy(img_p, ndim=(3,))
        if img_arr.shape[2] != 3:
            raise DataFileError(img_p, f"expected an (H, W, 3) image, got shape {img_arr.shape}")
        check_numeric(img_p, img_arr, floating=True)
        img = torch.from_numpy(np.ascontiguousarray(img_arr[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32) * 255.0)
        depth = torch.from_numpy(read_depth_npy(depth_p)).unsqueeze(0)
        label = read_npy(label_p, ndim=(2,))
        check_numeric(label_p, label)
        if not np.issubdtype(label.dtype, np.integer) and not np.all(np.mod(label, 1) == 0):
            raise DataFileError(label_p, f"labels must be whole numbers, got dtype {label.dtype} with fractions")
        label = label.astype(np.int64)
        bad = (label < -1) | (label >= self.num_class)
        if bad.any():
            raise DataFileError(
                label_p, f"labels must be -1 (ignore) or 0..{self.num_class - 1}; found {int(label[bad][0])}"
            )
        label[label == -1] = IGNORE_INDEX
        seg = torch.from_numpy(label).unsqueeze(0)
        h, w = img.shape[-2:]
        for path, t in ((depth_p, depth), (label_p, seg)):
            if tuple(t.shape[-2:]) != (h, w):
                raise DataFileError(path, f"size {tuple(t.shape[-2:])} differs from the image's {(h, w)} ({img_p})")

        if self.augment:
            out = random_scale_flip_crop(
                {"img": img, "seg": seg, "depth": depth},
                *self.crop,
                interpolation={"img": "bilinear", "seg": "nearest", "depth": "nearest"},
                pad_value={"img": 0.0, "seg": IGNORE_INDEX, "depth": 0.0},
                generator=self.generator,
            )
            img, seg, depth = out["img"], out["seg"], out["depth"]
        return {"img": subtract_mean(img), "seg": seg.squeeze(0), "depth": depth}
