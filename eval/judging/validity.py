"""Judge validity: an LLM judge's pairwise verdicts against the exact gold verdicts of the same pairs.

On the held-out prompts of the synthetic:verifiable data every answer has a gold score (the IFEval
verifiers, eval.judging.judges.GoldJudge), so Table 1's answer pairs have a known right verdict. The LLM judge is
asked about the same pairs under Table 1's `both_orders` protocol (eval.pairwise_judge.judge_both_orders:
answer A shown first, then answer B shown first), once per `constrain` setting (eval.judging.constraint).

Definitions (per pair = one prompt answered by model_a and model_b; "A" is model_a's answer):

    gold verdict        from the gold scores: win (score_a > score_b), tie (equal), loss (score_a < score_b),
                        eval.pairwise.outcome.
    judge verdict       pairwise_outcome's combination of the two orders: each valid order gives A 1, 0.5 or
                        0, the outcome is their mean over the valid orders (0, 0.25, 0.5, 0.75, 1), and its
                        class is win above 0.5, tie at 0.5, loss below; no valid order: no verdict.
    unparsable          % of judge calls (two per pair) without a valid [[A]]/[[B]]/[[C]] verdict.
    agreement           % of pairs with a judge verdict whose judge class equals the gold class (ties count).
    agreement_no_gold_ties
                        the same over the pairs whose gold verdict is not a tie (a judge tie disagrees).
    kappa               Cohen's kappa of judge and gold over THREE classes (win, tie, loss), unweighted:
                        (p_o - p_e) / (1 - p_e) with p_e from each side's class shares (`cohen_kappa`).
    first_position_win_rate
                        % over the valid single-order verdicts that the answer shown first wins, a tie
                        counting half; 50 is a judge without position bias.
    longer_answer_win_rate
                        % over the pairs with a verdict whose answers differ in length (characters) that the
                        longer answer wins, ties half; given for the judge and, as the reference, for gold.

Each value comes with a percentile bootstrap interval over PROMPTS (a prompt's pairs of every model pair
resampled together, Table 1's bootstrap settings and seed; a replicate where the statistic is undefined,
nothing counted or kappa's p_e = 1, is left out of its interval) and its `n`: the calls, pairs or verdicts
the statistic counts. Rates are in percent, kappa in [-1, 1]; an undefined value is an empty cell.
The constrained judge answers with the verdict alone (eval.judging.constraint), so its rows measure what
the constraint buys a judge that cannot keep to the format, against the same judge in free text.

    python -m eval judge-validity --args '<json settings>' --paths '<json paths>'   (workflow/rules/judge.smk)
"""
from __future__ import annotations

import csv
import logging
import math
import time

import numpy as np

from eval.judging.config import GOLD_LABEL, judge_label
from eval.judging.judges import GoldJudge, get_judge
from eval.pairwise_judge import judge_both_orders
from rpo.data import read_records
from rpo.io import atomic_open, write_jsonl

log = logging.getLogger(__name__)

CLASSES = ("win", "tie", "loss")
COLUMNS = ("statistic", "judge", "constrain", "value", "ci_low", "ci_high", "n", "n_prompts")
JUDGE_STATS = ("unparsable", "agreement", "agreement_no_gold_ties", "kappa", "first_position_win_rate",
               "longer_answer_win_rate")


def verdict_class(outcome: float | None) -> str | None:
    """win / tie / loss for answer A of a gold or a combined judge outcome; None: no verdict."""
    if outcome is None:
        return None
    return "win" if outcome > 0.5 else "loss" if outcome < 0.5 else "tie"


def confusion(gold: list[str], judged: list[str]) -> np.ndarray:
    """The 3x3 table of counts, rows the gold class, columns the judge class, in CLASSES order."""
    table = np.zeros((3, 3))
    for g, j in zip(gold, judged, strict=True):
        table[CLASSES.index(g), CLASSES.index(j)] += 1
    return table


