"""DistributedDataParallel (gloo, CPU, 2 processes) trains a converted model as one process would.

Stage 1 (relaxed gates) and stage 2 (frozen routers, hard decisions, sparse execution) each run a
few SGD steps. In stage 2 every sample on rank 0 skips block ``layer1.0`` while rank 1 runs it
for some samples: without :meth:`GatedBlock._skipped` DDP would wait for that block's gradients.
The reference is one process on the same global batch, split in the two per-rank micro-batches
(DDP computes BatchNorm statistics per rank) with each rank's Gumbel noise stream.
"""

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dynroute
from dynroute.models import CifarResNet

WORLD_SIZE = 2
STEPS = 3
PER_RANK = 4  # 2 samples x 2 views
NUM_VIEWS = 2
LR = 0.05
SKIPPED_BLOCK = "layer1.0"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return dynroute.convert_resnet(CifarResNet(1), input_size=(3, 32, 32)).train()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-rank (images, labels): rank 0 holds one image repeated, so each gate decides alike for all its rows."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 32, 32, generator=generator)
    rank0 = image.expand(PER_RANK, -1, -1, -1).clone()
    rank1 = torch.randn(PER_RANK, 3, 32, 32, generator=generator) * torch.rand(PER_RANK, 3, 1, 1, generator=generator)
    labels = torch.randint(0, 10, (WORLD_SIZE, PER_RANK), generator=generator)
    return [(rank0, labels[0]), (rank1, labels[1])]


def _loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cost: nn.Module) -> torch.Tensor:
    logits = model(images)
    paths = dynroute.routing_paths(model)
    routing = dynroute.consistency_loss(paths, NUM_VIEWS) + dynroute.diversity_loss(paths, NUM_VIEWS)
    return F.cross_entropy(logits, labels) + 0.1 * routing + cost(paths)


