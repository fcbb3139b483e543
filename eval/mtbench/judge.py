"""MT-Bench single-answer grading, as FastChat's llm_judge judges (common.py run_judge_single,
gen_judgment.py make_judge_single): the judge's requests, the rating rule, and the judgment file.

The judge is any object with a `.model` name and `complete_many(requests) -> list[str]`, each request
being {"messages": [{"role", "content"}, ...], "temperature": 0.0, "max_tokens": 2048, "attempt": k}
(FastChat's GPT-4 call; `attempt` makes a re-ask its own call, see eval.judging.cache.cache_key).
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path

from eval.mtbench.data import NEED_REF_CATEGORIES, _write_jsonl_atomic

log = logging.getLogger(__name__)

# gen_judgment.py make_judge_single: prompt names by (reference-based, multi-turn).
PROMPT_NAMES = {
    (False, False): "single-v1",
    (True, False): "single-math-v1",
    (False, True): "single-v1-multi-turn",
    (True, True): "single-math-v1-multi-turn",
}
# common.py run_judge_single: the GPT-4 call.
JUDGE_TEMPERATURE = 0.0
JUDGE_MAX_TOKENS = 2048

_ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
# what a constrained judge may answer (eval.judging.constraint): the judge prompts' 1-10 scale, [[rating]]
RATINGS = tuple(f"[[{i}]]" for i in range(1, 11))
_ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def _index_answers(answers) -> Mapping:
    if isinstance(answers, Mapping):
        return answers
    return {a["question_id"]: a for a in answers}


def judge_requests(questions: list[dict], answers, judge_prompts: Mapping[str, dict],
                   references: Mapping[int, list[str]] | None) -> list[dict]:
    """The judge's input for each question and turn, as FastChat's single-answer grading builds it.

    `answers`: FastChat answer rows (a list, or {question_id: row}); `references`: {question_id: [r1, r2]}
    (needed for the math, reasoning and coding questions only). Turn 1 uses single-v1 (single-math-v1 with
    the reference), turn 2 single-v1-multi-turn (single-math-v1-multi-turn), whose template holds both
    questions and both answers. Messages are [system prompt, user prompt] (FastChat's conversation ->
    OpenAI messages; an empty system prompt is left out as FastChat does).

    Returns, turn-1 requests first, in question order: {"question_id", "category", "turn", "prompt_name",
    "user_prompt", "messages", "temperature": 0.0, "max_tokens": 2048}.
    """
    answers = _index_answers(answers)
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        raise ValueError(f"judge_requests: no answer for {len(missing)} of {len(questions)} questions; "
                         f"missing question ids: {missing}")
    refs = references or {}
    no_ref = [q["question_id"] for q in questions
              if q["category"] in NEED_REF_CATEGORIES and q["question_id"] not in refs]
    if no_ref:
        raise ValueError(f"judge_requests: no reference answer for the {'/'.join(NEED_REF_CATEGORIES)} "
                         f"question ids {no_ref}")
    absent = sorted(set(PROMPT_NAMES.values()) - set(judge_prompts))
    if absent:
        raise ValueError(f"judge_requests: judge prompts {absent} are missing")

    out = []
    for turn in (1, 2):
        multi = turn == 2
        for q in questions:
            qid = q["question_id"]
            a = answers[qid]["choices"][0]["turns"]
            if len(a) < turn:
                raise ValueError(f"judge_requests: the answer to question {qid} has {len(a)} turn(s)")
            ref_based = q["category"] in NEED_REF_CATEGORIES
            name = PROMPT_NAMES[(ref_based, multi)]
            tpl = judge_prompts[name]
            kw = {}
            if ref_based:
                kw["ref_answer_1"] = refs[qid][0]
                if multi:
                    kw["ref_answer_2"] = refs[qid][1]
            if multi:
                user = tpl["prompt_template"].format(question_1=q["turns"][0], question_2=q["turns"][1],
                                                     answer_1=a[0], answer_2=a[1], **kw)
            else:
                user = tpl["prompt_template"].format(question=q["turns"][0], answer=a[0], **kw)
            messages = []
            if tpl["system_prompt"]:
                messages.append({"role": "system", "content": tpl["system_prompt"]})
            messages.append({"role": "user", "content": user})
            out.append({"question_id": qid, "category": q["category"], "turn": turn, "prompt_name": name,
                        "user_prompt": user, "messages": messages, "temperature": JUDGE_TEMPERATURE,
                        "max_tokens": JUDGE_MAX_TOKENS})
    return out


def parse_rating(text: str) -> float:
    """FastChat's [[rating]] rule: the first "[[x]]", else the first "[x]"; -1 when neither is found."""
    m = _ONE_SCORE.search(text) or _ONE_SCORE_BACKUP.search(text)
    return float(m.group(1)) if m else -1.0


def write_judgments(requests: list[dict], judge, out_path, *, model_id: str, attempts: int) -> list[dict]:
    """Judge each request with `judge.complete_many` into FastChat's model_judgment/<judge>_single.jsonl.

    Rows: {"question_id", "model", "judge": [judge.model, prompt name], "user_prompt", "judgment", "score",
    "turn", "tstamp", "attempts"}, in request order. A judgment FastChat cannot parse (score -1) is asked
    again, as a re-run of FastChat would ask it, up to `attempts` asks in all: each re-ask is a new call
    with its own cache entry (the attempt index is part of the key), so every attempt stays in the judge
    cache. The row keeps the last attempt; what stays -1 is counted in the log and dropped by `score`.
    Resuming is the judge cache's job: a re-run after a kill makes no finished call again.
    """
    if attempts < 1:
        raise ValueError(f"write_judgments: attempts must be >= 1, got {attempts}")
    out_path = Path(out_path)
    texts: list[str | None] = [None] * len(requests)
    n_asks = [0] * len(requests)
    todo = list(range(len(requests)))
    for attempt in range(attempts):
        if not todo:
            break
        got = judge.complete_many([{"messages": requests[i]["messages"], "temperature": requests[i]["temperature"],
                                    "max_tokens": requests[i]["max_tokens"], "attempt": attempt,
                                    "constraint": RATINGS} for i in todo])
        if len(got) != len(todo):
            raise RuntimeError(f"judge {judge.model!r} returned {len(got)} completions for {len(todo)} requests")
        for i, text in zip(todo, got):
            texts[i], n_asks[i] = text, attempt + 1
        todo = [i for i in todo if parse_rating(texts[i]) == -1]
        if todo and attempt + 1 < attempts:
            log.info("%s: %d judgment(s) without a parsable rating after attempt %d; asking again",
                     out_path, len(todo), attempt + 1)
    now = time.time()
    rows = [{"question_id": r["question_id"], "model": model_id, "judge": [judge.model, r["prompt_name"]],
             "user_prompt": r["user_prompt"], "judgment": text, "score": parse_rating(text), "turn": r["turn"],
             "tstamp": now, "attempts": n} for r, text, n in zip(requests, texts, n_asks)]
    if todo:
        log.warning("%s: %d of %d judgments have no parsable rating after %d attempt(s) (score -1); they "
                    "are left out of the score, as FastChat does", out_path, len(todo), len(rows), attempts)
    _write_jsonl_atomic(rows, out_path)
    return rows
