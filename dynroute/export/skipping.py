"""Export a converted model as a graph that skips: the runtime does not run a skipped block's residual branch.

Each gated block becomes one ``torch.cond`` on its eval decisions (the router's argmax, or the gate
forced on the block), which ``torch.onnx.export(program, dynamo=True)`` turns into one ONNX ``If``
node. When no image is routed to the block, the branch that runs is :func:`dynroute.gated_residual`
with the gate closed, ``act(shortcut)``; otherwise the other one:

- at batch 1 (a one-image example, ``dynamic_batch=False``): ``gated_residual`` with the gate open,
  ``act(shortcut + F(x))``;
- at any other batch: the routed rows are gathered, run through ``F`` and added to their shortcut
  rows, as sparse eval runs them. How many rows that is depends on the data: an unbacked size in
  ``torch.export``, a data-dependent shape in ONNX.

So a block no image of the batch is routed to costs its router and shortcut, and in a batch, each
residual branch runs on the routed rows only. The program can also return the paths, for a server
to log.
"""

import copy
from functools import partial

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from dynroute._validation import check_image_batch
from dynroute.export._common import example_batch, export_batch
from dynroute.export.masked import WithPaths
from dynroute.layers.gated_block import GatedBlock, gated_residual, merge_routed_rows
from dynroute.layers.routing import require_gated_blocks
from dynroute.layers.stage import GatedSequential

__all__ = ["export_skipping_program"]


class _SkippingBlock(GatedBlock):
    """A gated block whose eval forward is one ``torch.cond``: routed (some image runs the branch) or skipped.

    Export copies get it by a class swap, as ``convert_resnet`` makes stages ``GatedSequential``: the
    block keeps its modules, parameters and names. The activation runs inside the branches, where a
    runtime can fuse it with the last convolution.

    Attributes:
        gathers: the routed branch runs the residual branch on the routed rows only (any batch), rather
            than on the whole batch (a batch of one).
    """

    gathers: bool

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'); the residual branch runs only if some image is routed to it."""
        check_image_batch(x, "GatedBlock")
        logits = self.router(x)
        gate = self._gate(logits)
        shortcut = self.adapter.shortcut(self.block, x)
        if isinstance(gate, bool):  # forced open or closed: nothing is left to the data
            out = self._output(x, shortcut, gate)
        else:
            out = torch.cond(gate.amax(0) > 0, self._routed, self._skipped, (x, shortcut, gate))
        self._record(gate, logits, x.shape)
        return out

    def _routed(self, x: Tensor, shortcut: Tensor, decisions: Tensor) -> Tensor:
        """The output when at least one of ``decisions`` (N,) is 1: the whole batch runs the residual branch
        (a batch of one), or the routed rows do, as sparse eval runs them."""
        if not self.gathers:
            return self._output(x, shortcut, True)
        routed = decisions.nonzero().squeeze(1)
        # The branch runs only if some row is routed: without the hint, a layer that checks for an empty
        # input (batch norm does) cannot be traced on an unbacked number of rows.
        torch._check(routed.shape[0] > 0)
        merged = merge_routed_rows(shortcut, partial(self.adapter.residual, self.block), x, routed)
        return self.adapter.activation(self.block, merged)

    def _skipped(self, x: Tensor, shortcut: Tensor, decisions: Tensor) -> Tensor:
        """The output when every one of ``decisions`` (N,) is 0."""
        return self._output(x, shortcut, False)

    def _output(self, x: Tensor, shortcut: Tensor, gate: bool) -> Tensor:
        """The block's output with the gate open or closed for every image: :func:`gated_residual` (a new tensor,
        as a branch of ``torch.cond`` must return), then the activation."""
        merged = gated_residual(shortcut, partial(self.adapter.residual, self.block), x, gate)
        return self.adapter.activation(self.block, merged)


def _skipping_copy(model: nn.Module, gathers: bool) -> nn.Module:
    """A deep copy of ``model`` in eval mode whose gated blocks are :class:`_SkippingBlock`."""
    model = copy.deepcopy(model).eval()
    for _, block in require_gated_blocks(model):
        block.__class__ = _SkippingBlock
        block.gathers = gathers
    for module in model.modules():
        if type(module) is GatedSequential:
            module.__class__ = nn.Sequential  # each block runs its own forward, never the stage's fast path
    return model


def _guards_on_data(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from or while handling, is a guard on a data-dependent size.

    Inside a ``torch.cond`` branch, dynamo reports it as a ``UserError`` raised while handling one.
    """
    while error is not None:
        if isinstance(error, GuardOnDataDependentSymNode):
            return True
        error = error.__cause__ or error.__context__
    return False


def export_skipping_program(
    model: nn.Module,
    example_inputs: Tensor,
    dynamic_batch: bool = True,
    with_paths: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` a deep copy of converted ``model`` in eval mode as a graph that skips.

    Each gated block is one ``torch.cond`` (one ``If`` node in ONNX) whose branch for routed images
    runs the residual branch; a skipped block's convolutions are not run. The user's model is not
    changed. The program's ``module()`` returns the eval model's logits (and its paths with
    ``with_paths``); pass the program to :func:`dynroute.export_onnx` for ONNX Runtime.

    Args:
        model: a converted model.
        example_inputs: a batch (N, C, H, W) of the deployment's input size; any N for a dynamic batch.
        dynamic_batch: export the batch dimension as dynamic (any N >= 1), else fixed to N. With a
            fixed batch of one, each block's branch for a routed image is the plain block; otherwise it
            gathers the routed rows, whose number is data dependent.
        with_paths: return ``(logits, paths)``, paths (N, n_blocks) the 0/1 decisions of each gated
            block in :func:`dynroute.gated_blocks` order, as :func:`dynroute.routing_paths` gives them.

    Raises:
        RuntimeError: a block's residual branch decides something from how many rows it gets, which a
            batched graph that skips leaves to the data; export batch 1 or the masked graph instead.

    Example:
        >>> program = dynroute.export_skipping_program(model, torch.randn(1, 3, 224, 224), dynamic_batch=False)
        >>> logits, paths = program.module()(image)  # with_paths=True
    """
    example = example_batch(example_inputs, dynamic_batch)
    exported = _skipping_copy(model, gathers=example.shape[0] > 1)
    if with_paths:
        exported = WithPaths(exported)
    try:
        return export_batch(exported, example, dynamic_batch)
    except Exception as error:
        if not _guards_on_data(error):
            raise
        raise RuntimeError(
            "a gated block's residual branch depends on how many rows it runs on, which a batched graph "
            "that skips leaves to the data, so torch.export cannot trace it. Export a batch of one "
            "(dynamic_batch=False, a one-image example), which needs no gathering, or the masked graph, "
            "which runs every block: dynroute.export_masked_program"
        ) from error
