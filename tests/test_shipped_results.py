"""The CIFAR-10 checkpoints shipped under docs/results/cifar10/ and the figures their JSON files record.

Every JSON names a checkpoint that :func:`dynroute.from_pretrained` rebuilds; with ``DYNROUTE_CIFAR10``
set to an extracted CIFAR-10 ImageFolder root (``test/<class>/*.jpg``, see docs/results.md), each
checkpoint is evaluated with ``python -m dynroute eval`` and must print its JSON's figures.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

import dynroute
from dynroute import cli

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "cifar10"
RECORDS = sorted(RESULTS.glob("*.json"))
FIGURES = ("top1", "macs_fraction", "distinct_paths", "macs_std_fraction")
CIFAR10 = os.environ.get("DYNROUTE_CIFAR10")


def test_results_are_shipped():
    names = {record.stem for record in RECORDS}
    assert {"r55-plain-s0", "r70-plain-s0", "dense32-s0", "dense56-s0"} <= names


@pytest.mark.parametrize("record", RECORDS, ids=lambda path: path.stem)
def test_record_names_a_checkpoint_that_loads(record):
    figures = json.loads(record.read_text())
    assert set(FIGURES) | {"checkpoint", "command", "commit"} <= set(figures)
    assert figures["checkpoint"] == f"{record.stem}.pt"
    assert f"--note {record.stem}" in figures["command"]
    model = dynroute.from_pretrained(RESULTS / figures["checkpoint"])
    assert (len(list(dynroute.gated_blocks(model))) > 0) == (not record.stem.startswith("dense"))
    assert 0.0 < figures["macs_fraction"] <= 1.0 and 0.0 < figures["top1"] <= 100.0
    assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()


@pytest.mark.skipif(CIFAR10 is None, reason="set DYNROUTE_CIFAR10 to an extracted CIFAR-10 ImageFolder root")
@pytest.mark.parametrize("record", RECORDS, ids=lambda path: path.stem)
def test_eval_prints_the_recorded_figures(record):
    figures = json.loads(record.read_text())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(["eval", "--checkpoint", str(RESULTS / figures["checkpoint"]), "--data-root", CIFAR10, "--json"])
    measured = json.loads(printed.getvalue().strip().splitlines()[-1])
    assert measured["top1"] == pytest.approx(figures["top1"], abs=0.05)
    assert measured["macs_fraction"] == pytest.approx(figures["macs_fraction"], abs=1e-4)
    assert measured["macs_std_fraction"] == pytest.approx(figures["macs_std_fraction"], abs=1e-4)
    assert measured["distinct_paths"] == figures["distinct_paths"]
