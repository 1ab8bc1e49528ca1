"""Backbones, heads and the multi-task network."""

from fastshare.model.backbone import BasicBlock, Bottleneck, DeeplabResNet, deeplab_resnet, LAYERS
from fastshare.model.heads import ASPPHead, ClassificationModule
from fastshare.model.net import AdaShareNet

__all__ = ["AdaShareNet", "ASPPHead", "BasicBlock", "Bottleneck", "ClassificationModule", "DeeplabResNet",
           "LAYERS", "deeplab_resnet"]
