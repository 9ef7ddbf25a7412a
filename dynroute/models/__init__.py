"""Backbones dynroute ships: the CIFAR ResNets of He et al. (2016)."""

from dynroute.models.cifar_resnet import (
    CifarBasicBlock,
    CifarResNet,
    PadShortcut,
    load_cifar_checkpoint,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet74,
    resnet110,
)

__all__ = [
    "CifarBasicBlock",
    "CifarResNet",
    "PadShortcut",
    "load_cifar_checkpoint",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet74",
    "resnet110",
]
