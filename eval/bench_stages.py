"""Stage functions of the benchmark rules: generate_<benchmark>, judge_<benchmark>, score_<benchmark>.

Each reads only its inputs and parameters and writes only its outputs, in the benchmark's own format:
    MT-Bench     FastChat model_answer/<model>.jsonl and model_judgment/<judge>_single.jsonl
    AlpacaEval   alpaca_eval model_outputs.json and annotations.json
    Arena-Hard   arena-hard-auto model_answer rows and model_judgment/<model>.jsonl
Every score file is a JSON list of eval.results_table rows, which make_table1 adds to results/table1.csv.
"""
from __future__ import annotations

import logging
from pathlib import Path

from eval import (alpacaeval, alpacaeval_judge, alpacaeval_metrics, arenahard, arenahard_judge,
                  arenahard_protocol, generation, mtbench, mtbench_judge)
from rpo.io import write_json
from eval import judge_config
from eval.judges import get_judge, is_empty, write_calls

log = logging.getLogger(__name__)


def _write_rows(rows: list[dict], out: str) -> None:
    write_json(out, rows, default=float)


# ---------------------------------------------------------------------------------------------------
# MT-Bench
# ---------------------------------------------------------------------------------------------------

def generate_mtbench(*, model_name, ref_dir, policy_dir, out, n_questions, max_new_tokens, batch_size, seed,
                     backend="hf", vllm_dtype=None, dtype=None, fastchat_template=None):
    """`fastchat_template`: FastChat's conversation template (eval.fastchat; benchmarks.mtbench.template
    fastchat) instead of the model's chat template; `dtype`: benchmarks.mtbench.dtype (eval.generation)."""
    generation.check_backend(backend, vllm_dtype)
    questions = mtbench.load_questions()
    if backend == "vllm":
        from eval.vllm_backend import generate_mtbench_answers
        engine = generation.vllm_engine(ref_dir, policy_dir, seed=seed, vllm_dtype=vllm_dtype, dtype=dtype)
        generate_mtbench_answers(engine, questions, out, model_id=model_name, max_new_tokens=max_new_tokens,
                                 seed=seed, limit=n_questions, fastchat_template=fastchat_template)
        return
    tok, model = generation.load_local(backend, ref_dir, policy_dir, dtype)
    mtbench.generate_answers(model, tok, questions, out, model_id=model_name, max_new_tokens=max_new_tokens,
                             seed=seed, limit=n_questions, batch_size=batch_size, fastchat_template=fastchat_template)


def judge_mtbench(*, model_name, answers, out, calls_out, judge, judge_max_tokens, rating_attempts):
    questions = mtbench.load_questions()
    answer_rows = mtbench.load_answers(answers)
    questions = [q for q in questions if q["question_id"] in answer_rows]
    requests = mtbench_judge.judge_requests(questions, answer_rows, mtbench.load_judge_prompts(),
                                      mtbench.load_reference_answers())
    for r in requests:
        r["max_tokens"] = judge_max_tokens
    empty = sum(is_empty(t) for q in questions for t in answer_rows[q["question_id"]]["choices"][0]["turns"])
    with get_judge(judge, scope=out) as j:
        mtbench_judge.write_judgments(requests, j, out, model_id=model_name, attempts=rating_attempts)
        write_calls(calls_out, j, benchmark="mtbench", models=[model_name], judged=len(requests),
                    unit="question turns", empty={model_name: empty})


def score_mtbench(*, model_name, judgments, out, judge_label, bootstrap):
    log.info("%s: MT-Bench %s", model_name, mtbench.score(judgments, model=model_name))
    rows = mtbench.table_rows(judgments, model_id=model_name, judge=judge_label, n_boot=bootstrap["n"],
                              seed=bootstrap["seed"], level=bootstrap["ci"])
    _write_rows(rows, out)


# ---------------------------------------------------------------------------------------------------
# AlpacaEval 2.0
# ---------------------------------------------------------------------------------------------------

def _subset(rows: list, n: int | None, subset: str, size) -> list:
    """The first n rows, or (subset "shortest") the n whose judge prompt will be shortest.

    "shortest" exists for the CPU quickstart: a judge's cost there is its prompt, dominated by the
    reference or baseline answer, so the cheapest questions to judge are those with the shortest ones.
    A deterministic choice, named in the config; the paper configs use every question.
    """
    if subset not in ("first", "shortest"):
        raise ValueError(f"benchmark subset {subset!r}: expected 'first' or 'shortest'")
    if n is None:
        return rows
    if subset == "shortest":
        order = sorted(range(len(rows)), key=lambda i: (size(rows[i]), i))[:n]
        return [rows[i] for i in sorted(order)]
    return rows[:n]


def _alpaca_eval_set(n_questions, subset):
    rows = alpacaeval.load_eval_set()
    return _subset(rows, n_questions, subset, lambda r: len(r["instruction"]) + len(r["output"]))


def generate_alpacaeval(*, model_name, ref_dir, policy_dir, out, n_questions, max_new_tokens, batch_size, seed,
                        temperature, top_p, subset="first", backend="hf", vllm_dtype=None, dtype=None,
                        add_special_tokens=False, stop_token_ids=(), prompt_template=None):
    """Answers with benchmarks.alpacaeval's decoding settings; `prompt_template`: an alpaca_eval model config's
    prompt (the authors' prompt.txt) instead of the chat template. Answers are stripped, as alpaca_eval's
    evaluate_from_model strips them."""
    eval_set = _alpaca_eval_set(n_questions, subset)
    gen = generation.answer_prompts(
        backend=backend, vllm_dtype=vllm_dtype, dtype=dtype, ref_dir=ref_dir, policy_dir=policy_dir,
        prompts=alpacaeval.generation_prompts(eval_set, prompt_template), out=Path(out).with_suffix(".gen.jsonl"),
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0, batch_size=batch_size,
        seed=seed, model_name=model_name, desc=f"alpacaeval {model_name}", add_special_tokens=add_special_tokens,
        stop_token_ids=stop_token_ids)
    alpacaeval.write_model_outputs(alpacaeval.make_model_outputs(eval_set, gen, model_name), out)


