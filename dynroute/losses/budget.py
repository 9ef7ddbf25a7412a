"""Budget control: hold a routed network's average cost at a requested fraction of dense MACs.

CoDiNet weights its cost loss (Eq. 11) with a gamma that is "tuned adaptive" without saying how.
Here gamma is a Lagrange multiplier of the constraint ``E[cost] <= target``, adapted during training
by the method of multipliers (augmented Lagrangian). Two roles, kept apart:

- the loss, :meth:`BudgetLoss.forward`: ``gamma * (c - target) + penalty / 2 * (c - target)^2``,
  where ``c`` is the batch mean of the relaxed path costs (differentiable, it trains the routers);
  it has no side effects;
- the controller, :meth:`BudgetLoss.update_gamma`, one explicit step per training batch:
  ``gamma <- max(0, gamma + step_size * (measured - target))``, where ``measured`` is the batch mean
  cost of the hard decisions the network would take at test time, averaged over processes under DDP
  so every rank keeps the same gamma. :meth:`dynroute.CoDiNetLoss.step` calls it for you.

The quadratic term pulls the cost towards the target at once; the multiplier integrates the
remaining gap, including the gap between relaxed training gates and hard test decisions. gamma never
goes negative: a network that runs cheaper than its budget is not rewarded for cost, and the
quadratic term alone pulls it back up.

Relaxed gates are not hard ones: later routers see features mixed by soft gates in training and
by 0/1 decisions at test time, so the cost measured in stage 1 is only close to the test-time
cost. Stage 2 runs the hard decisions, so its measured cost is the test-time cost; there
:meth:`BudgetLoss.trim` closes the remaining gap by moving the routers' shared decision offset (an
integral controller on the decision threshold; the router weights stay frozen). After training,
:func:`dynroute.calibrate_budget` sets that offset from images like the deployed model's.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dynroute._validation import check_target
from dynroute.analysis.accounting import hard_paths
from dynroute.conversion.flops import MacsTable, check_table
from dynroute.layers.routing import routing_paths, shift_decision_offsets
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
        trim_step: logits the decision offset moves per unit of cost gap in :meth:`trim`.

    Attributes:
        gamma: the current multiplier, a buffer (saved in the ``state_dict``, so training resumes
            with it).
        last_measured: test-time cost fraction of the last batch given to :meth:`update_gamma` or :meth:`trim`.

    Example:
        >>> budget = BudgetLoss(dynroute.macs_table(model), target=0.6)
        >>> loss = ce + budget(dynroute.routing_paths(model))
        >>> loss.backward(); optimizer.step()
        >>> budget.update_gamma(dynroute.routing_decisions(model))  # CoDiNetLoss.step(model) does this
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

    def forward(self, paths: Tensor) -> Tensor:
        """Loss of relaxed ``paths`` (N, n_blocks), ``dynroute.routing_paths(model)``, at the current gamma."""
        gap = path_costs(paths, self.block_costs, self.fixed_cost).mean() - self.target
        return self.gamma.item() * gap + 0.5 * self.penalty * gap.pow(2)

    @torch.no_grad()
    def update_gamma(self, decisions: Tensor) -> float:
        """The controller step, once per training batch: move gamma by the measured cost gap, never below 0.

        Args:
            decisions: the batch's hard decisions (N, n_blocks), 0/1: what the network would run at test
                time, ``dynroute.routing_decisions(model)`` after the training forward.

        Returns:
            The measured cost, a fraction of dense MACs (averaged over processes under DDP).
        """
        measured = self._measure(decisions)
        self.gamma.add_(self.step_size * (measured - self.target)).clamp_(min=0.0)
        return measured

    @torch.no_grad()
    def trim(self, model: nn.Module) -> float:
        """Stage 2: move every router's decision offset so the hard cost of the last forward nears the target.

        Call it after each stage-2 training forward (routers frozen, hard decisions). Returns the
        shift applied, ``-trim_step * (measured - target)`` logits.
        """
        shift = -self.trim_step * (self._measure(routing_paths(model)) - self.target)
        shift_decision_offsets(model, shift)
        return shift

    @torch.no_grad()
    def _measure(self, decisions: Tensor) -> float:
        """Mean cost of 0/1 ``decisions`` (N, n_blocks), averaged over processes under DDP."""
        measured = path_costs(hard_paths(decisions).float(), self.block_costs, self.fixed_cost).mean()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(measured)
            measured /= dist.get_world_size()
        self.last_measured = measured.item()
        return self.last_measured

    def extra_repr(self) -> str:
        return (
            f"target={self.target}, penalty={self.penalty}, step_size={self.step_size}, trim_step={self.trim_step}, "
            f"gamma={self.gamma.item():.4f}, fixed_cost={self.fixed_cost:.4f}"
        )
