"""Deployed routed ResNets at batch 1: do exported graphs that skip save the time their MACs promise?

For timm ``resnet50`` at 224 px and the CIFAR ``resnet110`` of ``dynroute.models`` at 32 px (random
weights and batch norm statistics), routed at fixed execution rates, three graphs of the same weights
run side by side in one process, in ONNX Runtime (CPU execution provider, each graph optimised for the CPU
by ``dynroute.optimize_onnx``, which for the dense and masked graphs is ONNX Runtime's own optimisation) and
as ``torch.export`` programs (``program.module()``):

- dense: the original network, exported as it is;
- masked: ``dynroute.export_masked_program``, every block computed and multiplied by its decision;
- skipping: ``dynroute.export_skipping_program`` at batch 1, one ``torch.cond`` (ONNX ``If``) per block.

The routers decide inside the graphs, as deployed. To measure given rates, one routed model is
exported once, its routers fitted (least squares on their hidden features) so that on ``--draws``
images per rate each image runs ``round(rate * n_blocks)`` blocks drawn at random, and runs varied
paths elsewhere; the graphs' paths are checked against those draws. A timed call runs a rate's
draws one image at a time; times are per image. Columns as in ``inference_speed.py``: MAC ratio =
routed / dense MACs of the draws' paths (routers included), time ratio = routed / dense time
(median of the paired ratios of interleaved repeats, one runtime at a time), efficiency = MAC ratio
/ time ratio (time speedup / MAC speedup).

Then the check, for each model: the eager routed model's logits and paths against both
graphs that skip, in both runtimes, on ``--check-images`` images (CIFAR-10 test JPEGs from
``--data-root``, resized to the model's input size, or random images where the folder is missing):
the batch-1 graph one image at a time, and the any-batch graph (gather, run, scatter) in batches of
``--check-batch``. Required: max |logits| difference <= 1e-5 (torch.export) and <= 1e-4 (ONNX
Runtime), every path equal.

    python benchmarks/deploy_speed.py                       # resnet50 and cifar_resnet110, 50 % and 70 %
    python benchmarks/deploy_speed.py --models cifar_resnet110 --repeats 21
    python benchmarks/deploy_speed.py --quick                # a tiny CIFAR ResNet, about a minute (run by the tests)
    python benchmarks/deploy_speed.py --onnx-dir onnx         # keep the ONNX models
"""

import argparse
import copy
import itertools
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import onnxruntime
import torch
import torchvision
from inference_speed import (
    CLOCKS,
    MODELS,
    ModelSpec,
    TimingOptions,
    interleaved_times,
    macs_ratio,
    paired_median_ratio,
    random_decisions,
    randomize_batchnorm,
)
from torch import Tensor, nn

import dynroute

DEPLOY_MODELS: dict[str, ModelSpec] = {
    **MODELS,
    "cifar_resnet8": ModelSpec(partial(dynroute.models.CifarResNet, 1), (3, 32, 32), (1,)),
}
FULL_DEFAULTS = {
    "models": ["resnet50", "cifar_resnet110"],
    "rates": [0.5, 0.7],
    "repeats": 11,
    "warmup": 2,
    "min_time": 0.1,
    "draws": 8,
    "check_images": 256,
    "check_batch": 32,
}
QUICK_DEFAULTS = {
    "models": ["cifar_resnet8"],
    "rates": [0.5],
    "repeats": 2,
    "warmup": 1,
    "min_time": 0.0,
    "draws": 2,
    "check_images": 6,
    "check_batch": 4,
}
RUNTIMES = ("onnxruntime", "torch.export")
GRAPHS = ("dense", "masked", "skipping")
TARGET_EFFICIENCY = 0.85
TOLERANCES = {"torch.export": 1e-5, "onnxruntime": 1e-4}
FIT_IMAGES = 64  # images whose logit differences set each fitted router's bias and scale


