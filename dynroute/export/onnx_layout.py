"""ONNX Runtime's CPU model of a graph that skips, with its blocked layout carried across the ``If`` nodes.

On x86 CPUs ONNX Runtime's optimiser rewrites convolutions into the blocked NCHWc layout (channels in
blocks of 8 or 16, by instruction set), with the bias, the residual sum and the activation fused in.
It optimises each ``If`` branch as a graph of its own, so every branch that runs converts its input
to NCHWc and its output back, and adds the shortcut and applies the activation in separate NCHW
passes. :func:`optimize_onnx` saves ONNX Runtime's optimised model and then lets NCHWc tensors cross
the ``If`` boundaries: each branch reads its block input as it is, fuses ``relu(shortcut + F(x))``
into its last convolution, and returns NCHWc; the routers pool the NCHWc tensors directly. A tensor
is converted back to NCHW only where a node that needs NCHW reads it.

The block size depends on the CPU, so the optimised model is for CPUs of the kind it was made on:
make it on the serving machine and load it with optimisations off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

__all__ = ["optimize_onnx"]

_NCHWC = "com.microsoft.nchwc"
_LARGEST_BLOCK = 16  # channels per NCHWc block: 8 (AVX2) or 16 (AVX-512)


def optimize_onnx(path: str | os.PathLike, optimized_path: str | os.PathLike) -> None:
    """Save ONNX Runtime's CPU optimisation of the ONNX model at ``path`` (from :func:`dynroute.export_onnx`) to
    ``optimized_path``, with NCHWc tensors carried across the ``If`` nodes of a graph that skips.

    A dense or masked model gets ONNX Runtime's own optimisation. The saved model holds ONNX Runtime's
    contrib operators and the block size of this CPU: make it on the serving machine (at start-up, say),
    and load it with optimisations off, which is also faster to load.

    Args:
        path: an ONNX model whose input is a batch (N, C, H, W) of images.
        optimized_path: the ``.onnx`` file to write.

    Example:
        >>> dynroute.optimize_onnx("routed.onnx", "routed.cpu.onnx")
        >>> options = onnxruntime.SessionOptions()
        >>> options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        >>> session = onnxruntime.InferenceSession("routed.cpu.onnx", options, providers=["CPUExecutionProvider"])
    """
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = os.fspath(optimized_path)
    options.log_severity_level = 3  # ORT warns that the saved model is for this CPU, which is what we want
    onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(os.fspath(optimized_path))
    _scope_branch_names(model.graph)
    _carry_nchwc(model.graph)
    onnx.save(model, os.fspath(optimized_path))


@dataclass
class _Layout:
    """The NCHWc twin of each NCHW tensor of the main graph that has one, and the shapes ONNX Runtime inferred."""

    twins: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _carry_nchwc(graph: onnx.GraphProto) -> int:
    """Rewrite ONNX Runtime's optimised ``graph`` in place so that NCHWc tensors cross its ``If`` nodes; return how
    many ``If`` nodes now return NCHWc.

    Main-graph conversions ``ReorderOutput`` (NCHWc -> NCHW) give their tensors NCHWc twins; an ``If`` whose
    branches can return the twin of their output (:func:`_branch_to_nchwc`) does so, and its NCHW output gets a
    twin too. Readers of a tensor with a twin read the twin where they can (conversions back to NCHWc, global
    average pooling); conversions nothing reads any more are removed.
    """
    layout = _Layout(shapes=_shapes(graph))
    for node in graph.node:
        if _is_reorder(node, "ReorderOutput") and _attribute(node, "channels") % _LARGEST_BLOCK == 0:
            twin = f"{node.output[0]}_nchwc"
            _rename_output(graph, node.input[0], twin)
            layout.twins[node.output[0]] = twin
    nodes, carried = [], 0
    for node in graph.node:
        if _is_reorder(node, "ReorderInput") and node.input[0] in layout.twins:
            _rename_input(graph, node.output[0], layout.twins[node.input[0]])
        elif node.op_type == "ReduceMean" and node.input[0] in layout.twins and _pools_space(graph, node):
            nodes += _global_pool(node, layout.twins[node.input[0]])
        elif node.op_type == "If" and _if_to_nchwc(node, layout):
            y = node.output[0]
            channels = layout.shapes[y][1]
            node.output[0] = layout.twins[y] = f"{y}_nchwc"
            nodes += [node, _reorder_output(layout.twins[y], y, channels)]
            carried += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _remove_unread(graph)
    return carried


def _scope_branch_names(graph: onnx.GraphProto) -> None:
    """Prefix every name a subgraph of ``graph`` defines with its node and attribute, at every depth.

    ONNX Runtime names the values it makes ``reorder_token_<n>`` in every graph, so its saved model can define in
    a branch a name the main graph defines too, which its loader refuses (names must be assigned once).
    """
    import onnx

    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type != onnx.AttributeProto.GRAPH:
                continue
            branch = attribute.g
            defined = [name for child in branch.node for name in child.output if name]
            defined += [tensor.name for tensor in branch.initializer] + [value.name for value in branch.input]
            for name in defined:
                scoped = f"{node.name}.{attribute.name}/{name}"
                for child in branch.node:
                    child.output[:] = [scoped if output == name else output for output in child.output]
                for value in [*branch.initializer, *branch.input, *branch.value_info]:
                    if value.name == name:
                        value.name = scoped
                _rename_input(branch, name, scoped)
            _scope_branch_names(branch)


def _if_to_nchwc(node: onnx.NodeProto, layout: _Layout) -> bool:
    """Make both branches of ``node`` return NCHWc if both can (else leave them as they are); whether they do."""
    import onnx

    branches = [attribute.g for attribute in node.attribute if attribute.type == onnx.AttributeProto.GRAPH]
    rewritten = [_branch_to_nchwc(branch, layout) for branch in branches]
    shape = layout.shapes.get(node.output[0])
    if shape is None or len(shape) != 4 or shape[1] % _LARGEST_BLOCK or any(branch is None for branch in rewritten):
        return False
    for branch, new in zip(branches, rewritten):
        branch.CopyFrom(new)
    return True


def _branch_to_nchwc(branch: onnx.GraphProto, layout: _Layout) -> onnx.GraphProto | None:
    """A copy of ``branch`` that returns the NCHWc twin of its output, or None if it has none of these two forms:

    - the skipped block, ``relu(s)`` of a tensor s with a twin: the same on the twin;
    - the routed block, ``relu(s + ReorderOutput(conv(...)))`` with s a tensor with a twin and conv an NCHWc
      convolution without activation: the convolution with s's twin as its sum input and a ReLU, its NCHWc
      inputs read as they are (``ReorderInput`` of a tensor with a twin is its twin).
    """
    import onnx

    branch = _copy(branch)
    producers = {name: node for node in branch.node for name in node.output}
    output = producers.get(branch.output[0].name)
    if output is None or output.op_type != "Relu" or len(branch.output) != 1:
        return None
    if len(branch.node) == 1:
        if output.input[0] not in layout.twins:
            return None
        output.input[0] = layout.twins[output.input[0]]
        return branch
    add = producers.get(output.input[0])
    if add is None or add.op_type != "Add" or _readers(branch, add.output[0]) != 1:
        return None
    local = [name for name in add.input if name in producers and _is_reorder(producers[name], "ReorderOutput")]
    outer = [name for name in add.input if name not in producers]
    if len(local) != 1 or len(outer) != 1 or outer[0] not in layout.twins or _readers(branch, local[0]) != 1:
        return None
    if layout.shapes.get(outer[0]) != _shape(branch.output[0]):
        return None  # the sum input of a convolution must have its output's shape, without broadcasting
    conv = producers.get(producers[local[0]].input[0])
    if conv is None or not _is_nchwc_conv(conv) or _readers(branch, conv.output[0]) != 1:
        return None
    conv.input.extend([""] * (3 - len(conv.input)) + [layout.twins[outer[0]]])
    conv.attribute.append(onnx.helper.make_attribute("activation", "Relu"))
    conv.output[0] = output.output[0]
    nodes = []
    for node in branch.node:
        if _is_reorder(node, "ReorderInput") and node.input[0] in layout.twins:
            _rename_input(branch, node.output[0], layout.twins[node.input[0]])
        elif node not in (output, add, producers[local[0]]):
            nodes.append(node)
    del branch.node[:]
    branch.node.extend(nodes)
    return branch


def _global_pool(node: onnx.NodeProto, twin: str) -> list[onnx.NodeProto]:
    """NCHWc global average pooling of ``twin`` in place of ``ReduceMean`` ``node`` over (H, W).

    Its (N, C, 1, 1) output has the same memory order in NCHWc as in NCHW, so it needs no conversion.
    """
    from onnx import helper

    if _attribute(node, "keepdims", 1):
        return [helper.make_node("GlobalAveragePool", [twin], [node.output[0]], domain=_NCHWC)]
    pooled = f"{node.output[0]}_pooled"
    return [
        helper.make_node("GlobalAveragePool", [twin], [pooled], domain=_NCHWC),
        helper.make_node("Flatten", [pooled], [node.output[0]], axis=1),
    ]


def _reorder_output(nchwc: str, nchw: str, channels: int) -> onnx.NodeProto:
    """The NCHWc -> NCHW conversion of ``nchwc`` (N, channels, H, W) into ``nchw``."""
    from onnx import helper

    return helper.make_node("ReorderOutput", [nchwc], [nchw], domain=_NCHWC, channels=channels, channels_last=0)


def _pools_space(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """Whether ``ReduceMean`` ``node`` averages a 4-D tensor over its two spatial dimensions, and nothing else."""
    from onnx import numpy_helper

    axes = {tensor.name: tensor for tensor in graph.initializer}.get(node.input[1]) if len(node.input) > 1 else None
    values = numpy_helper.to_array(axes).tolist() if axes is not None else _attribute(node, "axes", [])
    return sorted(axis % 4 for axis in values) == [2, 3]


def _is_reorder(node: onnx.NodeProto, op_type: str) -> bool:
    """Whether ``node`` is ONNX Runtime's NCHW <-> NCHWc conversion ``op_type`` (not to channels-last)."""
    return node.domain == _NCHWC and node.op_type == op_type and not _attribute(node, "channels_last", 0)


