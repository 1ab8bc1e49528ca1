"""Data sets: the built-in synthetic scenes and AdaShare's on-disk formats.

Every data set returns a dict of tensors per sample (shapes for one sample; a DataLoader adds the batch
axis in front):

- ``img``: float32 ``(3, H, W)``, BGR order, 0..255 scale minus
  :data:`~fastshare.data.transforms.IMG_MEAN_BGR` (AdaShare's input convention);
- ``seg``: int64 ``(H, W)``, class indices, 255 = ignore (CityScapes' -1 is mapped to 255);
- ``normal``: float32 ``(3, H, W)``, unit vectors on valid pixels, exactly 0 on invalid ones;
- ``depth``: float32 ``(1, H, W)``, 0 = invalid;
- ``keypoint``, ``edge`` (Taskonomy): float32 ``(1, H, W)`` in [-1, 1], 255 = ignore.

Tasks are named as in AdaShare; :data:`TASK_TARGET_KEY` maps each task to its sample key (``'sn'`` reads
``'normal'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastshare.data.cityscapes import CityScapes
from fastshare.data.io import DataFileError
from fastshare.data.nyu_v2 import NYUv2, nyu_split_from_folders
from fastshare.data.synthetic import SyntheticScenes
from fastshare.data.taskonomy import Taskonomy
from fastshare.data.transforms import IGNORE_INDEX, IMG_MEAN_BGR

if TYPE_CHECKING:
    from fastshare.config import Config

#: AdaShare task name -> key of its target in a sample.
TASK_TARGET_KEY: dict[str, str] = {
    "seg": "seg",
    "sn": "normal",
    "depth": "depth",
    "keypoint": "keypoint",
    "edge": "edge",
}


def check_tasks_provided(cfg: Config) -> None:
    """Raise :class:`~fastshare.config.ConfigError` (a ``ValueError``) if ``cfg.dataload.dataset`` is
    unknown, lacks a task of ``cfg.tasks``, or stores another number of segmentation classes than
    ``cfg.tasks_num_class`` gives ``seg`` (NYU v2: 40, Taskonomy: 17, CityScapes: 2, 7 or 19,
    the synthetic scenes: at least their 4)."""
    from fastshare.config import ConfigError

    dl = cfg.dataload
    classes = {"Synthetic": SyntheticScenes, "NYU_v2": NYUv2, "CityScapes": CityScapes, "Taskonomy": Taskonomy}
    if dl.dataset not in classes:
        raise ConfigError(f"dataload.dataset: unknown dataset {dl.dataset!r}; known: {sorted(classes)}")
    provided = classes[dl.dataset].TASKS
    missing = [t for t in cfg.tasks if t not in provided]
    if missing:
        raise ConfigError(f"tasks: dataset {dl.dataset!r} has no task(s) {missing}; it provides {list(provided)}")
    if "seg" in cfg.tasks:
        n = cfg.tasks_num_class[cfg.tasks.index("seg")]
        if dl.dataset == "Synthetic":
            ok, want = n >= SyntheticScenes.NUM_SEG_CLASSES, f"at least {SyntheticScenes.NUM_SEG_CLASSES}"
        elif dl.dataset == "CityScapes":
            ok, want = n in CityScapes.SEG_CLASS_CHOICES, "2, 7 or 19"
        else:
            ok, want = n == classes[dl.dataset].NUM_SEG_CLASSES, str(classes[dl.dataset].NUM_SEG_CLASSES)
        if not ok:
            raise ConfigError(f"tasks_num_class: {dl.dataset} stores {want} segmentation classes, the "
                              f"configuration gives seg {n}")


def build_dataset(cfg: Config, split: str, *, augment: bool | None = None) -> torch.utils.data.Dataset:
    """The data set named by ``cfg.dataload`` for ``split`` (``train``, ``train1``, ``train2``, ``test``).

    ``crop_h``/``crop_w`` apply to the train splits (the synthetic image size for every split); test
    splits keep the stored resolution, as in AdaShare. ``augment=None`` keeps each data set's default
    (on for train splits of the real data sets, off for the synthetic one). Raises
    :class:`~fastshare.config.ConfigError` as :func:`check_tasks_provided`.
    """
    dl = cfg.dataload
    check_tasks_provided(cfg)
    train = split not in ("test", "test_small")
    crop = (dl.crop_h, dl.crop_w) if train else (None, None)
    if dl.dataset == "Synthetic":
        size = (dl.crop_h or 64, dl.crop_w or 64)
        return SyntheticScenes(split, size=size, seed=cfg.seed[0], augment=bool(augment) and train)
    if dl.dataset == "NYU_v2":
        return NYUv2(dl.dataroot, split, *crop, augment=augment)
    if dl.dataset == "CityScapes":
        n = cfg.tasks_num_class[cfg.tasks.index("seg")] if "seg" in cfg.tasks else 19
        return CityScapes(dl.dataroot, split, *crop, num_class=n, small_res=dl.small_res, augment=augment)
    return Taskonomy(dl.dataroot, split, *crop, augment=augment)

__all__ = [
    "IGNORE_INDEX",
    "IMG_MEAN_BGR",
    "TASK_TARGET_KEY",
    "check_tasks_provided",
    "CityScapes",
    "DataFileError",
    "NYUv2",
    "SyntheticScenes",
    "Taskonomy",
    "build_dataset",
    "nyu_split_from_folders",
]
