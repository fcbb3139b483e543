"""Arena-Hard-Auto's rules per version: verdict parsing, judgment attempts, judge settings, battles, score.

Each version follows lmarena/arena-hard-auto's own code at that version (read, not copied):

v0.1 (the release line up to commit 0489bf3, 2024-09; `gen_judgment.py`, `show_result.py`, `utils_math.py`)
  * verdict: `get_score` finds `\\[\\[([AB<>=]+)\\]\\]` in the judgment AS WRITTEN (no upper-casing, no
    single-bracket fallback); no match -> no verdict and another attempt; one distinct label -> that label
    as written (e.g. `B<A`); several distinct labels -> no verdict, no further attempt.
  * attempts: `number_of_judgment_attempts: 2`: when the first answer has no label the conversation goes on
    with the judge's answer and the user turn `FOLLOW_UP`; the stored judgment is "\\n" + answer 1
    [+ "\\n" + answer 2] and the label is parsed from that concatenation. Judge max_tokens 4096, temperature 0.
  * battles: each game on its own (`get_battles_from_row`): exactly `A>B`, `A>>B`, `A=B`, `B>A`, `B>>A` count
    (strong ones 3 times); any other label (`B<A`, `A<B`, `B=A`, ...) or none weighs 0, and the question's
    other game is kept. Order: per row game 1 then game 2, rows in file order.
  * score: the Bradley-Terry (logistic) fit of model vs baseline; with one model its win probability is
    (wins + ties / 2) / battles (tests check it against the logistic fit). Interval: 100 rounds of
    `battles.sample(frac=1.0, replace=True)` under utils_math's `np.random.seed(42)` (the official IS seeded),
    2.5th/97.5th percentiles of the Elo ratings, turned into win rates. We reproduce that draw exactly for a
    judgment directory holding this one model (the official bootstraps every model of the directory together,
    which changes the draw).
v2.0 (HEAD, 2025-04; `gen_judgment.py`, `show_result.py`)
  * verdict: the upper-cased judgment, `\\[\\[([AB<>=]+)\\]\\]` then `\\[([AB<>=]+)\\]`; the first pattern with a
    match gives its LAST match (conflicting labels keep the last). One attempt; judge max_tokens 16000.
  * battles: a question whose either game has no verdict is dropped whole; otherwise game 2's `label_to_score`
    then 1 - game 1's (the ten spellings, strong ones 3 times). A label outside that table makes the official
    stop with a KeyError; we count the game invalid and drop its question (the one place we differ).
  * score: the MEAN of 100 bootstrap rounds (`groupby("model").sample(frac=1.0, replace=True)` then the mean),
    interval the 5th/95th percentiles of the rounds. The official does not seed this draw; we seed it
    (`numpy.random.RandomState(seed)`, benchmarks.bootstrap.seed), so a re-run gives identical numbers.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eval.results_table import make_row
from rpo.io import read_json_objects

V2 = "v2.0"
V01 = "v0.1"
VERSIONS = (V2, V01)

# Each version's judge settings (config/arena-hard-v2.0.yaml; v0.1's config/judge_config.yaml).
JUDGE_SETTINGS = {V2: {"temperature": 0.0, "max_tokens": 16000, "attempts": 1},
                  V01: {"temperature": 0.0, "max_tokens": 4096, "attempts": 2}}
FOLLOW_UP = "continue your judgment and finish by outputting a final verdict label"  # v0.1 gen_judgment.py
N_ROUNDS = 100  # show_result.py --num-rounds (v0.1) / range(100) (v2.0)
V01_SEED = 42   # v0.1 utils_math.py: np.random.seed(42) at import
WEIGHT = 3      # strong verdicts count three times in both versions

_DOUBLE = re.compile(r"\[\[([AB<>=]+)\]\]")
_SINGLE = re.compile(r"\[([AB<>=]+)\]")
# v0.1 show_result: the five labels it scores, as (winner, strong) for game 1 where the baseline is A
_V01_LABELS = {"A>B": ("A", False), "A>>B": ("A", True), "A=B": ("tie", False),
               "B>A": ("B", False), "B>>A": ("B", True)}
# v2.0 show_result label_to_score: the outcome for assistant A and whether it weighs WEIGHT
_V2_SCORES = {"A>B": (1.0, False), "A>>B": (1.0, True), "A=B": (0.5, False), "A<<B": (0.0, True),
              "A<B": (0.0, False), "B>A": (0.0, False), "B>>A": (0.0, True), "B=A": (0.5, False),
              "B<<A": (1.0, True), "B<A": (1.0, False)}


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"Arena-Hard version {version!r}: expected one of {VERSIONS}")

# ----------------------------------------------------------------------------- verdicts and attempts


def parse_verdict(text, version: str = V2) -> str | None:
    """The label the version's gen_judgment stores for a judgment text (as written; None: no verdict)."""
    _check_version(version)
    if not isinstance(text, str):
        return None
    if version == V01:
        found = [m for m in _DOUBLE.findall(text) if m]
        return found[0].strip("\n") if len(set(found)) == 1 else None
    upper = text.upper()
    for pattern in (_DOUBLE, _SINGLE):
        found = [m for m in pattern.findall(upper) if m]
        if found:
            return found[-1].strip("\n")
    return None


