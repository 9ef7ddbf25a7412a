"""timm's ``resnet`` module: ``BasicBlock`` and ``Bottleneck`` (ResNet, ResNeXt, wide, SE/ECA variants)."""

import timm.models.resnet as timm_resnet
from torch import Tensor

from dynroute.conversion.adapters._common import downsample_shortcut, named_activation_adapter, optional
from dynroute.conversion.registry import register_block


def _basic_residual(block: timm_resnet.BasicBlock, x: Tensor) -> Tensor:
    x = block.bn1(block.conv1(x))
    x = block.act1(optional(block.drop_block, x))
    x = block.bn2(block.conv2(optional(block.aa, x)))
    return optional(block.drop_path, optional(block.se, x))


def _bottleneck_residual(block: timm_resnet.Bottleneck, x: Tensor) -> Tensor:
    x = block.act1(block.bn1(block.conv1(x)))
    x = block.bn2(block.conv2(x))
    x = block.act2(optional(block.drop_block, x))
    x = block.bn3(block.conv3(optional(block.aa, x)))
    return optional(block.drop_path, optional(block.se, x))


register_block(timm_resnet.BasicBlock, named_activation_adapter(_basic_residual, downsample_shortcut, "act2"))
register_block(timm_resnet.Bottleneck, named_activation_adapter(_bottleneck_residual, downsample_shortcut, "act3"))
