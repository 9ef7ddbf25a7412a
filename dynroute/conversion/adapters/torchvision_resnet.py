"""torchvision's ResNets: ``BasicBlock`` and ``Bottleneck`` (one ``relu`` in the branch and after the add)."""

import torchvision.models.resnet as tv_resnet
from torch import Tensor

from dynroute.conversion.adapters._common import downsample_shortcut, named_activation_adapter
from dynroute.conversion.registry import register_block


def _basic_residual(block: tv_resnet.BasicBlock, x: Tensor) -> Tensor:
    return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))


def _bottleneck_residual(block: tv_resnet.Bottleneck, x: Tensor) -> Tensor:
    x = block.relu(block.bn1(block.conv1(x)))
    x = block.relu(block.bn2(block.conv2(x)))
    return block.bn3(block.conv3(x))


register_block(tv_resnet.BasicBlock, named_activation_adapter(_basic_residual, downsample_shortcut, "relu"))
register_block(tv_resnet.Bottleneck, named_activation_adapter(_bottleneck_residual, downsample_shortcut, "relu"))