def wants_another_attempt(text, version: str) -> bool:
    """v0.1 asks again only when the judgment has no [[label]] at all (get_score's try_again)."""
    return version == V01 and not [m for m in _DOUBLE.findall(text or "") if m]


def judge_games(judge, requests: Sequence[dict], version: str) -> list[tuple[str, str | None]]:
    """(stored judgment text, label) per request, with the version's attempts (see the module docstring).

    `judge.complete_many(requests) -> texts`; the attempts of all games go out together, round by round.
    """
    _check_version(version)
    attempts = JUDGE_SETTINGS[version]["attempts"]
    texts = list(judge.complete_many(list(requests)))
    if version == V2:
        return [(t, parse_verdict(t, V2)) for t in texts]
    joined = ["\n" + t for t in texts]  # v0.1: judgment = "" then += "\n" + answer per attempt
    messages = [list(r["messages"]) for r in requests]
    last = texts
    for _ in range(attempts - 1):
        todo = [i for i, j in enumerate(joined) if wants_another_attempt(j, V01)]
        if not todo:
            break
        follow = []
        for i in todo:
            messages[i] = messages[i] + [{"role": "assistant", "content": last[i]},
                                         {"role": "user", "content": FOLLOW_UP}]
            follow.append({**requests[i], "messages": messages[i]})
        new = judge.complete_many(follow)
        last = list(last)
        for i, t in zip(todo, new):
            joined[i] += "\n" + t
            last[i] = t
    return [(j, parse_verdict(j, V01)) for j in joined]

# ----------------------------------------------------------------------------- judgment files


def _read_jsonl(path) -> list[tuple[int, dict]]:
    return read_json_objects(path)


