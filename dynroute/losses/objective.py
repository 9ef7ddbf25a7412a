"""The CoDiNet training objective in one module: cross-entropy plus the path terms (Eq. 12)."""

import warnings

import torch
from torch import Tensor, nn

from dynroute.conversion.flops import MacsTable
from dynroute.layers.routing import routing_decisions
from dynroute.losses.budget import BudgetLoss
from dynroute.losses.cost import CostLoss
from dynroute.losses.path import ConsistencyLoss, DiversityLoss
from dynroute.losses.rate import ExecutionRateLoss
from dynroute.training.stages import get_stage

__all__ = ["CoDiNetLoss"]


class CoDiNetLoss(nn.Module):
    """``CE + alpha * consistency + beta * diversity + cost term [+ rate_weight * execution rates]``.

    The batch is sample-major: rows ``i * M .. i * M + M - 1`` are the M views of sample i and the labels
    are repeated per view, as :class:`dynroute.MultiViewTransform` with :func:`dynroute.multiview_collate`
    build it. A view-major batch (``torch.cat([views_1, views_2])``) cannot be told apart from the paths
    alone: it would compare views of different images in the consistency term and push views of one
    image apart in the diversity term.

    The cost term is :class:`BudgetLoss` (adaptive gamma) when ``target`` is set, else
    ``gamma * CostLoss`` (Eq. 11 with a fixed weight); ``gamma=0`` without a target leaves it out.

    The batch must be sample-major: the M views of each sample in adjacent rows, logits, labels and
    paths alike, with each label repeated for its sample's views. Build it with
    :class:`dynroute.MultiViewTransform` as the dataset's transform and
    ``DataLoader(..., collate_fn=dynroute.multiview_collate)``, and pass the images and labels as
    the loader yields them. A view-major batch (``torch.cat([view1, view2])``, labels
    ``labels.repeat(2)``) has the same shapes and cannot be detected: consistency would pull the paths
    of different images together and diversity push the views of one image apart.

    Fallbacks, so the same loop runs everywhere: with ``num_views=1`` the consistency term is
    left out (it compares views of one sample, and there is only one); when the paths carry no
    gradient (stage 2: routers frozen, hard decisions; or an eval forward) all path terms are left
    out. Either way the paths must have as many rows as the logits (a validation batch of any size
    passes).

    The loss has no side effects. Call :meth:`step` after each training step: with a budget it runs
    the budget's controller (stage 1: gamma, :meth:`BudgetLoss.update_gamma`; stage 2: the decision
    offset, :meth:`BudgetLoss.trim`), and in stage 1 it warns if the step's paths carried no gradient
    although autograd was on and the logits did (the model left in eval mode, say), since then only
    cross-entropy trained.

    Args:
        table: the model's :class:`MacsTable`.
        num_views: M, views per sample in the batch.
        alpha: consistency weight.
        beta: diversity weight.
        gamma: the cost weight, >= 0: fixed (default 1.0; 0 leaves the cost term out) without
            ``target``, the starting value of the adaptive gamma (default 0.0) with one.
        target: budget as a fraction of dense MACs; enables the adaptive gamma.
        consistency_margin: m_c of Eq. 8.
        diversity_margin: m_d of Eq. 9.
        rate_weight: weight of the per-block execution-rate term (:func:`dynroute.execution_rate_loss`);
            0 (default) leaves it out.
        rate_target: each block's target rate; default, with a ``target`` budget, the one rate that spends
            it when every block runs at it: ``(target - fixed cost) / (1 - fixed cost)``.
        budget_kwargs: passed to :class:`BudgetLoss` (``penalty``, ``step_size``, ``trim_step``).

    Example:
        >>> criterion = CoDiNetLoss(dynroute.macs_table(model), num_views=2, target=0.6)
        >>> loss, terms = criterion(model(x), y, dynroute.routing_paths(model))
        >>> loss.backward(); optimizer.step(); criterion.step(model)
    """

    def __init__(
        self,
        table: MacsTable,
        num_views: int,
        alpha: float = 0.2,
        beta: float = 0.2,
        gamma: float | None = None,
        target: float | None = None,
        consistency_margin: float = 0.2,
        diversity_margin: float = 0.5,
        rate_weight: float = 0.0,
        rate_target: float | Tensor | None = None,
        **budget_kwargs: float,
    ) -> None:
        super().__init__()
        if gamma is not None and not gamma >= 0:  # NaN fails too
            raise ValueError(f"gamma must be >= 0, but got {gamma}; a negative cost weight rewards cost")
        if target is None:
            self.cost: nn.Module = CostLoss(table)
            gamma = 1.0 if gamma is None else gamma
        else:
            self.cost = BudgetLoss(table, target, initial_gamma=gamma or 0.0, **budget_kwargs)
        if rate_weight and rate_target is None:
            if target is None:
                raise ValueError("rate_weight needs a rate: pass rate_target=<fraction>, or a budget target=<fraction>")
            rate_target = (target - table.fixed_cost()) / (1 - table.fixed_cost())
        self.num_views, self.alpha, self.beta, self.gamma, self.rate_weight = num_views, alpha, beta, gamma, rate_weight
        self._paths_lacked_grad = False  # whether the last call dropped the path terms of a gradient step
        self._paths_trained = False  # whether the last call computed the path terms
        self.classification = nn.CrossEntropyLoss()
        self.consistency = ConsistencyLoss(num_views, consistency_margin) if num_views > 1 else None
        self.diversity = DiversityLoss(num_views, diversity_margin)
        self.rate = ExecutionRateLoss(rate_target) if rate_weight else None

    def forward(
        self, logits: Tensor, labels: Tensor, paths: Tensor, run_probs: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Total loss and its terms as floats (for logging).

        Args:
            logits: class logits (L * M, classes), sample-major.
            labels: (L * M,) labels, each repeated for its sample's M views, as
                :func:`dynroute.multiview_collate` returns them.
            paths: ``dynroute.routing_paths(model)`` of that forward, (L * M, n_blocks).
            run_probs: optional run probabilities of the same forward,
                ``dynroute.routing_logits(model).softmax(-1)[..., 1]`` (L * M, n_blocks). Given, the
                consistency and diversity terms measure them instead of ``paths``: the Gumbel noise of
                the relaxed gates alone keeps two images' paths further apart than the diversity margin
                and two views of one image further apart than the consistency margin, so on ``paths``
                diversity stays near 0 and consistency is lowered by saturating the routers. The rate
                and cost terms always measure ``paths``.
        """
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels have {labels.shape[0]} rows but logits {logits.shape[0]}; CoDiNetLoss expects one label per "
                f"row, labels of shape (L * M,) = ({logits.shape[0]},) with each sample's label repeated for its "
                f"{self.num_views} adjacent views, as dynroute.multiview_collate returns them: pass the labels of "
                "the loader's batch as they are"
            )
        if paths.shape[0] != logits.shape[0]:
            raise ValueError(
                f"paths have {paths.shape[0]} rows but logits {logits.shape[0]}; pass dynroute.routing_paths(model) "
                "of the forward that gave the logits"
            )
        if run_probs is not None and run_probs.shape != paths.shape:
            raise ValueError(
                f"run_probs have shape {tuple(run_probs.shape)} but paths {tuple(paths.shape)}; pass "
                "dynroute.routing_logits(model).softmax(-1)[..., 1] of the forward that gave the paths"
            )
        path_term_input = paths if run_probs is None else run_probs
        loss = self.classification(logits, labels)
        terms = {"ce": loss.item()}
        self._paths_lacked_grad = torch.is_grad_enabled() and logits.requires_grad and not paths.requires_grad
        self._paths_trained = paths.requires_grad
        if not paths.requires_grad:
            return loss, terms
        if self.consistency is not None and self.alpha:
            consistency = self.consistency(path_term_input)
            loss = loss + self.alpha * consistency
            terms["consistency"] = consistency.item()
        if self.beta and paths.shape[0] > self.num_views:
            diversity = self.diversity(path_term_input)
            loss = loss + self.beta * diversity
            terms["diversity"] = diversity.item()
        if self.rate is not None:
            rate = self.rate(paths)
            loss = loss + self.rate_weight * rate
            terms["rate"] = rate.item()
        if isinstance(self.cost, BudgetLoss):
            cost = self.cost(paths)
            terms["gamma"] = self.cost.gamma.item()
        elif self.gamma:
            cost = self.gamma * self.cost(paths)
        else:
            return loss, terms
        loss = loss + cost
        terms["cost"] = cost.item()
        return loss, terms

    def step(self, model: nn.Module) -> None:
        """After a training step: run the budget's controller on the last forward, and warn of a lost stage-1 step.

        Stage 1 (relaxed gates that carried gradient): gamma moves by the cost of the hard decisions the
        network would take at test time (:meth:`BudgetLoss.update_gamma`). Stage 2: the decision offset
        moves so the hard cost nears the budget (:meth:`BudgetLoss.trim`). In stage 1, warns if the step's
        paths carried no gradient while the logits did: the path terms were left out and gamma kept, most
        likely because the model was in eval mode.
        """
        budget = isinstance(self.cost, BudgetLoss)
        if not (budget or self._paths_lacked_grad):
            return
        stage = get_stage(model)
        if stage == 1 and self._paths_lacked_grad:
            warnings.warn(
                "CoDiNetLoss left out the path terms (consistency, diversity, cost) and kept gamma: the paths of "
                "this stage-1 step carried no gradient, though the logits did (the model in eval mode, gates forced "
                "open or closed, or routers frozen). To train the routers, run stage-1 steps in training mode "
                "(model.train()) with trainable routers and pass dynroute.routing_paths(model) as it is",
                stacklevel=2,
            )
        elif budget and stage == 1 and self._paths_trained:
            self.cost.update_gamma(routing_decisions(model))
        elif budget and stage == 2:
            self.cost.trim(model)

    def extra_repr(self) -> str:
        return (
            f"num_views={self.num_views}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"rate_weight={self.rate_weight}"
        )
