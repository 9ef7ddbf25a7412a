"""Stage-2 DDP step time: GatedBlock's zero-gradient join versus ``find_unused_parameters=True``.

Two gloo ranks on CPU train a routed CIFAR ResNet-20 (routers frozen, hard decisions, sparse
execution) on a fixed batch per rank, and rank 0 prints the median step time and how many blocks
every one of its samples skipped. Usage (from the repository root)::

    python benchmarks/ddp_unused_parameters.py --steps 15 --repeats 2
"""

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import dynroute

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from routed_models import images, routed_model  # noqa: E402  (the test suite's routed CIFAR ResNet)

WARMUP = 3


def _worker(rank: int, init_file: str, find_unused: bool, steps: int, batch_size: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300)
    )
    model = routed_model(blocks_per_stage=3).train()
    for _, block in dynroute.gated_blocks(model):
        block.hard_decisions = True
        block.router.requires_grad_(False)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x, y = images(batch_size, seed=rank), torch.arange(batch_size) % 10
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        timed = sorted(seconds[WARMUP:])
        skipped = int((dynroute.routing_paths(model).sum(0) == 0).sum())
        print(
            f"find_unused_parameters={find_unused}: median step {1000 * timed[len(timed) // 2]:.0f} ms over "
            f"{len(timed)} steps; blocks skipped by every sample of rank 0: {skipped}",
            flush=True,
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.repeats):
        for find_unused in (False, True):
            init_file = os.path.join(tempfile.mkdtemp(), "init")
            mp.start_processes(
                _worker, args=(init_file, find_unused, args.steps, args.batch_size), nprocs=2, start_method="spawn"
            )


if __name__ == "__main__":
    main()