def read_judgments(paths, *, baseline: str | None = None, category: str | None = None) -> list[dict]:
    """Judgment rows in file order: [{"uid", "model", "category", "labels": [game 1, game 2], "file", "line"}].

    A label is the stored `score` as written (None for a missing game or score). Rows of another category are
    skipped when `category` is given; a row naming a different baseline is an error.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows, seen = [], {}
    for path in map(Path, paths):
        for lineno, row in _read_jsonl(path):
            where = f"{path}, line {lineno}"
            uid = row.get("uid", row.get("question_id"))
            if not isinstance(uid, str) or not uid.strip():
                raise ValueError(f"{where}: missing question id ('uid' or 'question_id')")
            if not isinstance(row.get("model"), str) or not row["model"].strip():
                raise ValueError(f"{where}: missing 'model'")
            if category is not None and row.get("category") != category:
                continue
            if baseline is not None and row.get("baseline") not in (None, baseline):
                raise ValueError(f"{where}: judged against baseline {row['baseline']!r}, expected {baseline!r}")
            games = row.get("games")
            if not isinstance(games, list) or len(games) != 2:
                raise ValueError(f"{where}: 'games' must be a list of the 2 games (baseline as A, then swapped)")
            labels = []
            for g in games:
                if g is not None and not isinstance(g, dict):
                    raise ValueError(f"{where}: a game must be an object or null, got {type(g).__name__}")
                label = g.get("score") if g else None
                labels.append(label if isinstance(label, str) else None)
            key = (row["model"], uid)
            if key in seen:
                raise ValueError(f"{where}: second judgment of {uid!r} for model {row['model']!r} "
                                 f"(first at {seen[key]})")
            seen[key] = where
            rows.append({"uid": uid, "model": row["model"], "category": row.get("category"),
                         "labels": labels, "file": str(path), "line": lineno})
    return rows

# ----------------------------------------------------------------------------- battles


def battles_v01(rows: Sequence[dict], weight: int = WEIGHT) -> tuple[list[float], int, int]:
    """(the model's battle outcomes, invalid games, questions with no valid game): v0.1's get_battles_from_row.

    Game 1 shows the baseline as A, so its A win is a model loss; game 2 shows the model as A.
    """
    out, n_invalid, n_empty = [], 0, 0
    for r in rows:
        kept = 0
        for game, label in enumerate(r["labels"]):
            if label not in _V01_LABELS:
                n_invalid += 1  # weight 0 in v0.1: this game only
                continue
            winner, strong = _V01_LABELS[label]
            model_is_a = game == 1
            o = 0.5 if winner == "tie" else float((winner == "A") == model_is_a)
            out += [o] * (weight if strong else 1)
            kept += 1
        n_empty += kept == 0
    return out, n_invalid, n_empty


def battles_v2(rows: Sequence[dict], weight: int = WEIGHT) -> tuple[list[float], int, int]:
    """(the model's battle outcomes, invalid games, questions dropped): v2.0's load_judgments."""
    out, n_invalid, n_dropped = [], 0, 0
    for r in rows:
        bad = sum(label not in _V2_SCORES for label in r["labels"])
        if bad:
            n_invalid += bad
            n_dropped += 1  # a null (or, here, unknown) game drops the whole question
            continue
        g1, g2 = (_V2_SCORES[label] for label in r["labels"])
        out += [g2[0]] * (weight if g2[1] else 1)          # game 2: the model is A
        out += [1.0 - g1[0]] * (weight if g1[1] else 1)    # game 1: the baseline is A
    return out, n_invalid, n_dropped

# ----------------------------------------------------------------------------- score


def _logit10(p: np.ndarray) -> np.ndarray:
    """Elo difference (scale 400, base 10) whose predicted win rate is p.

    A round won (or lost) outright has no finite fit; the official's solver stops at some large rating,
    we at the one of p = 1 - 1e-9 (both read as 100.0 / 0.0)."""
    p = np.clip(p, 1e-9, 1.0 - 1e-9)
    return 400.0 * (np.log10(p) - np.log10(1.0 - p))


def _win_rate(elo_diff: float) -> float:
    return 100.0 / (1.0 + 10.0 ** (-elo_diff / 400.0))


def _score_v01(battles: np.ndarray) -> tuple[float, float, float]:
    rs = np.random.RandomState(V01_SEED)
    n = battles.size
    # pandas' sample(frac=1.0, replace=True) draws np.random.choice(n, size=n, replace=True)
    boot = np.array([battles[rs.choice(n, size=n, replace=True)].mean() for _ in range(N_ROUNDS)])
    lo, hi = np.percentile(_logit10(boot), [2.5, 97.5])  # percentiles of the Elo ratings
    return 100.0 * float(battles.mean()), _win_rate(lo), _win_rate(hi)


def _score_v2(battles: np.ndarray, seed: int) -> tuple[float, float, float]:
    rs = np.random.RandomState(seed)
    n = battles.size
    boot = np.array([battles[rs.choice(n, size=n, replace=True)].mean() for _ in range(N_ROUNDS)])
    lo, hi = np.quantile(boot, [0.05, 0.95])
    return 100.0 * float(boot.mean()), 100.0 * float(lo), 100.0 * float(hi)


def score(judgment_paths, baseline: str, *, version: str, category: str | None = None, seed: int = 0) -> dict:
    """Arena-Hard score of one model vs `baseline` as the version's show_result computes it.

    Returns {"score", "ci_low", "ci_high" (percent), "ci" (the interval's coverage), "n" (questions with a
    valid game), "n_battles", "n_invalid" (games without a usable verdict), "n_excluded" (questions left
    out: v2.0 drops a question with an invalid game, v0.1 only one without any valid game), "n_questions",
    "model", "baseline", "version"}. `seed` seeds v2.0's bootstrap (v0.1's is the official seed 42).
    """
    _check_version(version)
    rows = read_judgments(judgment_paths, baseline=baseline, category=category)
    if not rows:
        raise ValueError(f"no judgments in {judgment_paths}" + (f" for category {category!r}" if category else ""))
    models = sorted({r["model"] for r in rows})
    if len(models) != 1:
        raise ValueError(f"judgments of several models {models}: score one model at a time")
    if baseline in models:
        raise ValueError(f"the judged model is the baseline {baseline!r}")
    battles, n_invalid, n_excluded = (battles_v01 if version == V01 else battles_v2)(rows)
    out = {"model": models[0], "baseline": baseline, "version": version, "n": len(rows) - n_excluded,
           "n_questions": len(rows), "n_invalid": n_invalid, "n_excluded": n_excluded,
           "n_battles": len(battles), "ci": 0.95 if version == V01 else 0.90}
    if not battles:
        return out | {"score": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    arr = np.asarray(battles, dtype=float)
    value, lo, hi = _score_v01(arr) if version == V01 else _score_v2(arr, seed)
    return out | {"score": value, "ci_low": lo, "ci_high": hi}


def table_rows(result: dict, *, judge: str, metric: str = "arenahard") -> list[dict]:
    """eval.results_table rows for a score() result (model_b = the baseline)."""
    note = (f"{result['n_battles']} usable games of {2 * result['n_questions']}"
            if math.isnan(result["score"]) else None)
    return [make_row(model_a=result["model"], model_b=result["baseline"], metric=metric, value=result["score"],
                     ci_low=result["ci_low"], ci_high=result["ci_high"], n=result["n"], judge=judge, note=note)]
