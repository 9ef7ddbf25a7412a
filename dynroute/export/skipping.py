"""Export a converted model as a graph that skips: the runtime does not run a skipped block's residual branch.

Each gated block becomes one ``torch.cond`` on its router's decisions (argmax of the logits, a tie
skipping, as in eager eval), which ``torch.onnx.export(program, dynamo=True)`` turns into one ONNX
``If`` node. When no image is routed to the block, the branch that runs gives ``act(shortcut)``;
otherwise the other one:

- at batch 1 (a one-image example, ``dynamic_batch=False``): ``act(shortcut + F(x))``;
- at any other batch: gathers the routed rows (``nonzero``, ``index_select``), runs ``F`` on them only,
  adds them to their shortcut rows (``index_add``) and applies ``act``. How many rows that is depends
  on the data: an unbacked size in ``torch.export``, a data-dependent shape in ONNX.

So a block no image of the batch is routed to costs its router and shortcut, and in a batch, each
residual branch runs on the routed rows only. The program can also return the paths, for a server
to log.
"""

import copy

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from dynroute.export._common import example_batch, export_batch
from dynroute.layers.gated_block import GatedBlock
from dynroute.layers.routing import require_gated_blocks
from dynroute.layers.stage import GatedSequential

__all__ = ["export_skipping_program"]


class _PathLog:
    """The int64 0/1 decisions (N,) of each gated block in one forward, by the block's position in ``gated_blocks``."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._gates: dict[int, Tensor] = {}

    def record(self, position: int, decisions: Tensor) -> None:
        self._gates[position] = decisions

    def take(self) -> Tensor:
        """The paths (N, n_blocks) of the forward in float32, in ``gated_blocks`` order; the log is empty again."""
        gates, self._gates = self._gates, {}
        missing = sorted(set(range(self.num_blocks)) - set(gates))
        if missing:
            raise RuntimeError(
                f"gated blocks at positions {missing[:3]} of dynroute.gated_blocks(model) did not run in the "
                "forward, so it has no path to return; export with with_paths=False"
            )
        # One conversion for all blocks: a runtime pays per op, and ONNX Runtime per node, however small.
        return torch.stack([gates[position] for position in range(self.num_blocks)], dim=1).float()


class _SkippingBlock(GatedBlock):
    """A gated block whose output is one ``torch.cond`` on its int64 0/1 decisions (N,): routed or skipped.

    Export copies get it by a class swap, as ``convert_resnet`` makes stages ``GatedSequential``: the
    block keeps its modules, parameters and names. Subclasses give :meth:`routed_output`. The final
    activation runs inside the branches, where a runtime can fuse it with the last convolution.

    Attributes:
        path_log: where the decisions of each forward go.
        position: the block's position in :func:`dynroute.gated_blocks`.
    """

    path_log: _PathLog
    position: int

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'); the residual branch runs only if some image is routed to it."""
        shortcut = self.adapter.shortcut(self.block, x)
        if self.forced_gate is None:
            decisions = self.router(x).argmax(1)  # of (skip, run), as eager eval decides: a tie skips
            routed = decisions.amax(0) > 0
            out = torch.cond(routed, self.routed_output, self.skipped_output, (x, shortcut, decisions))
        else:
            opened = self.forced_gate == "open"
            decisions = torch.full((x.shape[0],), int(opened), device=x.device)
            out = (self.routed_output if opened else self.skipped_output)(x, shortcut, decisions)
        self.path_log.record(self.position, decisions)
        return out

    def skipped_output(self, x: Tensor, shortcut: Tensor, decisions: Tensor) -> Tensor:
        """The output when no image is routed: the activation of a copy of the shortcut (a branch of
        ``torch.cond`` may neither return nor modify its inputs)."""
        return self.adapter.activation(self.block, shortcut.clone())

    def routed_output(self, x: Tensor, shortcut: Tensor, decisions: Tensor) -> Tensor:
        """The output when at least one of ``decisions`` (N,) is 1."""
        raise NotImplementedError


class _SingleImageBlock(_SkippingBlock):
    """Batch 1: the one image runs the residual branch."""

    def routed_output(self, x: Tensor, shortcut: Tensor, decisions: Tensor) -> Tensor:
        return self.adapter.activation(self.block, shortcut + self.adapter.residual(self.block, x))


class _GatheringBlock(_SkippingBlock):
    """Any batch: the residual branch runs on the routed rows, gathered, and is added back to their shortcut."""

    def routed_output(self, x: Tensor, shortcut: Tensor, decisions: Tensor) -> Tensor:
        routed = decisions.nonzero().squeeze(1)
        # This branch runs only if some row is routed: without the hint, a layer that checks for an empty
        # input (batch norm does) cannot be traced on an unbacked number of rows.
        torch._check(routed.shape[0] > 0)
        residual = self.adapter.residual(self.block, x.index_select(0, routed))
        return self.adapter.activation(self.block, shortcut.index_add(0, routed, residual.to(shortcut.dtype)))


class _SkippingProgram(nn.Module):
    """What :func:`export_skipping_program` traces: the model, then the paths its blocks logged."""

    def __init__(self, model: nn.Module, block_class: type[_SkippingBlock], with_paths: bool) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        blocks = require_gated_blocks(self.model)
        self.path_log = _PathLog(len(blocks))
        self.with_paths = with_paths
        for position, (_, block) in enumerate(blocks):
            block.__class__ = block_class
            block.path_log, block.position = self.path_log, position
        for module in self.model.modules():
            if type(module) is GatedSequential:
                module.__class__ = nn.Sequential  # its gated blocks now run a forward of their own

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """(N, C, H, W) -> logits, or ``(logits, paths)`` with paths (N, n_blocks) of 0/1."""
        logits = self.model(x)
        paths = self.path_log.take()
        return (logits, paths) if self.with_paths else logits


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
    ``with_paths``); pass the program to ``torch.onnx.export(program, dynamo=True)`` for ONNX.

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
    single_image = example.shape[0] == 1
    program = _SkippingProgram(model, _SingleImageBlock if single_image else _GatheringBlock, with_paths)
    try:
        return export_batch(program, example, dynamic_batch)
    except Exception as error:
        if not _guards_on_data(error):
            raise
        raise RuntimeError(
            "a gated block's residual branch depends on how many rows it runs on, which a batched graph "
            "that skips leaves to the data, so torch.export cannot trace it. Export a batch of one "
            "(dynamic_batch=False, a one-image example), which needs no gathering, or the masked graph, "
            "which runs every block: dynroute.export_masked_program"
        ) from error
