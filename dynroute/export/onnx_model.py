"""ONNX models of dynroute's exported programs, laid out for ONNX Runtime (optional extra ``dynroute[export]``).

``torch.onnx.export(program, dynamo=True)`` turns each ``torch.cond`` of a program that skips into an
``If`` node whose branches read their weights from the main graph. ONNX Runtime optimises a convolution
whose weights are constants of its own graph (on x86 CPUs, the blocked NCHWc layout with the bias,
sum and activation fused in) but not one whose weights come from an enclosing graph: its branches would
run plain convolutions, slower than the dense model's. :func:`export_onnx` therefore moves every weight
that only one branch reads into that branch, and drops the weights nothing reads (the exporter folds the
``If`` of a block whose decision is a constant, as a :class:`~dynroute.StaticRouter`'s is at batch 1, and
leaves its branch's weights behind).
"""

from __future__ import annotations

import os
from collections import defaultdict
from importlib.util import find_spec
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import onnx

__all__ = ["export_onnx"]

_OUTPUT_NAMES = {1: ["logits"], 2: ["logits", "paths"]}


def export_onnx(program: torch.export.ExportedProgram, path: str | os.PathLike) -> None:
    """Save ``program`` (from :func:`dynroute.export_skipping_program` or :func:`dynroute.export_masked_program`)
    as an ONNX model for ONNX Runtime.

    The input is named ``images``, the outputs ``logits`` and, for a program exported ``with_paths``,
    ``paths``; a dynamic batch stays dynamic. Each ``If`` node's branches get the weights only they read;
    weights that no node reads are left out.

    Args:
        program: an exported program whose forward takes a batch of images.
        path: the ``.onnx`` file to write.

    Example:
        >>> program = dynroute.export_skipping_program(model, torch.randn(1, 3, 224, 224), dynamic_batch=False)
        >>> dynroute.export_onnx(program, "routed.onnx")
        >>> session = onnxruntime.InferenceSession("routed.onnx", providers=["CPUExecutionProvider"])
    """
    missing = [name for name in ("onnx", "onnxscript") if find_spec(name) is None]
    if missing:
        raise ImportError(
            f"export_onnx needs {missing}: pip install 'dynroute[export]' (onnx, onnxscript, onnxruntime)"
        )
    import onnx

    outputs = len(program.graph_signature.user_outputs)
    if outputs not in _OUTPUT_NAMES:
        raise ValueError(f"program must return logits, or logits and paths, but it returns {outputs} outputs")
    onnx_program = torch.onnx.export(
        program, dynamo=True, input_names=["images"], output_names=_OUTPUT_NAMES[outputs], verbose=False
    )
    model = onnx_program.model_proto
    _place_weights(model.graph)
    onnx.save(model, os.fspath(path))


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names that nodes of ``graph`` or of graphs inside it read from an enclosing graph."""
    import onnx

    defined = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    defined |= {name for node in graph.node for name in node.output}
    read = set()
    for node in graph.node:
        read.update(name for name in node.input if name)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                read |= _outer_names(attribute.g)
    return read - defined


def _place_weights(graph: onnx.GraphProto) -> tuple[int, int]:
    """Move each initializer of ``graph`` that exactly one subgraph (one branch of one node) reads, and nothing
    else, into that subgraph, and drop each one that nothing reads; return how many moved and how many dropped."""
    import onnx

    readers: dict[str, list[onnx.GraphProto | None]] = defaultdict(list)  # None: the graph itself
    for node in graph.node:
        for name in node.input:
            readers[name].append(None)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                for name in _outer_names(attribute.g):
                    readers[name].append(attribute.g)
    for value in [*graph.output, *graph.input]:
        readers[value.name].append(None)
    moved = dropped = 0
    for index in reversed(range(len(graph.initializer))):
        initializer = graph.initializer[index]
        owners = readers.get(initializer.name, [])
        if owners and (len(owners) > 1 or owners[0] is None):
            continue  # read by the graph itself or by several branches: it stays
        if owners:
            owners[0].initializer.append(initializer)
            moved += 1
        else:
            dropped += 1
        del graph.initializer[index]
    return moved, dropped
