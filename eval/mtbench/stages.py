"""MT-Bench's stages, the commands of its rules (workflow/rules/mtbench.smk): `python -m eval generate-mtbench`,
`judge-mtbench`, `score-mtbench`. Each reads only its inputs and parameters and writes only its outputs, in
FastChat's formats: model_answer/<model>.jsonl, model_judgment/<judge>_single.jsonl, and a score file (a JSON
list of eval.results_table rows, which make_table1 adds to results/table1.csv)."""
from __future__ import annotations

import logging

from eval import generation
from eval.judging.judges import get_judge, is_empty, write_calls
from eval.mtbench import answers as mtbench_answers, data, judge as mtbench_judge, score as mtbench_score
from rpo.io import write_json

log = logging.getLogger(__name__)


def generate_mtbench(*, model_name, ref_dir, policy_dir, out, n_questions, max_new_tokens, batch_size, seed,
                     backend="hf", vllm_dtype=None, dtype=None, fastchat_template=None, gguf=None):
    """`fastchat_template`: FastChat's conversation template (eval.mtbench.fastchat; benchmarks.mtbench.template
    fastchat) instead of the model's chat template; `dtype`: benchmarks.mtbench.dtype (eval.generation)."""
    generation.check_backend(backend, vllm_dtype, gguf)
    questions = data.load_questions()
    if backend == "vllm":
        engine = generation.vllm_engine(ref_dir, policy_dir, seed=seed, vllm_dtype=vllm_dtype, dtype=dtype)
        mtbench_answers.generate_answers_vllm(engine, questions, out, model_id=model_name,
                                              max_new_tokens=max_new_tokens, seed=seed, limit=n_questions,
                                              fastchat_template=fastchat_template)
        return
    tok, model = generation.load_sampler(backend, ref_dir, policy_dir, gguf, dtype)
    mtbench_answers.generate_answers(model, tok, questions, out, model_id=model_name, max_new_tokens=max_new_tokens,
                                     seed=seed, limit=n_questions, batch_size=batch_size,
                                     fastchat_template=fastchat_template)


def judge_mtbench(*, model_name, answers, out, calls_out, judge, judge_max_tokens, rating_attempts):
    questions = data.load_questions()
    answer_rows = data.load_answers(answers)
    questions = [q for q in questions if q["question_id"] in answer_rows]
    requests = mtbench_judge.judge_requests(questions, answer_rows, data.load_judge_prompts(),
                                            data.load_reference_answers())
    for r in requests:
        r["max_tokens"] = judge_max_tokens
    empty = sum(is_empty(t) for q in questions for t in answer_rows[q["question_id"]]["choices"][0]["turns"])
    with get_judge(judge, scope=out) as j:
        mtbench_judge.write_judgments(requests, j, out, model_id=model_name, attempts=rating_attempts)
        write_calls(calls_out, j, benchmark="mtbench", models=[model_name], judged=len(requests),
                    unit="question turns", empty={model_name: empty})


def score_mtbench(*, model_name, judgments, out, judge_label, bootstrap):
    log.info("%s: MT-Bench %s", model_name, mtbench_score.score(judgments, model=model_name))
    rows = mtbench_score.table_rows(judgments, model_id=model_name, judge=judge_label, n_boot=bootstrap["n"],
                                    seed=bootstrap["seed"], level=bootstrap["ci"])
    write_json(out, rows, default=float)
