"""Pieces the block families' adapters share: optional layers, the downsample shortcut, a named final activation."""

from collections.abc import Callable

from torch import Tensor, nn

from dynroute.conversion.registry import BlockAdapter


def optional(module: nn.Module | None, x: Tensor) -> Tensor:
    """``module(x)``, or x for a switched-off layer that older timm releases keep as None."""
    return x if module is None else module(x)


def downsample_shortcut(block: nn.Module, x: Tensor) -> Tensor:
    """The shortcut of a block with an optional ``downsample`` child."""
    return optional(block.downsample, x)


def conv1_in_channels(block: nn.Module) -> int:
    """Input channels of the block's ``conv1``: what its router sees."""
    return block.conv1.in_channels


def named_activation_adapter(
    residual: Callable[[nn.Module, Tensor], Tensor],
    shortcut: Callable[[nn.Module, Tensor], Tensor],
    final_activation: str,
) -> BlockAdapter:
    """An adapter whose final activation is the block's child ``final_activation`` and router input ``conv1``'s."""

    def module(block: nn.Module) -> nn.Module:
        return getattr(block, final_activation)

    def activation(block: nn.Module, x: Tensor) -> Tensor:
        return getattr(block, final_activation)(x)

    return BlockAdapter(residual, shortcut, activation, conv1_in_channels, final_activation=module)
