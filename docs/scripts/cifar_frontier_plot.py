"""Plot one routed model's budget sweep against the dense frontier and the static subnetworks (docs/img/).

Reads the scored runs, the JSON lines that docs/scripts/cifar_results.py prints (one object per run
and split, the swept model with ``--sweep``), and draws the test split's top-1 against MACs as a
fraction of dense ResNet-56:

    python docs/scripts/cifar_frontier_plot.py docs/results/cifar10/scores.jsonl --out docs/img/cifar10_frontier.png

The frontier joins the mean top-1 of each dense depth's seeds (docs/scripts/cifar_table.py's
``frontier``); each static and routed model is drawn at the mean of its seeds. For every sweep point inside
the frontier's range it prints how far above (+) or below (-) the frontier the point lies, in points.
The vertical axis spans the frontier's neighbourhood (2 points under its lowest network to 1 over its
best).
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from cifar_table import SEED, frontier, label, macs_of_resnet56, read_scores, seeds_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, help="JSON lines of docs/scripts/cifar_results.py")
    parser.add_argument("--out", type=Path, default=Path("docs/img/cifar10_frontier.png"))
    args = parser.parse_args()
    runs = [run for run in read_scores(args.scores) if run["split"] == "test"]
    fractions, top1 = frontier(runs, "test")
    fig, ax = plt.subplots(figsize=(9.6, 4.4))
    if len(fractions):
        ax.plot(fractions, top1, "o-", color="black", label="dense ResNet-20/32/44/56, mean of seeds (frontier)")
    routed_colors = iter(["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"])
    colors = {}
    for model, seeds in seeds_of(runs, "test").items():
        if seeds[0]["kind"] != "dense":
            static = seeds[0]["kind"] == "static"
            colors[model] = "tab:orange" if static else next(routed_colors)
            point = [np.mean([macs_of_resnet56(run) for run in seeds]), np.mean([run["top1"] for run in seeds])]
            name = f"{label(model, seeds[0])}, {len(seeds)} seed{'s' * (len(seeds) > 1)}".replace("`", "")
            ax.plot(*point, "s" if static else "*", markersize=7 if static else 12, color=colors[model], label=name)
    for run in runs:
        if "sweep" in run:
            points = sorted((macs_of_resnet56(run | point), point["top1"]) for point in run["sweep"])
            color = colors[SEED.match(run["run"])["model"]]
            ax.plot(*zip(*points), ".--", color=color, label=f"{run['run']}: shared threshold swept")
            for macs, acc in points:
                if len(fractions) > 1 and fractions[0] <= macs <= fractions[-1]:
                    print(f"{run['run']} at {macs:.3f} of dense: {acc - np.interp(macs, fractions, top1):+.2f}")
    if len(fractions):  # the frontier's neighbourhood; sweep points far below it leave the axes
        ax.set_ylim(top1.min() - 2.0, top1.max() + 1.0)
    ax.set_xlabel("MACs, fraction of dense ResNet-56")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("CIFAR-10: one routed model at every budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, clear of the curves
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
