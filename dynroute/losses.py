"""CoDiNet's path losses (Wang et al., TPAMI 2021): consistency (Eq. 8), diversity (Eq. 9), cost (Eq. 11).

Paths are laid out sample-major: a batch of L samples with M augmented views each is a tensor of
shape (L * M, n_blocks) whose rows ``i * M .. i * M + M - 1`` are the views of sample i, as
:func:`dynroute.routing_paths` returns them for a batch built that way.
"""

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dynroute.flops import MacsTable, check_table

__all__ = [
    "consistency_loss",
    "diversity_loss",
    "cost_loss",
    "path_costs",
    "ConsistencyLoss",
    "DiversityLoss",
    "CostLoss",
]

_REDUCTIONS = ("mean", "sum", "none")


def _in_float32(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``loss(paths, ...)`` outside autocast with paths in at least float32.

    Under ``torch.autocast`` a matmul would otherwise run in bfloat16 and round the loss; float64
    paths (``torch.autograd.gradcheck``) stay float64.
    """

    @functools.wraps(loss)
    def wrapper(paths: Tensor, *args, **kwargs) -> Tensor:
        if not isinstance(paths, Tensor):
            return loss(paths, *args, **kwargs)  # let the loss name the bad value
        if paths.is_floating_point():
            paths = paths.to(torch.promote_types(paths.dtype, torch.float32))
        with torch.autocast(paths.device.type, enabled=False):
            return loss(paths, *args, **kwargs)

    return wrapper


def _check_paths(paths: Tensor, num_views: int | None = None) -> None:
    """Raise a ValueError naming the fix unless ``paths`` are (N, n_blocks) gates of L samples x ``num_views``."""
    if not isinstance(paths, Tensor) or paths.dim() != 2:
        shape = tuple(paths.shape) if isinstance(paths, Tensor) else type(paths).__name__
        raise ValueError(
            f"paths must be a (batch, n_blocks) tensor, but got {shape}; use dynroute.routing_paths(model)"
        )
    if not paths.is_floating_point():
        raise ValueError(f"paths must be floating point, but got {paths.dtype}; use paths.float()")
    if paths.shape[0] == 0:
        raise ValueError("paths hold an empty batch; the losses need at least one sample")
    if paths.shape[1] == 0:
        raise ValueError("paths have no blocks (shape (N, 0)); the model needs gated blocks (dynroute.convert_resnet)")
    if num_views is not None:
        check_num_views(num_views)
        if paths.shape[0] % num_views:
            raise ValueError(
                f"a batch of {paths.shape[0]} paths does not split into views of {num_views}; lay the batch out as "
                "L samples x M views (dynroute.data does) and pass num_views=M"
            )
    if not torch.compiler.is_compiling():
        finite = torch.isfinite(paths).all()
        in_range = ((paths >= 0) & (paths <= 1)).all()
        if not bool(finite & in_range):
            raise ValueError(
                "paths must be finite gate values in [0, 1], but got "
                f"{'NaN or inf' if not bool(finite) else 'values outside [0, 1]'}; pass gates, not router logits"
            )


def check_num_views(num_views: int) -> None:
    """Raise a ValueError unless ``num_views`` (M, the views per sample) is a positive int (not a bool)."""
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be a positive int (M, the views per sample), but got {num_views!r}")


def _check_margin(margin: float) -> None:
    if not 0.0 <= margin < math.inf:  # NaN fails too
        raise ValueError(f"margin must be a finite distance >= 0, but got {margin!r}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, but got {reduction!r}")


def check_target(target: float, fixed_cost: float) -> None:
    """Raise a ValueError unless ``target`` is a fraction of dense MACs in (``fixed_cost``, 1].

    ``fixed_cost`` is the always-paid fraction (stem, shortcuts, head, routers): no path costs less.
    """
    if not fixed_cost < target <= 1.0 + 1e-6:  # NaN fails too
        floor = f"{fixed_cost:.3f}" if fixed_cost else "0"
        reason = f"; a network that skips every block still costs {floor} of dense" if fixed_cost else ""
        raise ValueError(f"target must be a fraction of dense MACs in ({floor}, 1], but got {target}{reason}")


def _check_cost_target(target: float | None, reduction: str, fixed_cost: float) -> None:
    if target is None:
        return
    check_target(target, fixed_cost)
    if reduction != "mean":
        raise ValueError(
            f"a target budget constrains the batch mean, so reduction must be 'mean', but got {reduction!r}"
        )


def _check_consistency_views(num_views: int) -> None:
    check_num_views(num_views)
    if num_views < 2:
        raise ValueError(
            f"consistency needs at least 2 views per sample, but got num_views={num_views}; build M >= 2 views "
            "with dynroute.data.MultiViewTransform or leave the consistency term out"
        )


def _reduce(values: Tensor, reduction: str) -> Tensor:
    _check_reduction(reduction)
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values


def _safe_norm(difference: Tensor) -> Tensor:
    """Euclidean norm over the last dim, with gradient 0 (not NaN) where the norm is 0."""
    squared = difference.pow(2).sum(-1)
    positive = squared > 0
    return torch.where(positive, squared.where(positive, torch.ones_like(squared)).sqrt(), torch.zeros_like(squared))


def _centres(paths: Tensor, num_views: int) -> Tensor:
    """(L * M, n) -> (L, n) mean path of each sample's views."""
    return paths.unflatten(0, (-1, num_views)).mean(1)


@_in_float32
def consistency_loss(paths: Tensor, num_views: int, margin: float = 0.2, reduction: str = "mean") -> Tensor:
    """Eq. 8: ``[ ||r_ij - c_i||_2 - m_c ]_+^2`` averaged over the L * M views.

    Args:
        paths: relaxed paths (L * M, n_blocks), sample-major.
        num_views: M, the views per sample; at least 2, else a ValueError (one view has no other view
            to agree with: leave the term out, as :class:`~dynroute.CoDiNetLoss` does).
        margin: m_c.
        reduction: ``"mean"`` (Eq. 8), ``"sum"``, or ``"none"`` for a (L * M,) tensor.
    """
    _check_consistency_views(num_views)
    _check_paths(paths, num_views)
    _check_margin(margin)
    views = paths.unflatten(0, (-1, num_views))
    distance = _safe_norm(views - views.mean(1, keepdim=True)).flatten()
    return _reduce((distance - margin).clamp_min(0).pow(2), reduction)


@_in_float32
def diversity_loss(paths: Tensor, num_views: int, margin: float = 0.5, reduction: str = "mean") -> Tensor:
    """Eq. 9: ``[ m_d - ||c_i - c_j||_2 ]_+^2`` averaged over the L (L - 1) ordered pairs i != j.

    Args:
        paths: relaxed paths (L * M, n_blocks), sample-major; centres c_i are the means over views.
        num_views: M, the views per sample (1 is fine: then c_i is the path itself). Required, as in
            :func:`consistency_loss`: M views of one image taken for M images would be pushed apart.
        margin: m_d.
        reduction: ``"mean"`` (Eq. 9), ``"sum"``, or ``"none"`` for the (L, L) matrix with a zero diagonal.
    """
    _check_paths(paths, num_views)
    _check_margin(margin)
    centres = _centres(paths, num_views)
    if centres.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 samples in the batch, but got {centres.shape[0]}")
    distance = _safe_norm(centres.unsqueeze(1) - centres.unsqueeze(0))
    penalty = (margin - distance).clamp_min(0).pow(2)
    penalty = penalty * (1 - torch.eye(centres.shape[0], dtype=penalty.dtype, device=penalty.device))
    if reduction == "mean":
        return penalty.sum() / (centres.shape[0] * (centres.shape[0] - 1))
    return _reduce(penalty, reduction)


@_in_float32
def path_costs(paths: Tensor, block_costs: Tensor, fixed_cost: float = 0.0) -> Tensor:
    """Per-sample cost ``fixed_cost + sum_k c_k v_k`` of Eq. 11, shape (N,)."""
    _check_paths(paths)
    if paths.shape[1] != block_costs.shape[0]:
        raise ValueError(
            f"paths have {paths.shape[1]} blocks but the cost table has {block_costs.shape[0]}; "
            "use the table of the model that produced the paths (dynroute.macs_table(model))"
        )
    return fixed_cost + paths @ block_costs.to(device=paths.device, dtype=paths.dtype)


@_in_float32
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
        return _reduce(costs, reduction)
    _check_cost_target(target, reduction, fixed_cost)
    return (costs.mean() - target).pow(2)


class ConsistencyLoss(nn.Module):
    """Eq. 8 as a module; see :func:`consistency_loss`. ``num_views`` must be at least 2.

    Example:
        >>> loss = ConsistencyLoss(num_views=2)
        >>> loss(torch.rand(8, 5))
    """

    def __init__(self, num_views: int, margin: float = 0.2, reduction: str = "mean") -> None:
        super().__init__()
        _check_consistency_views(num_views)
        _check_margin(margin)
        _check_reduction(reduction)
        self.num_views, self.margin, self.reduction = num_views, margin, reduction

    def forward(self, paths: Tensor) -> Tensor:
        return consistency_loss(paths, self.num_views, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"num_views={self.num_views}, margin={self.margin}, reduction={self.reduction!r}"


class DiversityLoss(nn.Module):
    """Eq. 9 as a module; see :func:`diversity_loss`."""

    def __init__(self, num_views: int, margin: float = 0.5, reduction: str = "mean") -> None:
        super().__init__()
        check_num_views(num_views)
        _check_margin(margin)
        _check_reduction(reduction)
        self.num_views, self.margin, self.reduction = num_views, margin, reduction

    def forward(self, paths: Tensor) -> Tensor:
        return diversity_loss(paths, self.num_views, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"num_views={self.num_views}, margin={self.margin}, reduction={self.reduction!r}"


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
        _check_reduction(reduction)
        _check_cost_target(target, reduction, table.fixed_cost())
        self.register_buffer("block_costs", table.block_costs(), persistent=False)
        self.fixed_cost = table.fixed_cost()
        self.target, self.reduction = target, reduction

    def forward(self, paths: Tensor) -> Tensor:
        return cost_loss(paths, self.block_costs, self.fixed_cost, self.target, self.reduction)

    def extra_repr(self) -> str:
        return f"n_blocks={self.block_costs.numel()}, fixed_cost={self.fixed_cost:.4f}, target={self.target}"
