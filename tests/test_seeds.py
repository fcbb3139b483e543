"""Seed replicates (issue 12.3, config `seeds`): the DAG trains and judges every seed's runs, and Table 1's
pooled rows on hand-made judgments."""
from __future__ import annotations

import csv
import json
import re

import yaml

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


def test_seeds_replicate_every_training_and_table1_pair(tmp_path):
    """A dry run of the tiny config with seeds [1, 2]: each method trained twice (seed 2 as <m>-seed2 with
    training seed 2), Table 1's pairs judged for both seeds, the benchmarks on the first seed's models."""
    from test_workflow import job_counts, snakemake, tiny_config
    cfg_path = tiny_config(tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["seeds"] = [1, 2]
    cfg_path.write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path, cfg_path, "-n", "-p")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counts = job_counts(run.stdout)
    assert counts["train_preference"] == 4 and counts["generate_table1"] == 5
    assert counts["judge_table1"] == 2 * 3  # the default pairs rpo-ref, rpo-dpo, dpo-ref, per seed
    assert counts["generate_mtbench"] == 3  # ref, dpo, rpo: the first seed's models
    for m in ("dpo", "rpo"):
        assert f"results/train/{m}-seed2/model" in run.stdout
    args = [json.loads(a) for a in re.findall(r"train-preference --threads \d+ --args '(\{.*?\})' --paths", run.stdout)]
    seeds = {a["method"]["name"]: a["cfg"]["seed"] for a in args}
    assert seeds == {"dpo": 1, "rpo": 1, "dpo-seed2": 2, "rpo-seed2": 2}, seeds
    assert "results/judgments/table1/rpo-seed2_vs_dpo-seed2.jsonl" in run.stdout