@dataclass(frozen=True)
class Row:
    """One graph in one runtime at one rate (None for the dense graph)."""

    model: str
    rate: float | None
    runtime: str
    graph: str
    ms: float
    macs_ratio: float
    time_ratio: float

    @property
    def efficiency(self) -> float:
        """Time speedup / MAC speedup, ``(t_dense / t_graph) / (macs_dense / macs_graph)``."""
        return self.macs_ratio / self.time_ratio


@dataclass(frozen=True)
class CheckRow:
    """A graph that skips against the eager routed model on the check images."""

    model: str
    runtime: str
    graph: str
    images: int
    execution_rate: float
    distinct_paths: int
    max_abs_diff: float
    path_mismatches: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= TOLERANCES[self.runtime] and self.path_mismatches == 0


def fit_routers(model: nn.Module, images: Tensor, decisions: Tensor, generator: torch.Generator) -> nn.Module:
    """Set every router so that the eval model's paths on the first D ``images`` are ``decisions`` (D, n_blocks),
    while the other images take varied paths; in place.

    The routers are set in forward order, inside one forward of all ``images``, so router k sees its block's real
    input under the decisions of the blocks before it. Its first layer gets random weights and a bias that makes
    each hidden unit active on half of ``images``; its "run minus skip" logit is a random direction of the hidden
    features, with a bias that runs half of ``images`` (as trained routers disagree between images), plus the
    smallest change (least squares) that makes it +s on the first D images that run block k and -s on the others,
    s the median distance of a logit difference from the median. Exact while D does not exceed the hidden width.
    """
    blocks = [block for _, block in dynroute.gated_blocks(model)]
    fitted = decisions.shape[0]

    def fit(router: dynroute.Router, run: Tensor) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            pooled = args[0].mean((2, 3))  # the router: pool, fc1, act, fc2
            router.fc1.weight.copy_(torch.randn(router.fc1.weight.shape, generator=generator) / pooled.shape[1] ** 0.5)
            router.fc1.bias.copy_(-(pooled @ router.fc1.weight.T).median(dim=0).values)
            hidden = router.act(router.fc1(pooled)).double()
            weight = torch.randn(hidden.shape[1], generator=generator, dtype=torch.float64)
            difference = hidden @ weight
            bias = -difference.median()
            scale = (difference + bias).abs().median()
            features = torch.cat([hidden[:fitted], torch.ones_like(hidden[:fitted, :1])], dim=1)
            change = torch.linalg.pinv(features) @ (scale * (2 * run.double() - 1) - difference[:fitted] - bias)
            router.fc2.weight.zero_()
            router.fc2.bias.zero_()
            router.fc2.weight[1] = weight + change[:-1]
            router.fc2.bias[1] = bias + change[-1]

        return hook

    handles = [block.register_forward_pre_hook(fit(block.router, run)) for block, run in zip(blocks, decisions.T)]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        model(images[:fitted])
    mismatches = int((dynroute.routing_paths(model) != decisions).sum())
    if mismatches:
        raise RuntimeError(
            f"the fitted routers take {mismatches} decisions of the draws otherwise: fewer --draws or --rates"
        )
    return model


def load_images(data_root: str, count: int, input_size: tuple[int, int, int], seed: int) -> tuple[Tensor, str]:
    """``count`` CIFAR-10 test images at ``input_size`` from ``data_root``, or random ones where it is missing."""
    root = Path(data_root).expanduser()
    split = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if split is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(count, *input_size, generator=generator), "random images"
    dataset = torchvision.datasets.ImageFolder(split, transform=dynroute.eval_transform(input_size[-1]))
    # Spread over the classes: ImageFolder lists them one class after another.
    indices = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()
    return torch.stack([dataset[index][0] for index in indices]), f"{split} JPEG images"


