"""Deeplab-ResNet backbones of AdaShare (DESIGN.md §1), with AdaShare's module and state-dict names.

Stem: 7x7/2 conv (64), BN, ReLU, 3x3/2 max-pool (ceil mode). Four stages of widths 64/128/256/512
(x4 for Bottleneck), strides [1, 2, 1, 1], dilations [1, 1, 2, 4]; the first block of a stage has a
1x1 conv + BN shortcut (``ds[stage]``) when stride, width or dilation changes (dilation 2 or 4 always).
Blocks are numbered 0..L-1 in execution order; ``residual_branch(l, x)`` is ``F(x)`` (ending in BN, no
final ReLU) and ``shortcut(l, x)`` is ``ds(x)`` or ``x``. Output stride 8: an input of ``H x W`` gives
features of ``ceil(ceil(H/2)/2)/2`` per side (stem /4, stage 2 /2).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastshare.model.norm import SegmentedBatchNorm2d

LAYERS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

_STRIDES = (1, 2, 1, 1)
_DILATIONS = (1, 1, 2, 4)
_WIDTHS = (64, 128, 256, 512)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution, no bias, padding = dilation (spatial size kept at stride 1)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Residual branch ``F(x) = BN(conv3x3(ReLU(BN(conv3x3(x)))))``; the residual add lives outside."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = SegmentedBatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, dilation)
        self.bn2 = SegmentedBatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(nn.Module):
    """Residual branch 1x1 (stride) -> 3x3 (dilated) -> 1x1 (x4), BN after each; BN affine frozen as in
    AdaShare's Deeplab-ResNet-101."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = SegmentedBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = SegmentedBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = SegmentedBatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        for bn in (self.bn1, self.bn2, self.bn3):
            for p in bn.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class DeeplabResNet(nn.Module):
    """Deeplab-ResNet backbone: stem, ``blocks[stage][i]`` residual branches, ``ds[stage]`` shortcuts.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    """

    def __init__(self, block: type[nn.Module], layers: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = SegmentedBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer_config = tuple(int(n) for n in layers)
        self.expansion = block.expansion
        inplanes = 64
        blocks, ds = [], []
        for width, n_blocks, stride, dilation in zip(_WIDTHS, self.layer_config, _STRIDES, _DILATIONS):
            out = width * block.expansion
            needs_ds = stride != 1 or inplanes != out or dilation in (2, 4)
            ds.append(nn.Sequential(nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False),
                                    SegmentedBatchNorm2d(out)) if needs_ds else None)
            stage = [block(inplanes, width, stride, dilation)]
            stage += [block(out, width, 1, dilation) for _ in range(1, n_blocks)]
            blocks.append(nn.ModuleList(stage))
            inplanes = out
        self.blocks = nn.ModuleList(blocks)
        self.ds = nn.ModuleList(ds)
        self.out_channels = inplanes
        # (stage, index in stage) of each gated block, in execution order.
        self.block_index = tuple((s, b) for s, n in enumerate(self.layer_config) for b in range(n))
        self.reset_parameters()

    @property
    def num_blocks(self) -> int:
        """L, the number of gated residual blocks."""
        return len(self.block_index)

    def reset_parameters(self) -> None:
        """AdaShare's initialisation: conv weights N(0, 0.01), BN weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 64, ceil(ceil(H/2)/2), ...)``: conv1, BN, ReLU, max-pool."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def residual_branch(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """``F_l(x)`` of block ``l``."""
        stage, b = self.block_index[l]
        return self.blocks[stage][b](x)

    def has_projection(self, l: int) -> bool:
        """Whether block ``l``'s shortcut is a 1x1 conv + BN (else the identity)."""
        stage, b = self.block_index[l]
        return b == 0 and self.ds[stage] is not None

    def shortcut(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """``r = ds(x)`` for a stage's first block with a projection, else ``x``."""
        stage, _ = self.block_index[l]
        return self.ds[stage](x) if self.has_projection(l) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Ungated pass (every block executed): ``x <- relu(shortcut(x) + F(x))``."""
        x = self.stem(x)
        for l in range(self.num_blocks):
            x = F.relu(self.shortcut(l, x) + self.residual_branch(l, x))
        return x


def deeplab_resnet(name: str) -> DeeplabResNet:
    """Build ``resnet18``, ``resnet34`` or ``resnet101`` (Deeplab variant, output stride 8)."""
    if name not in LAYERS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(LAYERS)}")
    kind, layers = LAYERS[name]
    return DeeplabResNet(BasicBlock if kind == "basic" else Bottleneck, layers)
