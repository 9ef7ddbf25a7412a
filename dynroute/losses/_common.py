"""Checks and helpers the path and cost losses share: float32 outside autocast, path validation, reductions."""

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from dynroute._validation import check_num_views, check_target

REDUCTIONS = ("mean", "sum", "none")


def in_float32(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
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


def check_paths(paths: Tensor, num_views: int | None = None) -> None:
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
                "L samples x M views (dynroute.MultiViewTransform + dynroute.multiview_collate do) and pass num_views=M"
            )
    if not torch.compiler.is_compiling():
        finite = torch.isfinite(paths).all()
        in_range = ((paths >= 0) & (paths <= 1)).all()
        if not bool(finite & in_range):
            raise ValueError(
                "paths must be finite gate values in [0, 1], but got "
                f"{'NaN or inf' if not bool(finite) else 'values outside [0, 1]'}; pass gates, not router logits"
            )


def check_margin(margin: float) -> None:
    if not 0.0 <= margin < math.inf:  # NaN fails too
        raise ValueError(f"margin must be a finite distance >= 0, but got {margin!r}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, but got {reduction!r}")


def check_cost_target(target: float | None, reduction: str, fixed_cost: float) -> None:
    if target is None:
        return
    check_target(target, fixed_cost)
    if reduction != "mean":
        raise ValueError(
            f"a target budget constrains the batch mean, so reduction must be 'mean', but got {reduction!r}"
        )


def check_consistency_views(num_views: int) -> None:
    check_num_views(num_views)
    if num_views < 2:
        raise ValueError(
            f"consistency needs at least 2 views per sample, but got num_views={num_views}; build M >= 2 views "
            "with dynroute.MultiViewTransform or leave the consistency term out"
        )


def reduce(values: Tensor, reduction: str) -> Tensor:
    check_reduction(reduction)
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values