@dataclass(frozen=True)
class Graph:
    """One exported graph, runnable on a (N, C, H, W) batch in both runtimes: logits, and paths if it has them."""

    module: nn.Module  # the program's module()
    onnx_model: onnxruntime.InferenceSession

    def run(self, runtime: str, images: Tensor) -> tuple[Tensor, ...]:
        if runtime == "onnxruntime":
            return tuple(torch.from_numpy(out) for out in self.onnx_model.run(None, {"images": images.numpy()}))
        outputs = self.module(images)
        return outputs if isinstance(outputs, tuple) else (outputs,)


def build_graph(program: torch.export.ExportedProgram, path: Path, threads: int) -> Graph:
    """The program's module and its ONNX model (written to ``path``) loaded in ONNX Runtime, optimised for the CPU
    it runs on by ``dynroute.optimize_onnx`` (next to it, ``.cpu.onnx``), as every graph is."""
    dynroute.export_onnx(program, path)
    optimized = path.with_suffix(".cpu.onnx")
    dynroute.optimize_onnx(path, optimized)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    onnx_model = onnxruntime.InferenceSession(optimized, options, providers=["CPUExecutionProvider"])
    return Graph(program.module(), onnx_model)


def run_images(graph: Graph, runtime: str, images: Tensor) -> Tensor:
    """Logits of one call per image of ``images`` (N, C, H, W), concatenated."""
    return torch.cat([graph.run(runtime, image)[0] for image in images.split(1)])


def if_nodes(path: Path) -> int:
    """How many ``If`` nodes the main graph of an ONNX file holds."""
    import onnx

    return sum(node.op_type == "If" for node in onnx.load(os.fspath(path), load_external_data=False).graph.node)


