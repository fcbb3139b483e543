"""The benchmarks of Table 2: the one list that `python -m eval` (its commands), the preflight (its checks), the
table (its column order) and the workflow (its rules and targets) read.

A benchmark is one package, one rule file and one entry here:

    eval/<name>/stages.py       generate_<name>, judge_<name>, score_<name>: the commands of its rules
                                (`python -m eval generate-<name> ...`), each reading only its inputs and parameters
    eval/<name>/checks.py       settings_problems and data_problems: what the preflight asks of it
    workflow/rules/<name>.smk   its rules generate_<name>, judge_<name>, score_<name>; the score file
                                results/scores/<name>/<model>.json feeds make_table1
    config benchmarks.<name>    its settings (workflow/schemas/config.schema.yaml), `enabled` among them

This module imports no benchmark: the workflow reads it while it is parsed (every cluster job parses it again),
and a benchmark's stages import torch. A stage function or a checks module is imported when it is used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

STAGES = ("generate", "judge", "score")


@dataclass(frozen=True)
class Benchmark:
    name: str                 # config benchmarks.<name>, package eval.<name>, rules <stage>_<name>
    metrics: tuple[str, ...]  # its Table 2 columns (eval.results_table rows' `metric`), in the paper's order

    @property
    def package(self) -> str:
        return f"eval.{self.name}"

    def rule(self, stage: str) -> str:
        """The workflow's rule of one stage, e.g. judge_mtbench."""
        if stage not in STAGES:
            raise ValueError(f"benchmark stage {stage!r}: expected one of {list(STAGES)}")
        return f"{stage}_{self.name}"

    def command(self, stage: str) -> str:
        """The `python -m eval` command of one stage, e.g. judge-mtbench."""
        return self.rule(stage).replace("_", "-", 1)

    def stage(self, stage: str):
        """The function behind one stage's command: eval.<name>.stages.<stage>_<name>."""
        return getattr(importlib.import_module(f"{self.package}.stages"), self.rule(stage))

    def checks(self):
        """The module of its preflight checks, eval.<name>.checks."""
        return importlib.import_module(f"{self.package}.checks")


# Table 2's benchmarks in the paper's column order.
BENCHMARKS = (
    Benchmark("mtbench", ("mtbench", "mtbench_turn1", "mtbench_turn2")),
    Benchmark("alpacaeval", ("alpacaeval_lc", "alpacaeval_wr")),
    Benchmark("arenahard", ("arenahard",)),
)
NAMES = tuple(b.name for b in BENCHMARKS)
TABLE_ORDER = tuple(m for b in BENCHMARKS for m in b.metrics)


def get(name: str) -> Benchmark:
    for b in BENCHMARKS:
        if b.name == name:
            return b
    raise KeyError(f"no benchmark {name!r}; the benchmarks are {list(NAMES)} (eval/registry.py)")


def enabled(config: dict) -> list[str]:
    """The benchmarks a config runs (benchmarks.<name>.enabled), in the registry's order."""
    return [b.name for b in BENCHMARKS if config["benchmarks"][b.name]["enabled"]]


def commands() -> dict:
    """`python -m eval`'s benchmark commands, {"generate-mtbench": run, ...}: each imports its stage when run."""
    def runner(b: Benchmark, stage: str):
        def run(**kw):
            b.stage(stage)(**kw)
        return run
    return {b.command(s): runner(b, s) for s in STAGES for b in BENCHMARKS}