def kappa_of(table: np.ndarray) -> float:
    """Cohen's kappa of a square table of counts; NaN when undefined (no rows, or p_e = 1: both sides put
    every pair in one and the same class)."""
    n = table.sum()
    if n == 0:
        return math.nan
    p_o = np.trace(table) / n
    p_e = float((table.sum(axis=1) / n) @ (table.sum(axis=0) / n))
    return math.nan if math.isclose(p_e, 1.0) else float((p_o - p_e) / (1.0 - p_e))


def cohen_kappa(gold: list[str], judged: list[str]) -> float:
    """Cohen's kappa over the three classes win/tie/loss (unweighted)."""
    return kappa_of(confusion(gold, judged))


# ----------------------------------------------------------------------------- per-pair contributions


def pair_terms(item: dict, constrain: bool | None) -> dict[str, tuple[float, float]]:
    """Each statistic's (numerator, denominator) contribution of one pair, so that a statistic over any
    set of pairs (a bootstrap replicate too) is sum(numerators) / sum(denominators). `constrain` None:
    the gold statistics."""
    longer = None if item["len_a"] == item["len_b"] else item["len_a"] > item["len_b"]

    def for_longer(o):  # the longer answer's outcome
        return (0.0, 0.0) if longer is None or o is None else (o if longer else 1.0 - o, 1.0)

    if constrain is None:
        return {"longer_answer_win_rate": for_longer(item["gold"])}
    j = item["judge"][str(constrain)]
    o, g = j["outcome"], verdict_class(item["gold"])
    c = verdict_class(o)
    first = [x for x in (j["outcome_ab"], None if j["outcome_ba"] is None else 1.0 - j["outcome_ba"])
             if x is not None]  # the outcome of the answer shown first, per valid order
    return {"unparsable": (float(j["n_invalid"]), 2.0),
            "agreement": (float(c == g), 1.0) if c else (0.0, 0.0),
            "agreement_no_gold_ties": (float(c == g), 1.0) if c and g != "tie" else (0.0, 0.0),
            "first_position_win_rate": (float(sum(first)), float(len(first))),
            "longer_answer_win_rate": for_longer(o)}


def statistics(items: list[dict], constrain: bool | None, *, n_boot: int, seed: int, ci: float) -> list[dict]:
    """The rows of one judge setting (`constrain`; None: gold's reference rows) over `items`, each with its
    percentile bootstrap interval over prompts (items sharing an `id` are resampled together)."""
    ids = sorted({it["id"] for it in items})
    where = {pid: k for k, pid in enumerate(ids)}
    names = list(pair_terms(items[0], constrain))
    num = np.zeros((len(names), len(ids)))
    den = np.zeros((len(names), len(ids)))
    conf = np.zeros((len(ids), 9))  # per prompt: the gold x judge table of its pairs with a verdict
    for it in items:
        p = where[it["id"]]
        for s, (a, b) in enumerate(pair_terms(it, constrain).values()):
            num[s, p] += a
            den[s, p] += b
        if constrain is not None:
            c = verdict_class(it["judge"][str(constrain)]["outcome"])
            if c:
                conf[p, 3 * CLASSES.index(verdict_class(it["gold"])) + CLASSES.index(c)] += 1
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, len(ids), len(ids)), minlength=len(ids))
                       for _ in range(n_boot)]).astype(float)  # (n_boot, prompts): prompts drawn per round
    alpha = (1.0 - ci) / 2.0

    def row(name, value, reps, n):
        reps = reps[np.isfinite(reps)]
        lo, hi = np.quantile(reps, [alpha, 1.0 - alpha]) if reps.size else (math.nan, math.nan)
        return {"statistic": name, "value": value, "ci_low": float(lo), "ci_high": float(hi), "n": int(n),
                "n_prompts": len(ids)}

    rows = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for s, name in enumerate(names):
            total = den[s].sum()
            value = 100.0 * num[s].sum() / total if total else math.nan
            rows.append(row(name, value, 100.0 * (counts @ num[s]) / (counts @ den[s]), total))
        if constrain is not None:
            table = conf.sum(axis=0).reshape(3, 3)
            reps = np.array([kappa_of(t.reshape(3, 3)) for t in counts @ conf])
            rows.insert(3, row("kappa", kappa_of(table), reps, table.sum()))
    return rows