def judge_alpacaeval(*, outputs, out, calls_out, judge, annotator_dir):
    model_outputs = alpacaeval.read_model_outputs(outputs)
    eval_set = {r["instruction"]: r for r in alpacaeval.load_eval_set()}
    reference = [eval_set[r["instruction"]] for r in model_outputs]
    model = model_outputs[0]["generator"] if model_outputs else "?"
    with get_judge(judge, scope=out) as j:
        annotations = alpacaeval_judge.annotate(model_outputs, j, annotator_dir, reference=reference)
        write_calls(calls_out, j, benchmark="alpacaeval", models=[model], judged=len(model_outputs),
                    unit="instructions", empty={model: sum(is_empty(r["output"]) for r in model_outputs)})
    alpacaeval.write_annotations(annotations, out)


def score_alpacaeval(*, model_name, annotations, out, judge_label, bootstrap, lc_win_rate="if_available",
                     precomputed_dir=None):
    ann = alpacaeval.read_annotations(annotations)
    wr = alpacaeval_metrics.win_rate(ann, n_boot=bootstrap["n"], seed=bootstrap["seed"], ci=bootstrap["ci"])
    log.info("%s: AlpacaEval win rate %.2f (alpaca_eval's standard error %.2f; bootstrap interval [%.2f, %.2f])",
             model_name, wr["value"], wr["standard_error"], wr["ci_low"], wr["ci_high"])
    lc = alpacaeval_metrics.lc_win_rate(ann, precomputed_dir=precomputed_dir, fetch=lc_win_rate == "required")
    if lc.get("unavailable"):
        if lc_win_rate == "required":  # checked at start-up; the files went away since
            raise RuntimeError(f"{model_name}: AlpacaEval LC win rate required but unavailable: {lc['unavailable']}")
        # The LC column stays empty, never filled with another number; the reason goes to the log.
        log.warning("%s: AlpacaEval LC win rate unavailable: %s", model_name, lc["unavailable"])
    _write_rows(alpacaeval_metrics.table_rows(model_name, wr, lc, judge=judge_label), out)


# ---------------------------------------------------------------------------------------------------
# Arena-Hard
# ---------------------------------------------------------------------------------------------------

def _arena_questions(version: str, n_questions, category, subset="first"):
    questions, baselines = arenahard.load_benchmark(version, categories=[category] if category else None)

    def size(q):
        return len(q["prompt"]) + max(len(b.get(q["uid"], "")) for b in baselines.values())
    return _subset(questions, n_questions, subset, size), baselines


def generate_arenahard(*, model_name, ref_dir, policy_dir, out, version, category, n_questions, max_new_tokens,
                       batch_size, seed, temperature, top_p, subset="first", backend="hf", vllm_dtype=None, dtype=None,
                       add_special_tokens=False, stop_token_ids=()):
    questions, _ = _arena_questions(version, n_questions, category, subset)
    generation.answer_prompts(backend=backend, vllm_dtype=vllm_dtype, dtype=dtype, ref_dir=ref_dir,
                              policy_dir=policy_dir, prompts=arenahard.generation_prompts(questions), out=out,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0,
                              batch_size=batch_size, seed=seed, model_name=model_name, desc=f"arena-hard {model_name}",
                              add_special_tokens=add_special_tokens, stop_token_ids=stop_token_ids)


def judge_arenahard(*, model_name, answers, out, calls_out, judge, version, category, n_questions,
                    judge_max_tokens, subset="first"):
    from rpo.data import read_records
    questions, baselines = _arena_questions(version, n_questions, category, subset)
    model_answers = arenahard.answers_from_generations(read_records(answers))
    if judge_max_tokens is None:  # null: the version's own setting (v0.1 4096, v2.0 16000)
        judge_max_tokens = arenahard_protocol.JUDGE_SETTINGS[version]["max_tokens"]
    with get_judge(judge, scope=out) as j:
        arenahard_judge.judge_answers(questions, model_answers, baselines, j, out, model=model_name,
                                      judge_name=judge_config.judge_label(judge), max_tokens=judge_max_tokens,
                                      version=version)
        write_calls(calls_out, j, benchmark="arenahard", models=[model_name], judged=len(questions),
                    unit="questions (2 games each)",
                    empty={model_name: sum(is_empty(model_answers.get(q["uid"])) for q in questions)})


def score_arenahard(*, model_name, judgments, out, judge_label, version, category, bootstrap):
    """The version's show_result (eval.arenahard_protocol); bootstrap.seed seeds v2.0's draw only."""
    baseline = arenahard.baseline_for(category) if version == arenahard.V2 else arenahard.V01_BASELINE
    result = arenahard_protocol.score([judgments], baseline, version=version, category=category,
                                      seed=bootstrap["seed"])
    log.info("%s: Arena-Hard %s", model_name, {k: v for k, v in result.items() if k != "model"})
    _write_rows(arenahard_protocol.table_rows(result, judge=judge_label), out)
