"""Set a trained routed model to a budget: the shared decision offset that meets a cost on given images.

The cost measured on augmented training views is not the cost on clean images: padded random crops
route differently from the un-augmented images a deployed model sees. :func:`calibrate_budget` moves
every router's decision offset by one shared amount until the eval-mode cost over images you give it
(training images under the evaluation transform, say; never the test set you report on) lands on the
target. Any budget can be asked of one trained model this way, without retraining.
"""

from collections.abc import Iterable

import torch
from torch import nn

from dynroute._progress import progress_bar
from dynroute._validation import check_target
from dynroute.analysis.metrics import collect_for_macs
from dynroute.conversion.flops import MacsTable, macs_table
from dynroute.layers.routing import require_gated_blocks

__all__ = ["calibrate_budget"]


@torch.no_grad()
def calibrate_budget(
    model: nn.Module,
    loader: Iterable,
    target: float,
    *,
    at_most: bool = False,
    tolerance: float = 0.002,
    max_passes: int = 16,
    max_batches: int | None = None,
    table: MacsTable | None = None,
    progress: bool | None = None,
) -> float:
    """Move every router's decision offset by one shared shift so the eval-mode cost over ``loader`` meets ``target``.

    Bisection on the shift, each step a pass over the loader in eval mode (blocks really skipped); the
    model is left in the mode it had, with the best shift found (the trained offsets if a pass fails).
    The cost is counted with ``table``, so images of another input size than the table's raise a
    ValueError at that batch; to calibrate at another size (train at 224, test at 256), pass a table of it,
    ``table=dynroute.build_macs_table(model, (C, H, W))``.

    Args:
        model: the trained, converted network.
        loader: yields image batches or ``(images, labels, ...)`` tuples, in a fixed order.
        target: the budget, a fraction of dense MACs in (the table's fixed cost, 1].
        at_most: treat the target as a cap: keep only shifts whose cost is at or under it
            (between ``target - tolerance`` and ``target`` when the bisection gets there).
        tolerance: stop once the measured cost is this close to the target (fraction of dense).
        max_passes: most passes over the loader.
        max_batches: use only this many batches of the loader.
        table: the MAC table of the loader's image size; default :func:`dynroute.macs_table` (model).
        progress: show tqdm progress bars, one over the passes and one over each pass's batches;
            None (default) shows them when stderr is a terminal.

    Returns:
        The cost fraction measured at the shift kept: the closest to the target seen (with ``at_most``,
        the closest at or under it, if any was).

    Example:
        >>> cost = dynroute.calibrate_budget(model, calibration_loader, target=0.55, at_most=True)
        >>> dynroute.save_pretrained(model, "routed-55")
    """
    if not tolerance > 0 or max_passes < 1:
        raise ValueError(f"tolerance must be > 0 and max_passes >= 1, but got {tolerance} and {max_passes}")
    routers = [block.router for _, block in require_gated_blocks(model)]
    check_target(target, (table or macs_table(model)).fixed_cost())
    trained = [router.decision_offset.item() for router in routers]

    def set_shift(shift: float) -> None:
        for router, offset in zip(routers, trained):
            router.set_decision_offset(offset + shift)

    def cost_at(shift: float) -> float:
        set_shift(shift)
        desc = f"calibrate pass {len(measured) + 1}"
        record = collect_for_macs(
            model, loader, max_batches=max_batches, table=table, progress=progress, desc=desc, leave=False
        )
        cost = record.macs().fraction
        passes.update()
        passes.set_postfix(shift=f"{shift:+.3f}", cost=f"{cost:.4f}", target=target)
        return cost

    def closest() -> float:
        allowed = [shift for shift in measured if not at_most or measured[shift] <= target]
        return min(allowed or measured, key=lambda shift: abs(measured[shift] - target))

    def done() -> bool:
        cost = measured[closest()]
        return abs(cost - target) <= tolerance and (not at_most or cost <= target)

    measured: dict[float, float] = {}
    passes = progress_bar(total=max_passes, progress=progress, desc="calibrate", unit="pass")
    try:
        measured[0.0] = cost_at(0.0)
        # Bracket the target (a larger shift opens more gates), doubling the step until the cost
        # crosses it; then halve the bracket.
        direction = 1.0 if measured[0.0] < target else -1.0
        short_of, past, step = 0.0, None, 1.0
        while len(measured) < max_passes and not done():
            shift = direction * step if past is None else (short_of + past) / 2
            measured[shift] = cost_at(shift)
            if (measured[shift] - target) * direction >= 0:
                past = shift
            else:
                short_of, step = shift, 2 * step
    finally:  # keep the best shift found, the trained offsets if nothing was measured
        set_shift(closest() if measured else 0.0)
        passes.close()
    return measured[closest()]
