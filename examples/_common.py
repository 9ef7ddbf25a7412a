"""The CoDiNet training loop the examples share: DDP setup, two stages, evaluation, logs, resume.

Not part of the library: a readable loop to copy into your own project. The library pieces it
uses are ``dynroute.CoDiNetLoss``, ``dynroute.set_stage``, ``dynroute.save_checkpoint`` /
``load_checkpoint``, ``dynroute.routing_paths`` and the accounting functions.
"""

import argparse
import copy
import csv
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

import dynroute

# Per-epoch means written to the CSV log; a term a stage does not compute is NaN.
LOGGED_TERMS = ("ce", "consistency", "diversity", "gamma", "cost", "train_macs", "distill")


@dataclass
class Distributed:
    """Where this process runs: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed() -> Distributed:
    """Join the process group ``torchrun`` describes (nccl on CUDA, gloo on CPU), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        return Distributed(dist.get_rank(), world_size, device)
    return Distributed(0, 1, device)


def image_folder_split(root: str, names: tuple[str, ...]) -> str:
    """The first of ``root/<name>`` folders that exists, e.g. ``("val", "test")``."""
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise ValueError(f"{root!r} has none of the folders {names}; an ImageFolder root needs train/ and test/ (or val/)")


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


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD with the routers in their own group (their own learning rate, no weight decay)."""
    groups = [{"params": dynroute.block_parameters(model), "lr": args.lr, "weight_decay": args.weight_decay}]
    routers = dynroute.router_parameters(model) if not args.dense else []
    if routers:
        groups.append({"params": routers, "lr": args.router_lr, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)


def distillation_loss(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s KD term: T^2 x KL(teacher || student) of the softened class distributions, (N, K) -> ()."""
    log_student = F.log_softmax(logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature**2


def calibration_subset(train_set: Dataset, transform: Callable, count: int, seed: int) -> Subset:
    """``count`` training images, a fixed random choice, under ``transform`` (the evaluation one).

    What :func:`dynroute.calibrate_budget` needs: images like the ones a deployed model meets,
    not augmented views and not the test set. ``train_set`` is a torchvision dataset with a
    ``transform`` attribute, or a ``Subset`` of one.
    """
    indices: list[int] = list(range(len(train_set)))
    base = train_set
    if isinstance(base, Subset):
        indices, base = list(base.indices), base.dataset
    clean = copy.copy(base)  # shares the file list or arrays; only the transform differs
    clean.transform = transform
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:count]
    return Subset(clean, [indices[i] for i in order.tolist()])


