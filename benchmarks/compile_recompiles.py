"""Count what torch.compile compiles for a routed model in eval mode, sparse vs masked execution.

Prints, per batch, how many samples each block routed, the seconds the call took and the number
of graphs compiled so far; then the graph breaks. Usage (from the repository root)::

    python benchmarks/compile_recompiles.py --backend inductor --batches 8
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import dynroute

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from routed_models import images, routed_model  # noqa: E402  (the test suite's routed CIFAR ResNet)


def measure(execution: str, backend: str, batches: int, batch_size: int) -> None:
    torch._dynamo.reset()
    counters.clear()
    model = dynroute.set_execution(routed_model(), execution)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    print(f"--- execution={execution!r} backend={backend!r}")
    with torch.no_grad():
        for index in range(batches):
            x = images(batch_size, seed=20 + index)
            start = time.perf_counter()
            compiled(x)
            seconds = time.perf_counter() - start
            routed = dynroute.routing_paths(model).sum(0).int().tolist()
            print(f"batch {index}: routed per block {routed}, {seconds:6.2f} s, graphs compiled {counter.frame_count}")
    print(f"graph breaks: {sum(counters['graph_break'].values())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    for execution in ("masked", "sparse"):
        measure(execution, args.backend, args.batches, args.batch_size)


if __name__ == "__main__":
    main()
