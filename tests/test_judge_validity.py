"""Judge validity (eval/judging/validity.py, rule judge_validity): the statistics on small hand-made tables,
the stage through a fake OpenAI-compatible judge and the real IFEval gold verifiers, and the Snakemake
rule run from Table 1's answer files.

Run: pytest -q tests/test_judge_validity.py            (about 20 s: one Snakemake run of the rule)
     pytest -q -m slow tests/test_judge_validity.py    (also: `enabled` adds it to rule all; two dry runs)
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.fake_openai import FakeOpenAIServer, completion
from sklearn.metrics import cohen_kappa_score

from eval.judging import validity as jv
from helpers.workflow import REPO, job_counts, snakemake, tiny_config

# ----------------------------------------------------------------------------- kappa and agreement by hand

#         1  2  3  4  5  6  7  8  9  10
GOLD = ["win", "win", "win", "win", "tie", "tie", "loss", "loss", "loss", "loss"]
JUDGE = ["win", "win", "win", "tie", "tie", "win", "loss", "loss", "tie", "loss"]
# agree at 1,2,3,5,7,8,10: p_o = 7/10. Shares gold (win, tie, loss) = (.4, .2, .4), judge (.4, .3, .3):
# p_e = .16 + .06 + .12 = .34; kappa = (.7 - .34) / (1 - .34) = .36 / .66 = 6/11.


def test_cohen_kappa_three_classes_by_hand():
    assert jv.confusion(GOLD, JUDGE).tolist() == [[3, 1, 0], [1, 1, 0], [0, 1, 3]]  # rows gold, cols judge
    assert jv.cohen_kappa(GOLD, JUDGE) == pytest.approx(6 / 11)
    assert jv.cohen_kappa(GOLD, JUDGE) == pytest.approx(cohen_kappa_score(GOLD, JUDGE))
    assert jv.cohen_kappa(GOLD, GOLD) == 1.0
    # a judge that always says tie agrees on the gold ties only, no better than chance: kappa 0
    assert jv.cohen_kappa(GOLD, ["tie"] * 10) == 0.0
    assert math.isnan(jv.cohen_kappa(["tie"] * 3, ["tie"] * 3))  # p_e = 1: undefined, not 1 or 0
    assert [jv.verdict_class(o) for o in (0, 0.25, 0.5, 0.75, 1, None)] == ["loss", "loss", "tie", "win", "win", None]


def item(pid, gold, ab, ba, len_a=5, len_b=5, n_invalid=None):
    """One pair: gold outcome for A, the judge's outcome for A per order (None: no verdict)."""
    valid = [o for o in (ab, ba) if o is not None]
    o = sum(valid) / len(valid) if valid else None
    j = {"outcome": o, "outcome_ab": ab, "outcome_ba": ba, "n_invalid": 2 - len(valid)}
    return {"id": pid, "gold": gold, "len_a": len_a, "len_b": len_b, "judge": {"True": j}}


# The same ten gold/judge classes as pairs, each order's verdict spelled out, plus an unparsable pair (11)
# and one with a single valid order (12). A is longer in 1-4, B in 7-10, equal in 5, 6, 11, 12.
ITEMS = [item("p1", 1.0, 1.0, 1.0, 9, 5), item("p2", 1.0, 1.0, 1.0, 9, 5), item("p3", 1.0, 1.0, 1.0, 9, 5),
         item("p4", 1.0, 1.0, 0.0, 9, 5),            # judge tie: A wins shown first, loses shown second
         item("p5", 0.5, 0.5, 0.5), item("p6", 0.5, 1.0, 0.5),   # p6: 0.75 -> win
         item("p7", 0.0, 0.0, 0.0, 5, 9), item("p8", 0.0, 0.0, 0.0, 5, 9),
         item("p9", 0.0, 0.5, 0.5, 5, 9), item("p10", 0.0, 0.0, 0.0, 5, 9),
         item("p11", 1.0, None, None), item("p12", 0.0, None, 0.0)]


