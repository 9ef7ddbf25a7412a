"""CoDiNet's path terms (Wang et al., TPAMI 2021): consistency (Eq. 8) and diversity (Eq. 9).

Paths are laid out sample-major: a batch of L samples with M augmented views each is a tensor of
shape (L * M, n_blocks) whose rows ``i * M .. i * M + M - 1`` are the views of sample i, as
:func:`dynroute.routing_paths` returns them for a batch built that way. The one way to build such
a batch is :class:`dynroute.MultiViewTransform` as the dataset's transform and
:func:`dynroute.multiview_collate` as the loader's ``collate_fn``. A view-major batch
(``torch.cat([view1, view2])``: all first views, then all second views) has the same shape and
cannot be told apart from the paths: the losses would group the views of different images, so
consistency pulls the paths of different images together and diversity pushes the views of one
image apart, without an error.
"""

import torch
from torch import Tensor, nn

from dynroute._validation import check_num_views
from dynroute.losses._common import (
    check_consistency_views,
    check_margin,
    check_paths,
    check_reduction,
    in_float32,
    reduce,
)

__all__ = ["consistency_loss", "diversity_loss", "ConsistencyLoss", "DiversityLoss"]


def _safe_norm(difference: Tensor) -> Tensor:
    """Euclidean norm over the last dim, with gradient 0 (not NaN) where the norm is 0."""
    squared = difference.pow(2).sum(-1)
    positive = squared > 0
    return torch.where(positive, squared.where(positive, torch.ones_like(squared)).sqrt(), torch.zeros_like(squared))


def _centres(paths: Tensor, num_views: int) -> Tensor:
    """(L * M, n) -> (L, n) mean path of each sample's views."""
    return paths.unflatten(0, (-1, num_views)).mean(1)


@in_float32
def consistency_loss(paths: Tensor, num_views: int, margin: float = 0.2, reduction: str = "mean") -> Tensor:
    """Eq. 8: ``[ ||r_ij - c_i||_2 - m_c ]_+^2`` averaged over the L * M views.

    ``paths`` must be sample-major, from a batch built with :class:`dynroute.MultiViewTransform` and
    :func:`dynroute.multiview_collate`. A view-major batch (``torch.cat([view1, view2])``) is not
    detected: its rows would be grouped across images, and the loss would pull the paths of
    different images together.

    Args:
        paths: relaxed paths (L * M, n_blocks), sample-major.
        num_views: M, the views per sample; at least 2, else a ValueError (one view has no other view
            to agree with: leave the term out, as :class:`~dynroute.CoDiNetLoss` does).
        margin: m_c.
        reduction: ``"mean"`` (Eq. 8), ``"sum"``, or ``"none"`` for a (L * M,) tensor.
    """
    check_consistency_views(num_views)
    check_paths(paths, num_views)
    check_margin(margin)
    views = paths.unflatten(0, (-1, num_views))
    distance = _safe_norm(views - views.mean(1, keepdim=True)).flatten()
    return reduce((distance - margin).clamp_min(0).pow(2), reduction)


@in_float32
def diversity_loss(paths: Tensor, num_views: int, margin: float = 0.5, reduction: str = "mean") -> Tensor:
    """Eq. 9: ``[ m_d - ||c_i - c_j||_2 ]_+^2`` averaged over the L (L - 1) ordered pairs i != j.

    ``paths`` must be sample-major, from a batch built with :class:`dynroute.MultiViewTransform` and
    :func:`dynroute.multiview_collate`. A view-major batch (``torch.cat([view1, view2])``) is not
    detected: its centres would mix different images, and the loss would push the views of one
    image apart.

    Args:
        paths: relaxed paths (L * M, n_blocks), sample-major; centres c_i are the means over views.
        num_views: M, the views per sample (1 is fine: then c_i is the path itself). Required, as in
            :func:`consistency_loss`: M views of one image taken for M images would be pushed apart.
        margin: m_d.
        reduction: ``"mean"`` (Eq. 9), ``"sum"``, or ``"none"`` for the (L, L) matrix with a zero diagonal.
    """
    check_paths(paths, num_views)
    check_margin(margin)
    centres = _centres(paths, num_views)
    if centres.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 samples in the batch, but got {centres.shape[0]}")
    distance = _safe_norm(centres.unsqueeze(1) - centres.unsqueeze(0))
    penalty = (margin - distance).clamp_min(0).pow(2)
    penalty = penalty * (1 - torch.eye(centres.shape[0], dtype=penalty.dtype, device=penalty.device))
    if reduction == "mean":
        return penalty.sum() / (centres.shape[0] * (centres.shape[0] - 1))
    return reduce(penalty, reduction)


class ConsistencyLoss(nn.Module):
    """Eq. 8 as a module; see :func:`consistency_loss`. ``num_views`` must be at least 2.

    The paths must be sample-major (:class:`dynroute.MultiViewTransform` +
    :func:`dynroute.multiview_collate`); a view-major batch (``torch.cat([view1, view2])``) is not
    detected and pulls the paths of different images together.

    Example:
        >>> loss = ConsistencyLoss(num_views=2)
        >>> loss(torch.rand(8, 5))
    """

    def __init__(self, num_views: int, margin: float = 0.2, reduction: str = "mean") -> None:
        super().__init__()
        check_consistency_views(num_views)
        check_margin(margin)
        check_reduction(reduction)
        self.num_views, self.margin, self.reduction = num_views, margin, reduction

    def forward(self, paths: Tensor) -> Tensor:
        return consistency_loss(paths, self.num_views, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"num_views={self.num_views}, margin={self.margin}, reduction={self.reduction!r}"


class DiversityLoss(nn.Module):
    """Eq. 9 as a module; see :func:`diversity_loss`.

    The paths must be sample-major (:class:`dynroute.MultiViewTransform` +
    :func:`dynroute.multiview_collate`); a view-major batch (``torch.cat([view1, view2])``) is not
    detected and pushes the views of one image apart.
    """

    def __init__(self, num_views: int, margin: float = 0.5, reduction: str = "mean") -> None:
        super().__init__()
        check_num_views(num_views)
        check_margin(margin)
        check_reduction(reduction)
        self.num_views, self.margin, self.reduction = num_views, margin, reduction

    def forward(self, paths: Tensor) -> Tensor:
        return diversity_loss(paths, self.num_views, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"num_views={self.num_views}, margin={self.margin}, reduction={self.reduction!r}"
