"""timm's ``resnest`` module: ``ResNestBottleneck``, with split attention (``SplitAttn``) as its 3x3 stage.

Its forward applies ``drop_path`` to the block input on its way to the downsampling shortcut, not
to the branch; the adapter keeps that order.
"""

import timm.models.resnest as timm_resnest
from torch import Tensor

from dynroute.conversion.adapters._common import named_activation_adapter, optional
from dynroute.conversion.registry import register_block


def _residual(block: timm_resnest.ResNestBottleneck, x: Tensor) -> Tensor:
    x = optional(block.avd_first, block.act1(block.bn1(block.conv1(x))))
    x = block.act2(block.drop_block(block.bn2(block.conv2(x))))
    return block.bn3(block.conv3(optional(block.avd_last, x)))


def _shortcut(block: timm_resnest.ResNestBottleneck, x: Tensor) -> Tensor:
    if block.downsample is None:
        return x
    return block.downsample(optional(block.drop_path, x))


register_block(timm_resnest.ResNestBottleneck, named_activation_adapter(_residual, _shortcut, "act3"))
