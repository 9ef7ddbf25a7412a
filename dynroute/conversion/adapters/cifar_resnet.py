"""dynroute's CIFAR ResNets (He et al.): ``CifarBasicBlock`` with an identity or padding shortcut."""

import torch
from torch import Tensor, nn

from dynroute.conversion.adapters._common import named_activation_adapter
from dynroute.conversion.registry import register_block
from dynroute.layers.hooks import has_global_forward_hooks, runs_as_stock, torch_forward
from dynroute.models.cifar_resnet import CifarBasicBlock


def _residual(block: CifarBasicBlock, x: Tensor) -> Tensor:
    return block.bn2(block.conv2(block.act(block.bn1(block.conv1(x)))))


_IDENTITY_FORWARD = torch_forward(nn.Identity)


def _shortcut(block: CifarBasicBlock, x: Tensor) -> Tensor:
    shortcut = block.shortcut
    # Without autograd, x itself, without the module call of an nn.Identity no forward hook sees: at batch 1
    # that call costs more than the rest of a skipped block's shortcut and activation. (With autograd, a
    # backward hook could be waiting for the call.)
    unseen = not (torch.is_grad_enabled() or has_global_forward_hooks())
    if unseen and runs_as_stock(shortcut, nn.Identity, _IDENTITY_FORWARD):
        return x
    return shortcut(x)


register_block(CifarBasicBlock, named_activation_adapter(_residual, _shortcut, "act"))
