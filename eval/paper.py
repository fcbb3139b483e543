"""The paper's reported numbers and the reproduction beside them (results/paper_comparison.csv / .md).

Liu et al., NeurIPS 2024: Table 1 (GPT-4-0613 pairwise win rates, %, row model vs column model, 150 test
prompts) and Table 2 (MT-Bench with a GPT-4 judge; AlpacaEval 2.0 LC and raw win rates vs GPT-4 Preview
11/06), for the beta series (mistral-7b-sft-beta on UltraFeedback) and the gemma series
(zephyr-7b-gemma-sft on dpo-mix-7k). Copied from ../shared/paper.md; every row names its table.

One comparison row per paper number: the reproduced value and CI from table1.csv (empty when the run did
not produce that number, never filled from elsewhere), difference = reproduced - paper, and whether the
paper's number lies inside the reproduction's confidence interval (empty when there is no CI).
"""
from __future__ import annotations

import csv
import math

from eval import results_table
from rpo.io import atomic_open, write_text

# (model_a, model_b, metric, paper value, where in the paper); model_b is ignored for benchmark metrics
PAPER: dict[str, list[tuple[str, str, str, float, str]]] = {
    "beta": [
        ("rpo", "ref", "win_rate", 79.0, "Table 1"), ("rpo", "dpo", "win_rate", 56.0, "Table 1"),
        ("dpo", "ref", "win_rate", 77.3, "Table 1"), ("ref", "rpo", "win_rate", 21.0, "Table 1"),
        ("ref", "dpo", "win_rate", 22.7, "Table 1"), ("dpo", "rpo", "win_rate", 44.0, "Table 1"),
        ("rpo", "", "mtbench", 7.381, "Table 2"), ("ref", "", "mtbench", 5.088, "Table 2"),
        ("dpo", "", "mtbench", 7.278, "Table 2"),
        ("rpo", "", "alpacaeval_lc", 23.28, "Table 2"), ("ref", "", "alpacaeval_lc", 7.19, "Table 2"),
        ("dpo", "", "alpacaeval_lc", 21.15, "Table 2"),
        ("rpo", "", "alpacaeval_wr", 21.01, "Table 2"), ("ref", "", "alpacaeval_wr", 4.69, "Table 2"),
        ("dpo", "", "alpacaeval_wr", 17.27, "Table 2"),
    ],
    "gemma": [
        ("rpo", "ref", "win_rate", 71.7, "Table 1"), ("rpo", "dpo", "win_rate", 54.0, "Table 1"),
        ("dpo", "ref", "win_rate", 67.3, "Table 1"), ("ref", "rpo", "win_rate", 28.3, "Table 1"),
        ("ref", "dpo", "win_rate", 32.7, "Table 1"), ("dpo", "rpo", "win_rate", 46.0, "Table 1"),
        ("rpo", "", "mtbench", 7.916, "Table 2"), ("ref", "", "mtbench", 7.266, "Table 2"),
        ("dpo", "", "mtbench", 7.688, "Table 2"),
        ("rpo", "", "alpacaeval_lc", 15.51, "Table 2"), ("ref", "", "alpacaeval_lc", 8.35, "Table 2"),
        ("dpo", "", "alpacaeval_lc", 15.36, "Table 2"),
        ("rpo", "", "alpacaeval_wr", 13.85, "Table 2"), ("ref", "", "alpacaeval_wr", 4.61, "Table 2"),
        ("dpo", "", "alpacaeval_wr", 13.69, "Table 2"),
    ],
}
PAPER_JUDGE = {"win_rate": "GPT-4 (0613)", "mtbench": "GPT-4", "alpacaeval_lc": "GPT-4 Preview (11/06)",
               "alpacaeval_wr": "GPT-4 Preview (11/06)"}
COLUMNS = ("series", "source", "model_a", "model_b", "metric", "paper", "value", "ci_low", "ci_high",
           "difference", "paper_in_ci", "n", "judge", "paper_judge")


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def compare(rows: list[dict], series: str) -> list[dict]:
    """One row per paper number of `series`, matched to the reproduced rows (table1.csv rows)."""
    if series not in PAPER:
        raise ValueError(f"config paper.series: unknown series {series!r}; expected one of {sorted(PAPER)}")
    out = []
    for a, b, metric, paper, source in PAPER[series]:
        # with several training seeds, a pair's win rate is its pooled one
        pooled = metric == results_table.WIN_RATE and any(r["metric"] == results_table.POOLED_WIN_RATE for r in rows)
        want = results_table.POOLED_WIN_RATE if pooled else metric
        match = [r for r in rows if r["model_a"] == a and r["metric"] == want
                 and (metric != results_table.WIN_RATE or r["model_b"] == b)]
        if len(match) > 1:
            raise ValueError(f"table1.csv has {len(match)} rows for {a} vs {b or '-'} {metric}; expected one")
        r = match[0] if match else {}
        value, lo, hi = _num(r.get("value")), _num(r.get("ci_low")), _num(r.get("ci_high"))
        inside = "" if math.isnan(lo) or math.isnan(hi) else str(lo <= paper <= hi).lower()
        out.append({"series": series, "source": source, "model_a": a, "model_b": b or r.get("model_b", ""),
                    "metric": metric, "paper": paper, "value": value, "ci_low": lo, "ci_high": hi,
                    "difference": value - paper, "paper_in_ci": inside, "n": r.get("n", ""),
                    "judge": r.get("judge", ""), "paper_judge": PAPER_JUDGE[metric]})
    return out


def _fmt(x, digits: int = 2) -> str:
    return "" if isinstance(x, float) and math.isnan(x) else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def write_comparison(table_csv: str, series: str, out_csv: str, out_md: str) -> list[dict]:
    with open(table_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    comp = compare(rows, series)
    with atomic_open(out_csv, newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in comp:
            w.writerow({k: _fmt(v, 4) if isinstance(v, float) else v for k, v in r.items()})
    lines = [f"# Paper vs reproduction ({series} series)", "",
             "| | metric | paper | reproduced | CI | difference | paper in CI | judge (ours / paper) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in comp:
        who = f"{r['model_a']} vs {r['model_b']}" if r["metric"] == results_table.WIN_RATE else r["model_a"]
        ci = "" if math.isnan(r["ci_low"]) else f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        value = "not reproduced" if math.isnan(r["value"]) else _fmt(r["value"])
        lines.append(f"| {who} | {r['metric']} | {_fmt(r['paper'])} | {value} | {ci} | {_fmt(r['difference'])} "
                     f"| {r['paper_in_ci']} | {r['judge'] or '-'} / {r['paper_judge']} |")
    lines += ["", "difference = reproduced - paper. Win rates in %; a reproduction judged by another judge than "
              "the paper's is not directly comparable."]
    write_text(out_md, "\n".join(lines) + "\n")
    return comp
