"""Command line: `python -m rpo <command> --args '<json of keyword arguments>' [--paths '<json>'] [--threads N]`.

Every Snakemake rule calls one of these; each is also a plain function (see COMMANDS) for tests.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _materialise_model(source: str, out: str, dtype: str = "float32") -> None:
    from rpo.models import materialise_model
    materialise_model(source, out, dtype=dtype)


def _make_data(**kw) -> None:
    from rpo.pipeline import make_data
    make_data(**kw)


def _train_sft(**kw) -> None:
    from rpo.train import train_sft
    train_sft(**kw)


def _reference_logps(**kw) -> None:
    from rpo.train import reference_logps
    reference_logps(**kw)


def _train_preference(**kw) -> None:
    from rpo.train import train_preference
    train_preference(**kw)


def _make_soup(**kw) -> None:
    from rpo.soup import make_soup
    make_soup(**kw)


def _reference_answers(**kw) -> None:
    from rpo.overopt import reference_answers
    reference_answers(**kw)


def _evaluate_snapshots(**kw) -> None:
    from rpo.overopt import evaluate_snapshots
    evaluate_snapshots(**kw)


def _train_reward_model(**kw) -> None:
    from rpo.reward import train_reward_model
    train_reward_model(**kw)


def _candidates(name):
    def run(**kw):
        from rpo import candidates
        getattr(candidates, name)(**kw)
    return run


def _rso_pairs(**kw) -> None:
    from rpo.rso import make_rso_pairs
    make_rso_pairs(**kw)


def _export_gguf(**kw) -> None:
    from rpo.gguf import export
    export(**kw)
def _rounds(name):
    def run(**kw):
        from rpo import rounds
        getattr(rounds, name)(**kw)
    return run


def _train_round(**kw) -> None:
    from rpo.round_train import train_round
    train_round(**kw)


def _write_config(config: dict, out: str) -> None:
    """The resolved config as YAML, keys in their order (results/config.resolved.yaml)."""
    import yaml

    from rpo.io import write_text
    write_text(out, yaml.safe_dump(config, sort_keys=False))


COMMANDS = {
    "materialise-model": _materialise_model,
    "make-data": _make_data,
    "train-sft": _train_sft,
    "reference-logps": _reference_logps,
    "train-preference": _train_preference,
    "make-soup": _make_soup,
    "reference-answers": _reference_answers,
    "evaluate-snapshots": _evaluate_snapshots,
    "write-config": _write_config,
    "train-reward-model": _train_reward_model,
    "rso-pairs": _rso_pairs,
    **{f"{stage}-candidates": _candidates(f"{stage}_candidates") for stage in ("sample", "gold", "score")},
    "export-gguf": _export_gguf,
    # online rounds (rpo/rounds.py, rpo/round_train.py; workflow/rules/rounds.smk)
    "round-prompts": _rounds("round_prompts"),
    "sample-round": _rounds("sample_round"),
    "label-round": _rounds("label_round"),
    "train-round": _train_round,
    "evaluate-round": _rounds("evaluate_round"),
    "reference-records": _rounds("reference_records"),
    "finish-rounds": _rounds("finish_rounds"),
}


def main(argv=None, commands=COMMANDS, prog="rpo") -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {prog}")
    ap.add_argument("command", choices=sorted(commands))
    ap.add_argument("--args", default="{}", help="JSON object of the command's keyword arguments")
    ap.add_argument("--paths", default="{}", help="JSON object of more keyword arguments: the paths a "
                    "Snakemake rule takes from its input and output (kept apart from --args, whose "
                    "changes Snakemake tracks to re-run the job)")
    ap.add_argument("--threads", type=int, default=None, help="the job's CPU threads; each of several ranks on a "
                    "node takes its share (rpo.launch.rank_threads)")
    ns = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    kwargs = {}
    for flag, text in (("--args", ns.args), ("--paths", ns.paths)):
        try:
            more = json.loads(text)
        except json.JSONDecodeError as e:
            ap.error(f"{flag} is not valid JSON: {e}")
        both = sorted(set(kwargs) & set(more))
        if both:
            ap.error(f"--args and --paths both give {both}")
        kwargs.update(more)
    if ns.threads:
        import torch

        from rpo.launch import rank_threads
        threads = rank_threads(ns.threads)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    commands[ns.command](**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
