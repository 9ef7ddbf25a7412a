"""Count what torch.compile compiles for a routed model in eval mode, sparse vs masked execution.

Prints, per batch, how many samples each block routed, the seconds the call took, the graphs and
the frames dynamo compiled so far (a frame whose graph is empty compiles no graph); then the graph
breaks, the most cache entries any one code object holds and how many code objects hit dynamo's
recompile limit (they then run uncompiled). Routers are centred to run each block for about half of the
images. Usage (from the repository root)::

    python benchmarks/compile_recompiles.py --backend inductor --batches 8
    python benchmarks/compile_recompiles.py --model timm_resnet18 --backend aot_eager --batch-sizes 8 1 4
    python benchmarks/compile_recompiles.py --model resnet20 --backend aot_eager --recompile-limit 72
"""

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn
from torch._dynamo.convert_frame import input_codes
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import dynroute

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from routed_models import RecompileLimitHits, centre_routers, images  # noqa: E402  (the test suite's helpers)

# name -> (network factory, image size)
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet8": (lambda: dynroute.models.CifarResNet(1), 32),  # the tests' 3-block network
    "resnet20": (dynroute.models.resnet20, 32),
    "resnet56": (dynroute.models.resnet56, 32),
    "timm_resnet18": (lambda: timm.create_model("resnet18"), 64),
}


def routed(name: str) -> tuple[nn.Module, int]:
    """The converted network ``name`` in eval mode, routers centred, and its image size."""
    factory, size = MODELS[name]
    torch.manual_seed(0)
    model = dynroute.convert_resnet(factory(), input_size=(3, size, size)).eval()
    return centre_routers(model, images(64, size=size, seed=100)), size


def most_cache_entries() -> tuple[int, str]:
    """The most cache entries on one code object dynamo compiled, and that code's name."""
    codes = [ref() for ref in input_codes.seen]
    return max(((len(_debug_get_cache_entry_list(code)), code.co_name) for code in codes if code), default=(0, "-"))


def measure(name: str, execution: str, backend: str, batches: int, batch_sizes: list[int]) -> None:
    torch._dynamo.reset()
    counters.clear()
    model, size = routed(name)
    dynroute.set_execution(model, execution)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    hits = RecompileLimitHits()
    logging.getLogger("torch._dynamo").addHandler(hits)
    blocks = len(list(dynroute.gated_blocks(model)))
    print(f"--- model={name!r} ({blocks} gated blocks, {size} px) execution={execution!r} backend={backend!r}")
    try:
        with torch.no_grad():
            for index in range(batches):
                x = images(batch_sizes[index % len(batch_sizes)], size=size, seed=20 + index)
                start = time.perf_counter()
                compiled(x)
                seconds = time.perf_counter() - start
                paths = dynroute.routing_paths(model).sum(0).int().tolist()
                print(
                    f"batch {index} of {x.shape[0]}: routed per block {paths}, {seconds:6.2f} s, "
                    f"graphs compiled {counter.frame_count}, frames compiled {counters['frames']['total']}"
                )
    finally:
        logging.getLogger("torch._dynamo").removeHandler(hits)
    entries, code = most_cache_entries()
    print(f"graph breaks: {sum(counters['graph_break'].values())}; most cache entries on one code: {entries} ({code})")
    limit = torch._dynamo.config.recompile_limit
    print(f"code objects that hit the recompile limit ({limit}) and run uncompiled: {len(hits.messages)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet8")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8], help="cycled through; default 8")
    parser.add_argument("--recompile-limit", type=int, help="torch._dynamo.config.recompile_limit; default torch's")
    args = parser.parse_args()
    if args.recompile_limit is not None:
        torch._dynamo.config.recompile_limit = args.recompile_limit
        limit = torch._dynamo.config.accumulated_recompile_limit
        torch._dynamo.config.accumulated_recompile_limit = max(limit, args.recompile_limit)
    for execution in ("masked", "sparse"):
        measure(args.model, execution, args.backend, args.batches, args.batch_sizes)


if __name__ == "__main__":
    main()
