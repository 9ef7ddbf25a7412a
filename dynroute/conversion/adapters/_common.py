"""Pieces the block families' adapters share: optional layers, the downsample shortcut, a child module by name,
the pre-activation a branch shares with its shortcut."""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynroute.conversion.registry import BlockAdapter


def optional(module: nn.Module | None, x: Tensor) -> Tensor:
    """``module(x)``, or x for a switched-off layer that older timm releases keep as None."""
    return x if module is None else module(x)


def downsample_shortcut(block: nn.Module, x: Tensor) -> Tensor:
    """The shortcut of a block with an optional ``downsample`` child."""
    return optional(block.downsample, x)


def conv1_in_channels(block: nn.Module) -> int:
    """Input channels of the block's ``conv1``: what its router sees.

    ``conv1`` is a convolution, timm's ``ConvNormAct``, or a fused ``torch.ao`` sequence such as
    ``ConvReLU2d`` (after ``fuse_model()``), whose first layer is the convolution.
    """
    conv1 = block.conv1
    return (conv1[0] if isinstance(conv1, nn.Sequential) else conv1).in_channels


@dataclass(frozen=True)
class ChildModule:
    """``(block, x) -> block.<name>(x)``: a part of a block (shortcut, final activation) that is one of its children."""

    name: str

    def __call__(self, block: nn.Module, x: Tensor) -> Tensor:
        return getattr(block, self.name)(x)


@dataclass(frozen=True)
class ShortcutChild(ChildModule):
    """The shortcut child ``name`` of a block type that builds some instances without one (the child is None).

    Such an instance adds nothing to its branch: a plain layer, which the converter leaves ungated
    (:meth:`present` is the adapter's ``has_residual_add``). Calling the shortcut of one, which only a
    block wrapped by hand does, is a TypeError saying so.
    """

    def __call__(self, block: nn.Module, x: Tensor) -> Tensor:
        shortcut = getattr(block, self.name)
        if shortcut is None:
            raise TypeError(
                f"this {type(block).__name__} has no shortcut ({self.name} is None), so no residual add to gate; "
                "dynroute.convert_resnet leaves such blocks as they are"
            )
        return shortcut(x)

    def present(self, block: nn.Module) -> bool:
        """Whether ``block`` has the shortcut, and so a residual add."""
        return getattr(block, self.name) is not None


def named_activation_adapter(
    residual: Callable[[nn.Module, Tensor], Tensor],
    shortcut: Callable[[nn.Module, Tensor], Tensor],
    final_activation: str,
    in_channels: Callable[[nn.Module], int] = conv1_in_channels,
    has_residual_add: Callable[[nn.Module], bool] | None = None,
) -> BlockAdapter:
    """An adapter whose final activation is the block's child ``final_activation`` (router input: ``conv1``'s)."""
    return BlockAdapter(residual, shortcut, ChildModule(final_activation), in_channels, has_residual_add)


def no_activation(block: nn.Module, x: Tensor) -> Tensor:
    """The final activation of a pre-activation block: none, the sum is the output."""
    return x


def shared_preactivation(norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(x)`` in a residual branch whose shortcut also applies ``norm`` to ``x`` (pre-activation blocks).

    The block's own forward calls ``norm`` once; here the shortcut and the branch each call it. In
    training the branch's call must not update the running statistics a second time, so it runs on
    throw-away copies of ``norm``'s buffers; the shortcut's call, which sees every sample, updates them.
    """
    if not norm.training:
        return norm(x)
    copies = {name: buffer.clone() for name, buffer in norm.named_buffers()}
    return torch.func.functional_call(norm, copies, (x,))
