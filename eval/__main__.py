"""Command line: `python -m eval <command> --args '<json>' [--threads N]` (see rpo/__main__.py).

Each command imports its module when it runs: most of them import torch, matplotlib or lm_eval, which a command
that does not use them should not pay for.
"""
from __future__ import annotations

import sys

from eval import registry
from rpo.__main__ import main


def _generate_table1(**kw):
    from eval.table1 import generate_table1_answers
    generate_table1_answers(**kw)


def _judge_pair(**kw):
    from eval.table1 import judge_pair
    judge_pair(**kw)


def _make_table1(**kw):
    from eval.table1 import make_table1
    make_table1(**kw)


def _table1_variance(**kw):
    from eval.pairwise_judge import variance_report
    variance_report(**kw)


def _overoptimization(**kw):
    from eval.overoptimization import make_study
    make_study(**kw)


def _online(**kw):
    from eval.online import make_online
    make_online(**kw)


def _judge_validity(**kw):
    from eval.judging.validity import judge_validity
    judge_validity(**kw)


def _best_of_n(**kw):
    from eval.bon import make_bon
    make_bon(**kw)


def _make_fused_model(**kw):
    from eval.fusion import make_fused_model
    make_fused_model(**kw)


def _harness(name):
    def run(**kw):
        from eval import harness
        getattr(harness, name)(**kw)
    return run


COMMANDS = {"generate-table1": _generate_table1, "judge-table1": _judge_pair, "make-table1": _make_table1,
            "table1-variance": _table1_variance, "overoptimization": _overoptimization, "online": _online,
            "judge-validity": _judge_validity, "best-of-n": _best_of_n, "make-fused-model": _make_fused_model,
            **registry.commands(),  # generate-mtbench, judge-mtbench, score-mtbench, ... (eval/registry.py)
            "make-lm-eval-ifeval": _harness("make_ifeval_task"), "check-lm-eval": _harness("check_datasets"),
            "run-lm-eval": _harness("run_lm_eval"), "score-lm-eval": _harness("score_lm_eval")}

if __name__ == "__main__":
    sys.exit(main(commands=COMMANDS, prog="eval"))
