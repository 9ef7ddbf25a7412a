"""MAC table of a converted network, measured with fvcore (one multiply-add counts as one).

For each gated block: the MACs its gate saves when closed (its residual branch) and the MACs of
its router; plus the always-paid rest (stem, shortcuts, head). Measuring never changes the
user's model: fvcore traces a deep copy with every gate forced open, then closed.
"""

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

with warnings.catch_warnings():  # fvcore scripts helpers with torch.jit, which now warns of its deprecation
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import elementwise_flop_counter

from dynroute._validation import check_input_size
from dynroute.layers.routing import force_gates, gated_blocks, unwrap_model

__all__ = ["MacsTable", "count_macs", "build_macs_table", "macs_table"]

_TABLE_ATTRIBUTE = "_dynroute_macs_table"

# A router pools with ``mean`` over (H, W), which fvcore does not count; count it as fvcore counts
# adaptive_avg_pool2d, one MAC per input element. Only for routers measured alone: the network's
# own counts stay fvcore's.
_ROUTER_OP_HANDLES = {"aten::mean": elementwise_flop_counter(1, 0)}


@dataclass(frozen=True)
class MacsTable:
    """Where the MACs of one forward of a converted network go, for one input size.

    Attributes:
        input_size: (C, H, W) the table was measured at.
        block_names: dotted module names of the gated blocks, in forward order.
        block_input_shapes: (C, H, W) each gated block sees at ``input_size``.
        block_macs: MACs of each block's residual branch, saved when its gate is closed.
        router_macs: MACs of each block's router, always paid.
        base_macs: MACs paid whatever the gates say, routers excluded (stem, shortcuts, head).
    """

    input_size: tuple[int, ...]
    block_names: tuple[str, ...]
    block_input_shapes: tuple[tuple[int, ...], ...]
    block_macs: tuple[int, ...]
    router_macs: tuple[int, ...]
    base_macs: int

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def dense_macs(self) -> int:
        """MACs of the original, unconverted network."""
        return self.base_macs + sum(self.block_macs)

    @property
    def fixed_macs(self) -> int:
        """MACs of a forward that skips every block: the base plus all routers."""
        return self.base_macs + sum(self.router_macs)

    def block_costs(self) -> Tensor:
        """Each block's MACs as a fraction of dense, shape (n_blocks,), float32."""
        return torch.tensor(self.block_macs, dtype=torch.float64).div(self.dense_macs).float()

    def fixed_cost(self) -> float:
        """The always-paid MACs (base and routers) as a fraction of dense."""
        return self.fixed_macs / self.dense_macs

    def format(self) -> str:
        """A printable table: one row per gated block, then the totals."""
        totals = {
            "always paid (stem, shortcuts, head)": f"{self.base_macs:>14,}",
            "dense network": f"{self.dense_macs:>14,}",
            "every gate closed": f"{self.fixed_macs:>14,}  "
            f"({100 * self.fixed_cost():.1f}% of dense, input {tuple(self.input_size)})",
        }
        width = max(len(name) for name in (*self.block_names, *totals))
        rows = [f"{'block':<{width}}  {'MACs':>14}  {'router MACs':>11}  {'router %':>8}"]
        for name, block, router in zip(self.block_names, self.block_macs, self.router_macs):
            rows.append(f"{name:<{width}}  {block:>14,}  {router:>11,}  {100 * router / block:>7.2f}%")
        rows += [f"{label:<{width}}  {figures}" for label, figures in totals.items()]
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()


