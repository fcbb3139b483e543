"""results/paper_comparison.csv: each paper number beside the reproduced one, on a hand-made table1.csv."""
from __future__ import annotations

import csv
import math

import pytest

from eval import paper, results_table


def _table(tmp_path):
    rows = [
        results_table.make_row(model_a="rpo", model_b="ref", metric="win_rate", value=70.0, ci_low=62.0, ci_high=78.0,
                       n=150, judge="openai:gpt-4-0613"),
        results_table.make_row(model_a="rpo", model_b="", metric="mtbench", value=7.0, n=160, judge="openai:gpt-4-0613"),
        results_table.make_row(model_a="dpo", model_b="gpt4_1106_preview", metric="alpacaeval_lc", value=math.nan, n=0,
                       judge="openai:gpt-4-1106-preview"),
    ]
    path = tmp_path / "table1.csv"
    results_table.write_table(results_table.complete_pairs(rows), path)
    return path


def test_comparison_rows(tmp_path):
    comp = paper.write_comparison(_table(tmp_path), "beta", tmp_path / "c.csv", tmp_path / "c.md")
    assert len(comp) == len(paper.PAPER["beta"]) == 15  # one row per paper number
    by = {(r["model_a"], r["model_b"] if r["metric"] == "win_rate" else "", r["metric"]): r for r in comp}
    r = by[("rpo", "ref", "win_rate")]
    # paper 79.0; ours 70.0 in [62, 78]: difference 70 - 79 = -9, the paper's number is outside our CI
    assert (r["paper"], r["value"], r["difference"], r["paper_in_ci"]) == (79.0, 70.0, -9.0, "false")
    r = by[("ref", "rpo", "win_rate")]
    # the reverse row from complete_pairs: 100 - 70 = 30 in [22, 38]; paper 21.0 -> difference 9.0, outside
    assert (r["value"], r["ci_low"], r["ci_high"], r["difference"], r["paper_in_ci"]) == (30.0, 22.0, 38.0, 9.0, "false")
    r = by[("rpo", "", "mtbench")]
    # paper 7.381; ours 7.0 -> -0.381; MT-Bench has no CI here, so "in CI" stays empty
    assert r["difference"] == pytest.approx(-0.381) and r["paper_in_ci"] == ""
    r = by[("dpo", "", "alpacaeval_lc")]  # produced but n/a (LC unavailable): kept, not filled
    assert math.isnan(r["value"]) and math.isnan(r["difference"]) and r["model_b"] == "gpt4_1106_preview"
    r = by[("rpo", "dpo", "win_rate")]  # not in the run at all: an empty row, never another number
    assert math.isnan(r["value"]) and r["judge"] == ""
    saved = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert list(saved[0]) == list(paper.COLUMNS) and saved[0]["difference"] == "-9.0000"
    md = (tmp_path / "c.md").read_text()
    assert "| rpo vs ref | win_rate | 79.00 | 70.00 | [62.00, 78.00] | -9.00 | false |" in md
    assert "not reproduced" in md


def test_unknown_series_is_refused(tmp_path):
    with pytest.raises(ValueError, match="paper.series: unknown series 'delta'"):
        paper.write_comparison(_table(tmp_path), "delta", tmp_path / "c.csv", tmp_path / "c.md")