def test_statistics_by_hand():
    rows = {r["statistic"]: r for r in jv.statistics(ITEMS, True, n_boot=200, seed=0, ci=0.95)}
    assert list(rows) == list(jv.JUDGE_STATS)
    # 24 calls, 2 (p11) + 1 (p12) without a verdict
    assert (rows["unparsable"]["value"], rows["unparsable"]["n"]) == (pytest.approx(100 * 3 / 24), 24)
    # pairs with a verdict: p1-p10 as GOLD/JUDGE above, and p12 (loss, loss): 8 of 11 agree
    assert (rows["agreement"]["value"], rows["agreement"]["n"]) == (pytest.approx(100 * 8 / 11), 11)
    # without gold ties (p5, p6): 7 of 9 (p4 and p9 are judge ties, disagreeing)
    assert (rows["agreement_no_gold_ties"]["value"], rows["agreement_no_gold_ties"]["n"]) == (pytest.approx(700 / 9), 9)
    assert rows["kappa"]["value"] == pytest.approx(cohen_kappa_score(GOLD + ["loss"], JUDGE + ["loss"]))
    assert rows["kappa"]["n"] == 11
    # first shown wins: per valid order, outcome_ab as is, 1 - outcome_ba. Orders (ab, 1-ba):
    # p1-p3 (1,0)x3, p4 (1,1), p5 (.5,.5), p6 (1,.5), p7,p8,p10 (0,1)x3, p9 (.5,.5), p12 (-,1): 21 verdicts
    first = 3 * 1 + 2 + 1 + 1.5 + 3 * 1 + 1 + 1
    assert (rows["first_position_win_rate"]["value"], rows["first_position_win_rate"]["n"]) == \
        (pytest.approx(100 * first / 21), 21)
    # the longer answer's outcome: p1-p3 1, p4 .5 (A longer); p7, p8, p10 1, p9 .5 (B longer): 7 of 8
    assert (rows["longer_answer_win_rate"]["value"], rows["longer_answer_win_rate"]["n"]) == (87.5, 8)
    gold, = jv.statistics(ITEMS, None, n_boot=200, seed=0, ci=0.95)
    assert (gold["statistic"], gold["value"], gold["n"]) == ("longer_answer_win_rate", 100.0, 8)
    for r in rows.values():
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["n_prompts"] == 12


def reference_interval(items, seed, n_boot, ci, stat):
    """A plain percentile bootstrap over prompts: the same draws, each replicate's pairs listed and the
    statistic computed on them directly (sklearn's kappa)."""
    ids = sorted({it["id"] for it in items})
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        chosen = [ids[k] for k in rng.integers(0, len(ids), len(ids))]
        sample = [it for pid in chosen for it in items if it["id"] == pid]
        reps.append(stat(sample))
    reps = np.array([r for r in reps if np.isfinite(r)])
    return tuple(np.quantile(reps, [(1 - ci) / 2, 1 - (1 - ci) / 2]))


def test_bootstrap_resamples_prompts_with_all_their_pairs():
    # two model pairs per prompt: the pairs of a prompt are drawn together
    items = [dict(it, id=f"q{k // 2}") for k, it in enumerate(ITEMS)]

    def pairs_with_verdict(sample):
        return [(jv.verdict_class(it["gold"]), jv.verdict_class(it["judge"]["True"]["outcome"]))
                for it in sample if it["judge"]["True"]["outcome"] is not None]

    def agreement(sample):
        p = pairs_with_verdict(sample)
        return 100 * sum(g == j for g, j in p) / len(p) if p else math.nan

    def kappa(sample):
        g, j = zip(*pairs_with_verdict(sample))
        return jv.cohen_kappa(list(g), list(j))

    rows = {r["statistic"]: r for r in jv.statistics(items, True, n_boot=300, seed=7, ci=0.9)}
    for name, stat in (("agreement", agreement), ("kappa", kappa)):
        lo, hi = reference_interval(items, 7, 300, 0.9, stat)
        assert (rows[name]["ci_low"], rows[name]["ci_high"]) == (pytest.approx(lo), pytest.approx(hi)), name
    assert rows["agreement"]["n_prompts"] == 6


# ----------------------------------------------------------------------------- the stage, a fake judge

LOWER = {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}
# (prompt id, model x's answer, model y's answer): gold win, loss, tie for x (the real IFEval verifier)
ANSWERS = [("p1", "all lowercase here", "ALL CAPS"), ("p2", "UPPER", "lower answer"),
           ("p3", "this is the answer in plain english", "that is the answer in plain english")]


