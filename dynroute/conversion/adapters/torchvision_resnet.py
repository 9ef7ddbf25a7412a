"""torchvision's ResNets: ``BasicBlock`` and ``Bottleneck`` (one ``relu`` in the branch and after the add), and
the quantizable ResNets' ``QuantizableBasicBlock`` and ``QuantizableBottleneck`` in float mode.

A quantizable block ends with ``FloatFunctional.add_relu``: the sum, a ReLU and the functional's
``activation_post_process`` (an ``nn.Identity`` in float mode, an observer once prepared for
quantization-aware training). The adapter applies the last two after the gated sum.
"""

import torch
import torchvision.models.quantization.resnet as tv_quantizable_resnet
import torchvision.models.resnet as tv_resnet
from torch import Tensor
from torch.ao.nn.quantized import FloatFunctional

from dynroute.conversion.adapters._common import conv1_in_channels, downsample_shortcut, named_activation_adapter
from dynroute.conversion.registry import BlockAdapter, register_block


def _basic_residual(block: tv_resnet.BasicBlock, x: Tensor) -> Tensor:
    return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))


def _bottleneck_residual(block: tv_resnet.Bottleneck, x: Tensor) -> Tensor:
    x = block.relu(block.bn1(block.conv1(x)))
    x = block.relu(block.bn2(block.conv2(x)))
    return block.bn3(block.conv3(x))


def _quantizable_bottleneck_residual(block: tv_quantizable_resnet.QuantizableBottleneck, x: Tensor) -> Tensor:
    x = block.relu1(block.bn1(block.conv1(x)))
    x = block.relu2(block.bn2(block.conv2(x)))
    return block.bn3(block.conv3(x))


def _after_add_relu(functional: FloatFunctional, y: Tensor) -> Tensor:
    """What ``functional.add_relu`` does after its sum."""
    return functional.activation_post_process(torch.relu(y))


def _quantizable_basic_activation(block: tv_quantizable_resnet.QuantizableBasicBlock, y: Tensor) -> Tensor:
    return _after_add_relu(block.add_relu, y)


def _quantizable_bottleneck_activation(block: tv_quantizable_resnet.QuantizableBottleneck, y: Tensor) -> Tensor:
    return _after_add_relu(block.skip_add_relu, y)


register_block(tv_resnet.BasicBlock, named_activation_adapter(_basic_residual, downsample_shortcut, "relu"))
register_block(tv_resnet.Bottleneck, named_activation_adapter(_bottleneck_residual, downsample_shortcut, "relu"))
register_block(
    tv_quantizable_resnet.QuantizableBasicBlock,
    BlockAdapter(_basic_residual, downsample_shortcut, _quantizable_basic_activation, conv1_in_channels),
)
register_block(
    tv_quantizable_resnet.QuantizableBottleneck,
    BlockAdapter(
        _quantizable_bottleneck_residual, downsample_shortcut, _quantizable_bottleneck_activation, conv1_in_channels
    ),
)
