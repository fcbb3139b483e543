"""AlpacaEval 2.0's stages, the commands of its rules (workflow/rules/alpacaeval.smk): `python -m eval
generate-alpacaeval`, `judge-alpacaeval`, `score-alpacaeval`. Each reads only its inputs and parameters and writes
only its outputs, in alpaca_eval's formats: model_outputs.json, annotations.json, and a score file (a JSON list of
eval.results_table rows, which make_table1 adds to results/table1.csv)."""
from __future__ import annotations

import logging
from pathlib import Path

from eval import generation, subset as subsets
from eval.alpacaeval import data, judge as alpacaeval_judge, metrics
from eval.judging.judges import get_judge, is_empty, write_calls
from rpo.io import write_json

log = logging.getLogger(__name__)


def _eval_set(n_questions, subset):
    rows = data.load_eval_set()
    return subsets.select(rows, n_questions, subset, lambda r: len(r["instruction"]) + len(r["output"]))


def generate_alpacaeval(*, model_name, ref_dir, policy_dir, out, n_questions, max_new_tokens, batch_size, seed,
                        temperature, top_p, subset="first", backend="hf", vllm_dtype=None, dtype=None,
                        add_special_tokens=False, stop_token_ids=(), prompt_template=None, gguf=None):
    """Answers with benchmarks.alpacaeval's decoding settings; `prompt_template`: an alpaca_eval model config's
    prompt (the authors' prompt.txt) instead of the chat template. Answers are stripped, as alpaca_eval's
    evaluate_from_model strips them."""
    eval_set = _eval_set(n_questions, subset)
    gen = generation.answer_prompts(
        backend=backend, vllm_dtype=vllm_dtype, dtype=dtype, gguf=gguf, ref_dir=ref_dir, policy_dir=policy_dir,
        prompts=data.generation_prompts(eval_set, prompt_template), out=Path(out).with_suffix(".gen.jsonl"),
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0, batch_size=batch_size,
        seed=seed, model_name=model_name, desc=f"alpacaeval {model_name}", add_special_tokens=add_special_tokens,
        stop_token_ids=stop_token_ids)
    data.write_model_outputs(data.make_model_outputs(eval_set, gen, model_name), out)


def judge_alpacaeval(*, outputs, out, calls_out, judge, annotator_dir):
    model_outputs = data.read_model_outputs(outputs)
    eval_set = {r["instruction"]: r for r in data.load_eval_set()}
    reference = [eval_set[r["instruction"]] for r in model_outputs]
    model = model_outputs[0]["generator"] if model_outputs else "?"
    with get_judge(judge, scope=out) as j:
        annotations = alpacaeval_judge.annotate(model_outputs, j, annotator_dir, reference=reference)
        write_calls(calls_out, j, benchmark="alpacaeval", models=[model], judged=len(model_outputs),
                    unit="instructions", empty={model: sum(is_empty(r["output"]) for r in model_outputs)})
    data.write_annotations(annotations, out)


def score_alpacaeval(*, model_name, annotations, out, judge_label, bootstrap, lc_win_rate="if_available",
                     precomputed_dir=None):
    ann = data.read_annotations(annotations)
    wr = metrics.win_rate(ann, n_boot=bootstrap["n"], seed=bootstrap["seed"], ci=bootstrap["ci"])
    log.info("%s: AlpacaEval win rate %.2f (alpaca_eval's standard error %.2f; bootstrap interval [%.2f, %.2f])",
             model_name, wr["value"], wr["standard_error"], wr["ci_low"], wr["ci_high"])
    lc = metrics.lc_win_rate(ann, precomputed_dir=precomputed_dir, fetch=lc_win_rate == "required")
    if lc.get("unavailable"):
        if lc_win_rate == "required":  # checked at start-up; the files went away since
            raise RuntimeError(f"{model_name}: AlpacaEval LC win rate required but unavailable: {lc['unavailable']}")
        # The LC column stays empty, never filled with another number; the reason goes to the log.
        log.warning("%s: AlpacaEval LC win rate unavailable: %s", model_name, lc["unavailable"])
    write_json(out, metrics.table_rows(model_name, wr, lc, judge=judge_label), default=float)