def write_inputs(root):
    prompts = [{"id": pid, "messages": [{"role": "user", "content": f"Answer in lowercase letters only ({pid})."}],
                "meta": {"source": "synthetic:verifiable", **LOWER}} for pid, _, _ in ANSWERS]
    paths = {"prompts": root / "prompts_test.jsonl", "x": root / "x.jsonl", "y": root / "y.jsonl"}
    paths["prompts"].write_text("".join(json.dumps(p) + "\n" for p in prompts))
    for k, model in ((1, "x"), (2, "y")):
        paths[model].write_text("".join(json.dumps({"id": a[0], "model": model, "responses": [a[k]]}) + "\n"
                                        for a in ANSWERS))
    return paths


def shown(text, who):
    return text.split(f"[The Start of Assistant {who}'s Answer]\n")[1].split("\n[The End")[0]


def fake_judge(n, req, hdrs):
    """Constrained (vLLM's structured_outputs in the body): a perfect judge of lowercase. Free text: always
    [[A]], except on p2, where it gives no verdict."""
    user = req["messages"][-1]["content"]
    if "structured_outputs" in req:
        a, b = (shown(user, w) == shown(user, w).lower() for w in "AB")
        return 200, {}, completion("[[A]]" if a > b else "[[B]]" if b > a else "[[C]]")
    return 200, {}, completion("I cannot decide." if "(p2)" in user else "Assistant A. [[A]]")


# By hand. Constrained: every verdict right: unparsable 0/6, agreement 3/3, without gold ties 2/2, kappa 1;
# the first shown wins p1 ab, p2 ba, half in both p3 orders: 3/6; the longer answer (x in p1, y in p2; p3
# equal lengths) wins both: 2/2. Free text: p2 unparsable (2/6); p1 [[A]] twice -> tie (gold win, wrong),
# p3 tie (right): agreement 1/2, without gold ties 0/1, kappa 0 (p_o = p_e = 1/2); first shown wins all 4
# verdicts; the longer answer (x in p1) ties: 50 % of 1.
EXPECTED = {
    "false": {"unparsable": (100 / 3, 6), "agreement": (50, 2), "agreement_no_gold_ties": (0, 1), "kappa": (0, 2),
              "first_position_win_rate": (100, 4), "longer_answer_win_rate": (50, 1)},
    "true": {"unparsable": (0, 6), "agreement": (100, 3), "agreement_no_gold_ties": (100, 2), "kappa": (1, 3),
             "first_position_win_rate": (50, 6), "longer_answer_win_rate": (100, 2)},
}


def test_judge_validity_stage_against_the_gold_verifiers(tmp_path):
    paths = write_inputs(tmp_path)
    with FakeOpenAIServer() as server:
        server.behave = fake_judge
        judge = {"kind": "openai", "base_url": server.url, "model": "open-judge", "max_retries": 0,
                 "cache_dir": str(tmp_path / "cache")}
        kw = dict(answers={"x": str(paths["x"]), "y": str(paths["y"])}, prompts_path=str(paths["prompts"]),
                  pairs=[["x", "y"]], judge=judge, constrain=[False, True], judge_max_tokens=16, n_prompts=None,
                  bootstrap={"n": 200, "seed": 0, "ci": 0.95}, out_csv=str(tmp_path / "v.csv"),
                  out_jsonl=str(tmp_path / "v.jsonl"))
        jv.judge_validity(**kw)
        # 3 pairs x 2 orders, once free and once constrained: the constrained calls are not the cache's
        assert server.n == 12 and sum("structured_outputs" in r for r in server.requests) == 6
        jv.judge_validity(**kw)
        assert server.n == 12  # a re-run is served from the judge cache
    rows = list(csv.DictReader((tmp_path / "v.csv").open()))
    assert list(rows[0]) == list(jv.COLUMNS)
    assert (rows[0]["statistic"], rows[0]["judge"], rows[0]["value"], rows[0]["n"]) == \
        ("longer_answer_win_rate", "gold (IFEval verifiers)", "100", "2")
    for r in rows[1:]:
        value, n = EXPECTED[r["constrain"]][r["statistic"]]
        assert (float(r["value"]), int(r["n"]), r["n_prompts"]) == (pytest.approx(value, abs=1e-4), n, "3"), r
        assert r["judge"] == ("openai:open-judge (constrained)" if r["constrain"] == "true" else "openai:open-judge")
    assert len(rows) == 1 + 2 * len(jv.JUDGE_STATS)
    pairs = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [(p["id"], p["gold"], p["judge"]["True"]["outcome"], p["judge"]["False"]["outcome"]) for p in pairs] == \
        [("p1", 1.0, 1.0, 0.5), ("p2", 0.0, 0.0, None), ("p3", 0.5, 0.5, 0.5)]


