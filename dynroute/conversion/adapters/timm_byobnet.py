"""timm's ``byobnet`` module, the blocks of its ResNets (``resnet33ts``, ``resnet51q``, ``gcresnet50t``, the
CLIP ResNets ``resnet50_clip``...): ``BottleneckBlock`` and ``EdgeBlock``.

Each runs its layers in sequence, adds its ``shortcut`` child (``nn.Identity`` where the shape is
kept) and applies ``act``. A block built with no downsample type where the shape changes has no
shortcut (``shortcut`` is None): a plain layer, which stays ungated.
"""

import timm.models.byobnet as timm_byobnet
from torch import Tensor

from dynroute.conversion.adapters._common import ShortcutChild, named_activation_adapter
from dynroute.conversion.registry import register_block

_SHORTCUT = ShortcutChild("shortcut")


def _bottleneck_residual(block: timm_byobnet.BottleneckBlock, x: Tensor) -> Tensor:
    x = block.attn(block.conv2b_kxk(block.conv2_kxk(block.conv1_1x1(x))))
    return block.drop_path(block.attn_last(block.conv3_1x1(x)))


def _edge_residual(block: timm_byobnet.EdgeBlock, x: Tensor) -> Tensor:
    x = block.attn(block.conv1_kxk(x))
    return block.drop_path(block.attn_last(block.conv2_1x1(x)))


def _bottleneck_in_channels(block: timm_byobnet.BottleneckBlock) -> int:
    return block.conv1_1x1.in_channels


def _edge_in_channels(block: timm_byobnet.EdgeBlock) -> int:
    return block.conv1_kxk.in_channels


register_block(
    timm_byobnet.BottleneckBlock,
    named_activation_adapter(_bottleneck_residual, _SHORTCUT, "act", _bottleneck_in_channels, _SHORTCUT.present),
)
register_block(
    timm_byobnet.EdgeBlock,
    named_activation_adapter(_edge_residual, _SHORTCUT, "act", _edge_in_channels, _SHORTCUT.present),
)
