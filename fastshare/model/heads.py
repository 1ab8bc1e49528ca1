"""DeepLab ASPP heads as AdaShare builds them (DESIGN.md §1).

Each task's head sums four branches ``c0..c3`` with dilation 6, 12, 18, 24; a branch is
``conv3x3(C_in -> W, dilation d, bias) -> ReLU -> Dropout -> conv1x1(W -> W) -> ReLU -> Dropout ->
conv1x1(W -> classes)`` with ``W = 1024`` in the paper (``width`` here, smaller for demos).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

ASPP_RATES = (6, 12, 18, 24)


class ClassificationModule(nn.Module):
    """One ASPP branch: ``(B, C_in, h, w) -> (B, classes, h, w)``."""

    def __init__(self, inplanes: int, num_classes: int, rate: int, width: int = 1024,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=3, padding=rate, dilation=rate, bias=True)
        self.conv2 = nn.Conv2d(width, width, kernel_size=1)
        self.conv3 = nn.Conv2d(width, num_classes, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.relu(self.conv1(x)))
        x = self.dropout(self.relu(self.conv2(x)))
        return self.conv3(x)


class ASPPHead(nn.Module):
    """Sum of the four branches ``fc1_c0..fc1_c3`` (AdaShare's ``task<i>_fc1_c<j>``)."""

    def __init__(self, inplanes: int, num_classes: int, width: int = 1024, dropout: float = 0.5,
                 rates: Sequence[int] = ASPP_RATES) -> None:
        super().__init__()
        self.rates = tuple(rates)
        for j, rate in enumerate(self.rates):
            self.add_module(f"fc1_c{j}", ClassificationModule(inplanes, num_classes, rate, width, dropout))

    def branches(self) -> list[ClassificationModule]:
        return [getattr(self, f"fc1_c{j}") for j in range(len(self.rates))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for branch in self.branches():
            y = branch(x)
            out = y if out is None else out + y
        return out
