"""Checks of user input that several modules make, each raising an error that names the fix."""

import operator
from collections.abc import Iterable

from torch import Tensor


def check_image_batch(x: Tensor, receiver: str) -> None:
    """Raise a ValueError naming the fix unless x is a non-empty (N, C, H, W) batch."""
    if x.dim() != 4:
        raise ValueError(
            f"{receiver} expects a batched 4D input (N, C, H, W), but got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0)"
        )
    if x.shape[0] == 0:
        raise ValueError(
            f"{receiver} got an empty batch of shape {tuple(x.shape)}; skip empty batches before the model "
            "(a DataLoader with drop_last=True never yields one)"
        )


def check_num_views(num_views: int) -> None:
    """Raise a ValueError unless ``num_views`` (M, the views per sample) is a positive int (not a bool)."""
    if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be a positive int (M, the views per sample), but got {num_views!r}")


def check_target(target: float, fixed_cost: float) -> None:
    """Raise a ValueError unless ``target`` is a fraction of dense MACs in (``fixed_cost``, 1].

    ``fixed_cost`` is the always-paid fraction (stem, shortcuts, head, routers): no path costs less.
    """
    if not fixed_cost < target <= 1.0 + 1e-6:  # NaN fails too
        floor = f"{fixed_cost:.3f}" if fixed_cost else "0"
        reason = f"; a network that skips every block still costs {floor} of dense" if fixed_cost else ""
        raise ValueError(f"target must be a fraction of dense MACs in ({floor}, 1], but got {target}{reason}")


def positive_int(size: object) -> int | None:
    """``size`` as an int if it is a positive integer of any kind (numpy, 0-d tensor) but a bool, else None."""
    if isinstance(size, bool):
        return None
    try:
        value = operator.index(size)
    except TypeError:
        return None
    return value if value > 0 else None


def check_input_size(input_size: object) -> tuple[int, int, int]:
    """``input_size`` as a tuple of ints; a ValueError naming the fix unless it is (C, H, W) of three positive ints."""
    items = list(input_size) if isinstance(input_size, Iterable) and not isinstance(input_size, str) else []
    sizes = tuple(positive_int(size) for size in items)
    if len(sizes) != 3 or None in sizes:
        raise ValueError(
            f"input_size must be (C, H, W) of positive ints, but got {input_size!r}; give the channels, height "
            "and width of one image, channels first, e.g. input_size=(3, 32, 32)"
        )
    return sizes
