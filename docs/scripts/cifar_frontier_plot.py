"""Plot one routed model's budget sweep against the dense frontier and the static subnetworks (docs/img/).

Reads the JSON lines that docs/scripts/cifar_results.py prints (one object per run, the routed run with
``--sweep``) and draws top-1 against MACs as a fraction of dense ResNet-56:

    python docs/scripts/cifar_results.py --split test runs/dense*-s0 runs/static*-s0 > scores.jsonl
    python docs/scripts/cifar_results.py --split test --sweep runs/r55-plain-s0 runs/r70-plain-s0 >> scores.jsonl
    python docs/scripts/cifar_frontier_plot.py scores.jsonl --out docs/img/cifar10_frontier.png

Dense runs (``"kind": "dense"``) are placed at their MACs as a fraction of dense ResNet-56 (20: 0.32,
32: 0.55, 44: 0.77, 56: 1.00, measured with ``dynroute.count_macs``) and joined into the frontier; it
prints, for every sweep point inside the frontier's range, how far above (+) or below (-) the frontier
it lies, in points. The vertical axis spans the frontier's neighbourhood (2 points under its lowest
network to 1 over its best).
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import dynroute  # noqa: E402

DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}


def dense_fraction(depth: int) -> float:
    """MACs of the dense CIFAR ResNet of ``depth`` as a fraction of dense ResNet-56's, counted by fvcore."""
    macs = {d: dynroute.count_macs(getattr(dynroute.models, f"resnet{d}")(), (3, 32, 32)) for d in (depth, 56)}
    return macs[depth] / macs[56]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, help="JSON lines of docs/scripts/cifar_results.py")
    parser.add_argument("--out", type=Path, default=Path("docs/img/cifar10_frontier.png"))
    args = parser.parse_args()
    runs = [json.loads(line) for line in args.scores.read_text().splitlines() if line.startswith("{")]
    dense = sorted((dense_fraction(DEPTHS[run["backbone"]]), run["top1"]) for run in runs if run.get("kind") == "dense")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if dense:
        ax.plot(*zip(*dense), "o-", color="black", label="dense ResNet-20/32/44/56 (frontier)")
    for run in runs:
        if run.get("kind") == "static":
            ax.plot(run["macs_fraction"], run["top1"], "s", color="tab:orange", label=f"static {run['run']}")
        elif run.get("kind") == "routed":
            ax.plot(run["macs_fraction"], run["top1"], "*", markersize=12, label=f"routed {run['run']}")
            if "sweep" in run:
                points = sorted((p["macs_fraction"], p["top1"]) for p in run["sweep"])
                ax.plot(*zip(*points), ".--", label=f"{run['run']}: shared threshold swept")
                if len(dense) > 1:
                    fractions, top1 = map(np.asarray, zip(*dense))
                    for macs, acc in points:
                        if fractions[0] <= macs <= fractions[-1]:
                            print(f"{run['run']} at {macs:.3f} of dense: {acc - np.interp(macs, fractions, top1):+.2f}")
    if dense:  # the frontier's neighbourhood; sweep points far below it leave the axes
        low, high = min(top1 for _, top1 in dense), max(top1 for _, top1 in dense)
        ax.set_ylim(low - 2.0, high + 1.0)
    ax.set_xlabel("MACs, fraction of dense ResNet-56")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("CIFAR-10: one routed model at every budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
