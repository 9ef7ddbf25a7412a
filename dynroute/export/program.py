"""Export a converted model for deployment as a static graph of hard decisions.

``torch.export`` cannot trace the sparse execution of eval mode: which rows a block runs on is
data dependent (``nonzero``), and the exporter cannot guard on it. The exported form is the
*masked* graph (``dynroute.set_execution(model, "masked")``): every residual branch is computed
and multiplied by its 0/1 decision, so the outputs are those of sparse execution, with dense MACs.
"""

import copy
import warnings

import torch
from torch import Tensor, nn

from dynroute.layers.routing import routing_paths, set_execution

__all__ = ["WithPaths", "export_program"]


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


def export_program(
    model: nn.Module,
    example_inputs: Tensor,
    dynamic_batch: bool = True,
    with_paths: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` a deep copy of converted ``model`` in eval mode as the masked static graph.

    The user's model is not changed. The program's ``module()`` returns the eval model's logits
    (and its paths with ``with_paths``); pass the program to ``torch.onnx.export`` for ONNX.

    Args:
        model: a converted model.
        example_inputs: a batch (N, C, H, W) of the deployment's input size.
        dynamic_batch: export the batch dimension as dynamic (any N >= 1), else fixed to N.
        with_paths: return ``(logits, paths)`` (see :class:`WithPaths`) instead of the logits.

    Example:
        >>> program = dynroute.export_program(model, torch.randn(2, 3, 32, 32))
        >>> logits = program.module()(images)
    """
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() != 4:
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, Tensor) else type(example_inputs).__name__
        raise ValueError(f"example_inputs must be a batch (N, C, H, W), but got {shape}; pass one tensor batch")
    exported = set_execution(copy.deepcopy(model), "masked").eval()
    if with_paths:
        exported = WithPaths(exported)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings():  # the gates a forward records stay Python attributes: with_paths returns them
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        # Non-strict: the strict tracer of torch 2.4 cannot trace the __dict__ update that records each block's gates.
        return torch.export.export(exported, (example_inputs,), dynamic_shapes=dynamic_shapes, strict=False)
