"""Inference speed of routed vs dense ResNets: does skipping a block save the time its MACs promise?

For each model, batch size and execution rate, the dense original, the routed network with sparse
execution (skipped blocks not computed) and the routed network with masked execution (every block
computed, then mixed by the 0/1 gate, as other implementations do) run side by side in one process.
The routers run as usual, so their time is part of the routed cost, but their decisions are
replaced by fixed random ones (``GatedBlock.force_gate``): each sample runs ``round(rate * n_blocks)``
blocks drawn at random (seeded), so every row measures the rate it names. A batch of one holds one path, and blocks of
equal MACs take different times (a stage-1 block of the CIFAR ResNet about twice a stage-3 one), so
a batch-1 row times ``--batch1-draws`` single-image forwards per call, each image with its own
path; the times are per forward. Printed per (model, batch, rate, execution):

- MAC ratio: routed / dense MACs of those decisions, from :func:`dynroute.sample_macs` and the MAC
  table (routers included); the masked rows show the same promised ratio, which they do not cash;
- time ratio: routed / dense time, the median over interleaved repeats of the paired ratio;
- efficiency: time speedup / MAC speedup = MAC ratio / time ratio (1.0: every saved MAC saves time).

Timing warms up, then interleaves dense, sparse and masked runs of every rate (ABCABC...) so that
the noise of a shared machine hits each alike, and takes medians.

    python benchmarks/inference_speed.py                      # resnet50 and cifar_resnet110, a few minutes
    python benchmarks/inference_speed.py --models cifar_resnet110 --batches 1 --repeats 21
    python benchmarks/inference_speed.py --quick              # tiny sizes, a few seconds
    python benchmarks/inference_speed.py --clock cpu --threads 1 --malloc keep   # on a busy shared machine
    python benchmarks/inference_speed.py --channels-last     # networks and images in NHWC
"""

import argparse
import copy
import ctypes
import ctypes.util
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynroute

EXECUTIONS = ("sparse", "masked")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked network: how to build it, its input size and its default batch sizes."""

    factory: Callable[[], nn.Module]
    input_size: tuple[int, int, int]
    batches: tuple[int, ...]


MODELS: dict[str, ModelSpec] = {
    "resnet50": ModelSpec(lambda: timm.create_model("resnet50"), (3, 224, 224), (1, 32)),
    "cifar_resnet110": ModelSpec(dynroute.models.resnet110, (3, 32, 32), (1, 256)),
    # small members of the same families, for --quick and the tests
    "resnet26": ModelSpec(lambda: timm.create_model("resnet26"), (3, 64, 64), (1, 4)),
    "cifar_resnet20": ModelSpec(dynroute.models.resnet20, (3, 32, 32), (1, 8)),
}
FULL_DEFAULTS = {
    "models": ["resnet50", "cifar_resnet110"],
    "repeats": 11,
    "warmup": 2,
    "min_time": 0.1,
    "batch1_draws": 8,
}
QUICK_DEFAULTS = {
    "models": ["resnet26", "cifar_resnet20"],
    "repeats": 3,
    "warmup": 1,
    "min_time": 0.0,
    "image_size": 32,
    "batch1_draws": 2,
}
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
TARGET_BATCH_1 = 0.85
TARGET_LARGE_BATCH = 0.9


@dataclass(frozen=True)
class TimingOptions:
    """How to time: interleaved repeats (median), untimed warm-up calls, seconds per measurement, clock."""

    repeats: int
    warmup: int
    min_time: float
    device: torch.device
    clock: Callable[[], float] = time.perf_counter


@dataclass(frozen=True)
class Row:
    """One line of the result table."""

    model: str
    batch: int
    rate: float
    execution: str
    dense_ms: float
    routed_ms: float
    macs_ratio: float
    time_ratio: float
    max_abs_diff: float

    @property
    def efficiency(self) -> float:
        """Time speedup / MAC speedup, ``(t_dense / t_routed) / (macs_dense / macs_routed)``."""
        return self.macs_ratio / self.time_ratio

    @property
    def target(self) -> float:
        return TARGET_BATCH_1 if self.batch == 1 else TARGET_LARGE_BATCH


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, in place.

    Fresh models have identity BNs and timm zero-initialises the last BN of each block, which
    would make every residual branch zero and any comparison of routed outputs vacuous.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.running_mean.shape
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.25)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model


def random_decisions(batch: int, num_blocks: int, rate: float, generator: torch.Generator) -> Tensor:
    """0/1 decisions (batch, num_blocks): each sample runs ``round(rate * num_blocks)`` random blocks."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"execution rate must lie in [0, 1], but got {rate}")
    order = torch.rand(batch, num_blocks, generator=generator).argsort(dim=1)
    return (order < round(rate * num_blocks)).float()


