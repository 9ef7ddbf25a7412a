"""One module per block family, each registering its blocks with :func:`dynroute.register_block` on import."""

from dynroute.conversion.adapters import (
    cifar_resnet,
    timm_byobnet,
    timm_regnet,
    timm_res2net,
    timm_resnest,
    timm_resnet,
    timm_resnetv2,
    timm_senet,
    timm_sknet,
    torchvision_regnet,
    torchvision_resnet,
)

__all__ = [
    "cifar_resnet",
    "timm_byobnet",
    "timm_regnet",
    "timm_res2net",
    "timm_resnest",
    "timm_resnet",
    "timm_resnetv2",
    "timm_senet",
    "timm_sknet",
    "torchvision_regnet",
    "torchvision_resnet",
]
