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
    ))
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["BlockAdapter", "register_block", "get_adapter", "registered_block_types"]


@dataclass(frozen=True)
class BlockAdapter:
    """The three parts of a residual block ``activation(residual(x) + shortcut(x))``.

    Attributes:
        residual: ``(block, x) -> F(x)``, the gated branch, shape (N, C_out, H', W').
        shortcut: ``(block, x) -> x`` or its downsampling, same shape as ``residual``.
        activation: ``(block, y) -> act(y)``, applied after the sum (identity if none).
        in_channels: ``block -> C_in``, the channels the router sees.
    """

    residual: Callable[[nn.Module, Tensor], Tensor]
    shortcut: Callable[[nn.Module, Tensor], Tensor]
    activation: Callable[[nn.Module, Tensor], Tensor]
    in_channels: Callable[[nn.Module], int]


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
