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
    add("--gamma", "--loss_w", dest="gamma", type=float, default=None, help="cost weight (initial gamma with a budget)")
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
        "evaluation transform is at most the budget and within 0.2 points of it (BudgetLoss.calibrate); 0 = off",
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

    ``--aug_repeat R`` gives R views (0 counts as 1) and ``--loss_lda`` both path weights;
    ``--num_target K`` becomes a budget in :func:`build_criterion`, once the MAC table is known.
    """
    if args.views is None:
        args.views = max(1, args.aug_repeat) if args.aug_repeat is not None else 2
    if args.views < 1:
        raise ValueError(f"--views must be >= 1, but got {args.views}")
    if args.loss_lda is not None:
        args.consistency_weight = args.diversity_weight = args.loss_lda
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
    if args.calibrate_when != "end" and not args.calibrate_images:
        raise ValueError(
            f"--calibrate-when {args.calibrate_when} needs images to calibrate on: add --calibrate-images N, or drop it"
        )
    args.distill_weight = 1.0 if args.distill_weight is None else args.distill_weight
    args.distill_temperature = 4.0 if args.distill_temperature is None else args.distill_temperature
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def budget_from_num_target(num_target: int, table: dynroute.MacsTable) -> float:
    """The original ``--num_target``: blocks run per sample on average, as a cost fraction of dense.

    The original loss pulls the summed run-probability of each sample's gates to ``num_target``;
    a count at or above the number of blocks asks for the dense network (budget 1.0).
    """
    if num_target < 1:
        raise ValueError(f"--num_target counts blocks run per sample and must be >= 1, but got {num_target}")
    blocks = min(num_target, table.num_blocks)
    return min(1.0, table.fixed_cost() + blocks * float(table.block_costs().mean()))


def build_criterion(args: argparse.Namespace, model: nn.Module) -> dynroute.CoDiNetLoss | nn.CrossEntropyLoss:
    """Cross-entropy for ``--dense``, else the CoDiNet objective with the budget the flags ask for."""
    if args.dense:
        return nn.CrossEntropyLoss()
    table = dynroute.macs_table(model)
    budget = args.budget
    if budget is None and args.num_target:
        budget = budget_from_num_target(args.num_target, table)
    budget_kwargs = {"penalty": args.budget_penalty, "step_size": args.budget_step}
    return dynroute.CoDiNetLoss(
        table,
        num_views=args.views,
        alpha=args.consistency_weight,
        beta=args.diversity_weight,
        gamma=args.gamma,
        target=budget,
        consistency_margin=args.consistency_margin,
        diversity_margin=args.diversity_margin,
        **(budget_kwargs if budget is not None else {}),
    )


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

    What :meth:`dynroute.BudgetLoss.calibrate` needs: images like the ones a deployed model meets,
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
                paths, router_logits = dynroute.routing_paths(model), dynroute.routing_logits(model)
                loss, terms = criterion(logits, labels, paths, router_logits)
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
            if not args.dense and not calibrate_in_stage2:
                criterion.trim(model)  # stage 2 with a budget: hold the hard cost on it
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
        cost = criterion.calibrate(model, loader, at_most=True)
        print(
            f"calibrated the decision threshold on {len(loader.dataset)} training images (evaluation transform): "
            f"cost {100 * cost:.2f}% of dense for a budget of at most {100 * criterion.cost.target:.1f}%"
        )
    if env.enabled:
        for parameter in dynroute.router_parameters(model):
            dist.broadcast(parameter.data, src=0)


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
    if env.is_main and not args.dense:
        print(dynroute.macs_table(model))
    test_loader = DataLoader(test_set, batch_size=args.test_bs, num_workers=args.workers)
    calibration_set = None
    if args.calibrate_images:
        calibration_set = calibration_subset(train_set, eval_transform, args.calibrate_images, args.seed)
    report = train(model, train_set, test_loader, args, env, teacher, calibration_set)
    if env.enabled:
        dist.destroy_process_group()
    return report