def test_items_are_the_first_n_prompts_in_id_order_of_every_pair(tmp_path):
    paths = write_inputs(tmp_path)
    prompts = [json.loads(x) for x in paths["prompts"].read_text().splitlines()]
    answers = {m: {r["id"]: r for r in map(json.loads, paths[m].read_text().splitlines())} for m in "xy"}
    items = jv.validity_items(prompts[::-1], answers, [["x", "y"], ["y", "x"]], 2)
    assert [(it["model_a"], it["id"], it["gold"]) for it in items] == [
        ("x", "p1", 1.0), ("x", "p2", 0.0), ("y", "p1", 0.0), ("y", "p2", 1.0)]


def test_a_pair_without_answers_is_named(tmp_path):
    paths = write_inputs(tmp_path)
    with pytest.raises(ValueError, match=r"judge_validity\.pairs: 'dpo' has no Table 1 answer file"):
        jv.validity_items([json.loads(x) for x in paths["prompts"].read_text().splitlines()],
                          {"x": {}, "y": {}}, [["x", "dpo"]], None)


# ----------------------------------------------------------------------------- the rule


def validity_run_dir(tmp_path, server, *, whole_dag: bool = False) -> Path:
    """The tiny config with judge_validity on (the fake judge, one pair) and Table 1's inputs in place;
    the tiny model is built only for a plan of the whole DAG (the rule alone never loads it)."""
    source = tiny_config(tmp_path) if whole_dag else REPO / ".test" / "config" / "config.yaml"
    cfg = yaml.safe_load(source.read_text())
    paths = write_inputs(tmp_path)
    results = tmp_path / "results"
    (results / "generations" / "table1").mkdir(parents=True)
    (results / "data").mkdir()
    paths["prompts"].rename(results / "data" / "prompts_test.jsonl")
    for model, src in (("rpo", "x"), ("ref", "y"), ("dpo", "y")):
        (results / "generations" / "table1" / f"{model}.jsonl").write_text(paths[src].read_text())
    cfg["judge_validity"] = {"enabled": True, "pairs": [["rpo", "ref"]], "judge_max_tokens": 16,
                             "judge": {"kind": "openai", "base_url": server.url, "model": "open-judge"}}
    path = tmp_path / "validity.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.workflow
def test_rule_judges_the_table1_answer_files(tmp_path):
    with FakeOpenAIServer() as server:
        server.behave = fake_judge
        path = validity_run_dir(tmp_path, server)
        # Table 1's answers as they are: only this rule runs, from its declared inputs to its outputs
        run = snakemake(tmp_path, path, "--allowed-rules=judge_validity", target="results/judge_validity.csv")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert server.n == 12
    results = tmp_path / "results"
    rows = {(r["statistic"], r["constrain"]): r for r in csv.DictReader((results / "judge_validity.csv").open())}
    assert float(rows[("agreement", "true")]["value"]) == 100 and rows[("agreement", "true")]["n"] == "3"
    assert float(rows[("unparsable", "false")]["value"]) == pytest.approx(100 / 3, abs=1e-4)
    assert (results / "judge_validity.jsonl").is_file() and (tmp_path / "logs/judge_validity/judge_validity.log").is_file()


@pytest.mark.workflow
@pytest.mark.slow
def test_enabled_adds_it_to_rule_all(tmp_path):
    with FakeOpenAIServer() as server:
        path = validity_run_dir(tmp_path, server, whole_dag=True)
        assert job_counts(snakemake(tmp_path, path, "-n", target="all").stdout)["judge_validity"] == 1
        cfg = yaml.safe_load(path.read_text())
        cfg["judge_validity"]["enabled"] = False
        path.write_text(yaml.safe_dump(cfg))
        assert "judge_validity" not in job_counts(snakemake(tmp_path, path, "-n", target="all").stdout)
