"""Two-stage CoDiNet training: stage switch and parameter groups.

Stage 1 trains blocks and routers jointly with relaxed (Gumbel-softmax) gates. Stage 2 freezes
the routers and trains the blocks under the hard decisions the network takes at test time,
closing the gap between relaxed training and hard inference (CoDiNet Sec. 3.4).
"""

from typing import Literal

from torch import nn

from dynroute.layers.routing import gated_blocks, require_gated_blocks

__all__ = [
    "Stage",
    "set_stage",
    "get_stage",
    "router_parameters",
    "block_parameters",
]

Stage = Literal[1, 2]


def set_stage(model: nn.Module, stage: Stage) -> nn.Module:
    """Switch a converted model to training stage 1 or 2.

    Stage 1: relaxed gates in train mode, routers trainable. Stage 2: hard decisions in train mode
    too (``GatedBlock.hard_decisions``) and router parameters frozen (``requires_grad=False``).
    An optimizer built once over all parameters keeps working: in stage 2 the routers get no
    gradient, so after ``optimizer.zero_grad()`` (``set_to_none=True``, PyTorch's default) their
    ``.grad`` stays None and SGD, Adam and AdamW leave them alone. With
    ``zero_grad(set_to_none=False)`` momentum and weight decay would still move them: then build
    the optimizer after switching, over :func:`block_parameters`.

    Returns:
        The same model, for chaining.
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (joint, relaxed) or 2 (routers frozen, hard decisions), but got {stage!r}")
    for _, block in require_gated_blocks(model):
        block.hard_decisions = stage == 2
        block.router.requires_grad_(stage == 1)
    return model


def get_stage(model: nn.Module) -> Stage:
    """The stage :func:`set_stage` last set (1 for a freshly converted model)."""
    flags = {block.hard_decisions for _, block in require_gated_blocks(model)}
    if len(flags) != 1:
        raise ValueError("the gated blocks disagree on hard_decisions; call dynroute.set_stage(model, 1 or 2)")
    return 2 if flags.pop() else 1


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every router, e.g. for an optimizer group with its own learning rate."""
    return [param for _, block in gated_blocks(model) for param in block.router.parameters()]


def block_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not a router's: the backbone, blocks and head."""
    routers = {id(param) for param in router_parameters(model)}
    return [param for param in model.parameters() if id(param) not in routers]
