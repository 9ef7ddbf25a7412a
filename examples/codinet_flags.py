"""The original CoDiNet command line on dynroute: its flags, what each one becomes here, and the loss they ask for.

The training examples accept the original's stage-1 command line as is. This module holds that
compatibility and nothing else: the flags (original spellings as aliases), their checks, the mapping
of the cost flags (``--loss_w``, ``--num_target``) onto ``dynroute.CoDiNetLoss`` with the original
meaning, and the lines printed at start saying what each mapped flag became. docs/training.md lists
the flags.
"""

import argparse
from dataclasses import dataclass

import torch
from torch import nn

import dynroute


class _OriginalStage2Flag(argparse.Action):
    """The original's stage-2 job flags: stage 2 is part of one run here, so say how to ask for it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(
            f"{option_string}: the original ran stage 2 as a second job from the stage-1 checkpoint; here add "
            "--stage2-epochs N to the stage-1 command line (with --resume, a finished stage-1 run in "
            "--log-path/--note continues with stage 2)"
        )


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the examples; the original CoDiNet spellings are aliases (see docs/training.md)."""
    add = parser.add_argument
    add("--train-bs", "--train_bs", dest="train_bs", type=int, default=64, help="samples per batch and process (L)")
    add("--test-bs", "--test_bs", dest="test_bs", type=int, default=100, help="evaluation batch size")
    add("--views", type=int, default=None, help="augmented views per sample M (default 2; --aug_repeat sets it)")
    add("--aug_repeat", "--aug-repeat", dest="aug_repeat", type=int, default=None, help="original flag: views M")
    add("--lr", type=float, default=0.1, help="learning rate of the network (SGD, cosine schedule)")
    add("--router-lr", type=float, default=None, help="learning rate of the routers (default: --lr)")
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=1e-4)
    add("--epochs", type=int, default=60, help="stage-1 epochs (all epochs for --dense)")
    add("--stage2-epochs", type=int, default=0, help="stage-2 epochs: routers frozen, hard decisions")
    add("--dense", action="store_true", help="train the dense network (no routers): the baseline")
    add("--budget", type=float, default=None, help="target average cost, fraction of dense MACs (adaptive gamma)")
    add("--num_target", "--num-target", dest="num_target", type=int, default=None, help="original: blocks to run")
    add(
        "--gamma",
        type=float,
        default=None,
        help="cost weight: fixed without a budget (default 1), the adaptive gamma's start with one (default 0); "
        "0 without a budget: no cost term",
    )
    add("--loss_w", "--loss-w", dest="loss_w", type=float, default=None, help="original: cost weight (--gamma)")
    add(
        "--static-router",
        action="store_true",
        help="one learned decision per block for every image (dynroute.StaticRouter): the learned-pruning baseline",
    )
    add(
        "--rate-weight",
        type=float,
        default=0.0,
        help="weight of the per-block execution-rate term (ConvNet-AIG), each block's target rate the one that "
        "spends --budget; 0 = off",
    )
    add(
        "--path-terms",
        default="gates",
        choices=("gates", "probabilities"),
        help="what consistency and diversity measure: the relaxed gates (the paper), or the routers' run "
        "probabilities without the Gumbel noise",
    )
    add("--consistency-weight", type=float, default=0.2, help="alpha, weight of Eq. 8")
    add("--diversity-weight", type=float, default=0.2, help="beta of the paper, weight of Eq. 9")
    add("--loss_lda", "--loss-lda", dest="loss_lda", type=float, default=None, help="original: both path weights")
    add("--consistency-margin", "--lda_intra_margin", dest="consistency_margin", type=float, default=0.2)
    add("--diversity-margin", "--lda_inter_margin", dest="diversity_margin", type=float, default=0.5)
    add("--temperature", type=float, default=1.0, help="Gumbel-softmax temperature of the routers")
    add(
        "--relaxation",
        default="gumbel",
        choices=("gumbel", "straight_through"),
        help="stage-1 gates: Gumbel-softmax samples, or hard samples with the soft gradient",
    )
    add("--teacher", default=None, help="dense checkpoint to distill from (adds --distill-weight x KD loss)")
    add(
        "--distill-weight",
        type=float,
        default=None,
        help="weight of the distillation term (default 1, needs --teacher)",
    )
    add(
        "--distill-temperature",
        type=float,
        default=None,
        help="softmax temperature of the KD term (default 4, needs --teacher)",
    )
    add("--beta", type=float, default=None, help="original flag, accepted and unused (as in the original)")
    add("--budget-penalty", type=float, default=4.0, help="quadratic weight of the budget loss")
    add("--budget-step", type=float, default=0.05, help="gamma's step per batch")
    add(
        "--calibrate-images",
        type=int,
        default=0,
        help="after training, set the decision threshold so the cost of this many training images under the "
        "evaluation transform is at most the budget and within 0.2 points of it (dynroute.calibrate_budget); 0 = off",
    )
    add(
        "--calibrate-when",
        choices=("end", "stage2"),
        default="end",
        help="with --calibrate-images: only after training, or also before every stage-2 epoch (stage 2 then "
        "fine-tunes the blocks for the calibrated routing instead of trimming the cost of augmented views)",
    )
    add("--log-path", "--log_path", dest="log_path", default="./outputs", help="where runs are written")
    add("--note", default="run", help="run name: the run's folder under --log-path")
    add("--resume", action="store_true", help="continue the run in --log-path/--note from its last checkpoint")
    stage2_job = "original stage-2 job flag, rejected: add --stage2-epochs N to the stage-1 run instead"
    add("--freeze_gate", nargs=0, action=_OriginalStage2Flag, help=stage2_job)
    add("--resume_path", metavar="F", action=_OriginalStage2Flag, help=stage2_job)
    add("--workers", type=int, default=2, help="data loader worker processes")
    add("--threads", type=int, default=None, help="torch CPU threads per process")
    add("--seed", type=int, default=0)
    add("--max-steps", type=int, default=None, help="stop each stage after this many steps (smoke tests)")
    add("--max-eval-batches", type=int, default=None, help="evaluate on this many batches only (smoke tests)")
    add("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)


def resolve_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Turn the original CoDiNet flags into this script's settings, in place.

    ``--aug_repeat R`` gives R views (0 counts as 1), ``--loss_lda`` both path weights and
    ``--loss_w`` the cost weight ``--gamma``; ``--num_target K`` becomes a budget (or none) in
    :func:`resolve_cost_flags`, once the MAC table is known.
    """
    if args.views is None:
        args.views = max(1, args.aug_repeat) if args.aug_repeat is not None else 2
    if args.views < 1:
        raise ValueError(f"--views must be >= 1, but got {args.views}")
    if args.loss_lda is not None:
        args.consistency_weight = args.diversity_weight = args.loss_lda
    if args.loss_w is not None:
        if args.gamma is not None and args.gamma != args.loss_w:
            raise ValueError(
                f"--loss_w {args.loss_w} and --gamma {args.gamma} both set the cost weight; pass one of them"
            )
        args.gamma = args.loss_w
    if args.gamma is not None and not args.gamma >= 0:
        raise ValueError(f"{_gamma_flag(args)} must be >= 0, but got {args.gamma}: a negative cost weight rewards cost")
    if args.gamma == 0 and args.budget is not None and not args.dense:
        raise ValueError(
            f"{_gamma_flag(args)} 0 switches the cost term off, but --budget {args.budget} asks for one: drop "
            f"{_gamma_flag(args)} (the budget's gamma starts at 0) or drop --budget"
        )
    if args.router_lr is None:
        args.router_lr = args.lr
    distill_flags = [flag for flag in ("distill_weight", "distill_temperature") if getattr(args, flag) is not None]
    if distill_flags and not args.teacher:
        names = " and ".join("--" + flag.replace("_", "-") for flag in distill_flags)
        raise ValueError(f"{names} set without --teacher: pass --teacher dense.th to distill, or drop {names}")
    if args.calibrate_images < 0:
        raise ValueError(f"--calibrate-images must be >= 0, but got {args.calibrate_images}")
    if args.calibrate_images and (args.dense or (args.budget is None and args.num_target is None)):
        raise ValueError(
            "--calibrate-images calibrates a budget: add --budget (or --num_target) to a routed run, or drop it"
        )
    if args.calibrate_images and args.gamma == 0:
        raise ValueError(
            f"--calibrate-images calibrates a budget, but {_gamma_flag(args)} 0 switches the cost term off: "
            f"drop {_gamma_flag(args)} 0, or drop --calibrate-images"
        )
    if args.calibrate_when != "end" and not args.calibrate_images:
        raise ValueError(
            f"--calibrate-when {args.calibrate_when} needs images to calibrate on: add --calibrate-images N, or drop it"
        )
    args.distill_weight = 1.0 if args.distill_weight is None else args.distill_weight
    args.distill_temperature = 4.0 if args.distill_temperature is None else args.distill_temperature
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def _gamma_flag(args: argparse.Namespace) -> str:
    """How the command line spelled the cost weight: the original's ``--loss_w`` or ``--gamma``."""
    return "--loss_w" if args.loss_w is not None else "--gamma"


def original_flag_notes(args: argparse.Namespace) -> list[str]:
    """One line per original CoDiNet flag (other than the cost flags) whose meaning changes here."""
    notes = []
    if args.aug_repeat is not None:
        zero = " (0 counts as 1)" if args.aug_repeat == 0 else ""
        notes.append(f"--aug_repeat {args.aug_repeat} -> {args.views} view(s) per sample{zero}")
    if args.loss_lda is not None:
        notes.append(f"--loss_lda {args.loss_lda} -> consistency and diversity weights {args.loss_lda} each")
    if args.beta is not None:
        notes.append(f"--beta {args.beta} -> unused, as in the original (the router temperature is --temperature)")
    if getattr(args, "pretrain", False):
        notes.append("--pretrain -> unused: the dense checkpoint is --model_path")
    return notes


@dataclass(frozen=True)
class CostSettings:
    """The cost term the command line asks for, once the MAC table is known.

    Attributes:
        term: ``"budget"`` (BudgetLoss, gamma adapted towards ``budget``), ``"fixed"`` (``gamma``
            times the cost) or ``"none"`` (no cost term, no controller).
        budget: target average cost as a fraction of dense MACs, or None.
        gamma: the fixed cost weight, or the adaptive gamma's starting value; 0 for ``"none"``.
        notes: one line per cost flag saying what it became, printed at start.
    """

    term: str
    budget: float | None
    gamma: float
    notes: tuple[str, ...] = ()


def resolve_cost_flags(args: argparse.Namespace, table: dynroute.MacsTable, model_name: str) -> CostSettings:
    """What ``--budget``, ``--num_target`` and ``--gamma`` / ``--loss_w`` ask for, with the original's meaning.

    A cost weight of 0 means no cost term and no controller (the original multiplied its cost
    loss by ``--loss_w``). ``--num_target K`` with K at or above the number of gated blocks asks
    for every block: no budget and no cost term. A smaller K is the budget
    :func:`budget_from_num_target`; ``--budget`` states one directly and wins. With a budget,
    the cost weight is gamma's starting value (default 0); without one, the fixed weight (default 1).
    """
    weight, target, blocks = _gamma_flag(args), args.num_target, table.num_blocks
    if args.gamma == 0:
        notes = [f"{weight} {args.gamma} -> no cost term and no budget controller (cost weight 0, as in the original)"]
        if target is not None:
            reason = f"{model_name} has {blocks} gated blocks" if target >= blocks else f"{weight} 0 turns the cost off"
            notes.append(f"--num_target {target} -> no budget ({reason})")
        return CostSettings("none", None, 0.0, tuple(notes))
    if args.budget is not None:
        budget = args.budget
        notes = [] if target is None else [f"--num_target {target} -> unused: --budget {budget} sets the budget"]
    elif target is not None and target >= blocks:
        notes = [f"--num_target {target} -> no budget ({model_name} has {blocks} gated blocks): no cost term"]
        if args.gamma is not None:
            notes.append(f"{weight} {args.gamma} -> unused: no budget, no cost term")
        return CostSettings("none", None, 0.0, tuple(notes))
    elif target is not None:
        budget = budget_from_num_target(target, table)
        notes = [
            f"--num_target {target} -> budget {budget:.4f} of dense MACs ({target} of {model_name}'s {blocks} gated "
            "blocks at their mean cost, plus the always-paid part)"
        ]
    else:
        budget, notes = None, []
    if budget is not None:
        if args.gamma is not None:
            notes.append(f"{weight} {args.gamma} -> starting value of the adaptive gamma (budget {budget:.4f})")
        return CostSettings("budget", budget, 0.0 if args.gamma is None else args.gamma, tuple(notes))
    if args.gamma is not None:
        notes.append(f"{weight} {args.gamma} -> fixed cost weight (no budget)")
    return CostSettings("fixed", None, 1.0 if args.gamma is None else args.gamma, tuple(notes))


def budget_from_num_target(num_target: int, table: dynroute.MacsTable) -> float:
    """The original ``--num_target``: blocks run per sample on average, as a cost fraction of dense.

    The original loss pulls the summed run-probability of each sample's gates to ``num_target``;
    here K blocks at their mean cost plus the always-paid part. :func:`resolve_cost_flags` calls
    it only for K below the number of gated blocks (K at or above it is no budget).
    """
    if num_target < 1:
        raise ValueError(f"--num_target counts blocks run per sample and must be >= 1, but got {num_target}")
    blocks = min(num_target, table.num_blocks)
    return min(1.0, table.fixed_cost() + blocks * float(table.block_costs().mean()))


def cli_model_name(args: argparse.Namespace, model: nn.Module) -> str:
    """The model's name on the command line (``--backbone`` / ``--model``), else its class name."""
    return getattr(args, "backbone", None) or getattr(args, "model", None) or type(model).__name__


def build_criterion(args: argparse.Namespace, model: nn.Module) -> dynroute.CoDiNetLoss | nn.CrossEntropyLoss:
    """Cross-entropy for ``--dense``, else the CoDiNet objective with the cost term the flags ask for."""
    if args.dense:
        return nn.CrossEntropyLoss()
    table = dynroute.macs_table(model)
    cost = resolve_cost_flags(args, table, cli_model_name(args, model))
    budget_kwargs = {"penalty": args.budget_penalty, "step_size": args.budget_step} if cost.term == "budget" else {}
    return dynroute.CoDiNetLoss(
        table,
        num_views=args.views,
        alpha=args.consistency_weight,
        beta=args.diversity_weight,
        gamma=cost.gamma,
        target=cost.budget,
        consistency_margin=args.consistency_margin,
        diversity_margin=args.diversity_margin,
        rate_weight=args.rate_weight,
        **budget_kwargs,
    )


def record_derived_settings(args: argparse.Namespace, model: nn.Module) -> list[str]:
    """Store what the flags became in ``args.derived`` (written to args.json); the lines to print at start.

    Raises a ValueError for ``--calibrate-images`` when the flags ask for no budget.
    """
    notes = original_flag_notes(args)
    derived = {
        "views": args.views,
        "consistency_weight": args.consistency_weight,
        "diversity_weight": args.diversity_weight,
        "router_lr": args.router_lr,
    }
    if not args.dense:
        table = dynroute.macs_table(model)
        cost = resolve_cost_flags(args, table, cli_model_name(args, model))
        if args.calibrate_images and cost.term != "budget":
            raise ValueError(
                f"--calibrate-images calibrates a budget, but the flags ask for none ({'; '.join(cost.notes)}); "
                "give a --budget or drop --calibrate-images"
            )
        notes += cost.notes
        derived.update(cost_term=cost.term, budget=cost.budget, gamma=cost.gamma, gated_blocks=table.num_blocks)
    args.derived = {**derived, "flag_mapping": notes}
    return notes
