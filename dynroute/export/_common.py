"""Pieces the export forms share: the example batch to trace with and its dynamic batch dimension."""

import warnings

import torch
from torch import Tensor


def example_batch(example_inputs: object, dynamic_batch: bool) -> Tensor:
    """The batch to trace: ``example_inputs`` (N, C, H, W), repeated to two images if it holds one and the batch
    is dynamic (``torch.export`` makes a dimension of size 1 a constant); a ValueError naming the fix otherwise."""
    if not isinstance(example_inputs, Tensor) or example_inputs.dim() != 4:
        shape = tuple(example_inputs.shape) if isinstance(example_inputs, Tensor) else type(example_inputs).__name__
        raise ValueError(f"example_inputs must be a batch (N, C, H, W), but got {shape}; pass one tensor batch")
    if dynamic_batch and example_inputs.shape[0] == 1:
        return example_inputs.expand(2, -1, -1, -1)
    return example_inputs


def export_batch(module: torch.nn.Module, example: Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) the forward of ``module`` on ``example``, its batch dimension any N >= 1 if
    ``dynamic_batch``, else fixed."""
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings():  # the gates a forward records stay Python attributes: WithPaths returns them
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        # Non-strict: the strict tracer cannot trace the __dict__ update that records each block's gates.
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes, strict=False)
