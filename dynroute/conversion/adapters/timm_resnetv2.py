"""timm's ``resnetv2`` module (BiT): pre-activation ``PreActBasic`` and ``PreActBottleneck``, and ``Bottleneck``.

A pre-activation block computes ``x + F(x)`` with no activation after the sum, so a skipped block
is an exact identity. A block that changes shape downsamples the pre-activated input,
``downsample(norm1(x)) + F(x)``: its shortcut keeps ``norm1`` and the projection running.
"""

import timm.models.resnetv2 as timm_resnetv2
from torch import Tensor

from dynroute.conversion.adapters._common import (
    conv1_in_channels,
    downsample_shortcut,
    named_activation_adapter,
    no_activation,
    shared_preactivation,
)
from dynroute.conversion.registry import BlockAdapter, register_block

PreActBlock = timm_resnetv2.PreActBasic | timm_resnetv2.PreActBottleneck


def _preactivated(block: PreActBlock, x: Tensor) -> Tensor:
    """``norm1(x)``, the input of the block's first convolution (and of its downsampling shortcut, if any)."""
    if block.downsample is None:
        return block.norm1(x)
    return shared_preactivation(block.norm1, x)


def _preact_basic_residual(block: timm_resnetv2.PreActBasic, x: Tensor) -> Tensor:
    x = block.conv1(_preactivated(block, x))
    return block.drop_path(block.conv2(block.norm2(x)))


def _preact_bottleneck_residual(block: timm_resnetv2.PreActBottleneck, x: Tensor) -> Tensor:
    x = block.conv1(_preactivated(block, x))
    x = block.conv2(block.norm2(x))
    return block.drop_path(block.conv3(block.norm3(x)))


def _preact_shortcut(block: PreActBlock, x: Tensor) -> Tensor:
    return x if block.downsample is None else block.downsample(block.norm1(x))


def _bottleneck_residual(block: timm_resnetv2.Bottleneck, x: Tensor) -> Tensor:
    x = block.norm2(block.conv2(block.norm1(block.conv1(x))))
    return block.drop_path(block.norm3(block.conv3(x)))


register_block(
    timm_resnetv2.PreActBasic,
    BlockAdapter(_preact_basic_residual, _preact_shortcut, no_activation, conv1_in_channels),
)
register_block(
    timm_resnetv2.PreActBottleneck,
    BlockAdapter(_preact_bottleneck_residual, _preact_shortcut, no_activation, conv1_in_channels),
)
register_block(timm_resnetv2.Bottleneck, named_activation_adapter(_bottleneck_residual, downsample_shortcut, "act3"))
