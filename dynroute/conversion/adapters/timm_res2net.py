"""timm's ``res2net`` module: ``Bottle2neck``, whose 3x3 stage works on channel groups, each group also
receiving the previous group's output (hierarchical residual-like connections inside the branch).
"""

import timm.models.res2net as timm_res2net
import torch
from torch import Tensor

from dynroute.conversion.adapters._common import downsample_shortcut, named_activation_adapter, optional
from dynroute.conversion.registry import register_block


def _multi_scale(block: timm_res2net.Bottle2neck, x: Tensor) -> Tensor:
    """The 3x3 stage: group i runs on split i plus, except in a block's first use of a scale, group i-1's output.

    The last split passes through (pooled where the block strides or downsamples).
    """
    splits = torch.split(x, block.width, 1)
    outputs = []
    group = splits[0]
    for index, (conv, bn) in enumerate(zip(block.convs, block.bns)):
        if index > 0:
            group = splits[index] if block.is_first else group + splits[index]
        group = block.relu(bn(conv(group)))
        outputs.append(group)
    if block.scale > 1:
        outputs.append(optional(block.pool, splits[-1]))
    return torch.cat(outputs, 1)


def _residual(block: timm_res2net.Bottle2neck, x: Tensor) -> Tensor:
    x = _multi_scale(block, block.relu(block.bn1(block.conv1(x))))
    x = block.bn3(block.conv3(block.drop_block(x)))
    return optional(block.drop_path, optional(block.se, x))


register_block(timm_res2net.Bottle2neck, named_activation_adapter(_residual, downsample_shortcut, "relu"))
