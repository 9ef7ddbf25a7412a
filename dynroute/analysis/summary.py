"""One table of a converted network: each gated block's MACs, router MACs and execution rate."""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dynroute.analysis.metrics import RoutingRecord, collect_for_macs
from dynroute.conversion.flops import MacsTable, macs_table

__all__ = ["RoutingSummary", "summary"]


@dataclass(frozen=True)
class RoutingSummary:
    """The MAC table of a converted network and, when measured over data, how it routed.

    ``str(summary)`` is the printable table; the fields hold the same numbers as data.

    Attributes:
        table: the network's MAC table.
        execution_rates: fraction of samples that ran each block (n_blocks,), or None.
        mean_macs: mean MACs per sample over the data, or None.
        num_samples: samples measured (0 without data).
        distinct_paths: distinct hard paths over the data, or None.
        accuracy: top-1 accuracy when the data had labels, else None.
    """

    table: MacsTable
    execution_rates: Tensor | None = None
    mean_macs: float | None = None
    num_samples: int = 0
    distinct_paths: int | None = None
    accuracy: float | None = None

    @classmethod
    def from_record(cls, record: RoutingRecord) -> "RoutingSummary":
        """Summarise what :func:`dynroute.collect_routing` recorded."""
        return cls(
            table=record.table,
            execution_rates=record.execution_rate(),
            mean_macs=record.macs().mean,
            num_samples=record.num_samples,
            distinct_paths=record.distinct_paths,
            accuracy=None if record.labels is None else record.accuracy,
        )

    @property
    def macs_fraction(self) -> float | None:
        """Mean MACs per sample as a fraction of dense, or None without data."""
        return None if self.mean_macs is None else self.mean_macs / self.table.dense_macs

    def format(self) -> str:
        """The printable table: one row per gated block, then the totals."""
        table = self.table
        width = max(len("always paid (stem, shortcuts, head)"), *(len(name) for name in table.block_names))
        measured = self.execution_rates is not None
        header = f"{'block':<{width}}  {'input (C, H, W)':>15}  {'MACs':>14}  {'router MACs':>11}"
        rows = [header + (f"  {'exec rate':>9}  {'expected MACs':>14}" if measured else "")]
        for index, name in enumerate(table.block_names):
            shape = "x".join(str(size) for size in table.block_input_shapes[index])
            row = f"{name:<{width}}  {shape:>15}  {table.block_macs[index]:>14,}  {table.router_macs[index]:>11,}"
            if measured:
                rate = self.execution_rates[index].item()
                row += f"  {rate:>9.1%}  {round(rate * table.block_macs[index]):>14,}"
            rows.append(row)
        rows.append(f"{'always paid (stem, shortcuts, head)':<{width}}  {'':>15}  {table.base_macs:>14,}")
        rows.append(f"{'dense network':<{width}}  {'':>15}  {table.dense_macs:>14,}")
        rows.append(
            f"{'every gate closed':<{width}}  {'':>15}  {table.fixed_macs:>14,}  ({table.fixed_cost():.1%} of dense)"
        )
        if measured:
            facts = [f"{self.macs_fraction:.1%} of dense", f"{self.distinct_paths} distinct paths"]
            if self.accuracy is not None:
                facts.append(f"accuracy {self.accuracy:.2%}")
            rows.append(
                f"{f'routed, mean of {self.num_samples:,} samples':<{width}}  {'':>15}  {round(self.mean_macs):>14,}  "
                f"({', '.join(facts)})"
            )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.format()


def summary(
    model: nn.Module,
    loader: Iterable | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    verbose: bool = True,
    table: MacsTable | None = None,
    progress: bool | None = None,
) -> RoutingSummary:
    """Print (and return) a converted model's blocks with their MACs and, over a loader, execution rates.

    Over a loader the MACs are those of ``table``, so a batch of another input size than the
    table's raises a ValueError at that batch; for another size pass a
    table of it, ``table=dynroute.build_macs_table(model, (C, H, W))``.

    Args:
        model: a network converted with :func:`dynroute.convert_resnet`; not changed.
        loader: yields image batches or ``(images, labels, ...)``; without one only the MACs are shown.
        device: where to run; default the model's.
        max_batches: stop after this many batches.
        verbose: print the table.
        table: the MAC table of the loader's image size; default :func:`dynroute.macs_table` (model).
        progress: show a tqdm progress bar over the loader's batches; None (default) shows it when
            stderr is a terminal.

    Returns:
        The :class:`RoutingSummary`; ``str()`` of it is the table.

    Example:
        >>> dynroute.summary(model, test_loader, max_batches=10)
    """
    if loader is None:
        result = RoutingSummary(table=macs_table(model) if table is None else table)
    else:
        record = collect_for_macs(
            model, loader, device=device, max_batches=max_batches, table=table, progress=progress, desc="summary"
        )
        result = RoutingSummary.from_record(record)
    if verbose:
        print(result)
    return result
