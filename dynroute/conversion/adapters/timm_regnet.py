"""timm's ``regnet`` module: ``Bottleneck`` (RegNetX/Y/Z) and the pre-activation ``PreBottleneck`` (RegNetV).

Both take their shortcut through the ``downsample`` child, an ``nn.Identity`` where the shape is
kept. RegNetZ builds the first block of each stage with no shortcut at all (``downsample`` is
None): a plain layer, which stays ungated. ``PreBottleneck`` normalises its input once and feeds
that to both paths, ``downsample(norm1(x)) + F(x)``, with no activation after the sum.
"""

import timm.models.regnet as timm_regnet
from torch import Tensor

from dynroute.conversion.adapters._common import (
    ShortcutChild,
    conv1_in_channels,
    named_activation_adapter,
    no_activation,
    shared_preactivation,
)
from dynroute.conversion.registry import BlockAdapter, register_block

_DOWNSAMPLE = ShortcutChild("downsample")


def _bottleneck_residual(block: timm_regnet.Bottleneck, x: Tensor) -> Tensor:
    return block.drop_path(block.conv3(block.se(block.conv2(block.conv1(x)))))


def _pre_bottleneck_residual(block: timm_regnet.PreBottleneck, x: Tensor) -> Tensor:
    x = block.conv1(shared_preactivation(block.norm1, x))
    x = block.se(block.conv2(block.norm2(x)))
    return block.drop_path(block.conv3(block.norm3(x)))


def _pre_bottleneck_shortcut(block: timm_regnet.PreBottleneck, x: Tensor) -> Tensor:
    return _DOWNSAMPLE(block, block.norm1(x))


register_block(
    timm_regnet.Bottleneck,
    named_activation_adapter(_bottleneck_residual, _DOWNSAMPLE, "act3", has_residual_add=_DOWNSAMPLE.present),
)
register_block(
    timm_regnet.PreBottleneck,
    BlockAdapter(
        _pre_bottleneck_residual,
        _pre_bottleneck_shortcut,
        no_activation,
        conv1_in_channels,
        has_residual_add=_DOWNSAMPLE.present,
    ),
)
