"""Pieces the block families' adapters share: optional layers, the downsample shortcut, a child module by name."""

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ChildModule:
    """``(block, x) -> block.<name>(x)``: a part of a block (shortcut, final activation) that is one of its children."""

    name: str

    def __call__(self, block: nn.Module, x: Tensor) -> Tensor:
        return getattr(block, self.name)(x)


def named_activation_adapter(
    residual: Callable[[nn.Module, Tensor], Tensor],
    shortcut: Callable[[nn.Module, Tensor], Tensor],
    final_activation: str,
) -> BlockAdapter:
    """An adapter whose final activation is the block's child ``final_activation`` and router input ``conv1``'s."""
    return BlockAdapter(residual, shortcut, ChildModule(final_activation), conv1_in_channels)
