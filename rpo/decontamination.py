"""HumanEval decontamination of the preference pairs, as the authors' run_rpo.py does it (config
`data.humaneval_decontamination`; the rule: YSLIU627/Regularized-Preference-Optimization @ d0389c4,
alignment-handbook/src/alignment/decontaminate.py):

    strings   every HumanEval test prompt's docstring (`docstring`), and every non-empty stripped canonical solution
              except the four generic ones upstream keeps (`KEPT_SOLUTIONS`)
    filter    a pair is removed when one of the strings, lower-cased with its whitespace collapsed to single
              spaces, is a substring of its chosen response's text treated the same way (`is_contaminated`)
    text      the chosen response as the handbook renders it (rpo.chat_format.render over the chosen messages:
              the model's chat template, no generation prompt), run_rpo.py's `text_column="text_chosen"`

run_rpo.py filters both splits; Table 1's prompts are read from the raw test split by the authors' gen_eval*.py,
so rpo.pipeline.make_data filters train.jsonl and test.jsonl and takes prompts_test.jsonl before the filter.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

HUMANEVAL_SOURCE, HUMANEVAL_SPLIT = "hf:openai/openai_humaneval", "test"  # upstream: load_dataset("openai_humaneval")

# decontaminate.py's HUMAN_EVAL_STRINGS_OK. Its fourth entry is written `"return " ".join(strings)"`, which
# Python reads as two adjacent literals: the string below (so HumanEval's `return ''.join(strings)` is filtered).
KEPT_SOLUTIONS = ("return x + y", "return len(string)", "return n**2", "return .join(strings)")
MODES = ("disabled", "if_available", "required")


def docstring(prompt: str, where: str = "HumanEval prompt") -> str:
    """The docstring of a HumanEval prompt: between the 1st and 2nd triple double quotes when it has 2, the 3rd and
    4th when it has 4; else between the two triple single quotes. Anything else is an error (upstream raises too)."""
    if '"""' in prompt:
        n = prompt.count('"""')
        if n in (2, 4):
            return prompt.split('"""')[n - 1].strip()
        raise ValueError(f'{where}: {n} triple double quotes; expected 2 or 4')
    if prompt.count("'''") == 2:
        return prompt.split("'''")[1].strip()
    raise ValueError(f"{where}: no docstring in triple quotes")


def filter_strings(rows: list[dict]) -> dict[str, list[str]]:
    """The strings to filter out, from HumanEval rows ({"prompt", "canonical_solution", ...}), by kind."""
    docstrings = [docstring(r["prompt"], f"HumanEval {r.get('task_id', i)}") for i, r in enumerate(rows)]
    solutions = [s for s in (r["canonical_solution"].strip() for r in rows) if s and s not in KEPT_SOLUTIONS]
    return {"human_eval_docstrings": docstrings, "human_eval_solutions": solutions}


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def is_contaminated(text: str, strings: dict[str, list[str]]) -> bool:
    content = normalize(text)
    return any(normalize(s) in content for group in strings.values() for s in group)


def decontaminate(rows: list[dict], strings: dict[str, list[str]], text_of) -> tuple[list[dict], list[str]]:
    """(the rows whose `text_of(row)` holds none of `strings`, the ids of the others)."""
    normalized = [normalize(s) for group in strings.values() for s in group]
    kept, removed = [], []
    for r in rows:
        content = normalize(text_of(r))
        if any(s in content for s in normalized):
            removed.append(r["id"])
        else:
            kept.append(r)
    return kept, removed


def load_humaneval() -> list[dict]:
    """HumanEval's test split through the hub cache (rpo.data.load_hub_split: offline, a cached snapshot)."""
    from rpo.data import load_hub_split
    ds, _ = load_hub_split(HUMANEVAL_SOURCE, HUMANEVAL_SPLIT)
    return [dict(r) for r in ds]


def humaneval_strings(mode: str) -> tuple[dict[str, list[str]] | None, str | None]:
    """(the strings, None), or under `if_available` (None, why) when HumanEval cannot be loaded; `required`
    raises instead."""
    from rpo.data import DataError
    if mode not in MODES[1:]:
        raise ValueError(f"data.humaneval_decontamination: {mode!r}; expected one of {list(MODES)}")
    try:
        return filter_strings(load_humaneval()), None
    except DataError as e:
        if mode == "required":
            raise DataError(f"data.humaneval_decontamination is 'required' but HumanEval cannot be loaded: {e}") from None
        return None, str(e)
