"""Seed replicates (issue 12.3, config `seeds`): Table 1's pooled rows on hand-made judgments. Which runs the seeds
add and which pairs are judged per seed: the plan's (tests/test_plan.py).

Run: pytest -q tests/test_seeds.py      (a few seconds)
"""
from __future__ import annotations

import csv
import json

from eval.bootstrap import hierarchical_bootstrap
from eval.table1 import make_table1


def _judgments(tmp_path, a, b, outcomes):
    path = tmp_path / f"{a}_vs_{b}.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "model_a": a, "model_b": b, "outcome": o, "judge": "gold",
                                        "protocol": "gold"}) + "\n" for i, o in enumerate(outcomes)))
    return str(path)


def test_pooled_win_rate_is_the_mean_of_the_seeds_with_a_bootstrap_over_both(tmp_path):
    seed1, seed2 = [1.0, 1.0, 0.0, 0.5], [1.0, 1.0, 1.0, 1.0, None]  # None: an invalid verdict, left out
    files = [_judgments(tmp_path, "rpo", "ref", seed1), _judgments(tmp_path, "rpo-seed2", "ref", seed2)]
    boot = {"n": 400, "seed": 0, "ci": 0.9}
    make_table1(judgments=files, out_csv=str(tmp_path / "t.csv"), out_md=str(tmp_path / "t.md"), metrics={},
                figure=str(tmp_path / "f.png"), raw_figure=str(tmp_path / "r.png"), labels={"rpo": "RPO"},
                pair_order=[["rpo", "ref"]], bootstrap=boot,
                seed_pairs={"rpo_vs_ref": [["rpo", "ref"], ["rpo-seed2", "ref"]]})
    rows = {(r["model_a"], r["model_b"], r["metric"]): r for r in csv.DictReader((tmp_path / "t.csv").open())}
    assert float(rows[("rpo", "ref", "win_rate")]["value"]) == 62.5          # seed 1: (1 + 1 + 0 + 0.5) / 4
    assert float(rows[("rpo-seed2", "ref", "win_rate")]["value"]) == 100.0   # seed 2's four valid verdicts
    pooled = rows[("rpo", "ref", "win_rate_pooled")]
    assert float(pooled["value"]) == 81.25 and int(pooled["n"]) == 8          # (62.5 + 100) / 2
    _, lo, hi = hierarchical_bootstrap([[1.0, 1.0, 0.0, 0.5], [1.0] * 4], **{"n_boot": 400, "seed": 0, "ci": 0.9})
    assert (float(pooled["ci_low"]), float(pooled["ci_high"])) == (100 * lo, 100 * hi)
    assert lo < 0.625 and hi == 1.0  # seed-to-seed spread is inside the interval
    reverse = rows[("ref", "rpo", "win_rate_pooled")]
    assert float(reverse["value"]) == 100 - 81.25 and float(reverse["ci_low"]) == 100 * (1 - hi)
    md = (tmp_path / "t.md").read_text()
    assert "pooled over training seeds" in md and "81.2" in md
