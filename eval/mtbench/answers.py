"""MT-Bench's answers, as FastChat's gen_model_answer.py writes them: two turns per question, the second prompt
holding the model's own first answer, the temperature by category, into model_answer/<model_id>.jsonl.

    generate_answers        the HF and llama.cpp samplers (rpo.sampling.generate_answers), resumable
    generate_answers_vllm   one vLLM engine (eval.vllm_backend.Engine), one call per turn, the same file
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from eval.mtbench import fastchat
from eval.mtbench.data import (SAMPLED_TOP_K, SAMPLED_TOP_P, MTBenchDataError, _read_jsonl, _write_jsonl_atomic,
                               temperature_for)
from rpo import sampling as _generate
from rpo.io import write_text

log = logging.getLogger(__name__)


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
    FastChat `template` (eval.mtbench.fastchat) each prompt also holds its text, FastChat's conversation."""
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
    """A generated row's answer text: as decoded, or cut as FastChat cuts it (eval.mtbench.fastchat.answer_text)."""
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
    `fastchat_template` FastChat's own (eval.mtbench.fastchat: its prompt text tokenized with special tokens, its
    stops, its cut of the answer, as the authors generated; benchmarks.mtbench.template fastchat); turn 2's
    prompt is [user q1, assistant <own answer 1>, user q2]; the temperature comes from the question's
    category (0 = greedy); a sampled answer uses top_k=50, top_p=1, the defaults HF `generate` applied
    there. Generation itself is rpo.sampling.generate_answers (batched, seeded per batch, resumable),
    once per (turn, temperature) group, into `<out_path>.work/`; that folder is kept while the run is
    unfinished so a rerun with the same settings resumes, and removed at the end. (The vLLM backend:
    generate_answers_vllm, the same prompts, temperatures and file.)

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


def generate_answers_vllm(engine, questions: list[dict], out_path, *, model_id: str, max_new_tokens: int, seed: int,
                          limit: int | None = None, fastchat_template: str | None = None) -> list[dict]:
    """MT-Bench's answers as generate_answers writes them (its prompts, its per-category temperatures, FastChat's
    file; with `fastchat_template`, FastChat's conversation, stops and cut), from one vLLM engine
    (eval.vllm_backend.Engine) with one engine call per turn: turn 2's prompts hold the turn-1 answers."""
    questions = select_questions(questions, limit)
    temperatures = [temperature_for(q["category"]) for q in questions]
    template = fastchat.get_template(fastchat_template) if fastchat_template else None
    text = text_settings(engine.tok, template)
    answers: dict[object, list[str]] = {q["question_id"]: [] for q in questions}
    cut = 0
    for turn in (1, 2):
        rows = engine.generate(turn_prompts(questions, turn, answers, template), temperatures=temperatures,
                               max_new_tokens=max_new_tokens, top_p=SAMPLED_TOP_P, top_k=SAMPLED_TOP_K, seed=seed,
                               model_name=model_id, **text)
        for q, r in zip(questions, rows):
            answers[q["question_id"]].append(answer_of(r, template))
            cut += not r["finished"][0]
    return write_answer_file(out_path, model_id, answers, n_cut=cut, max_new_tokens=max_new_tokens)
