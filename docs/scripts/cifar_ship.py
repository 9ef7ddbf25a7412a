"""Ship a CIFAR-10 run of docs/results.md: one checkpoint file and the figures `python -m dynroute eval` prints for it.

For each run folder that examples/train_cifar.py wrote, the script rebuilds the network the run trained
(docs/scripts/cifar_results.py's ``load_run``), saves it with :func:`dynroute.save_pretrained` as
``OUT/<run>.pt`` and evaluates that file with the command line a user runs,

    python -m dynroute eval --checkpoint OUT/<run>.pt --data-root DATA --json

then writes ``OUT/<run>.json``: the four figures it printed (``top1`` in percent, ``macs_fraction`` of
the run's own dense network, ``distinct_paths``, ``macs_std_fraction``), the checkpoint's file name, the
training command and the commit of the code that trained it:

    python docs/scripts/cifar_ship.py --data ~/data/cifar10 --out docs/results/cifar10 \\
        --commit 1793e08 --command "python examples/train_cifar.py ..." runs/r70-plain-s0
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from cifar_results import load_run

import dynroute


def ship(run: Path, data: Path, out: Path, command: str, commit: str) -> dict:
    """Save ``run``'s model to ``out/<run>.pt``, evaluate it with ``python -m dynroute eval`` and write its JSON."""
    model, description = load_run(run)
    checkpoint = out / f"{run.name}.pt"
    metadata = {"run": run.name, "command": command, "commit": commit, "budget": description["budget"]}
    input_size = None if list(dynroute.gated_blocks(model)) else (3, 32, 32)  # a converted model records its own
    dynroute.save_pretrained(model, checkpoint, input_size=input_size, metadata=metadata)
    printed = subprocess.run(
        [sys.executable, "-m", "dynroute", "eval", "--checkpoint", str(checkpoint), "--data-root", str(data), "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    figures = json.loads(printed.strip().splitlines()[-1])
    record = {**figures, "checkpoint": checkpoint.name, "command": command, "commit": commit}
    (out / f"{run.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders of examples/train_cifar.py")
    parser.add_argument("--data", type=Path, required=True, help="CIFAR-10 ImageFolder root holding test/")
    parser.add_argument("--out", type=Path, default=Path("docs/results/cifar10"))
    parser.add_argument("--command", required=True, help="the training command of the run (one per run)", nargs="+")
    parser.add_argument("--commit", required=True, help="commit of the code that trained the runs", nargs="+")
    args = parser.parse_args()
    if not len(args.runs) == len(args.command) == len(args.commit):
        parser.error(f"give one --command and one --commit per run: {len(args.runs)} runs")
    args.out.mkdir(parents=True, exist_ok=True)
    for run, command, commit in zip(args.runs, args.command, args.commit):
        print(json.dumps(ship(run, args.data, args.out, command, commit)), flush=True)


if __name__ == "__main__":
    main()