def cosine_factor(step: int, total: int) -> float:
    """Learning-rate multiplier of a cosine schedule from 1 at step 0 to 0 at ``total``."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def make_train_loader(dataset: Dataset, args: argparse.Namespace, env: Distributed) -> DataLoader:
    """Sample-major multi-view batches of ``args.train_bs`` samples, sharded across processes."""
    sampler = DistributedSampler(dataset, seed=args.seed) if env.enabled else None
    return DataLoader(
        dataset,
        batch_size=args.train_bs,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=dynroute.multiview_collate,
        drop_last=True,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )


def evaluate(model: nn.Module, loader: DataLoader, max_batches: int | None = None, progress: bool = True) -> dict:
    """:func:`dynroute.evaluate` as a dict, plus ``seconds``: the wall time of the pass, data loading included."""
    start = time.perf_counter()
    result = dynroute.evaluate(model, loader, max_batches=max_batches, progress=progress)
    return {**asdict(result), "seconds": time.perf_counter() - start}


@dataclass
class RunState:
    """Where a run is: the next epoch to train, the optimizer step count, training seconds so far."""

    epoch: int = 0
    step: int = 0
    seconds: float = 0.0


class Run:
    """One training run: folder, TensorBoard and CSV logs, checkpoints, resume."""

    def __init__(self, args: argparse.Namespace, env: Distributed) -> None:
        self.args, self.env = args, env
        self.folder = os.path.join(args.log_path, args.note)
        self.checkpoint_path = os.path.join(self.folder, "last.pt")
        self.csv_path = os.path.join(self.folder, "log.csv")
        self.writer = None
        if env.is_main:
            os.makedirs(self.folder, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.folder, "tensorboard"))
            with open(os.path.join(self.folder, "args.json"), "w") as file:
                json.dump(vars(args), file, indent=2)

    def log_scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def log_epoch(self, row: dict) -> None:
        """Append one row to the CSV log (main process only)."""
        if not self.env.is_main:
            return
        new = not os.path.exists(self.csv_path)
        with open(self.csv_path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, state: RunState) -> None:
        if self.env.is_main:
            dynroute.save_checkpoint(
                self.checkpoint_path + ".tmp",
                model,
                optimizer=optimizer.state_dict(),
                criterion=criterion.state_dict(),
                **asdict(state),
            )
            os.replace(self.checkpoint_path + ".tmp", self.checkpoint_path)

    def resume(self, model: nn.Module, criterion: nn.Module) -> tuple[RunState, dict | None]:
        """Restore model, stage and criterion (gamma) from the last checkpoint, if asked and present."""
        if not (self.args.resume and os.path.exists(self.checkpoint_path)):
            return RunState(), None
        extra = dynroute.load_checkpoint(self.checkpoint_path, model)
        criterion.load_state_dict(extra["criterion"])
        return RunState(extra["epoch"], extra["step"], extra["seconds"]), extra["optimizer"]

    def close(self, report: dict) -> None:
        if self.env.is_main:
            with open(os.path.join(self.folder, "results.json"), "w") as file:
                json.dump(report, file, indent=2)
            self.writer.close()


def _wrap(model: nn.Module, env: Distributed) -> nn.Module:
    """DDP around ``model``, built again at each stage: it fixes which parameters expect gradients.

    No ``find_unused_parameters``: a block that every sample of a rank skips in stage 2 still joins
    its parameters to the graph with an exact zero (``GatedBlock``), so every rank sends a gradient.
    """
    if not env.enabled:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def train(
    model: nn.Module,
    train_set: Dataset,
    test_loader: DataLoader,
    args: argparse.Namespace,
    env: Distributed,
    teacher: nn.Module | None = None,
    calibration_set: Dataset | None = None,
) -> dict:
    """Train ``model`` (converted, or dense with ``args.dense``) through both stages; return the final report.

    With a ``teacher`` (a frozen dense network) the loss gains ``args.distill_weight`` x the KD term.
    With a ``calibration_set`` the budget is calibrated on it after training, and with
    ``--calibrate-when stage2`` also before every stage-2 epoch, in place of the per-step trim.
    """
    model.to(env.device)
    if teacher is not None:
        teacher.to(env.device).eval().requires_grad_(False)
    criterion = build_criterion(args, model).to(env.device)
    run = Run(args, env)
    state, optimizer_state = run.resume(model, criterion)
    loader = make_train_loader(train_set, args, env)
    steps_per_epoch = len(loader) if args.max_steps is None else min(len(loader), args.max_steps)
    total_epochs = args.epochs + (0 if args.dense else args.stage2_epochs)
    total_steps = total_epochs * steps_per_epoch
    start_time = time.perf_counter()
    optimizer = build_optimizer(model, args)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    calibration_loader = None
    if calibration_set is not None:
        calibration_loader = DataLoader(calibration_set, batch_size=args.test_bs, num_workers=args.workers)
    calibrate_in_stage2 = calibration_loader is not None and args.calibrate_when == "stage2"
    wrapped, wrapped_stage = model, None
    while state.epoch < total_epochs:
        stage = 1 if args.dense or state.epoch < args.epochs else 2
        if stage != wrapped_stage:
            if not args.dense:
                dynroute.set_stage(model, stage)
            wrapped, wrapped_stage = _wrap(model, env), stage
        if stage == 2 and calibrate_in_stage2:
            calibrate(model, criterion, calibration_loader, env)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(state.epoch)
        model.train()
        criterion.train()
        sums = {"steps": 0.0, "loss": 0.0, "correct": 0.0, "seen": 0.0}
        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {state.epoch + 1}/{total_epochs} stage {stage}")
        bar.disable = not env.is_main
        for index, (images, labels) in enumerate(bar):
            if index >= steps_per_epoch:
                break
            for group, base in zip(optimizer.param_groups, (args.lr, args.router_lr)):
                group["lr"] = base * cosine_factor(state.step, total_steps)
            images, labels = images.to(env.device, non_blocking=True), labels.to(env.device, non_blocking=True)
            logits = wrapped(images)
            if args.dense:
                loss, terms = criterion(logits, labels), {}
                terms["ce"] = loss.item()
            else:
                paths = dynroute.routing_paths(model)
                loss, terms = criterion(logits, labels, paths)
                terms["train_macs"] = dynroute.macs_fraction(paths, dynroute.macs_table(model))
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(images)
                distill = distillation_loss(logits, teacher_logits, args.distill_temperature)
                loss = loss + args.distill_weight * distill
                terms["distill"] = distill.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not args.dense and not (calibrate_in_stage2 and stage == 2):
                criterion.step(model)  # the budget controller: gamma in stage 1, the threshold in stage 2
            state.step += 1
            sums["loss"] += loss.item() * labels.numel()
            sums["correct"] += (logits.argmax(1) == labels).sum().item()
            sums["seen"] += labels.numel()
            sums["steps"] += 1
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value
            if env.is_main:
                bar.set_postfix({key: f"{value:.3f}" for key, value in terms.items()})
                run.log_scalars("train", {**terms, "lr": optimizer.param_groups[0]["lr"]}, state.step)
        state.epoch += 1
        state.seconds += time.perf_counter() - start_time
        start_time = time.perf_counter()
        run.save(model, optimizer, criterion, state)
        row = {
            "epoch": state.epoch,
            "stage": stage,
            "train_loss": sums["loss"] / max(sums["seen"], 1),
            "train_top1": 100.0 * sums["correct"] / max(sums["seen"], 1),
            **{key: sums.get(key, math.nan) / max(sums["steps"], 1) for key in LOGGED_TERMS},
            "minutes": state.seconds / 60,
        }
        run.log_epoch(row)
        run.log_scalars("epoch", row, state.epoch)
        if env.enabled:
            dist.barrier()
    if calibration_loader is not None:
        calibrate(model, criterion, calibration_loader, env)
        run.save(model, optimizer, criterion, state)
    report = final_report(model, test_loader, args, env)
    run.close(report)
    return report


def calibrate(model: nn.Module, criterion: dynroute.CoDiNetLoss, loader: DataLoader, env: Distributed) -> None:
    """Put the eval-mode cost of ``loader``'s images at or just under the budget; every rank gets the thresholds."""
    if env.is_main:
        cost = dynroute.calibrate_budget(model, loader, criterion.cost.target, at_most=True)
        print(
            f"calibrated the decision threshold on {len(loader.dataset)} training images (evaluation transform): "
            f"cost {100 * cost:.2f}% of dense for a budget of at most {100 * criterion.cost.target:.1f}%"
        )
    if env.enabled:
        for _, block in dynroute.gated_blocks(model):  # the thresholds: run biases and decision offsets
            for tensor in (*block.router.parameters(), *block.router.buffers()):
                dist.broadcast(tensor.data, src=0)


