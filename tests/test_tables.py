"""Tests for eval.pairwise, eval.results_table and eval.figures on hand-made inputs.

Run:  cd /work/main && PYTHONPATH=. /work/venv/bin/python -m pytest tests/test_tables.py -q -p no:cacheprovider

Each expected number is worked out by hand in a comment beside it.
"""

import json
import math

import pytest

from eval.figures import moving_average, plot_logps_chosen_raw, plot_metric, read_metrics
from eval.pairwise import outcome, pairwise_from_scores, win_rate
from eval.results_table import (
    COLUMNS,
    complete_pairs,
    make_row,
    read_table,
    render_markdown,
    write_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- pairwise


def test_outcome_win_loss_tie():
    assert outcome(7.0, 3.0) == 1.0  # A scored higher
    assert outcome(3.0, 7.0) == 0.0  # B scored higher
    assert outcome(5.0, 5.0) == 0.5  # tie counts half


def test_win_rate_counts_ties_half():
    # (1 + 0.5 + 0 + 1) / 4 = 2.5 / 4 = 0.625 -> 62.5 %
    r = win_rate([1, 0.5, 0, 1], n_boot=200, seed=0)
    assert r["value"] == pytest.approx(62.5)
    assert r["n"] == 4
    # Every bootstrap mean lies in [0, 100]; the CI must bracket the estimate.
    assert 0.0 <= r["ci_low"] <= r["value"] <= r["ci_high"] <= 100.0


def test_bootstrap_is_seeded():
    outs = [1, 0, 0.5, 1, 1, 0, 1, 0.5, 0, 1] * 3
    a = win_rate(outs, n_boot=500, seed=7)
    b = win_rate(outs, n_boot=500, seed=7)
    # Same seed -> byte-identical numbers, so reruns reproduce the table.
    assert a == b
    # A different seed draws different resamples; with 30 varied outcomes
    # at least one of the two bounds moves.
    c = win_rate(outs, n_boot=500, seed=8)
    assert c["value"] == a["value"]  # the point estimate does not resample
    assert (c["ci_low"], c["ci_high"]) != (a["ci_low"], a["ci_high"])
    # The CI is a real interval here, not a point.
    assert a["ci_low"] < a["value"] < a["ci_high"]


def test_all_ties_give_fifty_with_degenerate_ci():
    # Every resample of all-0.5 outcomes has mean 0.5, so the CI collapses.
    r = win_rate([0.5] * 6, n_boot=100, seed=3)
    assert (r["value"], r["ci_low"], r["ci_high"]) == (50.0, 50.0, 50.0)


def test_win_rate_rejects_empty_and_invalid():
    with pytest.raises(ValueError, match="empty"):
        win_rate([])
    # 0.7 is not a possible outcome (one verdict: 0/0.5/1; the mean of two: also 0.25/0.75)
    assert win_rate([0.25, 0.75], n_boot=10)["value"] == 50.0
    with pytest.raises(ValueError, match="index 2"):
        win_rate([1, 0, 0.7, 1])
    with pytest.raises(ValueError, match="index 1"):
        win_rate([1, float("nan")])


def test_pairwise_from_scores_uses_shared_ids():
    a = {"p1": 8, "p2": 5, "p3": 2}
    b = {"p1": 6, "p2": 5, "p3": 9}
    # p1 win (1), p2 tie (0.5), p3 loss (0) -> 1.5 / 3 = 50 %
    r = pairwise_from_scores(a, b, n_boot=50, seed=0)
    assert r["value"] == pytest.approx(50.0)
    assert r["n"] == 3
    # Insertion order of the dicts must not change the seeded CI.
    r2 = pairwise_from_scores(dict(reversed(a.items())), b, n_boot=50, seed=0)
    assert r2 == r


def test_pairwise_from_scores_missing_id_is_an_error():
    a = {"p1": 1.0, "p2": 2.0, "p3": 3.0}
    b = {"p1": 1.0, "p2": 2.0, "p4": 3.0}
    with pytest.raises(ValueError) as e:
        pairwise_from_scores(a, b)
    msg = str(e.value)
    # Both directions are reported by id, with the counts of each side.
    assert "p3" in msg and "p4" in msg
    assert "3 scored for A, 3 for B" in msg


def test_pairwise_missing_ids_are_capped_at_five():
    a = {f"q{i}": 1.0 for i in range(10)}
    b = {}
    with pytest.raises(ValueError) as e:
        pairwise_from_scores(a, b)
    msg = str(e.value)
    # 10 missing from B, only the first five (sorted) are listed.
    assert "10 missing from B" in msg
    assert "q4" in msg and "q5" not in msg


# ---------------------------------------------------------------- table


def _table1_rows():
    return [
        make_row(model_a="rpo", model_b="ref", metric="win_rate",
                 value=62.5, ci_low=55.0, ci_high=70.0, n=500, judge="rm-judge"),
        make_row(model_a="rpo", model_b="dpo", metric="win_rate",
                 value=53.25, ci_low=47.0, ci_high=59.5, n=500, judge="rm-judge"),
        make_row(model_a="dpo", model_b="ref", metric="win_rate",
                 value=58.0, ci_low=51.0, ci_high=65.0, n=500, judge="rm-judge"),
    ]


def _bench_rows():
    return [
        make_row(model_a="rpo", metric="mtbench", value=6.123, n=80, judge="llm-judge"),
        make_row(model_a="dpo", metric="mtbench", value=math.nan, n=0, judge="llm-judge"),
        make_row(model_a="rpo", model_b="gpt4_turbo", metric="alpacaeval_lc",
                 value=21.04, ci_low=19.0, ci_high=23.0, n=805, judge="llm-judge"),
    ]


def test_make_row_validates():
    ok = make_row(model_a="m", metric="mtbench", value=5, n=80.0, judge="j")
    # Defaults: empty model_b, NaN CI; value coerced to float, n to int.
    assert ok["model_b"] == "" and math.isnan(ok["ci_low"]) and ok["value"] == 5.0
    assert ok["n"] == 80 and isinstance(ok["n"], int)
    assert tuple(ok) == COLUMNS
    bad = dict(model_a="m", metric="mtbench", value=1.0, n=1, judge="j")
    for field, val in [("metric", ""), ("judge", " "), ("n", -1), ("n", 2.5),
                       ("value", "high"), ("value", True)]:
        with pytest.raises(ValueError, match=field):
            make_row(**{**bad, field: val})
    with pytest.raises(ValueError, match="unknown"):
        make_row(**bad, score=1.0)


def test_write_read_round_trip_preserves_nan_and_sorts(tmp_path):
    rows = _bench_rows() + _table1_rows()
    path = tmp_path / "sub" / "table1.csv"
    write_table(rows, path)
    back = read_table(path)
    # Sorted by (metric, model_a, model_b): alpacaeval_lc < mtbench < win_rate,
    # and within win_rate dpo < rpo, then dpo < ref for model_b.
    assert [(r["metric"], r["model_a"], r["model_b"]) for r in back] == [
        ("alpacaeval_lc", "rpo", "gpt4_turbo"),
        ("mtbench", "dpo", ""),
        ("mtbench", "rpo", ""),
        ("win_rate", "dpo", "ref"),
        ("win_rate", "rpo", "dpo"),
        ("win_rate", "rpo", "ref"),
    ]
    dpo_mt = back[1]
    assert math.isnan(dpo_mt["value"]) and math.isnan(dpo_mt["ci_low"])  # NaN kept
    assert back[2]["value"] == 6.123  # floats round-trip exactly
    assert back[5]["n"] == 500 and isinstance(back[5]["n"], int)
    # The header is exactly COLUMNS and no temp file is left behind.
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [p.name for p in path.parent.iterdir()] == ["table1.csv"]
    # Writing the same rows in another order gives the identical file.
    before = path.read_bytes()
    write_table(list(reversed(rows)), path)
    assert path.read_bytes() == before


def test_read_table_missing_column_names_it(tmp_path):
    path = tmp_path / "bad.csv"
    header = [c for c in COLUMNS if c != "judge"]
    path.write_text(",".join(header) + "\nrpo,ref,win_rate,60,50,70,10\n")
    with pytest.raises(ValueError) as e:
        read_table(path)
    assert "bad.csv" in str(e.value) and "'judge'" in str(e.value)


def test_complete_pairs_adds_reverse_rows():
    rows = complete_pairs(_table1_rows() + _bench_rows())
    wr = {(r["model_a"], r["model_b"]): r for r in rows if r["metric"] == "win_rate"}
    # 3 given pairs + 3 reverses; benchmark rows untouched.
    assert len(wr) == 6 and len(rows) == 9
    ref_rpo = wr[("ref", "rpo")]
    # 100 - 62.5 = 37.5; CI [55, 70] flips to [100-70, 100-55] = [30, 45].
    assert (ref_rpo["value"], ref_rpo["ci_low"], ref_rpo["ci_high"]) == (37.5, 30.0, 45.0)
    assert ref_rpo["n"] == 500 and ref_rpo["judge"] == "rm-judge"
    # 100 - 53.25 = 46.75; [47, 59.5] -> [40.5, 53].
    dpo_rpo = wr[("dpo", "rpo")]
    assert (dpo_rpo["value"], dpo_rpo["ci_low"], dpo_rpo["ci_high"]) == (46.75, 40.5, 53.0)
    # Running it again adds nothing: every reverse now exists.
    assert len(complete_pairs(rows)) == 9


def test_render_markdown_table1_layout():
    rows = complete_pairs(_table1_rows())
    labels = {"rpo": "RPO", "dpo": "DPO", "ref": "Ref"}
    paper_order = [("rpo", "ref"), ("rpo", "dpo"), ("dpo", "ref"),
                   ("ref", "rpo"), ("ref", "dpo"), ("dpo", "rpo")]
    md = render_markdown(rows, model_labels=labels, pair_order=paper_order)
    lines = md.splitlines()
    assert "Table 1 — pairwise win rate (%)" in md
    # Columns in the paper's order with labels applied.
    assert "| RPO vs Ref | RPO vs DPO | DPO vs Ref | Ref vs RPO | Ref vs DPO | DPO vs RPO |" in lines
    # One decimal, in column order: 62.5 [55, 70]; 53.25 -> "53.2" (exact
    # binary half, rounded to even); 58.0 [51, 65]; reverses 100-62.5 = 37.5
    # [30, 45], 100-58 = 42.0 [35, 49], 100-53.25 = 46.75 -> "46.8" [40.5, 53].
    assert ("| 62.5 [55.0, 70.0] | 53.2 [47.0, 59.5] | 58.0 [51.0, 65.0] | "
            "37.5 [30.0, 45.0] | 42.0 [35.0, 49.0] | 46.8 [40.5, 53.0] |") in lines
    assert "Judge: rm-judge" in md and "n = 500" in md
    # No benchmark rows -> no Table 2 section.
    assert "Table 2" not in md


def test_render_markdown_table2_with_na():
    rows = _table1_rows() + _bench_rows()
    md = render_markdown(rows, model_labels={"rpo": "RPO", "dpo": "DPO"})
    lines = md.splitlines()
    assert "Table 2 — benchmarks" in md
    # mtbench precedes alpacaeval_lc per the paper's order, whatever the input order.
    assert "| Model | mtbench | alpacaeval_lc |" in lines
    # RPO: 6.123 -> "6.12" (no CI), alpacaeval 21.04 -> "21.0 [19.0, 23.0]".
    assert "| RPO | 6.12 | 21.0 [19.0, 23.0] |" in lines
    # DPO: NaN mtbench -> n/a; no alpacaeval row at all -> n/a as well.
    assert "| DPO | n/a | n/a |" in lines
    assert "- alpacaeval_lc: judge llm-judge; baseline gpt4_turbo" in lines
    assert "- mtbench: judge llm-judge; baseline none" in lines


def test_a_cell_without_a_number_says_why():
    rows = _table1_rows() + [
        make_row(model_a="dpo", metric="mtbench", value=math.nan, n=0, judge="llm-judge", note="0/6 ratings parsable"),
        make_row(model_a="dpo", model_b="gpt4_turbo", metric="alpacaeval_lc", value=math.nan, n=0, judge="llm-judge",
                 note="needs alpaca_eval's df_gamed.csv")]
    lines = render_markdown(rows, model_labels={"dpo": "DPO"}).splitlines()
    assert "| DPO | n/a (0/6 ratings parsable) | n/a (needs alpaca_eval's df_gamed.csv) |" in lines
    # the note is the Markdown's only: the CSV cell stays empty, and the column set is unchanged
    assert set(rows[-1]) == set(COLUMNS) | {"note"}


def test_the_table2_judges_agreement_with_gold_is_printed_beside_it(tmp_path):
    from eval.table1 import judge_trust_markdown
    rows = _table1_rows() + _bench_rows()
    # without judge_validity.csv: how to measure it
    assert "Agreement of the Table 2 judge llm-judge with gold: not measured in this run" in \
        judge_trust_markdown(rows, None)
    validity = tmp_path / "judge_validity.csv"  # judge_validity.csv's columns; kappa of the judge, and another
    validity.write_text("statistic,judge,constrain,value,ci_low,ci_high,n,n_prompts\n"
                        "unparsable,llm-judge,true,0,0,0,144,24\n"
                        "kappa,llm-judge,true,-0.0312,-0.0714,0,72,24\n"
                        "kappa,other-judge,false,0.5,0.4,0.6,72,24\n")
    assert ("Agreement of the Table 2 judge llm-judge with gold on Table 1's answer pairs (results/judge_validity.csv): "
            "Cohen's kappa -0.03 [-0.07, 0.00], n = 72.") in judge_trust_markdown(rows, str(validity))
    # Table 1 alone (its pairwise judge is checked by judge_validity itself): nothing to add
    assert judge_trust_markdown(_table1_rows(), None) == ""


def test_render_markdown_rejects_duplicate_pair():
    rows = _table1_rows()
    dup = dict(rows[0], judge="other-judge")
    # Two judges for one cell must be filtered by the caller, not silently merged.
    with pytest.raises(ValueError, match="duplicate"):
        render_markdown(rows + [dup])


# ---------------------------------------------------------------- figures


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_logps_chosen_writes_png_and_returns_data(tmp_path):
    dpo = _write_jsonl(tmp_path / "dpo.jsonl", [
        {"step": s, "logps/chosen": -100.0 - 5 * s, "loss": 0.6} for s in range(1, 6)
    ])
    rpo = _write_jsonl(tmp_path / "rpo.jsonl", [
        {"step": s, "logps/chosen": -100.0 + s, "loss/sft": 1.0} for s in range(1, 6)
    ])
    out = tmp_path / "figs" / "nested" / "logps.png"
    data = plot_logps_chosen_raw({"dpo": dpo, "rpo": rpo}, out,
                             labels={"dpo": "DPO", "rpo": "RPO"}, smooth=2)
    assert out.read_bytes()[:8] == PNG_MAGIC  # parent dirs created, real PNG
    # Returned series are the raw inputs, not the smoothed ones.
    assert data["dpo"] == ([1, 2, 3, 4, 5], [-105.0, -110.0, -115.0, -120.0, -125.0])
    assert data["rpo"] == ([1, 2, 3, 4, 5], [-99.0, -98.0, -97.0, -96.0, -95.0])


def test_plot_metric_skips_rows_without_key_and_rejects_absent_key(tmp_path):
    run = _write_jsonl(tmp_path / "run.jsonl", [
        {"step": 1, "logps/chosen": -1.0, "rewards/margins": 0.1},
        {"step": 2, "logps/chosen": -1.0},  # e.g. a row without rewards
        {"step": 3, "logps/chosen": -1.0, "rewards/margins": 0.3},
    ])
    data = plot_metric({"r": run}, "rewards/margins", tmp_path / "m.png")
    assert data["r"] == ([1, 3], [0.1, 0.3])
    with pytest.raises(ValueError, match="rewards/acc"):
        plot_metric({"r": run}, "rewards/acc", tmp_path / "x.png")


def test_moving_average_is_trailing_and_same_length():
    # window 2: [1, (1+3)/2, (3+5)/2, (5+7)/2] = [1, 2, 4, 6]
    assert moving_average([1, 3, 5, 7], 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_read_metrics_malformed_line_names_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "logps/chosen": -3.0}\n'
        "\n"  # blank lines are tolerated (trailing newline, appends)
        '{"step": 2, "logps/chosen": -3.1}\n'
        '{"step": 3, "logps/chosen": \n'  # truncated write, line 4
    )
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 4"):
        read_metrics(path)
    # A record without the required key is reported by line too.
    path.write_text('{"step": 1, "logps/chosen": -3.0}\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"line 2.*logps/chosen"):
        read_metrics(path)
    path.write_text('{"step": 1, "logps/chosen": -3.0}\n\n')
    assert read_metrics(path) == [{"step": 1, "logps/chosen": -3.0}]


def test_methods_view_curves_and_final_win_rates(tmp_path):
    from eval import figures
    runs = {}
    for m, slope in (("dpo", -1.0), ("ipo", 0.5)):
        path = tmp_path / f"{m}.jsonl"
        path.write_text("".join(json.dumps({"step": s, "logps/chosen": -50.0, "logratio/chosen": slope * s}) + "\n"
                                for s in range(1, 6)))
        runs[m] = path
    rows = [{"model_a": "dpo", "model_b": "ref", "metric": "win_rate", "value": "60", "ci_low": "50", "ci_high": "70"},
            {"model_a": "ref", "model_b": "dpo", "metric": "win_rate", "value": "40", "ci_low": "30", "ci_high": "50"},
            {"model_a": "dpo", "model_b": "", "metric": "mtbench", "value": "5", "ci_low": "", "ci_high": ""}]
    out = figures.plot_methods(runs, rows, tmp_path / "methods.png", smooth=1)
    assert (tmp_path / "methods.png").stat().st_size > 0
    assert out["curves"]["ipo"] == ([1, 2, 3, 4, 5], [0.5, 1.0, 1.5, 2.0, 2.5])
    # only dpo has a win rate against ref; ref's own row and the MT-Bench row are not win rates vs ref
    assert out["win_rate_vs_ref"] == {"dpo": (60.0, 50.0, 70.0)}
