"""Print the leading tables of docs/results.md from the scored runs (docs/results/cifar10/scores.jsonl).

Each line of the scores file is one run scored on one split, as docs/scripts/cifar_results.py prints it
(``run``, ``kind``, ``backbone``, ``budget``, ``split``, ``top1``, ``macs_fraction`` of the run's own dense
network, ``distinct_paths``, ``macs_std_fraction``, for routed runs ``flip_agreement`` and
``similarity_correlation``, ``wall_minutes``; scored with cifar_results.py's ``--sweep``, ``sweep``). Runs
named ``<model>-s<seed>`` are seeds of one model. The script prints two markdown tables: every model with
its seeds (cells read "mean (seed 0 / seed 1)" or "seed 0 / seed 1") followed by the threshold sweep of
one routed model (``--sweep RUN``, default r70-plain-s0), and every static and routed model's gap to the
dense frontier and to the static subnetwork of its budget:

    python docs/scripts/cifar_table.py docs/results/cifar10/scores.jsonl

The dense frontier is the mean top-1 of each dense depth's seeds at its MACs as a fraction of dense
ResNet-56 (20: 0.32, 32: 0.55, 44: 0.77, 56: 1.00, counted with fvcore), joined by straight lines.
"""

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from statistics import mean

import numpy as np

import dynroute

KINDS = ("dense", "static", "routed")  # the tables' order
RECIPES = {"plain": "plain", "prob": "`--path-terms probabilities`", "rate": "`--rate-weight 4`"}
SEED = re.compile(r"^(?P<model>.+)-s(?P<seed>\d+)$")


@cache
def dense_fraction(backbone: str) -> float:
    """MACs of the dense CIFAR ``backbone`` (``"resnet32"``) as a fraction of dense ResNet-56's, counted by fvcore."""
    macs = {name: dynroute.count_macs(getattr(dynroute.models, name)(), (3, 32, 32)) for name in (backbone, "resnet56")}
    return macs[backbone] / macs["resnet56"]


