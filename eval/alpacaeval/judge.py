"""AlpacaEval 2.0 annotation: alpaca_eval's own PairwiseAnnotator, its calls answered by our judge client.

`annotate` writes an annotator config (`write_annotator_config`: alpaca_eval's
`weighted_alpaca_eval_gpt4_turbo` with the judge model replaced by ours; the endpoint must return top-5
logprobs) whose client class is `CachedJudgeClient`, and runs alpaca_eval on it. `CachedJudgeClient`
answers alpaca_eval's `chat.completions.create` through eval.judging.client, so every call is in the judge
cache as soon as it returns (a killed run repeats no finished call; alpaca_eval saves its own cache only
every 128 rows, and it is switched off here), malformed answers are retried, errors never show the API
key, and no URL or key is written into the config.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import types
from collections.abc import Sequence
from pathlib import Path

import yaml

from eval.alpacaeval.data import DEFAULT_ANNOTATOR, _validate_outputs, load_eval_set
from rpo.io import write_text

# ----------------------------------------------------------------------------- annotator config


# Live judges that alpaca_eval's client configs may name, by token (see `judge_client_for`).
_LIVE_JUDGES: dict[str, object] = {}
_FINISH_REASONS = {"stop", "length", "tool_calls", "content_filter", "function_call"}


@contextlib.contextmanager
def judge_client_for(judge):
    """Make `judge` (an eval.judging.client.OpenAIClient) reachable from alpaca_eval's `client_class`
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
                               "works inside eval.alpacaeval.judge.annotate(..., judge=...)")
        self._judge = _LIVE_JUDGES[judge]
        self.chat = types.SimpleNamespace(completions=types.SimpleNamespace(create=self._create))

    def _create(self, *, messages, model, **params):
        from openai.types.chat import ChatCompletion
        if model != self._judge.model:
            raise ValueError(f"AlpacaEval asked for judge model {model!r}, the configured judge is "
                             f"{self._judge.model!r}")
        rec = self._judge.complete_records([{"messages": messages, **params}])[0]
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
    write_text(client_path, yaml.safe_dump({model: [{
        "client_class": "eval.alpacaeval.judge.CachedJudgeClient", "judge": judge_token}]}, sort_keys=False))
    cfg = dict(base)
    cfg["prompt_template"] = f"{name}/{template.name}"  # alpaca_eval resolves it from <results_dir>
    ck = dict(cfg.get("completions_kwargs") or {})
    ck.update(model_name=model, requires_chatml=True, client_config_path=str(client_path))
    if num_procs is not None:
        ck["num_procs"] = int(num_procs)
    cfg["completions_kwargs"] = ck
    cfg["pretty_name"] = f"{base_annotator} with judge {model}"
    path = out_dir / "configs.yaml"
    write_text(path, yaml.safe_dump({name: cfg}, sort_keys=False))
    return path

# ----------------------------------------------------------------------------- annotation


def annotate(model_outputs: Sequence[dict], judge, annotator_dir, reference: Sequence[dict] | None = None,
             base_annotator: str = DEFAULT_ANNOTATOR) -> list[dict]:
    """Annotate model outputs against the reference with alpaca_eval's PairwiseAnnotator and our judge.

    `judge`: an eval.judging.client.OpenAIClient (every LLM judge is one); `annotator_dir`: where the
    annotator config goes. Returns alpaca_eval's annotation
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
        # caching_path=None: our judge cache is the one resume mechanism (alpaca_eval's own saves only
        # every 128 rows); a re-run re-asks nothing either way.
        annotator = PairwiseAnnotator(annotators_config=str(config), base_dir=str(config.parents[1]),
                                      caching_path=None)
        records = annotator.annotate_head2head(outputs_1=list(reference), outputs_2=list(model_outputs))
    order = {s: i for i, s in enumerate(ref_instr)}
    return sorted(records, key=lambda r: order[r["instruction"]])
