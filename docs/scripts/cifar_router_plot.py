"""Plot what the routers learn during stage 1 of CIFAR-10 runs: gate entropy, path terms and MACs per step.

Reads the TensorBoard logs that examples/train_cifar.py writes under each run folder (``train/gate_entropy``,
``train/diversity``, ``train/consistency``, ``train/train_macs``) and draws them against the step,
smoothed over ``--window`` steps, one line per run:

    python docs/scripts/cifar_router_plot.py runs/r70-plain-s1 runs/r70-prob-s0 --out docs/img/cifar10_routers.png

It prints, for each run and series, the smoothed value at the first and the last stage-1 step.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SERIES = {
    "gate_entropy": "gate entropy (bits)",
    "diversity": "diversity term",
    "consistency": "consistency term",
    "train_macs": "MACs of the hard decisions (fraction of dense)",
}


def stage1_series(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The per-step scalars of the stage-1 steps of a run: {name: (steps, values)}."""
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    series = {}
    for name in SERIES:
        if f"train/{name}" in tags:
            points = [(event.step, event.value) for event in events.Scalars(f"train/{name}")]
            steps, values = (np.array(column) for column in zip(*points))
            series[name] = steps, values
    if "gate_entropy" in series:  # logged in stage 1 only: its last step ends stage 1
        last = series["gate_entropy"][0].max()
    else:  # a finished run logged before gate_entropy existed: stage 1 is its first epochs
        run = json.loads((folder / "args.json").read_text())
        last = series["train_macs"][0].max() * run["epochs"] / (run["epochs"] + run["stage2_epochs"])
    return {name: (steps[steps <= last], values[steps <= last]) for name, (steps, values) in series.items()}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Running mean over ``window`` steps (shorter at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of examples/train_cifar.py")
    parser.add_argument("--out", type=Path, required=True, help="image file to write")
    parser.add_argument("--window", type=int, default=25, help="steps of the running mean")
    args = parser.parse_args()
    figure, axes = plt.subplots(1, len(SERIES), figsize=(4.2 * len(SERIES), 3.4))
    for index, folder in enumerate(args.runs):
        series = stage1_series(folder)
        for axis, name in zip(axes, SERIES):
            if name not in series:
                continue
            steps, values = series[name]
            smoothed = smooth(values, args.window)
            axis.plot(steps, smoothed, color=f"C{index}", label=folder.name)
            print(f"{folder.name:<16} {name:<13} first {smoothed[0]:.3f}  last {smoothed[-1]:.3f}")
    for axis, title in zip(axes, SERIES.values()):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("stage-1 step")
        axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=f"C{index}") for index in range(len(args.runs))]
    figure.legend(handles, [folder.name for folder in args.runs], loc="upper center", ncol=len(args.runs), fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
