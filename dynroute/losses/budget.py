"""Budget control: hold a routed network's average cost at a requested fraction of dense MACs.

CoDiNet weights its cost loss (Eq. 11) with a gamma that is "tuned adaptive" without saying how.
Here gamma is a Lagrange multiplier adapted during training by the method of multipliers
(augmented Lagrangian) on the constraint ``E[cost] = target``:

    loss = gamma * (c - target) + penalty / 2 * (c - target)^2
    gamma <- max(0, gamma + step_size * (measured - target))        after every training batch

``c`` is the batch mean of the relaxed path costs (differentiable, it trains the routers);
``measured`` is the batch mean cost of the hard decisions the network would take at test time
(argmax of the router logits), averaged over processes under DDP so every rank keeps the same
gamma. The quadratic term pulls the cost towards the target at once; the multiplier integrates
the remaining gap, including the gap between relaxed training gates and hard test decisions, so
the test-time cost settles on the target rather than wherever the classification loss balances
the penalty. gamma never goes negative, so the cost term never rewards cost: a network that runs
cheaper than the target is pulled back up by the quadratic term alone, and gamma waits at 0 until
the measured cost exceeds the target again.

Relaxed gates are not hard ones: later routers see features mixed by soft gates in training and
by 0/1 decisions at test time, so the cost measured in stage 1 is only close to the test-time
cost. Stage 2 runs the hard decisions, so its measured cost is the test-time cost; there
:meth:`BudgetLoss.trim` closes the remaining gap by moving one shared offset on every router's
"run" logit (an integral controller on the decision threshold; the router weights stay frozen).

The cost measured on augmented training views is still not the cost on clean images: padded
random crops route differently from the un-augmented images a deployed model sees. After
training, :meth:`BudgetLoss.calibrate` sets the same shared offset by bisection so the eval-mode
cost over images you give it (training images under the evaluation transform, say) lands on the
target.
"""

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dynroute._progress import progress_bar
from dynroute._validation import check_target
from dynroute.analysis.accounting import hard_paths
from dynroute.analysis.metrics import collect_for_macs
from dynroute.conversion.flops import MacsTable, check_table
from dynroute.layers.router import hard_gate
from dynroute.layers.routing import gated_blocks, routing_paths
from dynroute.losses.cost import path_costs

__all__ = ["BudgetLoss"]


