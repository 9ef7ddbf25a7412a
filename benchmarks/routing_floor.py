"""How close can per-sample routing get to its MACs at batch 1 in eager PyTorch? Floors for the batch-1 rows.

Same models, weights, random paths and timing as ``inference_speed.py``, at batch 1 (where a decision
is a plain ``if``). Every variant runs the same paths and returns the same logits:

- dense: the original network;
- chosen blocks: the original network, each block either run as it is or replaced by its shortcut and
  final activation, chosen by a Python ``if`` on the fixed path: routing if deciding were free;
- + bare routers: the same, each block first running its router's four ops (mean, linear, relu,
  linear) on bound tensors: the paper's router without any module machinery;
- dynroute: the converted network's sparse eval forward (routers as deployed, decisions fixed).

Efficiency is the MAC ratio (dynroute's, routers included, for every variant) over the time ratio, as
in ``inference_speed.py``. A variant's efficiency bounds dynroute's from above: the gap between
"chosen blocks" and "+ bare routers" is what the routers' ops cost, and the gap between "+ bare
routers" and "dynroute" what the gating's bookkeeping and module calls cost.

    python benchmarks/routing_floor.py --malloc keep --repeats 7
    python benchmarks/routing_floor.py --models cifar_resnet110 --threads 1 --clock cpu
    python benchmarks/routing_floor.py --quick
"""

import copy
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    macs_ratio,
    paired_median_ratio,
    parse_args,
    random_decisions,
    run_dense,
    run_routed,
    selected_models,
    setup_timing,
)
from torch import Tensor, nn

import dynroute

VARIANTS = ("dense", "chosen blocks", "+ bare routers", "dynroute")


class ChosenBlock(nn.Module):
    """An original residual block, run as it is, or as its shortcut and final activation when ``run`` is False.

    ``router`` (optional) runs on the block input first, its result unused: the cost of deciding.
    """

    def __init__(self, block: nn.Module, router: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        adapter = dynroute.get_adapter(block)
        if adapter is None:
            raise TypeError(f"no adapter is registered for {type(block).__qualname__}")
        self.block, self.adapter, self.router = block, adapter, router
        self.run = True

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'), the block's output or its shortcut's, activated."""
        if self.router is not None:
            self.router(x)
        if self.run:
            return self.block(x)
        return self.adapter.activation(self.block, self.adapter.shortcut(self.block, x))


def chosen_network(dense: nn.Module, routed: nn.Module, with_routers: bool) -> tuple[nn.Module, list[ChosenBlock]]:
    """A copy of ``dense`` whose gated blocks (those of ``routed``) are :class:`ChosenBlock` s, in gated order."""
    network = copy.deepcopy(dense)
    blocks = []
    for name, gated in dynroute.gated_blocks(routed):
        block = ChosenBlock(network.get_submodule(name), bare_router(gated.router) if with_routers else None)
        network.set_submodule(name, block)
        blocks.append(block)
    return network, blocks


def run_chosen(network: nn.Module, blocks: list[ChosenBlock], paths: list[list[bool]], images: list[Tensor]) -> Tensor:
    """Logits of one single-image forward per image, each block run or not as its path says, concatenated."""
    outputs = []
    for path, image in zip(paths, images):
        for block, run in zip(blocks, path):
            block.run = run
        outputs.append(network(image))
    return torch.cat(outputs)


@dataclass(frozen=True)
class FloorRow:
    """One variant at one execution rate."""

    model: str
    rate: float
    variant: str
    ms: float
    macs_ratio: float
    time_ratio: float
    max_abs_diff: float  # against dynroute's logits

    @property
    def efficiency(self) -> float:
        """Time speedup / MAC speedup, as in ``inference_speed.Row``."""
        return self.macs_ratio / self.time_ratio


def floor_rows(
    name: str, spec: ModelSpec, rates: Sequence[float], options: TimingOptions, seed: int, draws: int
) -> list[FloorRow]:
    """Rows of every variant and rate for one model: ``draws`` single-image forwards per timed call."""
    generator = torch.Generator().manual_seed(seed)
    dense, networks = build_networks(spec, generator)
    dense, routed = dense.to(options.device), networks["sparse"].to(options.device)
    # Built on the device: the bare routers bind the device's tensors.
    chosen = {with_routers: chosen_network(dense, routed, with_routers) for with_routers in (False, True)}
    override = FixedDecisions(routed)
    table = dynroute.macs_table(routed)
    images = [torch.randn(1, *spec.input_size, generator=generator).to(options.device) for _ in range(draws)]
    variants: dict[str, Callable[[], Tensor]] = {"dense": partial(run_dense, dense, images)}
    decisions = {}
    for rate in rates:
        decisions[rate] = random_decisions(draws, table.num_blocks, rate, generator)
        paths = [[bool(gate) for gate in draw.tolist()] for draw in decisions[rate]]
        columns = [[t.to(options.device) for t in decision_columns(draw)] for draw in decisions[rate].split(1)]
        variants[f"chosen blocks@{rate}"] = partial(run_chosen, *chosen[False], paths, images)
        variants[f"+ bare routers@{rate}"] = partial(run_chosen, *chosen[True], paths, images)
        variants[f"dynroute@{rate}"] = partial(run_routed, routed, override, columns, images)
    try:
        with torch.inference_mode():
            outputs = {key: run() for key, run in variants.items()}
            times = interleaved_times(variants, options)
    finally:
        override.remove()
    rows = []
    for rate in rates:
        for variant in VARIANTS:
            key = "dense" if variant == "dense" else f"{variant}@{rate}"
            rows.append(
                FloorRow(
                    model=name,
                    rate=rate,
                    variant=variant,
                    ms=1e3 * statistics.median(times[key]) / draws,
                    macs_ratio=1.0 if variant == "dense" else macs_ratio(decisions[rate], table),
                    time_ratio=paired_median_ratio(times[key], times["dense"]),
                    max_abs_diff=0.0
                    if variant == "dense"
                    else (outputs[key] - outputs[f"dynroute@{rate}"]).abs().max().item(),
                )
            )
    return rows


def format_floor(rows: Sequence[FloorRow]) -> str:
    """The result table, one line per model, rate and variant, and the largest logit difference."""
    header = (
        f"{'model':<16} {'rate':>5} {'variant':<15} {'ms':>8} {'MAC ratio':>9} {'time ratio':>10} {'efficiency':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.model:<16} {row.rate:>5.0%} {row.variant:<15} {row.ms:>8.2f} {row.macs_ratio:>9.3f} "
            f"{row.time_ratio:>10.3f} {row.efficiency:>10.3f}"
        )
    worst = max(row.max_abs_diff for row in rows)
    lines.append(f"max |logits(variant) - logits(dynroute)| over all rows: {worst:.2e}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[FloorRow]:
    """Run the floors at batch 1, print their table and return its rows."""
    args = parse_args(argv)
    if args.batches not in (None, [1]):
        raise SystemExit("routing_floor.py measures batch 1 only (a decision is an `if` there); drop --batches")
    options = setup_timing(args)
    print(
        f"torch {torch.__version__}, {options.device}, {torch.get_num_threads()} threads, malloc {args.malloc}, "
        f"{args.clock} clock; median of {args.repeats} interleaved repeats; batch 1, "
        f"{args.batch1_draws} single-image forwards per call, each with its own path",
        flush=True,
    )
    rows = []
    for name, spec in selected_models(args).items():
        rows += floor_rows(name, spec, args.rates, options, args.seed, args.batch1_draws)
    print(format_floor(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
