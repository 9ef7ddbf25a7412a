"""What a routed forward actually computed: per-sample MACs and distinct paths."""

import torch
from torch import Tensor

from dynroute.flops import MacsTable

__all__ = ["hard_paths", "sample_macs", "macs_fraction", "count_distinct_paths"]


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