def _enter_stage_two(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Freeze routers, decide hard, and set block layer1.0's router to skip all of rank 0 and run part of rank 1."""
    for _, block in dynroute.gated_blocks(model):
        block.hard_decisions = True
        block.router.requires_grad_(False)
    block = model.get_submodule(SKIPPED_BLOCK)
    stem = copy.deepcopy(model).train()  # batch statistics, as in training; running stats of the model untouched
    with torch.no_grad():
        nn.init.normal_(block.router.fc2.weight, std=3.0, generator=torch.Generator().manual_seed(2))
        block.router.fc2.bias.zero_()
        differences = []
        for images, _ in batches:
            logits = block.router(stem.act(stem.bn1(stem.conv1(images))))
            differences.append(logits[:, 1] - logits[:, 0])
        skipped, mixed = differences[0][0], differences[1].median()
        if skipped > mixed:
            block.router.fc2.weight.neg_()
            skipped, mixed = -skipped, -mixed
        block.router.fc2.bias[1] = -(skipped + mixed) / 2


def _train(model: nn.Module, step, stage_two_batches) -> list[torch.Tensor]:
    """Stage 1 then stage 2, ``STEPS`` each; ``step(model, optimizer)`` runs one step and returns its paths."""
    paths = []
    for stage in (1, 2):
        if stage == 2:
            _enter_stage_two(model, stage_two_batches)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        for _ in range(STEPS):
            optimizer.zero_grad()
            paths.append(step(model, optimizer))
            optimizer.step()
    return paths


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        model = _model()
        cost = dynroute.CostLoss(dynroute.macs_table(model), target=0.6)
        batches = _batches()
        images, labels = batches[rank]
        torch.manual_seed(100 + rank)
        wrapped = {}

        def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
            # A new wrapper per stage: DDP fixes at construction which parameters expect gradients.
            trainable = tuple(p.requires_grad for p in model.parameters())
            if wrapped.get("trainable") != trainable:
                wrapped.update(trainable=trainable, ddp=DistributedDataParallel(model))
            _loss(wrapped["ddp"], images, labels, cost).backward()
            return dynroute.routing_paths(model).detach().clone()

        paths = _train(model, step, batches)
        torch.save({"state": model.state_dict(), "paths": paths}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference() -> tuple[nn.Module, list[torch.Tensor]]:
    """One process: each step sums the two per-rank micro-batch losses / 2, each with its rank's noise stream."""
    model = _model()
    cost = dynroute.CostLoss(dynroute.macs_table(model), target=0.6)
    batches = _batches()
    rng_states = []
    for rank in range(WORLD_SIZE):
        torch.manual_seed(100 + rank)
        rng_states.append(torch.get_rng_state())

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        paths = []
        for rank, (images, labels) in enumerate(batches):
            torch.set_rng_state(rng_states[rank])
            (_loss(model, images, labels, cost) / WORLD_SIZE).backward()
            rng_states[rank] = torch.get_rng_state()
            paths.append(dynroute.routing_paths(model).detach().clone())
        return torch.cat(paths)

    return model, _train(model, step, batches)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(
        _worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    while not context.join(timeout=300):
        pass
    return [torch.load(directory / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.mark.slow
class TestDistributedDataParallel:
    """Two gloo ranks end equal to each other and to one process on the global batch."""

    def test_stage_two_skips_a_block_on_one_rank_only(self, ddp_results):
        index = [name for name, _ in dynroute.gated_blocks(_model())].index(SKIPPED_BLOCK)
        for step in range(STEPS, 2 * STEPS):
            rank0, rank1 = (result["paths"][step][:, index] for result in ddp_results)
            assert rank0.sum() == 0, f"step {step}: rank 0 should skip {SKIPPED_BLOCK} for every sample"
            assert 0 < rank1.sum() < PER_RANK, f"step {step}: rank 1 should run {SKIPPED_BLOCK} for some samples"

    def test_ranks_end_with_the_same_parameters(self, ddp_results):
        first, second = (result["state"] for result in ddp_results)
        for key, value in first.items():
            if value.is_floating_point() and "running_" not in key:  # BN running stats are per rank
                torch.testing.assert_close(value, second[key], rtol=0, atol=1e-6, msg=key)

    def test_parameters_match_one_process_on_the_global_batch(self, ddp_results):
        reference, reference_paths = _reference()
        for step, paths in enumerate(reference_paths):
            ddp_paths = torch.cat([result["paths"][step] for result in ddp_results])
            torch.testing.assert_close(ddp_paths, paths, rtol=1e-4, atol=1e-5)
        trained = ddp_results[0]["state"]
        initial = _model().state_dict()
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(trained[name], parameter.detach(), rtol=1e-4, atol=1e-5, msg=name)
        moved = [name for name, parameter in reference.named_parameters() if not torch.equal(parameter, initial[name])]
        assert f"{SKIPPED_BLOCK}.conv1.weight" in moved  # rank 1's gradient reached the block skipped on rank 0


class TestSkippedBranchStaysInTheGraph:
    """A branch skipped by the whole batch in hard training gives its parameters a zero gradient, not None."""

    def test_zero_gradient_for_a_fully_skipped_branch(self):
        model = _model()
        block = model.get_submodule(SKIPPED_BLOCK)
        block.hard_decisions = True
        block.router.requires_grad_(False)
        block.force_gate(None)
        with torch.no_grad():
            block.router.fc2.bias.copy_(torch.tensor([5.0, -5.0]))  # skip for every sample
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        assert dynroute.routing_paths(model)[:, 0].sum() == 0
        for name, parameter in block.named_parameters():
            if parameter.requires_grad and not name.startswith("router"):
                assert parameter.grad is not None, name
                assert torch.count_nonzero(parameter.grad) == 0, name

    def test_eval_skip_adds_nothing(self):
        model = _model().eval()
        block = model.get_submodule(SKIPPED_BLOCK)
        with torch.no_grad():
            block.router.fc2.bias.copy_(torch.tensor([5.0, -5.0]))
        x = torch.randn(2, 16, 32, 32).relu()
        torch.testing.assert_close(block(x), block.adapter.activation(block.block, x), rtol=0, atol=0)
