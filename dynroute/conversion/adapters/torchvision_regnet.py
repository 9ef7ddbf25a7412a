"""torchvision's RegNets (``regnet_x_*``, ``regnet_y_*``): ``ResBottleneckBlock``, branch ``f``, projection
``proj`` where the shape changes, ``activation`` after the add."""

import torchvision.models.regnet as tv_regnet
from torch import Tensor

from dynroute.conversion.adapters._common import named_activation_adapter, optional
from dynroute.conversion.registry import register_block


def _residual(block: tv_regnet.ResBottleneckBlock, x: Tensor) -> Tensor:
    return block.f(x)


def _shortcut(block: tv_regnet.ResBottleneckBlock, x: Tensor) -> Tensor:
    return optional(block.proj, x)


def _in_channels(block: tv_regnet.ResBottleneckBlock) -> int:
    return block.f.a[0].in_channels  # the first 1x1 convolution of the branch


register_block(tv_regnet.ResBottleneckBlock, named_activation_adapter(_residual, _shortcut, "activation", _in_channels))