class BudgetLoss(nn.Module):
    """Cost loss whose weight gamma adapts so the average test-time cost lands on ``target``.

    Args:
        table: the model's :class:`MacsTable` (``dynroute.macs_table(model)``).
        target: the budget, a fraction of dense MACs in (fixed cost, 1].
        penalty: weight of the quadratic term ``(c - target)^2 / 2``.
        step_size: how fast gamma integrates the measured gap, per batch.
        initial_gamma: the multiplier to start from, >= 0.
        trim_step: logits the decision threshold moves per unit of cost gap in :meth:`trim`.

    Attributes:
        gamma: the current multiplier, >= 0, a buffer (saved in the ``state_dict``, so training
            resumes with it).
        last_measured: test-time cost fraction of the last training batch.

    Example:
        >>> budget = BudgetLoss(dynroute.macs_table(model), target=0.6)
        >>> loss = ce + budget(dynroute.routing_paths(model), dynroute.routing_logits(model))
    """

    def __init__(
        self,
        table: MacsTable,
        target: float,
        penalty: float = 4.0,
        step_size: float = 0.05,
        initial_gamma: float = 0.0,
        trim_step: float = 0.5,
    ) -> None:
        super().__init__()
        check_table(table)
        fixed = table.fixed_cost()
        check_target(target, fixed)
        if penalty < 0 or step_size < 0:
            raise ValueError(f"penalty and step_size must be >= 0, but got {penalty} and {step_size}")
        if not initial_gamma >= 0:  # NaN fails too
            raise ValueError(
                f"initial_gamma must be >= 0, but got {initial_gamma}; a negative cost weight rewards cost "
                "(a network under the target is pulled up by the quadratic term)"
            )
        self.register_buffer("block_costs", table.block_costs(), persistent=False)
        self.register_buffer("gamma", torch.tensor(float(initial_gamma)))
        self.fixed_cost = fixed
        self.target, self.penalty, self.step_size, self.trim_step = target, penalty, step_size, trim_step
        self.last_measured: float | None = None

    def forward(self, paths: Tensor, logits: Tensor | None = None) -> Tensor:
        """Loss for relaxed ``paths`` (N, n_blocks); updates gamma in train mode.

        Args:
            paths: relaxed gates of the batch, ``dynroute.routing_paths(model)``.
            logits: router logits (N, n_blocks, 2), ``dynroute.routing_logits(model)``; their argmax
                is the test-time decision whose cost gamma steers. Without them the relaxed gates are
                thresholded at 0.5.
        """
        gap = path_costs(paths, self.block_costs, self.fixed_cost).mean() - self.target
        loss = self.gamma.item() * gap + 0.5 * self.penalty * gap.pow(2)
        if self.training and torch.is_grad_enabled():
            self._update_gamma(paths if logits is None else hard_gate(logits.flatten(0, 1)).view(paths.shape))
        return loss

    @torch.no_grad()
    def trim(self, model: nn.Module) -> float:
        """Stage 2: shift every router's "run" logit so the hard cost of the last forward nears the target.

        Call it after each stage-2 training forward (routers frozen, hard decisions). Returns the
        shift applied, ``-trim_step * (measured - target)`` logits.
        """
        shift = -self.trim_step * (self._measure(routing_paths(model)) - self.target)
        for bias in _run_biases(model):
            bias[1] += shift
        return shift

    @torch.no_grad()
    def calibrate(
        self,
        model: nn.Module,
        loader: Iterable,
        tolerance: float = 0.002,
        max_passes: int = 16,
        max_batches: int | None = None,
        at_most: bool = False,
        table: MacsTable | None = None,
        progress: bool | None = None,
    ) -> float:
        """After training: shift every router's "run" logit so the eval-mode cost over ``loader`` meets the target.

        Bisection on one shared offset (the one :meth:`trim` moves), each step a pass over the loader
        in eval mode; the model is left in the mode it had. Pass images the model will meet at test
        time without their labels mattering, e.g. training images under the evaluation transform,
        never the test set you report on. The cost is counted with ``table``, so images of another
        input size than the table's raise a ValueError at that batch (the routers left as they were); to
        calibrate at another size (train at 224, test at 256), pass a table of it,
        ``table=dynroute.build_macs_table(model, (C, H, W))``.

        Args:
            model: the trained, converted network (this loss's table).
            loader: yields image batches or ``(images, labels, ...)`` tuples, in a fixed order.
            tolerance: stop once the measured cost is this close to the target (fraction of dense).
            max_passes: most passes over the loader.
            max_batches: use only this many batches of the loader.
            at_most: treat the target as a cap: keep only offsets whose cost is at or under it
                (between ``target - tolerance`` and ``target`` when the bisection gets there).
            table: the MAC table of the loader's image size; default :func:`dynroute.macs_table` (model).
            progress: show tqdm progress bars, one over the passes and one over each pass's batches;
                None (default) shows them when stderr is a terminal.

        Returns:
            The cost fraction measured at the offset kept: the closest to the target seen (with
            ``at_most``, the closest at or under it, if any was).
        """
        if tolerance <= 0 or max_passes < 1:
            raise ValueError(f"tolerance must be > 0 and max_passes >= 1, but got {tolerance} and {max_passes}")

        run_biases = _run_biases(model)
        trained = [bias.detach().clone() for bias in run_biases]

        def set_offset(offset: float) -> None:
            for bias, value in zip(run_biases, trained):
                bias.copy_(value)
                bias[1] += offset

        def cost_at(offset: float) -> float:
            set_offset(offset)
            desc = f"calibrate pass {len(measured) + 1}"
            record = collect_for_macs(
                model, loader, max_batches=max_batches, table=table, progress=progress, desc=desc, leave=False
            )
            cost = record.macs().fraction
            passes.update()
            passes.set_postfix(offset=f"{offset:+.3f}", cost=f"{cost:.4f}", target=self.target)
            return cost

        def closest() -> float:
            allowed = [offset for offset in measured if not at_most or measured[offset] <= self.target]
            return min(allowed or measured, key=lambda offset: abs(measured[offset] - self.target))

        def done() -> bool:
            cost = measured[closest()]
            return abs(cost - self.target) <= tolerance and (not at_most or cost <= self.target)

        measured: dict[float, float] = {}
        passes = progress_bar(total=max_passes, progress=progress, desc="calibrate", unit="pass")
        try:
            measured[0.0] = cost_at(0.0)
            # Bracket the target (a larger "run" logit opens more gates), doubling the step until the
            # cost crosses it; then halve the bracket.
            direction = 1.0 if measured[0.0] < self.target else -1.0
            short_of, past, step = 0.0, None, 1.0
            while len(measured) < max_passes and not done():
                offset = direction * step if past is None else (short_of + past) / 2
                measured[offset] = cost_at(offset)
                if (measured[offset] - self.target) * direction >= 0:
                    past = offset
                else:
                    short_of, step = offset, 2 * step
        finally:  # keep the best offset found, the trained one if nothing was measured
            set_offset(closest() if measured else 0.0)
            passes.close()
        return measured[closest()]

    @torch.no_grad()
    def _measure(self, decisions: Tensor) -> float:
        """Mean cost of 0/1 ``decisions`` (N, n_blocks), averaged over processes under DDP."""
        measured = path_costs(hard_paths(decisions).float(), self.block_costs, self.fixed_cost).mean()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(measured)
            measured /= dist.get_world_size()
        self.last_measured = measured.item()
        return self.last_measured

    @torch.no_grad()
    def _update_gamma(self, decisions: Tensor) -> None:
        # Clamped at 0: a negative multiplier would reward cost, i.e. push a cheap network to spend more.
        self.gamma.copy_((self.gamma + self.step_size * (self._measure(decisions) - self.target)).clamp_min(0.0))

    def extra_repr(self) -> str:
        return (
            f"target={self.target}, penalty={self.penalty}, step_size={self.step_size}, trim_step={self.trim_step}, "
            f"gamma={self.gamma.item():.4f}, fixed_cost={self.fixed_cost:.4f}"
        )


def _run_biases(model: nn.Module) -> list[Tensor]:
    """The output bias of every router of ``model``; entry 1 is the "run" logit's offset."""
    return [block.router.fc2.bias for _, block in gated_blocks(model)]
