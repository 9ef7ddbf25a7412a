"""Whole-model routing state: find the gated blocks, force their gates, read the path of a forward."""

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dynroute.layers.gated_block import Execution, ForcedGate, GatedBlock
from dynroute.layers.router import hard_gate

__all__ = [
    "gated_blocks",
    "force_gates",
    "set_execution",
    "set_decision_offset",
    "routing_paths",
    "routing_logits",
    "routing_decisions",
]


def gated_blocks(model: nn.Module) -> Iterator[tuple[str, GatedBlock]]:
    """Yield ``(name, block)`` for every :class:`GatedBlock`, in forward (module) order."""
    for name, module in model.named_modules():
        if isinstance(module, GatedBlock):
            yield name, module


# The attribute under which each wrapper keeps the model: DistributedDataParallel's, torch.compile's.
WRAPPER_ATTRIBUTES = ("module", "_orig_mod")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside any nesting of DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        inner = next((model._modules[name] for name in WRAPPER_ATTRIBUTES if name in model._modules), None)
        if inner is None:
            return model
        model = inner


def require_gated_blocks(model: nn.Module) -> list[tuple[str, GatedBlock]]:
    """``list(gated_blocks(model))``; a TypeError naming the fix if the model has none (package helper)."""
    blocks = list(gated_blocks(model))
    if not blocks:
        raise TypeError(
            f"{type(model).__name__} has no gated blocks; convert it first with dynroute.convert_resnet(model)"
        )
    return blocks


def force_gates(model: nn.Module, state: ForcedGate | None) -> nn.Module:
    """Force every gate ``"open"`` (the dense network) or ``"closed"``, or to given decisions; route again with None.

    The routers still run and record their logits; only the decisions are replaced.

    Args:
        model: a converted model.
        state: ``"open"``, ``"closed"``, None, or 0/1 decisions (N, n_blocks) as a bool or integer
            tensor, one row per sample of each batch to come, columns in :func:`gated_blocks` order
            (``routing_paths(model).bool()`` replays the paths of a forward).

    Returns:
        The same model, for chaining.
    """
    blocks = require_gated_blocks(model)
    if isinstance(state, Tensor):
        if state.dim() != 2 or state.shape[1] != len(blocks):
            raise ValueError(
                f"forced decisions must have shape (N, {len(blocks)}), one column per gated block, but got "
                f"{tuple(state.shape)}"
            )
        for (_, block), decisions in zip(blocks, state.unbind(1)):
            block.force_gate(decisions)
        return model
    for _, block in blocks:
        block.force_gate(state)
    return model


def set_execution(model: nn.Module, execution: Execution) -> nn.Module:
    """Run hard decisions ``"sparse"`` (skipped blocks not computed) or ``"masked"`` (static graph).

    Returns:
        The same model, for chaining.
    """
    for _, block in require_gated_blocks(model):
        block.set_execution(execution)
    return model


def set_decision_offset(model: nn.Module, offset: float) -> nn.Module:
    """Set every router's decision offset to ``offset`` logits: one shared decision threshold for the model.

    A block runs for an image when its router's "run" logit, raised by ``offset``, beats the "skip" logit:
    offset 0 is the trained argmax, a positive offset opens more gates (more MACs), a negative one fewer.
    Sweeping it trades accuracy for MACs on one trained model; :func:`dynroute.calibrate_budget` finds the
    offset that meets a budget. The offset is kept in each router's ``decision_offset`` buffer (so it is
    saved with the ``state_dict``) and folded into its run bias (so it costs nothing at inference).

    Returns:
        The same model, for chaining.
    """
    for _, block in require_gated_blocks(model):
        block.router.set_decision_offset(offset)
    return model


def shift_decision_offsets(model: nn.Module, shift: float) -> None:
    """Raise every router's decision offset by ``shift`` logits, keeping their differences."""
    for _, block in require_gated_blocks(model):
        block.router.set_decision_offset(block.router.decision_offset.item() + shift)


def _stack_last(model: nn.Module, attribute: str) -> Tensor:
    blocks = require_gated_blocks(model)
    values = [getattr(block, attribute) for _, block in blocks]
    missing = [name for (name, _), value in zip(blocks, values) if value is None]
    if missing:
        raise RuntimeError(
            f"routing state is read after a forward pass, but blocks {missing[:3]} have not run yet; "
            "call model(x) first"
        )
    sizes = [value.shape[0] for value in values]  # a list, not a set: symbolic sizes under torch.export don't hash
    if any(size != sizes[0] for size in sizes):
        raise RuntimeError(
            f"gated blocks ran on different batch sizes {sorted(set(sizes))}; read the paths right after one full "
            "forward"
        )
    return torch.stack(values, dim=1)


def routing_paths(model: nn.Module) -> Tensor:
    """Gates of the last forward, shape (N, n_blocks), block order as in :func:`gated_blocks`.

    In train mode the values are the relaxed gates v_k and carry gradients to the routers; in
    eval mode (or with ``hard_decisions``) they are the 0/1 decisions u_k.
    """
    return _stack_last(model, "last_gate")


def routing_logits(model: nn.Module) -> Tensor:
    """Router logits of the last forward, shape (N, n_blocks, 2) of (skip, run)."""
    return _stack_last(model, "last_logits")


def routing_decisions(model: nn.Module) -> Tensor:
    """Hard decisions of the last forward, shape (N, n_blocks), float 0/1: the path each image would take at test time.

    In eval mode (or stage 2) these are :func:`routing_paths`; in stage-1 training they are the argmax of the
    router logits behind the relaxed gates (what :meth:`dynroute.BudgetLoss.update_gamma` measures).
    """
    logits = routing_logits(model)
    return hard_gate(logits.flatten(0, 1)).view(logits.shape[:2])