def macs_ratio(decisions: Tensor, table: dynroute.MacsTable) -> float:
    """Mean routed MACs of ``decisions`` (N, n_blocks), routers included, over the dense network's."""
    return dynroute.sample_macs(decisions, table).mean().item() / table.dense_macs


def decision_columns(decisions: Tensor) -> list[Tensor]:
    """Each gated block's decisions (N,) as a bool tensor, from 0/1 decisions (N, n_blocks)."""
    return [column.contiguous() for column in decisions.bool().unbind(dim=1)]


class FixedDecisions:
    """Impose precomputed decisions with ``GatedBlock.force_gate``; the routers still run and pay their time.

    :meth:`set` a list from :func:`decision_columns` (one (N,) tensor per gated block, in
    :func:`dynroute.gated_blocks` order) before a forward; None lets the routers decide again.
    """

    def __init__(self, model: nn.Module) -> None:
        self._blocks = [block for _, block in dynroute.gated_blocks(model)]

    def set(self, columns: list[Tensor] | None) -> None:
        for block, column in zip(self._blocks, columns or [None] * len(self._blocks), strict=True):
            block.force_gate(column)

    def remove(self) -> None:
        """Let the routers decide again."""
        self.set(None)


def bare_router(router: dynroute.Router) -> Callable[[Tensor], Tensor]:
    """The router's logits (N, 2) from its four inference ops on its bound tensors: no module call, no check.

    Written for the default router (``nn.Linear`` layers with biases, ``nn.ReLU`` between them).
    """
    weight1, bias1, weight2, bias2 = (
        p.detach() for p in (router.fc1.weight, router.fc1.bias, router.fc2.weight, router.fc2.bias)
    )
    return lambda x: F.linear(F.linear(x.mean((2, 3)), weight1, bias1).relu_(), weight2, bias2)


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory instead of returning blocks over 32 MiB to the OS.

    By default every large activation is a fresh ``mmap`` whose pages fault in (and are zeroed) on
    first touch, once per forward, which can take half the CPU time of a dense ResNet-50 forward
    at batch 32, and sparse execution, which allocates the gathered rows and the output on
    top of the branch's own buffers, pays proportionally more. jemalloc or tcmalloc (LD_PRELOAD) do
    the same; both are the usual advice for CPU inference.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_mmap_max, m_trim_threshold = -4, -1  # from glibc's malloc.h
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError("mallopt() refused the settings; run with --malloc default on this C library")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], number: int, options: TimingOptions) -> float:
    """Mean seconds of ``number`` calls of ``fn`` on ``options.clock``, synchronizing CUDA around them."""
    _synchronize(options.device)
    start = options.clock()
    for _ in range(number):
        fn()
    _synchronize(options.device)
    return (options.clock() - start) / number