def read_scores(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (lines that are not JSON objects are skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def macs_of_resnet56(score: dict) -> float:
    """A scored run's MACs as a fraction of dense ResNet-56."""
    return score["macs_fraction"] * dense_fraction(score["backbone"])


def seeds_of(scores: Iterable[dict], split: str) -> dict[str, list[dict]]:
    """The scores of ``split`` grouped by model (the run name without ``-s<seed>``), seeds in order."""
    models: dict[str, list[dict]] = defaultdict(list)
    for score in scores:
        if score["split"] == split:
            match = SEED.match(score["run"])
            models[match["model"] if match else score["run"]].append(score)
    return {model: sorted(runs, key=lambda score: score["run"]) for model, runs in models.items()}


def frontier(scores: Iterable[dict], split: str) -> tuple[np.ndarray, np.ndarray]:
    """The dense frontier of ``split``: MACs (fraction of dense ResNet-56) and the mean top-1 of each dense depth."""
    points = sorted(
        (dense_fraction(runs[0]["backbone"]), mean(score["top1"] for score in runs))
        for runs in seeds_of(scores, split).values()
        if runs[0]["kind"] == "dense"
    )
    return tuple(map(np.asarray, zip(*points))) if points else (np.empty(0), np.empty(0))


def label(model: str, score: dict) -> str:
    """The table's name for a model."""
    depth = score["backbone"].removeprefix("resnet")
    if score["kind"] == "dense":
        return f"dense ResNet-{depth}"
    if score["kind"] == "static":
        return f"static ResNet-{depth}, budget {score['budget']:.2f} (`--static-router`)"
    return f"routed ResNet-{depth}, budget {score['budget']:.2f}, {RECIPES[model.split('-', 1)[1]]}"


def order(model: str, score: dict) -> tuple:
    """Where a model's rows go: dense networks by depth, then each budget's static and routed models."""
    dense = score["kind"] == "dense"
    return (
        not dense,
        dense_fraction(score["backbone"]) if dense else score["budget"],
        KINDS.index(score["kind"]),
        model,
    )


def column(runs: list[dict], key: str) -> list[float | None]:
    """One figure of each seed's score, None where it was not measured."""
    return [score.get(key) for score in runs]


def cell(values: list[float | None], digits: int, scale: float = 1.0, average: bool = False) -> str:
    """Seeds' values as "a / b", or "mean (a / b)" with ``average``; "-" for a value not measured (None or NaN)."""
    values = [None if value is None or value != value else value for value in values]
    if all(value is None for value in values):
        return "-"
    shown = " / ".join("-" if value is None else f"{scale * value:.{digits}f}" for value in values)
    if average and len(values) > 1 and None not in values:
        return f"{scale * mean(values):.{digits}f} ({shown})"
    return shown


def model_rows(scores: list[dict]) -> list[str]:
    """One row per model: validation and test figures of its seeds and its wall time."""
    val, test = seeds_of(scores, "val"), seeds_of(scores, "test")
    models = sorted(test, key=lambda model: order(model, test[model][0]))
    rows = []
    for model in models:
        runs, val_runs = test[model], val.get(model, [])
        fraction = dense_fraction(runs[0]["backbone"])
        rows.append(
            " | ".join(
                [
                    f"| {label(model, runs[0])}",
                    str(len(runs)),
                    cell(column(val_runs, "top1"), 2, average=True),
                    cell(column(val_runs, "macs_fraction"), 1, 100 * fraction),
                    cell(column(val_runs, "distinct_paths"), 0),
                    cell(column(runs, "top1"), 2, average=True),
                    cell(column(runs, "macs_fraction"), 1, 100 * fraction),
                    cell(column(runs, "distinct_paths"), 0),
                    cell(column(runs, "macs_std_fraction"), 1, 100),
                    cell(column(runs, "flip_agreement"), 3),
                    cell(column(runs, "similarity_correlation"), 3),
                    cell(column(runs, "wall_minutes"), 0) + " |",
                ]
            )
        )
    return rows


def sweep_rows(scores: list[dict], run: str, low: float = 0.4) -> list[str]:
    """The threshold sweep of ``run`` (``"r70-plain-s0"``), one row per offset at ``low`` of dense MACs or more."""
    rows = []
    for score in (score for score in scores if score["run"] == run and "sweep" in score):
        for point in score["sweep"]:
            if point["macs_fraction"] >= low:
                name = f"{run}, threshold offset {point['offset']:+.1f}"
                macs = 100 * macs_of_resnet56(score | point)
                rows.append(f"| {name} | 1 | - | - | - | {point['top1']:.2f} | {macs:.1f} | - | - | - | - | - |")
    return rows


def gap_rows(scores: list[dict]) -> list[str]:
    """Each static and routed model's mean gap in points to the dense frontier and to its budget's static model."""
    gaps: dict[str, dict[str, tuple[int, float, float | None]]] = defaultdict(dict)
    firsts: dict[str, dict] = {}
    for split in ("val", "test"):
        fractions, top1 = frontier(scores, split)
        models = {model: runs for model, runs in seeds_of(scores, split).items() if runs[0]["kind"] != "dense"}
        static = {
            runs[0]["budget"]: mean(column(runs, "top1")) for runs in models.values() if runs[0]["kind"] == "static"
        }
        for model, runs in models.items():
            firsts.setdefault(model, runs[0])
            to_frontier = mean(s["top1"] - np.interp(macs_of_resnet56(s), fractions, top1) for s in runs)
            to_static = None
            if runs[0]["kind"] == "routed" and runs[0]["budget"] in static:
                to_static = mean(column(runs, "top1")) - static[runs[0]["budget"]]
            gaps[model][split] = (len(runs), to_frontier, to_static)
    rows = []
    for model in sorted(gaps, key=lambda model: order(model, firsts[model])):
        by_split = {split: gaps[model].get(split, (0, None, None)) for split in ("val", "test")}
        seeds = " / ".join(str(count) for count, _, _ in by_split.values())
        shown = ["" if gap is None else f"{gap:+.2f}" for _, *pair in by_split.values() for gap in pair]
        first = firsts[model]
        rows.append(f"| {first['budget']:.2f} | {label(model, first)} | {seeds} | " + " | ".join(shown) + " |")
    return rows


HEADER = (
    "| model | seeds | val top-1 (%) | val MACs (%) | val paths | test top-1 (%) | test MACs (%) | test paths "
    "| MACs spread (%) | flip agreement | PCC | wall (min) |\n" + "| --- " * 12 + "|"
)
GAP_HEADER = (
    "| budget | model | seeds (val / test) | val: frontier | val: static | test: frontier | test: static |\n"
    + "| --- " * 7
    + "|"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, help="JSON lines of docs/scripts/cifar_results.py")
    parser.add_argument("--sweep", default="r70-plain-s0", help="the run whose threshold sweep the table shows")
    args = parser.parse_args(argv)
    scores = read_scores(args.scores)
    print("\n".join([HEADER, *model_rows(scores), *sweep_rows(scores, args.sweep)]))
    print()
    print("\n".join([GAP_HEADER, *gap_rows(scores)]))


if __name__ == "__main__":
    main()
