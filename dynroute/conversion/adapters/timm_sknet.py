"""timm's ``sknet`` module: ``SelectiveKernelBasic`` and ``SelectiveKernelBottleneck`` (selective-kernel
convolution, ``SelectiveKernel``, in place of the 3x3)."""

import timm.models.sknet as timm_sknet
from torch import Tensor

from dynroute.conversion.adapters._common import downsample_shortcut, named_activation_adapter, optional
from dynroute.conversion.registry import register_block


def _basic_residual(block: timm_sknet.SelectiveKernelBasic, x: Tensor) -> Tensor:
    x = block.conv2(block.conv1(x))
    return optional(block.drop_path, optional(block.se, x))


def _bottleneck_residual(block: timm_sknet.SelectiveKernelBottleneck, x: Tensor) -> Tensor:
    x = block.conv3(block.conv2(block.conv1(x)))
    return optional(block.drop_path, optional(block.se, x))


register_block(
    timm_sknet.SelectiveKernelBasic,
    named_activation_adapter(_basic_residual, downsample_shortcut, "act"),
)
register_block(
    timm_sknet.SelectiveKernelBottleneck,
    named_activation_adapter(_bottleneck_residual, downsample_shortcut, "act"),
)
