"""benchmarks/ladder.py's table of both budgets from two compare reports: gains paired by seed, and reports of
fewer evaluations or seeds (a `--evals knn` or one-seed ladder) still give a table."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from ladder import both_budgets_table  # noqa: E402


def report(budget: str, trained: list[dict], start: list[dict], epochs: int = 4) -> dict:
    def row(seeds):
        out = {"seeds": seeds}
        for key in seeds[0]:
            values = [s[key] for s in seeds]
            out[key] = sum(values) / len(values)
            if len(values) > 1:
                out[key + "_sd"] = (sum((v - out[key]) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return out

    return {"budget": budget, "methods": {"mae": {**row(trained), "epochs": epochs}}, "step0": {"mae": row(start)},
            "scratch": row(start)}  # fmt: skip


def test_gain_is_paired_by_seed_and_marked_clear():
    start = [{"knn": 0.30, "linear": 0.40}, {"knn": 0.31, "linear": 0.41}, {"knn": 0.32, "linear": 0.42}]
    up = [{"knn": s["knn"] + 0.05, "linear": s["linear"] + 0.001 * i} for i, s in enumerate(start)]
    lines = both_budgets_table(report("45s", up, start, 2), report("4ep", up, start))
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert lines[0].count("|") == lines[2].count("|") == 13 and "4 ep k-NN" in lines[0]
    assert cells[0] == "MAE" and cells[1] == "2"
    assert cells[2] == "0.360 ± 0.010" and cells[4] == "+5.0 ± 0.0 **clear**"  # +5 points on every seed
    assert cells[5] == "+0.1 ± 0.1"  # within the 1-point spread: not clear
    assert cells[10] == "0.310 ± 0.010"
    assert lines[-1].startswith("| random init (plain timm) |")


@pytest.mark.parametrize("seeds", [1, 2])
def test_knn_only_reports_give_a_table(seeds):
    start = [{"knn": 0.30 + 0.01 * i} for i in range(seeds)]
    up = [{"knn": s["knn"] + 0.02} for s in start]
    lines = both_budgets_table(report("45s", up, start), report("4ep", up, start))
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[3] == "-" and cells[5] == "-"  # no linear probe was run
    assert cells[4].startswith("+2.0")
