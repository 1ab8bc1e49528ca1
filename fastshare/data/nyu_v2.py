"""NYU v2 in AdaShare's "formatted" on-disk layout (tasks ``seg``, ``sn``, ``depth``).

Layout: ``root/nyu_v2_3task.json`` maps each split (``train``, ``train1``, ``train2``, ``test``) to a list of
``[img, seg, normal, depth]`` paths relative to ``root``:

- ``img``: 8-bit RGB PNG (AdaShare reads it with OpenCV, i.e. BGR in memory; reproduced here);
- ``seg``: 8-bit grey PNG, 40 classes, 255 = ignore;
- ``normal``: 8-bit RGB PNG; a pixel with any channel at 255 is invalid;
- ``depth``: ``(H, W)`` float32 ``.npy`` in metres.

A file that breaks this (a label outside 0..39 and not 255, a grey normal map, depth that is not
floating point, not finite or negative, ...) is a :class:`~fastshare.data.io.DataFileError` naming it.

A sample is a dict of tensors:

- ``img``: float32 ``(3, H, W)``, BGR, 0..255 scale minus :data:`~fastshare.data.transforms.IMG_MEAN_BGR`;
- ``seg``: int64 ``(H, W)``, 0..39, 255 = ignore (also where padding was added);
- ``normal``: float32 ``(3, H, W)``, unit vectors on valid pixels, exactly 0 on invalid ones;
- ``depth``: float32 ``(1, H, W)`` in metres, 0 = invalid (also where padding was added).

Normal encoding (a choice, documented): AdaShare's loss and metric take the stored 8-bit vector ``v`` in
BGR order, drop pixels with any channel at 255, and compare ``v / |v|`` with the normalised prediction.
This loader returns exactly that target, ``v / |v|`` (BGR channel order), so a prediction scored with
:class:`fastshare.metrics.NormalMetric` reproduces AdaShare's angles. It is *not* the decoded geometric
normal ``2 v / 255 - 1`` (all components are >= 0), and, as in AdaShare, a flip does not negate a
component. A stored ``(0, 0, 0)`` has no direction and is treated as invalid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from fastshare.data.base import SplitFileDataset
from fastshare.data.io import (
    DataFileError,
    PathLike,
    read_color_image,
    read_depth_npy,
    read_label_image,
    read_split_file,
)
from fastshare.data.transforms import (
    IGNORE_INDEX,
    random_scale_flip_crop,
    rgb_to_bgr_tensor,
    subtract_mean,
    unit_normals,
)

SPLIT_FILE = "nyu_v2_3task.json"
FOLDERS = ("img", "seg", "normal_mask", "depth")


def nyu_split_from_folders(root: PathLike) -> dict[str, list[tuple[str, str, str, str]]]:
    """Build a ``{'test': [...]}`` split from the folders ``img/``, ``seg/``, ``normal_mask/``, ``depth/``.

    Each entry is ``(img/ID.png, seg/ID.png, normal_mask/ID.png, depth/ID.npy)`` for every ``ID`` whose four
    files all exist, sorted by ``ID``. Nothing is written to ``root``. Raises ``FileNotFoundError`` if
    ``root/img`` is missing and ``ValueError`` if no complete sample is found.
    """
    root = Path(root)
    img_dir = root / "img"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: no such folder (expected folders {', '.join(FOLDERS)} under {root})")
    entries = []
    for img in sorted(img_dir.glob("*.png")):
        sid = img.stem
        group = (f"img/{sid}.png", f"seg/{sid}.png", f"normal_mask/{sid}.png", f"depth/{sid}.npy")
        if all((root / p).is_file() for p in group):
            entries.append(group)
    if not entries:
        raise ValueError(f"no complete NYU v2 sample (img, seg, normal_mask, depth) under {root}")
    return {"test": entries}


class NYUv2(SplitFileDataset):
    """NYU v2 (40-class segmentation, surface normals, depth) as AdaShare loads it.

    Args:
        root: data root holding ``nyu_v2_3task.json`` (unless ``splits`` is given).
        split: ``'train'``, ``'train1'``, ``'train2'`` or ``'test'``.
        crop_h, crop_w: training crop (AdaShare's YAMLs use 321x321); ``None``: the image size.
        augment: random scale/flip/pad/crop; default ``True`` for the train splits, ``False`` for test.
        splits: split name -> list of ``(img, seg, normal, depth)`` relative paths, instead of the JSON
            (e.g. from :func:`nyu_split_from_folders`).
        generator: randomness for augmentation (default: torch's global generator).

    Example::

        ds = NYUv2(root, "test", splits=nyu_split_from_folders(root))
        sample = ds[0]   # {'img': (3,480,640), 'seg': (480,640), 'normal': (3,480,640), 'depth': (1,480,640)}
    """

    TASKS: tuple[str, ...] = ("seg", "sn", "depth")
    NUM_SEG_CLASSES = 40

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        crop_h: int | None = None,
        crop_w: int | None = None,
        *,
        augment: bool | None = None,
        splits: Mapping[str, Sequence[Sequence[str]]] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if splits is None:
            groups = read_split_file(Path(root), SPLIT_FILE, split)
        elif split in splits:
            groups = splits[split]
        else:
            raise KeyError(f"split {split!r} not in the given splits; available: {sorted(splits)}")
        super().__init__(root, split, groups, ("img", "seg", "normal", "depth"), crop_h, crop_w, None, augment,
                         generator)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        img_p, seg_p, normal_p, depth_p = (self.root / p for p in self.groups[index])
        img = rgb_to_bgr_tensor(read_color_image(img_p))
        seg_arr = read_label_image(seg_p).astype(np.int64)
        bad = (seg_arr != IGNORE_INDEX) & ((seg_arr < 0) | (seg_arr >= self.NUM_SEG_CLASSES))
        if bad.any():
            raise DataFileError(seg_p, f"labels must be 0..{self.NUM_SEG_CLASSES - 1} or {IGNORE_INDEX} (ignore); "
                                       f"found {int(seg_arr[bad][0])}")
        seg = torch.from_numpy(seg_arr).unsqueeze(0)
        normal = rgb_to_bgr_tensor(read_color_image(normal_p, three_channel=True))
        depth = torch.from_numpy(read_depth_npy(depth_p)).unsqueeze(0)
        h, w = img.shape[-2:]
        for path, t in ((seg_p, seg), (normal_p, normal), (depth_p, depth)):
            if tuple(t.shape[-2:]) != (h, w):
                raise DataFileError(path, f"size {tuple(t.shape[-2:])} differs from the image's {(h, w)} ({img_p})")

        if self.augment:
            crop_h, crop_w = self.crop or (h, w)
            out = random_scale_flip_crop(
                {"img": img, "seg": seg, "normal": normal, "depth": depth},
                crop_h,
                crop_w,
                interpolation={"img": "bilinear", "seg": "nearest", "normal": "nearest", "depth": "nearest"},
                pad_value={"img": 0.0, "seg": IGNORE_INDEX, "normal": 255.0, "depth": 0.0},
                generator=self.generator,
            )
            img, seg, normal, depth = out["img"], out["seg"], out["normal"], out["depth"]

        valid_normal = (normal < 255).all(dim=0)
        return {
            "img": subtract_mean(img),
            "seg": seg.squeeze(0).to(torch.int64),
            "normal": unit_normals(normal, valid_normal),
            "depth": depth.float(),
        }
