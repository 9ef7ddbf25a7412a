"""One module per block family, each registering its blocks with :func:`dynroute.register_block` on import."""

from dynroute.conversion.adapters import cifar_resnet, timm_resnet, torchvision_resnet

__all__ = ["cifar_resnet", "timm_resnet", "torchvision_resnet"]