def interleaved_times(variants: dict[str, Callable[[], object]], options: TimingOptions) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``options.repeats`` times, the variants interleaved (ABCABC...).

    Each measurement averages enough calls that the first variant takes at least ``options.min_time``.
    """
    for run in variants.values():
        for _ in range(options.warmup):
            run()
    first = next(iter(variants.values()))
    number = max(1, math.ceil(options.min_time / time_call(first, 1, options)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(options.repeats):
        for name, run in variants.items():
            times[name].append(time_call(run, number, options))
    return times


def paired_median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """The median of the paired ratios numerator[i] / denominator[i] (repeats interleaved, so paired in time)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def build_networks(spec: ModelSpec, generator: torch.Generator) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The dense original (random BNs) and its converted copies by execution, all in eval mode."""
    dense = randomize_batchnorm(spec.factory(), generator).eval()
    routed = dynroute.convert_resnet(copy.deepcopy(dense), input_size=spec.input_size).eval()
    return dense, {execution: dynroute.set_execution(copy.deepcopy(routed), execution) for execution in EXECUTIONS}


def run_dense(network: nn.Module, images: list[Tensor]) -> Tensor:
    """Logits of one forward per batch of ``images``, concatenated."""
    return torch.cat([network(batch) for batch in images])


def run_routed(
    network: nn.Module, override: FixedDecisions, decisions: list[list[Tensor]], images: list[Tensor]
) -> Tensor:
    """Logits of one forward per batch of ``images``, each under its own fixed decisions, concatenated."""
    outputs = []
    for columns, batch in zip(decisions, images):
        override.set(columns)
        outputs.append(network(batch))
    return torch.cat(outputs)


def benchmark_model(
    name: str,
    spec: ModelSpec,
    rates: Sequence[float],
    options: TimingOptions,
    seed: int,
    batch1_draws: int = 1,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> list[Row]:
    """Rows for every (batch, rate, execution) of one model; dense and routed share weights.

    At batch 1 each timed call runs ``batch1_draws`` forwards, each image with its own decisions.
    Networks and images are moved to ``options.device`` in ``memory_format``.
    """
    generator = torch.Generator().manual_seed(seed)
    dense, networks = build_networks(spec, generator)
    dense = dense.to(options.device, memory_format=memory_format)
    networks = {key: net.to(options.device, memory_format=memory_format) for key, net in networks.items()}
    overrides = {key: FixedDecisions(net) for key, net in networks.items()}
    table = dynroute.macs_table(networks["sparse"])
    rows = []
    for batch in spec.batches:
        draws = batch1_draws if batch == 1 else 1
        images = [
            torch.randn(batch, *spec.input_size, generator=generator).to(options.device, memory_format=memory_format)
            for _ in range(draws)
        ]
        decisions = {rate: random_decisions(batch * draws, table.num_blocks, rate, generator) for rate in rates}
        variants: dict[str, Callable[[], Tensor]] = {"dense": partial(run_dense, dense, images)}
        for rate in rates:
            columns = [
                [tensor.to(options.device) for tensor in decision_columns(draw)]
                for draw in decisions[rate].split(batch)
            ]
            for execution in EXECUTIONS:
                network, override = networks[execution], overrides[execution]
                variants[f"{execution}@{rate}"] = partial(run_routed, network, override, columns, images)
        with torch.inference_mode():
            outputs = {key: run() for key, run in variants.items()}
            times = interleaved_times(variants, options)
        for rate in rates:
            diff = (outputs[f"sparse@{rate}"] - outputs[f"masked@{rate}"]).abs().max().item()
            for execution in EXECUTIONS:
                key = f"{execution}@{rate}"
                rows.append(
                    Row(
                        model=name,
                        batch=batch,
                        rate=rate,
                        execution=execution,
                        dense_ms=1e3 * statistics.median(times["dense"]) / draws,
                        routed_ms=1e3 * statistics.median(times[key]) / draws,
                        macs_ratio=macs_ratio(decisions[rate], table),
                        time_ratio=paired_median_ratio(times[key], times["dense"]),
                        max_abs_diff=diff,
                    )
                )
    for override in overrides.values():
        override.remove()
    return rows


def format_rows(rows: Sequence[Row], input_sizes: dict[str, tuple[int, int, int]]) -> str:
    """The result table; the target column is checked for sparse execution only."""
    header = (
        f"{'model':<16} {'px':>4} {'batch':>5} {'rate':>5} {'exec':>6} {'dense ms':>9} {'routed ms':>9} "
        f"{'MAC ratio':>9} {'time ratio':>10} {'efficiency':>10} {'target':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        verdict = ""
        if row.execution == "sparse":
            verdict = f"{'>=' if row.efficiency >= row.target else '< '}{row.target:.2f}"
        lines.append(
            f"{row.model:<16} {input_sizes[row.model][-1]:>4} {row.batch:>5} {row.rate:>5.0%} {row.execution:>6} "
            f"{row.dense_ms:>9.2f} {row.routed_ms:>9.2f} {row.macs_ratio:>9.3f} {row.time_ratio:>10.3f} "
            f"{row.efficiency:>10.3f} {verdict:>7}"
        )
    worst = max(row.max_abs_diff for row in rows)
    lines.append(f"max |logits(sparse) - logits(masked)| over all rows: {worst:.2e}")
    return "\n".join(lines)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, but got {value}")
        return value

    return parse


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"an execution rate lies in [0, 1], but got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` changes the defaults of the options not given."""
    positive, non_negative = _int_at_least(1), _int_at_least(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default resnet50 cifar_resnet110")
    parser.add_argument("--batches", nargs="+", type=positive, help="batch sizes for every model; default per model")
    parser.add_argument("--rates", nargs="+", type=_rate, default=[0.5, 0.7], help="execution rates (default 0.5 0.7)")
    parser.add_argument("--repeats", type=positive, help="interleaved measurements per variant (median); default 11")
    parser.add_argument("--warmup", type=non_negative, help="untimed calls of each variant first; default 2")
    parser.add_argument("--min-time", type=float, help="seconds a measurement of the dense model lasts; default 0.1")
    parser.add_argument("--image-size", type=positive, help="override every model's input height and width")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batch1-draws",
        type=positive,
        help="single-image forwards per timed call at batch 1, each with its own random path; default 8",
    )
    parser.add_argument(
        "--malloc",
        choices=("default", "keep"),
        default="default",
        help="'keep': glibc keeps freed memory, so large activations are not page-faulted in every forward",
    )
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="'cpu': CPU seconds of this process, blind to other jobs' load (use with --threads 1)",
    )
    parser.add_argument("--threads", type=positive, help="torch intra-op threads; default torch's own")
    parser.add_argument(
        "--channels-last", action="store_true", help="networks and images in channels_last (NHWC) memory format"
    )
    parser.add_argument("--quick", action="store_true", help="tiny models and sizes, a few seconds (a smoke test)")
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def setup_timing(args: argparse.Namespace) -> TimingOptions:
    """Apply ``--malloc`` and ``--threads`` to this process and return the timing options of the rest."""
    if args.malloc == "keep":
        keep_freed_memory()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return TimingOptions(args.repeats, args.warmup, args.min_time, torch.device(args.device), CLOCKS[args.clock])


def selected_models(args: argparse.Namespace) -> dict[str, ModelSpec]:
    """The models of ``--models`` by name, with ``--image-size`` and ``--batches`` applied."""
    specs = {}
    for name in args.models:
        spec = MODELS[name]
        if args.image_size is not None:
            spec = replace(spec, input_size=(spec.input_size[0], args.image_size, args.image_size))
        if args.batches is not None:
            spec = replace(spec, batches=tuple(args.batches))
        specs[name] = spec
    return specs


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark, print its table and return its rows."""
    args = parse_args(argv)
    options = setup_timing(args)
    print(
        f"torch {torch.__version__}, {options.device}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, malloc {args.malloc}, "
        f"{args.clock} clock, {'channels_last' if args.channels_last else 'NCHW'}; "
        f"median of {args.repeats} interleaved repeats; "
        f"batch 1: {args.batch1_draws} single-image forwards per call, each with its own path",
        flush=True,
    )
    specs = selected_models(args)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    rows = []
    for name, spec in specs.items():
        rows += benchmark_model(name, spec, args.rates, options, args.seed, args.batch1_draws, memory_format)
    print(format_rows(rows, {name: spec.input_size for name, spec in specs.items()}))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
