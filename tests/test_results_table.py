"""docs/scripts/cifar_table.py: the leading tables of docs/results.md, printed from the scored runs.

The gaps are checked against a hand computation on a small scores file, and docs/results.md must hold
exactly the tables the script prints from docs/results/cifar10/scores.jsonl.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "scripts"))
cifar_table = pytest.importorskip("cifar_table")


def score(run: str, split: str, top1: float, kind: str = "routed", backbone: str = "resnet56", **extra) -> dict:
    budget = None if kind == "dense" else extra.pop("budget", 0.7)
    return (
        {"run": run, "split": split, "kind": kind, "backbone": backbone, "budget": budget, "top1": top1}
        | {
            "macs_fraction": 1.0,
            "distinct_paths": 1,
            "macs_std_fraction": 0.0,
        }
        | extra
    )


def table_cells(row: str) -> list[str]:
    """The cells of a markdown table row, stripped."""
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


@pytest.fixture
def scores() -> list[dict]:
    return [
        score("dense32-s0", "test", 89.0, "dense", "resnet32"),
        score("dense32-s1", "test", 89.2, "dense", "resnet32"),
        score("dense44-s0", "test", 89.8, "dense", "resnet44"),
        score("static70-s0", "test", 89.0, "static", macs_fraction=0.70),
        score("static70-s1", "test", 89.4, "static", macs_fraction=0.70),
        score("r70-plain-s0", "test", 89.5, macs_fraction=0.70, distinct_paths=12),
        score("r70-plain-s1", "test", 89.9, macs_fraction=0.66, distinct_paths=30),
    ]


def test_frontier_is_the_mean_of_each_depths_seeds(scores):
    fractions, top1 = cifar_table.frontier(scores, "test")
    assert fractions.tolist() == [cifar_table.dense_fraction("resnet32"), cifar_table.dense_fraction("resnet44")]
    assert top1.tolist() == pytest.approx([89.1, 89.8])


def test_gaps_match_a_hand_computation(scores):
    low, high = cifar_table.dense_fraction("resnet32"), cifar_table.dense_fraction("resnet44")

    def frontier_at(macs: float) -> float:  # straight line from (low, 89.1) to (high, 89.8)
        return 89.1 + (macs - low) / (high - low) * (89.8 - 89.1)

    routed = ((89.5 - frontier_at(0.70)) + (89.9 - frontier_at(0.66))) / 2
    static = ((89.0 - frontier_at(0.70)) + (89.4 - frontier_at(0.70))) / 2
    rows = {cells[1]: cells for cells in map(table_cells, cifar_table.gap_rows(scores))}
    routed_row = rows["routed ResNet-56, budget 0.70, plain"]
    assert routed_row[2:] == ["0 / 2", "", "", f"{routed:+.2f}", f"{(89.5 + 89.9) / 2 - (89.0 + 89.4) / 2:+.2f}"]
    assert rows["static ResNet-56, budget 0.70 (`--static-router`)"][5:] == [f"{static:+.2f}", ""]


def test_model_rows_show_each_seed_and_the_mean(scores):
    rows = {cells[0]: cells for cells in map(table_cells, cifar_table.model_rows(scores))}
    routed = rows["routed ResNet-56, budget 0.70, plain"]
    assert routed[1] == "2"
    assert routed[5] == "89.70 (89.50 / 89.90)"
    assert routed[6] == "70.0 / 66.0"
    assert routed[7] == "12 / 30"
    assert list(rows)[:2] == ["dense ResNet-32", "dense ResNet-44"]  # dense first, then budget by budget


def test_sweep_rows_show_one_runs_offsets_from_40_percent(scores):
    offsets = (-3.0, 0.0, 1.0)  # MACs 0.3, 0.6, 0.7: the first is under 40 % of dense
    sweep = [{"offset": offset, "top1": 80.0 + offset, "macs_fraction": 0.6 + offset / 10} for offset in offsets]
    scores[5]["sweep"] = sweep  # r70-plain-s0
    scores[6]["sweep"] = sweep  # r70-plain-s1, not asked for
    rows = [table_cells(row) for row in cifar_table.sweep_rows(scores, "r70-plain-s0")]
    assert [row[0] for row in rows] == ["r70-plain-s0, threshold offset +0.0", "r70-plain-s0, threshold offset +1.0"]
    assert rows[1][5:7] == ["81.00", "70.0"]


def test_results_page_holds_the_tables_of_the_shipped_scores():
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cifar_table.main([str(ROOT / "docs" / "results" / "cifar10" / "scores.jsonl")])
    page = (ROOT / "docs" / "results.md").read_text()
    for table in printed.getvalue().strip().split("\n\n"):
        assert table in page, f"docs/results.md does not hold this table of cifar_table.py:\n{table}"


def test_scores_are_json_lines_of_one_run_and_split_each():
    lines = (ROOT / "docs" / "results" / "cifar10" / "scores.jsonl").read_text().splitlines()
    keys = [(record["run"], record["split"]) for record in map(json.loads, lines)]
    assert len(keys) == len(set(keys))
