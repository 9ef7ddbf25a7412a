"""How each supported residual block splits into residual branch, shortcut and activation.

The converter gates only the residual branch (Eq. 7 and 13 of CoDiNet): the shortcut, with its
downsampling, always runs, and the block's final activation is applied after the sum. An adapter
says how to compute those three parts from an unmodified block, so the block keeps its own
modules, parameters and ``state_dict`` keys. The registry is keyed by exact type, because
subclasses (torchvision's quantizable blocks, say) may override ``forward``.

To teach the converter a new block::

    dynroute.register_block(MyBlock, dynroute.BlockAdapter(
        residual=lambda b, x: b.bn2(b.conv2(b.act(b.bn1(b.conv1(x))))),
        shortcut=lambda b, x: x if b.down is None else b.down(x),
        activation=lambda b, x: b.act(x),
        in_channels=lambda b: b.conv1.in_channels,
        final_activation=lambda b: b.act,  # optional: lets sparse execution recognise a ReLU
    ))
"""

from collections.abc import Callable
from dataclasses import dataclass

import timm.models.resnet as timm_resnet
import torch
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn

from dynroute.hooks import has_global_forward_hooks, runs_as_stock, torch_forward
from dynroute.models.cifar_resnet import CifarBasicBlock

__all__ = ["BlockAdapter", "register_block", "get_adapter", "registered_block_types"]


@dataclass(frozen=True)
class BlockAdapter:
    """The three parts of a residual block ``activation(residual(x) + shortcut(x))``.

    Attributes:
        residual: ``(block, x) -> F(x)``, the gated branch, shape (N, C_out, H', W').
        shortcut: ``(block, x) -> x`` or its downsampling, same shape as ``residual``.
        activation: ``(block, y) -> act(y)``, applied after the sum (identity if none).
        in_channels: ``block -> C_in``, the channels the router sees.
        final_activation: ``block -> module`` that ``activation`` applies, if it is one (optional).
            When it is an ``nn.ReLU`` in two consecutive gated blocks of a stage, sparse execution
            leaves the rows the second skips as they are instead of applying the ReLU to its
            input again (``relu(relu(y)) == relu(y)``).
    """

    residual: Callable[[nn.Module, Tensor], Tensor]
    shortcut: Callable[[nn.Module, Tensor], Tensor]
    activation: Callable[[nn.Module, Tensor], Tensor]
    in_channels: Callable[[nn.Module], int]
    final_activation: Callable[[nn.Module], nn.Module] | None = None


_REGISTRY: dict[type[nn.Module], BlockAdapter] = {}


def register_block(block_type: type[nn.Module], adapter: BlockAdapter) -> None:
    """Teach the converter a residual block type (matched exactly, not by subclass)."""
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise TypeError(f"block_type must be an nn.Module subclass, but got {block_type!r}")
    if not isinstance(adapter, BlockAdapter):
        raise TypeError(f"adapter must be a dynroute.BlockAdapter, but got {type(adapter).__name__}")
    _REGISTRY[block_type] = adapter


def get_adapter(block: nn.Module) -> BlockAdapter | None:
    """The adapter registered for exactly ``type(block)``, or None."""
    return _REGISTRY.get(type(block))


def registered_block_types() -> tuple[type[nn.Module], ...]:
    """Every block type the converter knows, in registration order."""
    return tuple(_REGISTRY)


def _optional(module: nn.Module | None, x: Tensor) -> Tensor:
    # Older timm releases keep switched-off layers (aa, drop_block, se, drop_path) as None.
    return x if module is None else module(x)


def _downsample_shortcut(block: nn.Module, x: Tensor) -> Tensor:
    return _optional(block.downsample, x)


def _timm_basic_residual(block: timm_resnet.BasicBlock, x: Tensor) -> Tensor:
    x = block.bn1(block.conv1(x))
    x = block.act1(_optional(block.drop_block, x))
    x = block.bn2(block.conv2(_optional(block.aa, x)))
    return _optional(block.drop_path, _optional(block.se, x))


def _timm_bottleneck_residual(block: timm_resnet.Bottleneck, x: Tensor) -> Tensor:
    x = block.act1(block.bn1(block.conv1(x)))
    x = block.bn2(block.conv2(x))
    x = block.act2(_optional(block.drop_block, x))
    x = block.bn3(block.conv3(_optional(block.aa, x)))
    return _optional(block.drop_path, _optional(block.se, x))


def _tv_basic_residual(block: tv_resnet.BasicBlock, x: Tensor) -> Tensor:
    return block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))


def _tv_bottleneck_residual(block: tv_resnet.Bottleneck, x: Tensor) -> Tensor:
    x = block.relu(block.bn1(block.conv1(x)))
    x = block.relu(block.bn2(block.conv2(x)))
    return block.bn3(block.conv3(x))


def _cifar_basic_residual(block: CifarBasicBlock, x: Tensor) -> Tensor:
    return block.bn2(block.conv2(block.act(block.bn1(block.conv1(x)))))


def _conv1_in_channels(block: nn.Module) -> int:
    return block.conv1.in_channels


_IDENTITY_FORWARD = torch_forward(nn.Identity)


def _cifar_shortcut(block: CifarBasicBlock, x: Tensor) -> Tensor:
    shortcut = block.shortcut
    # Without autograd, x itself, without the module call of an nn.Identity no forward hook sees: at batch 1
    # that call costs more than the rest of a skipped block's shortcut and activation. (With autograd, a
    # backward hook could be waiting for the call.)
    unseen = not (torch.is_grad_enabled() or has_global_forward_hooks())
    if unseen and runs_as_stock(shortcut, nn.Identity, _IDENTITY_FORWARD):
        return x
    return shortcut(x)


def _final_activation(name: str) -> tuple[Callable[[nn.Module, Tensor], Tensor], Callable[[nn.Module], nn.Module]]:
    """``(activation, final_activation)`` of a block whose final activation is its child ``name``."""

    def module(block: nn.Module) -> nn.Module:
        return getattr(block, name)

    def activation(block: nn.Module, x: Tensor) -> Tensor:
        return getattr(block, name)(x)

    return activation, module


def _adapter(
    residual: Callable[[nn.Module, Tensor], Tensor],
    shortcut: Callable[[nn.Module, Tensor], Tensor],
    final_activation: str,
) -> BlockAdapter:
    activation, module = _final_activation(final_activation)
    return BlockAdapter(residual, shortcut, activation, _conv1_in_channels, final_activation=module)


register_block(timm_resnet.BasicBlock, _adapter(_timm_basic_residual, _downsample_shortcut, "act2"))
register_block(timm_resnet.Bottleneck, _adapter(_timm_bottleneck_residual, _downsample_shortcut, "act3"))
register_block(tv_resnet.BasicBlock, _adapter(_tv_basic_residual, _downsample_shortcut, "relu"))
register_block(tv_resnet.Bottleneck, _adapter(_tv_bottleneck_residual, _downsample_shortcut, "relu"))
register_block(CifarBasicBlock, _adapter(_cifar_basic_residual, _cifar_shortcut, "act"))
