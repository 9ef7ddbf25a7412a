"""Per-block execution-rate term, as in ConvNet-AIG (Veit and Belongie, ECCV 2018, Eq. 5).

The CoDiNet cost term constrains the mean cost of a batch, which a network can meet by dropping the
same blocks for every image: learned pruning. A target rate for each block asks each block to run for
a fraction of the images instead, so the routers must choose which images: with the consistency term
making each image's decision confident, the routing becomes per image.
"""

import torch
from torch import Tensor, nn

from dynroute.losses._common import check_paths, in_float32

__all__ = ["execution_rate_loss", "ExecutionRateLoss"]


def _check_rates(target: float | Tensor) -> None:
    values = torch.as_tensor(target, dtype=torch.float64)
    if values.dim() > 1 or not bool(((values >= 0) & (values <= 1)).all()):  # NaN fails too
        raise ValueError(f"target rates must be a fraction in [0, 1] or a (n_blocks,) tensor of them, but got {target}")


@in_float32
def execution_rate_loss(paths: Tensor, target: float | Tensor) -> Tensor:
    """``mean_k (mean_i v_ik - t_k)^2``: each block's batch execution rate against its target rate.

    Args:
        paths: relaxed paths (N, n_blocks), ``dynroute.routing_paths(model)``.
        target: t_k, one rate for every block or a (n_blocks,) tensor of them, each in [0, 1].

    Returns:
        A scalar.
    """
    check_paths(paths)
    _check_rates(target)
    target = torch.as_tensor(target, dtype=paths.dtype, device=paths.device)
    if target.dim() == 1 and target.shape[0] != paths.shape[1]:
        raise ValueError(f"paths have {paths.shape[1]} blocks but {target.shape[0]} target rates were given")
    return (paths.mean(0) - target).pow(2).mean()


class ExecutionRateLoss(nn.Module):
    """:func:`execution_rate_loss` as a module.

    Example:
        >>> rate = ExecutionRateLoss(target=0.6)
        >>> rate(torch.rand(8, 27))
    """

    def __init__(self, target: float | Tensor) -> None:
        super().__init__()
        _check_rates(target)
        self.register_buffer("target", torch.as_tensor(target, dtype=torch.float32), persistent=False)

    def forward(self, paths: Tensor) -> Tensor:
        return execution_rate_loss(paths, self.target)

    def extra_repr(self) -> str:
        return f"target={self.target.tolist()}"