def _is_nchwc_conv(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is an NCHWc convolution with neither a sum input nor an activation yet."""
    return (
        node.domain == _NCHWC and node.op_type == "Conv" and len(node.input) <= 3 and not _attribute(node, "activation")
    )


def _attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of ``node``'s attribute ``name``, or ``default``."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _shape(value: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The static shape of ``value``, or None if a dimension is not a number."""
    dims = value.type.tensor_type.shape.dim
    return tuple(dim.dim_value for dim in dims) if all(dim.HasField("dim_value") for dim in dims) else None


def _shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """The static shapes of the main graph's values that ONNX Runtime's saved model records."""
    values = [*graph.input, *graph.value_info, *graph.output]
    return {value.name: shape for value in values if (shape := _shape(value)) is not None}


def _copy(graph: onnx.GraphProto) -> onnx.GraphProto:
    """A deep copy of ``graph``."""
    import onnx

    copied = onnx.GraphProto()
    copied.CopyFrom(graph)
    return copied


def _defines(graph: onnx.GraphProto, name: str) -> bool:
    """Whether a node, input or initializer of ``graph`` itself defines ``name`` (a branch may shadow outer names)."""
    return any(name in node.output for node in graph.node) or name in {
        v.name for v in [*graph.input, *graph.initializer]
    }


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make every reader of ``old`` in ``graph`` and in its subgraphs that do not define ``old`` read ``new``."""
    import onnx

    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH and not _defines(attribute.g, old):
                _rename_input(attribute.g, old, new)
    for value in graph.output:
        if value.name == old:
            value.name = new


def _rename_output(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename the main-graph value ``old`` to a name no branch uses, for the node that makes it and its readers."""
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    _rename_input(graph, old, new)


def _readers(graph: onnx.GraphProto, name: str) -> int:
    """How many node inputs and outputs of ``graph`` (not of its subgraphs) are ``name``."""
    return sum(list(node.input).count(name) for node in graph.node) + sum(v.name == name for v in graph.output)


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of ``graph`` or of its subgraphs reads, and the graph's outputs."""
    import onnx

    names = {value.name for value in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= _read_names(attribute.g)
    return names


def _remove_unread(graph: onnx.GraphProto) -> None:
    """Remove the main graph's nodes and initializers that nothing reads (the conversions the rewrite bypassed)."""
    while True:
        read = _read_names(graph)
        kept = [node for node in graph.node if any(name in read for name in node.output)]
        if len(kept) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(kept)
    kept_initializers = [tensor for tensor in graph.initializer if tensor.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept_initializers)
