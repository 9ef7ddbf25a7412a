"""Where the time of a sparse eval forward goes, block by block: compute that scales with MACs, and overhead.

Companion of ``inference_speed.py`` (same models, weights, fixed random decisions and timing). Every
gated block is fed its real input (captured from a dense forward) and timed alone; each column sums
over all gated blocks of the network, so the stem and head are left out:

- dense: the original blocks;
- sparse: the converted blocks, each run as a stage of one (router, gather, branch, merge, activation),
  skipped rows really skipped;
- router: the routers' four ops alone, on their bound tensors;
- gather: ``index_select`` of the routed rows;
- branch all / branch routed: the residual branch on every row / on the pre-gathered routed rows;
- rows: the fraction of rows routed through a block (the execution rate);
- promised: dense - branch all + branch routed, the dense blocks with their branch run on the routed
  rows only: the time the saved MACs promise, with no cost for choosing, gathering and merging;
- promised / sparse: the share of that promise sparse execution keeps (1.0: no overhead at all).

    python benchmarks/block_breakdown.py --malloc keep                  # resnet50 b32, cifar_resnet110 b256
    python benchmarks/block_breakdown.py --models cifar_resnet110 --batches 1
    python benchmarks/block_breakdown.py --quick
    python benchmarks/block_breakdown.py --device cuda       # any torch device; CUDA is synchronized
"""

import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial

import torch
from inference_speed import (
    FixedDecisions,
    ModelSpec,
    TimingOptions,
    bare_router,
    build_networks,
    decision_columns,
    interleaved_times,
    parse_args,
    random_decisions,
    selected_models,
    setup_timing,
)
from torch import Tensor, nn

import dynroute

COLUMNS = ("dense", "sparse", "router", "gather", "branch all", "branch routed")


def block_inputs(dense: nn.Module, names: Sequence[str], images: Tensor) -> list[Tensor]:
    """The input of each named block of ``dense`` in one forward of ``images``."""
    inputs: list[Tensor] = []
    modules = dict(dense.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for name in names]
    try:
        dense(images)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def breakdown(spec: ModelSpec, batch: int, rate: float, options: TimingOptions, seed: int) -> dict[str, float]:
    """Median milliseconds of each of :data:`COLUMNS`, summed over the gated blocks, and derived figures."""
    generator = torch.Generator().manual_seed(seed)
    dense, networks = build_networks(spec, generator)
    dense, routed = dense.to(options.device), networks["sparse"].to(options.device)
    gated = list(dynroute.gated_blocks(routed))
    dense_blocks = dict(dense.named_modules())
    images = torch.randn(batch, *spec.input_size, generator=generator).to(options.device)
    decisions = random_decisions(batch, len(gated), rate, generator).to(options.device)
    override = FixedDecisions(routed)
    override.set(decision_columns(decisions))
    try:
        with torch.inference_mode():
            inputs = block_inputs(dense, [name for name, _ in gated], images)
            rows = [decisions[:, k].nonzero().squeeze(1) for k in range(len(gated))]
            gathered = [x.index_select(0, routed_rows) for x, routed_rows in zip(inputs, rows)]
            calls: dict[str, list[Callable[[], object]]] = {column: [] for column in COLUMNS}
            for (name, block), x, routed_rows, x_routed in zip(gated, inputs, rows, gathered):
                residual = block.adapter.residual
                calls["dense"].append(partial(dense_blocks[name], x))
                calls["sparse"].append(partial(dynroute.GatedSequential(block), x))  # a stage of one block
                calls["router"].append(partial(bare_router(block.router), x))
                calls["branch all"].append(partial(residual, block.block, x))
                if 0 < len(routed_rows) < len(x):  # as sparse execution: no gather when all or none run
                    calls["gather"].append(partial(x.index_select, 0, routed_rows))
                if len(routed_rows):
                    calls["branch routed"].append(partial(residual, block.block, x_routed))
            timed = {column: partial(_call_all, calls[column]) for column in COLUMNS if calls[column]}
            times = interleaved_times(timed, options)
    finally:
        override.remove()
    result = {column: 1e3 * statistics.median(times[column]) if column in times else 0.0 for column in COLUMNS}
    result["rows"] = decisions.mean().item()
    # The dense blocks with their branch run on the routed rows only: what the saved MACs promise.
    result["promised"] = result["dense"] - result["branch all"] + result["branch routed"]
    return result


def _call_all(calls: list[Callable[[], object]]) -> None:
    for call in calls:
        call()


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    """Print one line per (model, batch, rate) and return the results."""
    args = parse_args(argv)
    options = setup_timing(args)
    names = (*COLUMNS, "rows", "promised")
    header = f"{'model':<16} {'batch':>5} {'rate':>5} " + " ".join(f"{c:>13}" for c in names)
    print(f"ms summed over the gated blocks, {torch.get_num_threads()} threads, {args.clock} clock")
    print(f"{header} {'promised / sparse':>17}")
    results = []
    for name, spec in selected_models(args).items():
        for batch in spec.batches:
            for rate in args.rates:
                result = breakdown(spec, batch, rate, options, args.seed)
                results.append(result)
                figures = " ".join(f"{result[c]:>13.2f}" for c in names)
                print(f"{name:<16} {batch:>5} {rate:>5.0%} {figures} {result['promised'] / result['sparse']:>17.3f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
