"""CoDiNet's cost term (Eq. 11) as a fraction of the dense network's MACs, from a :class:`MacsTable`."""

from torch import Tensor, nn

from dynroute.conversion.flops import MacsTable, check_table
from dynroute.losses._common import check_cost_target, check_paths, check_reduction, in_float32, reduce

__all__ = ["path_costs", "cost_loss", "CostLoss"]


@in_float32
def path_costs(paths: Tensor, block_costs: Tensor, fixed_cost: float = 0.0) -> Tensor:
    """Per-sample cost ``fixed_cost + sum_k c_k v_k`` of Eq. 11, shape (N,)."""
    check_paths(paths)
    if paths.shape[1] != block_costs.shape[0]:
        raise ValueError(
            f"paths have {paths.shape[1]} blocks but the cost table has {block_costs.shape[0]}; "
            "use the table of the model that produced the paths (dynroute.macs_table(model))"
        )
    return fixed_cost + paths @ block_costs.to(device=paths.device, dtype=paths.dtype)


@in_float32
def cost_loss(
    paths: Tensor,
    block_costs: Tensor,
    fixed_cost: float = 0.0,
    target: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Eq. 11 as a fraction of dense MACs; with ``target``, the squared gap of the batch mean to it.

    Args:
        paths: relaxed paths (N, n_blocks).
        block_costs: c_k, each block's MACs as a fraction of the dense network's, shape (n_blocks,).
        fixed_cost: the always-paid fraction (stem, shortcuts, head, routers).
        target: budget as a fraction of dense MACs in (``fixed_cost``, 1], e.g. 0.6; None to
            minimise cost.
        reduction: ``"mean"``, ``"sum"``, or ``"none"`` for (N,); must be ``"mean"`` with a target.
    """
    costs = path_costs(paths, block_costs, fixed_cost)
    if target is None:
        return reduce(costs, reduction)
    check_cost_target(target, reduction, fixed_cost)
    return (costs.mean() - target).pow(2)


class CostLoss(nn.Module):
    """Eq. 11 as a fraction of the dense network's MACs, from a model's :class:`MacsTable`.

    Without a target the loss is the expected cost of the batch (about 1.0 with every gate open),
    so the weight gamma means the same on any network. With ``target`` it is
    ``(mean cost - target)^2``, which pulls the average cost to the budget from either side; the
    target must lie in (``table.fixed_cost()``, 1], as no path costs less than the always-paid part.

    Example:
        >>> cost = CostLoss(dynroute.macs_table(model), target=0.6)
        >>> cost(dynroute.routing_paths(model))
    """

    def __init__(self, table: MacsTable, target: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        check_table(table)
        check_reduction(reduction)
        check_cost_target(target, reduction, table.fixed_cost())
        self.register_buffer("block_costs", table.block_costs(), persistent=False)
        self.fixed_cost = table.fixed_cost()
        self.target, self.reduction = target, reduction

    def forward(self, paths: Tensor) -> Tensor:
        return cost_loss(paths, self.block_costs, self.fixed_cost, self.target, self.reduction)

    def extra_repr(self) -> str:
        return f"n_blocks={self.block_costs.numel()}, fixed_cost={self.fixed_cost:.4f}, target={self.target}"
