"""Export a converted model as the masked static graph: every block computed, then multiplied by its decision.

The masked graph (``dynroute.set_execution(model, "masked")``) runs every residual branch on every
image and multiplies it by the 0/1 decision: the outputs of sparse execution, with the dense network's
MACs and no data-dependent op, so any runtime that runs a static graph runs it. For a graph that
skips, see :func:`dynroute.export_skipping_program`.
"""

import copy
import warnings

import torch
from torch import Tensor, nn

from dynroute.export._common import example_batch, export_batch
from dynroute.layers.routing import routing_paths, set_execution

__all__ = ["WithPaths", "export_masked_program"]


class WithPaths(nn.Module):
    """Wrap a converted model so its forward returns ``(logits, paths)``.

    ``paths`` (N, n_blocks) are the 0/1 decisions of :func:`dynroute.routing_paths`, so an exported
    program also tells which blocks each sample would run.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> logits of the wrapped model, paths (N, n_blocks)."""
        return self.model(x), routing_paths(self.model)


def export_masked_program(
    model: nn.Module,
    example_inputs: Tensor,
    dynamic_batch: bool = True,
    with_paths: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` a deep copy of converted ``model`` in eval mode as the masked static graph.

    Every block runs for every image, so the program saves no MACs; it runs on any runtime that takes a
    static graph. The user's model is not changed. The program's ``module()`` returns the eval model's
    logits (and its paths with ``with_paths``); pass the program to ``torch.onnx.export`` for ONNX.

    Args:
        model: a converted model.
        example_inputs: a batch (N, C, H, W) of the deployment's input size; any N for a dynamic batch.
        dynamic_batch: export the batch dimension as dynamic (any N >= 1), else fixed to N.
        with_paths: return ``(logits, paths)`` (see :class:`WithPaths`) instead of the logits.

    Example:
        >>> program = dynroute.export_masked_program(model, torch.randn(2, 3, 32, 32))
        >>> logits = program.module()(images)
    """
    example = example_batch(example_inputs, dynamic_batch)
    exported = set_execution(copy.deepcopy(model), "masked").eval()
    if with_paths:
        exported = WithPaths(exported)
    return export_batch(exported, example, dynamic_batch)


def export_program(
    model: nn.Module,
    example_inputs: Tensor,
    dynamic_batch: bool = True,
    with_paths: bool = False,
) -> torch.export.ExportedProgram:
    """Deprecated name of :func:`export_masked_program`, which says what it exports."""
    warnings.warn(
        "dynroute.export_program is deprecated: it exports the masked graph, which runs every block; call "
        "dynroute.export_masked_program for that graph, or dynroute.export_skipping_program for one that skips",
        FutureWarning,
        stacklevel=2,
    )
    return export_masked_program(model, example_inputs, dynamic_batch, with_paths)
