"""A training run's folder: arguments, TensorBoard and CSV logs, the last checkpoint, resume."""

import argparse
import csv
import json
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

import dynroute


@dataclass
class RunState:
    """Where a run is: the next epoch to train, the optimizer step count, training seconds so far."""

    epoch: int = 0
    step: int = 0
    seconds: float = 0.0


class Run:
    """One training run: folder, TensorBoard and CSV logs, checkpoints, resume."""

    def __init__(self, args: argparse.Namespace, is_main: bool) -> None:
        self.args, self.is_main = args, is_main
        self.folder = os.path.join(args.log_path, args.note)
        self.checkpoint_path = os.path.join(self.folder, "last.pt")
        self.csv_path = os.path.join(self.folder, "log.csv")
        self.writer = None
        if is_main:
            os.makedirs(self.folder, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(self.folder, "tensorboard"))
            with open(os.path.join(self.folder, "args.json"), "w") as file:
                json.dump(vars(args), file, indent=2)

    def log_scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def log_epoch(self, row: dict) -> None:
        """Append one row to the CSV log (main process only).

        A resumed run keeps the columns its log began with, so rows stay under their headers when a
        newer version of this script logs more terms (those are left out of the old file).
        """
        if not self.is_main:
            return
        fieldnames = list(row)
        new = not os.path.exists(self.csv_path)
        if not new:
            with open(self.csv_path, newline="") as file:
                fieldnames = next(csv.reader(file), None) or fieldnames
        with open(self.csv_path, "a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames, restval="nan", extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, state: RunState) -> None:
        if self.is_main:
            dynroute.save_checkpoint(
                self.checkpoint_path + ".tmp",
                model,
                optimizer=optimizer.state_dict(),
                criterion=criterion.state_dict(),
                **asdict(state),
            )
            os.replace(self.checkpoint_path + ".tmp", self.checkpoint_path)

    def resume(self, model: nn.Module, criterion: nn.Module) -> tuple[RunState, dict | None]:
        """Restore model, stage and criterion (gamma) from the last checkpoint, if asked and present."""
        if not (self.args.resume and os.path.exists(self.checkpoint_path)):
            return RunState(), None
        extra = dynroute.load_checkpoint(self.checkpoint_path, model)
        criterion.load_state_dict(extra["criterion"])
        return RunState(extra["epoch"], extra["step"], extra["seconds"]), extra["optimizer"]

    def close(self, report: dict) -> None:
        if self.is_main:
            with open(os.path.join(self.folder, "results.json"), "w") as file:
                json.dump(report, file, indent=2)
            self.writer.close()
