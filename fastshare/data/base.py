"""What the on-disk data sets share: a split of file groups read from a JSON index, crop and augmentation
settings, and the sample names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from fastshare.data.io import PathLike
from fastshare.data.transforms import TRAIN_SPLITS


class SplitFileDataset(torch.utils.data.Dataset):
    """A data set whose split is a list of file groups (paths relative to ``root``).

    Args:
        root: data root.
        split: split name (``train``, ``train1``, ``train2``, ``test``, ...).
        groups: the split's file groups, each of ``len(fields)`` paths; none is a ``ValueError`` (groups
            read by :func:`~fastshare.data.io.read_split_file` are never empty: it raises first).
        fields: the name of each path in a group, for error messages.
        crop_h, crop_w: both or neither; None keeps ``default_crop``.
        default_crop: crop size when none is given (None: no crop).
        augment: random scale, flip and crop; None: on for the training splits.
        generator: torch generator of the augmentation (None: torch's global one).
    """

    def __init__(self, root: PathLike, split: str, groups: Sequence[Sequence[str]], fields: Sequence[str],
                 crop_h: int | None, crop_w: int | None,
                 default_crop: tuple[int, int] | None, augment: bool | None,
                 generator: torch.Generator | None) -> None:
        self.root = Path(root)
        self.split = split
        if not groups:  # a run would fail only at its end, when it first evaluates the split
            raise ValueError(f"{type(self).__name__}: split {split!r} of the given splits has no samples")
        for g in groups:
            if len(g) != len(fields):
                raise ValueError(f"{type(self).__name__} entries are [{', '.join(fields)}]; got {list(g)!r}")
        self.groups = [list(g) for g in groups]
        if (crop_h is None) != (crop_w is None):
            raise ValueError("give both crop_h and crop_w, or neither")
        self.crop = default_crop if crop_h is None else (int(crop_h), int(crop_w))
        self.augment = split in TRAIN_SPLITS if augment is None else augment
        self.generator = generator

    def __len__(self) -> int:
        return len(self.groups)

    def name(self, index: int) -> str:
        """The image file name of sample ``index`` (AdaShare's ``name``)."""
        return Path(self.groups[index][0]).name
