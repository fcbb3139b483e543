"""MT-Bench (Zheng et al. 2023), single-answer grading, with FastChat llm_judge's semantics and file formats.

The paper's Table 2 reports MT-Bench scores judged by GPT-4. This package reproduces each step of FastChat's
`fastchat/llm_judge` pipeline for one model, so its files can be read by FastChat's own scripts and vice versa:

    data.py      load_questions / load_judge_prompts / load_reference_answers / load_answers: the 80 two-turn
                 questions, the judge prompts, GPT-4's reference answers, a model's answer file
    fastchat.py  FastChat's conversation templates (benchmarks.mtbench.template: fastchat)
    answers.py   generate_answers: two turns per question, the second prompt holding the model's own first answer;
                 temperature by category (gen_model_answer.py) -> model_answer/<model_id>.jsonl
    judge.py     judge_requests, parse_rating, write_judgments: the judge's messages per question and turn, the
                 [[rating]] rule, judge.complete_many -> model_judgment/<judge>_single.jsonl
    score.py     score, ci, table_rows: show_result.py --mode single (drop score -1, mean per turn and overall),
                 plus a seeded bootstrap interval and rows for eval.results_table
    stages.py    generate_mtbench, judge_mtbench, score_mtbench: the commands of workflow/rules/mtbench.smk
    checks.py    what the preflight asks of it

The judge is any object with a `.model` name and `complete_many(requests) -> list[str]`, each request being
{"messages": [{"role", "content"}, ...], "temperature": 0.0, "max_tokens": 2048} (FastChat's GPT-4 call).
"""