def fvcore_analysis(
    model: nn.Module, input_size: tuple[int, ...], op_handles: dict[str, Callable] | None = None
) -> FlopCountAnalysis:
    """fvcore analysis of one eval forward of a deep copy of ``model`` on a batch of one.

    ``op_handles`` maps operator names to fvcore counters, added to (or replacing) fvcore's defaults.
    """
    measured = copy.deepcopy(model).eval()
    parameter = next(measured.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    inputs = torch.zeros(1, *input_size, device=device, dtype=dtype)
    analysis = FlopCountAnalysis(measured, inputs).set_op_handle(**(op_handles or {}))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings():  # fvcore traces with torch.jit, which now warns of its deprecation
        warnings.simplefilter("ignore", FutureWarning)
        analysis.total()  # runs and caches the trace
    return analysis


def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the first ``nn.Conv2d`` of ``model`` in module order (a ResNet's stem), or None."""
    return next((module.in_channels for module in model.modules() if isinstance(module, nn.Conv2d)), None)


def _run_at(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    """One no-grad forward of a zero image of ``input_size``; a ValueError naming input_size if it fails."""
    parameter = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=parameter.device, dtype=parameter.dtype))
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        channels = first_conv_channels(model)
        if channels is not None and channels != input_size[0]:
            hint = (
                f"input_size is (C, H, W), channels first; its first convolution takes {channels}, "
                f"so pass ({channels}, H, W)"
            )
        else:
            hint = "check input_size (C, H, W), channels first, and the model's own forward"
        raise ValueError(
            f"measuring the MACs of {type(model).__name__} at input_size={input_size} failed: one image of that "
            f"size does not run through it ({type(error).__name__}: {error}); {hint}"
        ) from error


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """MACs of one image of ``input_size`` through the dense network of ``model``, measured with fvcore.

    The dense network is ``model`` itself if it is not converted; for a converted model it is the
    network it was converted from: every gate forced open, routers not counted. So a model gives the
    same count before and after :func:`dynroute.convert_resnet`, and a converted one gives
    ``macs_table(model).dense_macs`` at the table's input size. One multiply-add counts as one MAC.
    ``model`` (or its DDP / ``torch.compile`` wrapper) is not changed: fvcore traces a deep copy in
    eval mode.

    Args:
        model: any network that takes a batch of images (N, C, H, W).
        input_size: (C, H, W) of one image, channels first.

    Returns:
        The MACs of one forward of one image.

    Example:
        >>> dynroute.count_macs(torchvision.models.resnet18(), (3, 224, 224))
        1819065856
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    input_size = check_input_size(input_size)
    measured = copy.deepcopy(unwrap_model(model)).eval()
    if any(True for _ in gated_blocks(measured)):
        force_gates(measured, "open")
    _run_at(measured, input_size)
    return fvcore_analysis(measured, input_size).total()


def check_table(table: MacsTable) -> None:
    """Raise a TypeError naming the fix unless ``table`` is a :class:`MacsTable`."""
    if not isinstance(table, MacsTable):
        given = "the model itself" if isinstance(table, nn.Module) else type(table).__name__
        raise TypeError(
            f"table must be the model's MacsTable, but got {given}; pass dynroute.macs_table(model), "
            "measured by dynroute.convert_resnet"
        )


def build_macs_table(model: nn.Module, input_size: tuple[int, ...]) -> MacsTable:
    """Measure the MAC table of a converted ``model`` at ``input_size`` = (C, H, W).

    The model is not changed: fvcore traces deep copies with all gates open, then all closed,
    and each router alone on its block's input shape (a forced gate leaves the router's output
    unused, so the tracer drops it from the whole-network trace).
    """
    input_size = check_input_size(input_size)
    measured = copy.deepcopy(model).eval()
    blocks = list(gated_blocks(measured))
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no gated blocks; convert it with dynroute.convert_resnet first")
    names = [name for name, _ in blocks]
    _run_at(force_gates(measured, "open"), input_size)
    shapes = tuple(tuple(block.last_input_shape[1:]) for _, block in blocks)
    by_module_open = fvcore_analysis(measured, input_size).by_module()
    closed = fvcore_analysis(force_gates(measured, "closed"), input_size)
    by_module_closed = closed.by_module()
    router_macs = tuple(
        fvcore_analysis(block.router, shape, _ROUTER_OP_HANDLES).total() for (_, block), shape in zip(blocks, shapes)
    )
    routers_in_trace = sum(by_module_closed[f"{name}.router"] for name in names)
    return MacsTable(
        input_size=input_size,
        block_names=tuple(names),
        block_input_shapes=shapes,
        block_macs=tuple(by_module_open[name] - by_module_closed[name] for name in names),
        router_macs=router_macs,
        base_macs=closed.total() - routers_in_trace,
    )


def attach_macs_table(model: nn.Module, table: MacsTable) -> None:
    """Keep ``table`` on ``model`` so :func:`macs_table` finds it."""
    object.__setattr__(model, _TABLE_ATTRIBUTE, table)


def macs_table(model: nn.Module) -> MacsTable:
    """The MAC table :func:`dynroute.convert_resnet` measured for ``model`` (or its DDP wrapper)."""
    table = getattr(unwrap_model(model), _TABLE_ATTRIBUTE, None)
    if table is None:
        raise TypeError(
            f"{type(model).__name__} has no MAC table; convert it with dynroute.convert_resnet(model, input_size) "
            "or build one with dynroute.build_macs_table(model, input_size)"
        )
    return table
