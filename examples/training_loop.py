"""The two-stage CoDiNet training loop of the examples, top to bottom: data, DDP, optimizer, steps, evaluation.

Not part of the library: a loop to read and copy into your own project. The library pieces it
uses are ``dynroute.CoDiNetLoss`` (and its ``step``), ``dynroute.set_stage``,
``dynroute.routing_paths``, ``dynroute.calibrate_budget``, ``dynroute.evaluate`` and the
checkpoint functions. The command line it reads is built in ``codinet_flags.py``; the run's
folder (logs, checkpoints, resume) is ``run_folder.py``.
"""

import argparse
import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from codinet_flags import build_criterion, record_derived_settings
from run_folder import Run
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

import dynroute

LOGGED_TERMS = ("ce", "consistency", "diversity", "gamma", "cost", "train_macs", "gate_entropy", "distill")


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
    run = Run(args, env.is_main)
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
                # routers learn only in stage 1; saturation (entropy -> 0) ends per-image routing
                run_probs = dynroute.routing_logits(model).softmax(-1)[..., 1] if stage == 1 else None
                on_probs = run_probs is not None and args.path_terms == "probabilities"
                loss, terms = criterion(logits, labels, paths, run_probs if on_probs else None)
                terms["train_macs"] = dynroute.macs_fraction(paths, dynroute.macs_table(model))
                if run_probs is not None:
                    terms["gate_entropy"] = dynroute.gate_entropy(run_probs.detach()).mean().item()
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
