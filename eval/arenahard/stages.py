"""Arena-Hard's stages, the commands of its rules (workflow/rules/arenahard.smk): `python -m eval
generate-arenahard`, `judge-arenahard`, `score-arenahard`. Each reads only its inputs and parameters and writes
only its outputs, in arena-hard-auto's formats: model_answer rows, model_judgment/<model>.jsonl, and a score file
(a JSON list of eval.results_table rows, which make_table1 adds to results/table1.csv)."""
from __future__ import annotations

import logging

from eval import generation, subset as subsets
from eval.arenahard import data, judge as arenahard_judge, protocol
from eval.judging import config as judge_config
from eval.judging.judges import get_judge, is_empty, write_calls
from rpo.data import read_records
from rpo.io import write_json

log = logging.getLogger(__name__)


def _questions(version: str, n_questions, category, subset="first"):
    questions, baselines = data.load_benchmark(version, categories=[category] if category else None)

    def size(q):
        return len(q["prompt"]) + max(len(b.get(q["uid"], "")) for b in baselines.values())
    return subsets.select(questions, n_questions, subset, size), baselines


def generate_arenahard(*, model_name, ref_dir, policy_dir, out, version, category, n_questions, max_new_tokens,
                       batch_size, seed, temperature, top_p, subset="first", backend="hf", vllm_dtype=None, dtype=None,
                       add_special_tokens=False, stop_token_ids=(), gguf=None):
    questions, _ = _questions(version, n_questions, category, subset)
    generation.answer_prompts(backend=backend, vllm_dtype=vllm_dtype, dtype=dtype, gguf=gguf, ref_dir=ref_dir,
                              policy_dir=policy_dir, prompts=data.generation_prompts(questions), out=out,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0,
                              batch_size=batch_size, seed=seed, model_name=model_name, desc=f"arena-hard {model_name}",
                              add_special_tokens=add_special_tokens, stop_token_ids=stop_token_ids)


def judge_arenahard(*, model_name, answers, out, calls_out, judge, version, category, n_questions,
                    judge_max_tokens, subset="first"):
    questions, baselines = _questions(version, n_questions, category, subset)
    model_answers = data.answers_from_generations(read_records(answers))
    if judge_max_tokens is None:  # null: the version's own setting (v0.1 4096, v2.0 16000)
        judge_max_tokens = protocol.JUDGE_SETTINGS[version]["max_tokens"]
    with get_judge(judge, scope=out) as j:
        arenahard_judge.judge_answers(questions, model_answers, baselines, j, out, model=model_name,
                                      judge_name=judge_config.judge_label(judge), max_tokens=judge_max_tokens,
                                      version=version)
        write_calls(calls_out, j, benchmark="arenahard", models=[model_name], judged=len(questions),
                    unit="questions (2 games each)",
                    empty={model_name: sum(is_empty(model_answers.get(q["uid"])) for q in questions)})


def score_arenahard(*, model_name, judgments, out, judge_label, version, category, bootstrap):
    """The version's show_result (eval.arenahard.protocol); bootstrap.seed seeds v2.0's draw only."""
    baseline = data.baseline_for(category) if version == data.V2 else data.V01_BASELINE
    result = protocol.score([judgments], baseline, version=version, category=category, seed=bootstrap["seed"])
    log.info("%s: Arena-Hard %s", model_name, {k: v for k, v in result.items() if k != "model"})
    write_json(out, protocol.table_rows(result, judge=judge_label), default=float)
