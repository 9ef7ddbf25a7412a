"""Pieces the block families' adapters share: optional layers, the downsample shortcut, a named final activation,
the pre-activation a branch shares with its shortcut."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from dynroute.conversion.registry import BlockAdapter


def optional(module: nn.Module | None, x: Tensor) -> Tensor:
    """``module(x)``, or x for a switched-off layer that older timm releases keep as None."""
    return x if module is None else module(x)


def downsample_shortcut(block: nn.Module, x: Tensor) -> Tensor:
    """The shortcut of a block with an optional ``downsample`` child."""
    return optional(block.downsample, x)


def required_shortcut(block: nn.Module, shortcut: nn.Module | None) -> nn.Module:
    """``shortcut``, the block's shortcut module; a TypeError if the block was built without one.

    Such a block (an adapter's ``has_residual_add`` says False) is a plain layer, which the converter
    leaves ungated; only wrapping it by hand reaches this error.
    """
    if shortcut is None:
        raise TypeError(
            f"this {type(block).__name__} has no shortcut, so no residual add to gate; "
            "dynroute.convert_resnet leaves such blocks as they are"
        )
    return shortcut


def conv1_in_channels(block: nn.Module) -> int:
    """Input channels of the block's ``conv1``: what its router sees.

    ``conv1`` is a convolution, timm's ``ConvNormAct``, or a fused ``torch.ao`` sequence such as
    ``ConvReLU2d`` (after ``fuse_model()``), whose first layer is the convolution.
    """
    conv1 = block.conv1
    return (conv1[0] if isinstance(conv1, nn.Sequential) else conv1).in_channels


def named_activation_adapter(
    residual: Callable[[nn.Module, Tensor], Tensor],
    shortcut: Callable[[nn.Module, Tensor], Tensor],
    final_activation: str,
    in_channels: Callable[[nn.Module], int] = conv1_in_channels,
    has_residual_add: Callable[[nn.Module], bool] | None = None,
) -> BlockAdapter:
    """An adapter whose final activation is the block's child ``final_activation`` (router input: ``conv1``'s)."""

    def module(block: nn.Module) -> nn.Module:
        return getattr(block, final_activation)

    def activation(block: nn.Module, x: Tensor) -> Tensor:
        return getattr(block, final_activation)(x)

    return BlockAdapter(
        residual, shortcut, activation, in_channels, final_activation=module, has_residual_add=has_residual_add
    )


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