def final_report(model: nn.Module, test_loader: DataLoader, args: argparse.Namespace, env: Distributed) -> dict:
    """Evaluate on the whole test set in the main process and print top-1, MACs and distinct paths."""
    report: dict = {}
    if env.is_main:
        report = evaluate(model, test_loader, args.max_eval_batches)
        report["split"] = "validation" if getattr(args, "val_per_class", 0) else "test"
        print(
            f"{report['split']} top-1 {report['top1']:.2f}% on {report['images']} images | average MACs "
            f"{report['macs'] / 1e6:.1f} M = {100 * report['macs_fraction']:.1f}% of dense "
            f"({report['dense_macs'] / 1e6:.1f} M) | distinct paths {report['distinct_paths']} | "
            f"eval {report['seconds']:.1f} s"
        )
    if env.enabled:
        dist.barrier()
    return report


def run_training(
    model: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    args: argparse.Namespace,
    env: Distributed,
    teacher: nn.Module | None = None,
    eval_transform: Callable | None = None,
) -> dict:
    """Print the MAC table (routed runs), train (distilling from ``teacher`` if given), evaluate, leave the group.

    With ``--calibrate-images N`` the budget is calibrated on N training images under ``eval_transform``.
    """
    notes = record_derived_settings(args, model)
    if env.is_main:
        for note in notes:
            print(note)
        if not args.dense:
            print(dynroute.macs_table(model))
    test_loader = DataLoader(test_set, batch_size=args.test_bs, num_workers=args.workers)
    calibration_set = None
    if args.calibrate_images:
        calibration_set = calibration_subset(train_set, eval_transform, args.calibrate_images, args.seed)
    report = train(model, train_set, test_loader, args, env, teacher, calibration_set)
    if env.enabled:
        dist.destroy_process_group()
    return report
