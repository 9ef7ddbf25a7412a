"""What a routed forward actually computed: per-sample MACs and distinct paths."""

import torch
from torch import Tensor, nn

from dynroute.conversion.flops import MacsTable, macs_table
from dynroute.layers.routing import gated_blocks, routing_paths

__all__ = ["hard_paths", "sample_macs", "macs_fraction", "count_distinct_paths", "forward_macs"]


def hard_paths(paths: Tensor) -> Tensor:
    """0/1 decisions (N, n_blocks) of paths; a block runs where its gate is >= 0.5."""
    return (paths.detach() >= 0.5).to(torch.uint8)


def sample_macs(paths: Tensor, table: MacsTable) -> Tensor:
    """MACs each sample paid (N,), float64: always-paid part, routers, and the blocks it ran."""
    if paths.dim() != 2 or paths.shape[1] != table.num_blocks:
        raise ValueError(
            f"paths must have shape (N, {table.num_blocks}) for this table, but got {tuple(paths.shape)}; "
            "use the table of the model that produced the paths"
        )
    block_macs = torch.tensor(table.block_macs, dtype=torch.float64, device=paths.device)
    return table.fixed_macs + hard_paths(paths).double() @ block_macs


def macs_fraction(paths: Tensor, table: MacsTable) -> float:
    """Mean MACs over the batch as a fraction of the dense network's."""
    return sample_macs(paths, table).mean().item() / table.dense_macs


def count_distinct_paths(paths: Tensor) -> int:
    """Number of distinct hard paths among the rows of ``paths`` (N, n_blocks)."""
    return torch.unique(hard_paths(paths), dim=0).shape[0]


def table_mismatch(model: nn.Module, table: MacsTable) -> str | None:
    """Why ``table`` does not fit ``model``'s last forward, naming the fix; None if every block ran at its size.

    A MAC table holds for one input size: a block's MACs grow with its input's area, so a table
    measured at another size than the last forward's (train at 224, test at 256) would count wrongly.
    """
    for (name, block), measured in zip(gated_blocks(model), table.block_input_shapes):
        seen = tuple(block.last_input_shape[1:])
        if seen != tuple(measured):
            return (
                f"block {name!r} ran on inputs of shape {seen}, but the MAC table was measured at input_size "
                f"{tuple(table.input_size)}, where it sees {tuple(measured)}; MACs depend on the input size, so "
                "measure a table at yours, table = dynroute.build_macs_table(model, (C, H, W)), and pass table=table"
            )
    return None


def forward_macs(model: nn.Module, table: MacsTable | None = None) -> Tensor:
    """MACs each sample of ``model``'s last forward paid (N,), float64, at the input size that forward had.

    A MAC table holds for one input size: a block's MACs grow with its input's area. If the last
    forward ran at another size than the table's (train at 224, test at 256), this raises rather
    than count wrongly; measure a table at that size once with :func:`dynroute.build_macs_table`.

    Args:
        model: a converted model (or its DDP / ``torch.compile`` wrapper) after a forward.
        table: the MAC table to count with; default :func:`dynroute.macs_table` (model).
    """
    table = macs_table(model) if table is None else table
    paths = routing_paths(model)
    mismatch = table_mismatch(model, table)
    if mismatch is not None:
        raise ValueError(mismatch)
    return sample_macs(paths, table)