# ----------------------------------------------------------------------------- the stage


def _read_answers(path) -> dict[str, dict]:
    return {r["id"]: r for r in read_records(path)}


def validity_items(prompts: list[dict], answers: dict[str, dict[str, dict]], pairs: list[list[str]],
                   n_prompts: int | None) -> list[dict]:
    """One item per (model pair, prompt): the prompts every model of `pairs` answered, in id order (the
    first `n_prompts` of them), with the gold outcome of the pair and the answers' lengths."""
    for a, b in pairs:
        for m in (a, b):
            if m not in answers:
                raise ValueError(f"judge_validity.pairs: {m!r} has no Table 1 answer file (have {sorted(answers)})")
    by_id = {p["id"]: p for p in prompts}
    ids = sorted(set.intersection(*(set(answers[m]) for pair in pairs for m in pair)))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"answers to prompt ids not in the prompts file: {missing[:5]}")
    if not ids:
        raise ValueError(f"the models {sorted(answers)} answered no prompt in common")
    ids = ids[:n_prompts] if n_prompts else ids
    gold, items = GoldJudge(), []
    for a, b in pairs:
        for pid in ids:
            ans_a, ans_b = answers[a][pid]["responses"][0], answers[b][pid]["responses"][0]
            o, details = gold.compare(by_id[pid], ans_a, ans_b)
            items.append({"id": pid, "model_a": a, "model_b": b, "gold": o,
                          "gold_a": details["gold_a"]["score"], "gold_b": details["gold_b"]["score"],
                          "len_a": len(ans_a), "len_b": len(ans_b), "answer_a": ans_a, "answer_b": ans_b,
                          "prompt": by_id[pid], "judge": {}})
    return items


def judge_validity(*, answers: dict[str, str], prompts_path: str, pairs: list[list[str]], judge: dict,
                   constrain: list[bool], judge_max_tokens: int, n_prompts: int | None, bootstrap: dict,
                   out_csv: str, out_jsonl: str, prompt: str = "history") -> list[dict]:
    """results/judge_validity.csv (COLUMNS; one row per statistic and judge setting, and gold's length
    row) and the pairs' verdicts as judge_validity.jsonl. `answers`: model -> Table 1 answer file; `prompt`:
    table1.prompt, so the judge sees the question the models were asked (eval.table1.question_prompts)."""
    from eval.table1 import question_prompts  # table1 imports matplotlib (eval.figures)
    items = validity_items(question_prompts(read_records(prompts_path), prompt),
                           {m: _read_answers(p) for m, p in answers.items()}, pairs, n_prompts)
    boot = {"n_boot": bootstrap["n"], "seed": bootstrap["seed"], "ci": bootstrap["ci"]}
    rows = [{**r, "judge": GOLD_LABEL, "constrain": ""} for r in statistics(items, None, **boot)]
    for c in constrain:
        cfg = {**judge, "constrain": bool(c)}
        t0 = time.monotonic()
        with get_judge(cfg) as j:
            results = judge_both_orders(j, [(it["prompt"], it["answer_a"], it["answer_b"]) for it in items],
                                        max_tokens=judge_max_tokens)
        log.info("judge validity: %d pairs judged in both orders by %s in %.1f s", len(items),
                 judge_label(cfg), time.monotonic() - t0)
        for it, (o, d) in zip(items, results):
            it["judge"][str(bool(c))] = {"outcome": o, **{k: d[k] for k in ("outcome_ab", "outcome_ba",
                                                                           "n_invalid", "raw_ab", "raw_ba")}}
        rows += [{**r, "judge": judge_label(cfg), "constrain": str(bool(c)).lower()}
                 for r in statistics(items, bool(c), **boot)]
    write_jsonl([{k: v for k, v in it.items() if k not in ("prompt", "answer_a", "answer_b")} for it in items],
                out_jsonl)
    with atomic_open(out_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r[k]) for k in COLUMNS})
    return rows


def _fmt(x):
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.6g}"
    return x
