"""dynroute's CIFAR ResNets (He et al.): ``CifarBasicBlock`` with an identity or padding shortcut."""

from torch import Tensor

from dynroute.conversion.adapters._common import ChildModule, named_activation_adapter
from dynroute.conversion.registry import register_block
from dynroute.models.cifar_resnet import CifarBasicBlock


def _residual(block: CifarBasicBlock, x: Tensor) -> Tensor:
    return block.bn2(block.conv2(block.act(block.bn1(block.conv1(x)))))


register_block(CifarBasicBlock, named_activation_adapter(_residual, ChildModule("shortcut"), "act"))
