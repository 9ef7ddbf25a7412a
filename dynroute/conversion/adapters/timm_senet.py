"""timm's ``senet`` module (the ``legacy_se*`` models): ``SEResNetBlock`` and the bottlenecks ``SEBottleneck``,
``SEResNetBottleneck`` and ``SEResNeXtBottleneck``, which share one forward.

Like torchvision's blocks, each uses one ``relu`` inside the branch and after the add; the
squeeze-and-excitation module ends the branch.
"""

import timm.models.senet as timm_senet
from torch import Tensor

from dynroute.conversion.adapters._common import downsample_shortcut, named_activation_adapter
from dynroute.conversion.registry import register_block


def _basic_residual(block: timm_senet.SEResNetBlock, x: Tensor) -> Tensor:
    x = block.relu(block.bn1(block.conv1(x)))
    x = block.relu(block.bn2(block.conv2(x)))
    return block.se_module(x)


def _bottleneck_residual(block: timm_senet.Bottleneck, x: Tensor) -> Tensor:
    x = block.relu(block.bn1(block.conv1(x)))
    x = block.relu(block.bn2(block.conv2(x)))
    return block.se_module(block.bn3(block.conv3(x)))


register_block(timm_senet.SEResNetBlock, named_activation_adapter(_basic_residual, downsample_shortcut, "relu"))
for _bottleneck in (timm_senet.SEBottleneck, timm_senet.SEResNetBottleneck, timm_senet.SEResNeXtBottleneck):
    register_block(_bottleneck, named_activation_adapter(_bottleneck_residual, downsample_shortcut, "relu"))
