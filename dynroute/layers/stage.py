"""A stage of gated blocks that hands each block's output to the next as scratch memory.

In a plain ``nn.Sequential`` a gated block cannot know whether anyone else holds its input, so a
skipped or partly routed block with an identity shortcut copies its input into a fresh output:
one full pass over the activations that the dense network does not pay. Inside a stage the
output of one gated block is seen by nobody but the next (unless a hook looks), so the next block
may write its output into it; when both end with a ReLU, the rows the next block skips are
already their own ReLU and need no pass at all. :func:`dynroute.convert_resnet` turns every
``nn.Sequential`` that holds gated blocks into a :class:`GatedSequential`, in place, the way
``torch.nn.utils.parametrize`` swaps a module's class: same object, children, hooks and
``state_dict`` keys.
"""

import torch
from torch import Tensor, nn

from dynroute.layers.gated_block import GatedBlock, _Plan
from dynroute.layers.hooks import has_global_forward_hooks, runs_own_forward

__all__ = ["GatedSequential"]


class GatedSequential(nn.Sequential):
    """``nn.Sequential`` whose gated blocks may reuse the previous gated block's output buffer.

    Block ``k`` gets ``reuse_input=True`` when its input is a tensor gated block ``k - 1`` created in
    this forward, autograd is off, and no global hook or hook on block ``k - 1`` (or anything inside
    it) could have kept a reference to it; block ``k`` itself declines the offer if a hook could see
    its own tensors. It gets ``relu_input=True`` when block ``k - 1`` ends with an ``nn.ReLU``. The
    stage's own input is never written to. Outputs are those of ``nn.Sequential``.

    Without autograd, the checks each gated block makes before it runs (hooks, autocast, which router
    ops may run bare, its final activation) are made for all of them before the first runs: between one
    block's kernels and the next's, each check costs several times what it costs in a tight loop (the
    caches are cold). So a hook, an autocast region or a router layer set while the stage runs takes
    effect from its next forward. A gated block whose ``forward`` is set on the object, overridden by a
    subclass, patched on the class or compiled is called as a module, as is any block a hook could see,
    and every block while ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` traces.
    """

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> the output of the last module, as ``nn.Sequential`` computes it."""
        private = False  # x is a buffer only this loop holds
        relu_output = False  # x came out of an nn.ReLU
        scratch_allowed = not (torch.is_grad_enabled() or has_global_forward_hooks())
        # Each gated block's checks, done for all of them before the first runs (None: called as a module).
        plans = [_plan(module) if scratch_allowed else None for module in self]
        for module, plan in zip(self, plans):
            if not (scratch_allowed and isinstance(module, GatedBlock)):
                x, private, relu_output = module(x), False, False
                continue
            if plan is None:
                output = module(x, reuse_input=private, relu_input=relu_output)  # keywords: hooks see (x,) alone
            else:
                output = module._planned_forward(x, plan, private, relu_output)
            # Whether a hook could see the block's tensors was checked once for its plan (or by its forward).
            private = module.last_forward_unobserved and (private or output is not x)
            relu_output = plan.relu_output if plan is not None else module.ends_with_relu
            x = output
        return x


# GatedBlock's own forward; one patched on the class later, or a subclass's, is called as a module
_GATED_FORWARD = GatedBlock.forward


def _plan(module: nn.Module) -> _Plan | None:
    """The plan of a gated block that is called as is (see runs_own_forward) and that no hook could see, else None."""
    if not (isinstance(module, GatedBlock) and runs_own_forward(module, _GATED_FORWARD)):
        return None
    return module._unobserved_plan()  # None if a hook, on the block or inside it, could see its tensors


def adopt_stage(stage: nn.Module) -> None:
    """Make a plain ``nn.Sequential`` a :class:`GatedSequential` in place; any other module is left alone."""
    if type(stage) is nn.Sequential:
        stage.__class__ = GatedSequential