def eager_outputs(model: nn.Module, images: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Logits and paths of the eager model on ``images``, run in batches of ``batch``."""
    logits, paths = [], []
    for chunk in images.split(batch):
        logits.append(model(chunk))
        paths.append(dynroute.routing_paths(model))
    return torch.cat(logits), torch.cat(paths)


def check_graph(
    graph: Graph, runtime: str, batch: int, images: Tensor, logits: Tensor, paths: Tensor
) -> tuple[float, int]:
    """Max |logits - reference| and the number of path entries that differ, running ``images`` in batches."""
    outputs = [graph.run(runtime, chunk) for chunk in images.split(batch)]
    got_logits, got_paths = torch.cat([out[0] for out in outputs]), torch.cat([out[1] for out in outputs])
    return (got_logits - logits).abs().max().item(), int((got_paths != paths).sum())


def benchmark_model(
    name: str, spec: ModelSpec, args: argparse.Namespace, options: TimingOptions, folder: Path
) -> tuple[list[Row], list[CheckRow]]:
    """Timing rows of one model at every rate of ``args.rates``, and its check rows.

    One routed model serves every rate: the routers are fitted to a set of draws per rate, and each rate's
    timed calls run its own draws.
    """
    generator = torch.Generator().manual_seed(args.seed)
    dense = randomize_batchnorm(spec.factory(), generator).eval()
    table = dynroute.macs_table(dynroute.convert_resnet(copy.deepcopy(dense), input_size=spec.input_size))
    fitted = args.draws * len(args.rates)
    count = max(args.check_images, fitted + FIT_IMAGES)
    images, source = load_images(args.data_root, count, spec.input_size, args.seed)
    decisions = {rate: random_decisions(args.draws, table.num_blocks, rate, generator) for rate in args.rates}
    draws = dict(zip(args.rates, images[:fitted].split(args.draws)))
    routed = dynroute.convert_resnet(copy.deepcopy(dense), input_size=spec.input_size)
    fit_routers(routed, images, torch.cat(list(decisions.values())), generator)
    print(f"{name}: exporting the graphs ({source})", flush=True)
    example, threads = images[:1], torch.get_num_threads()
    programs = {
        "dense": torch.export.export(dense, (example,), strict=False),
        "masked": dynroute.export_masked_program(routed, example, dynamic_batch=False, with_paths=True),
        "skipping": dynroute.export_skipping_program(routed, example, dynamic_batch=False, with_paths=True),
        "gathering": dynroute.export_skipping_program(routed, images[:2], with_paths=True),
    }
    graphs = {key: build_graph(program, folder / f"{key}.onnx", threads) for key, program in programs.items()}
    for key in ("skipping", "gathering"):
        found = if_nodes(folder / f"{key}.onnx")
        if found != table.num_blocks:
            raise RuntimeError(f"the {key} ONNX graph has {found} If nodes for {table.num_blocks} gated blocks")
    rows = []
    with torch.inference_mode():
        for runtime in RUNTIMES:
            for rate, images_at_rate in draws.items():
                paths = torch.cat([graphs["skipping"].run(runtime, draw)[1] for draw in images_at_rate.split(1)])
                if not torch.equal(paths, decisions[rate]):
                    raise RuntimeError(f"the {runtime} skipping graph ran other paths than the draws at rate {rate}")
            variants = {("dense", None): partial(run_images, graphs["dense"], runtime, draws[args.rates[0]])}
            for rate, graph in itertools.product(args.rates, ("masked", "skipping")):
                variants[graph, rate] = partial(run_images, graphs[graph], runtime, draws[rate])
            print(f"{name}: timing {runtime}", flush=True)
            times = interleaved_times(variants, options)
            for (graph, rate), seconds in times.items():
                rows.append(
                    Row(
                        model=name,
                        rate=rate,
                        runtime=runtime,
                        graph=graph,
                        ms=1e3 * statistics.median(seconds) / args.draws,
                        macs_ratio=1.0 if rate is None else macs_ratio(decisions[rate], table),
                        time_ratio=paired_median_ratio(seconds, times["dense", None]),
                    )
                )
        print(f"{name}: checking the graphs that skip", flush=True)
        check_images = images[: args.check_images]
        logits, paths = eager_outputs(routed, check_images, args.check_batch)
        checks = []
        forms = {"batch 1": ("skipping", 1), f"batch {args.check_batch}": ("gathering", args.check_batch)}
        for runtime, (form, (key, batch)) in itertools.product(RUNTIMES, forms.items()):
            diff, mismatches = check_graph(graphs[key], runtime, batch, check_images, logits, paths)
            execution_rate, distinct_paths = paths.mean().item(), len(torch.unique(paths, dim=0))
            checks.append(
                CheckRow(name, runtime, form, len(check_images), execution_rate, distinct_paths, diff, mismatches)
            )
    return rows, checks


def format_rows(rows: Sequence[Row], input_sizes: dict[str, tuple[int, int, int]]) -> str:
    """The timing table; the target column is checked for the skipping graphs."""
    header = (
        f"{'model':<16} {'px':>4} {'rate':>5} {'runtime':<12} {'graph':<9} {'ms':>8} {'MAC ratio':>9} "
        f"{'time ratio':>10} {'efficiency':>10} {'target':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        rate = "-" if row.rate is None else f"{row.rate:.0%}"
        verdict = ""
        if row.graph == "skipping":
            verdict = f"{'>=' if row.efficiency >= TARGET_EFFICIENCY else '< '}{TARGET_EFFICIENCY:.2f}"
        lines.append(
            f"{row.model:<16} {input_sizes[row.model][-1]:>4} {rate:>5} {row.runtime:<12} {row.graph:<9} "
            f"{row.ms:>8.2f} {row.macs_ratio:>9.3f} {row.time_ratio:>10.3f} {row.efficiency:>10.3f} {verdict:>7}"
        )
    return "\n".join(lines)


def format_checks(checks: Sequence[CheckRow]) -> str:
    """The check table: each graph that skips against the eager routed model."""
    header = (
        f"{'model':<16} {'runtime':<12} {'graph':<9} {'images':>6} {'exec rate':>9} {'paths':>5} "
        f"{'max |diff|':>10} {'path diffs':>10} {'result':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in checks:
        lines.append(
            f"{row.model:<16} {row.runtime:<12} {row.graph:<9} {row.images:>6} "
            f"{row.execution_rate:>9.3f} {row.distinct_paths:>5} {row.max_abs_diff:>10.2e} {row.path_mismatches:>10} "
            f"{'ok' if row.passed else 'FAILED':>6}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` changes the defaults of the options not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(DEPLOY_MODELS), help="default resnet50 cifar_resnet110")
    parser.add_argument("--rates", nargs="+", type=float, help="execution rates in (0, 1); default 0.5 0.7")
    parser.add_argument("--repeats", type=int, help="interleaved measurements per graph (median); default 11")
    parser.add_argument("--warmup", type=int, help="untimed calls of each graph first; default 2")
    parser.add_argument("--min-time", type=float, help="seconds a measurement of the dense graph lasts; default 0.1")
    parser.add_argument("--draws", type=int, help="timed images, each with its own random path; default 8")
    parser.add_argument("--check-images", type=int, help="images of the check; default 256")
    parser.add_argument("--check-batch", type=int, help="batch size of the any-batch graph in the check; default 32")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("DYNROUTE_CIFAR10", "~/data/cifar10"),
        help="CIFAR-10 ImageFolder root with test/ (default $DYNROUTE_CIFAR10 or ~/data/cifar10); random images "
        "where it is missing",
    )
    parser.add_argument("--image-size", type=int, help="override every model's input height and width")
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads; default torch's own")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="'cpu': CPU seconds of this process")
    parser.add_argument("--onnx-dir", help="keep the ONNX models in this folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny CIFAR ResNet, few images (a smoke test)")
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else FULL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not all(0.0 < rate < 1.0 for rate in args.rates):
        parser.error(f"--rates must lie strictly between 0 and 1, but got {args.rates}")
    for name in ("repeats", "draws", "check_images", "check_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}")
    if args.draws < 2:
        parser.error(f"--draws must be >= 2 (the any-batch graph is exported on two images), but got {args.draws}")
    return args


def main(argv: Sequence[str] | None = None) -> tuple[list[Row], list[CheckRow]]:
    """Run the benchmark and the check, print both tables and return their rows."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    options = TimingOptions(args.repeats, args.warmup, args.min_time, torch.device("cpu"), CLOCKS[args.clock])
    specs = {}
    for name in args.models:
        spec = DEPLOY_MODELS[name]
        if args.image_size is not None:
            spec = replace(spec, input_size=(spec.input_size[0], args.image_size, args.image_size))
        specs[name] = spec
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__} (CPUExecutionProvider), "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {args.clock} clock; "
        f"batch 1, {args.draws} images per call, each with its own path; median of {args.repeats} interleaved repeats",
        flush=True,
    )
    rows, checks = [], []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(args.onnx_dir or temporary)
        for name, spec in specs.items():
            model_folder = folder / name
            model_folder.mkdir(parents=True, exist_ok=True)
            model_rows, model_checks = benchmark_model(name, spec, args, options, model_folder)
            rows += model_rows
            checks += model_checks
    print(format_rows(rows, {name: spec.input_size for name, spec in specs.items()}))
    for model in specs:
        verdicts = [
            f"{row.runtime} {'yes' if row.time_ratio < 1 else 'no'} ({row.time_ratio:.3f})"
            for row in rows
            if row.model == model and row.graph == "skipping" and row.rate == 0.5
        ]
        if verdicts:
            print(f"{model}: skipping faster than dense at 50 %: {', '.join(verdicts)}")
    print()
    print(format_checks(checks))
    print(f"checks passed: {sum(row.passed for row in checks)} of {len(checks)}")
    return rows, checks


if __name__ == "__main__":
    main(sys.argv[1:])
