"""Start-up checks of what the evaluation stages will need, run when the workflow starts (common.smk):
a missing API key, judge model or benchmark data file fails the run in seconds, with the fix, instead
of failing the judging jobs after hours of training.

    every LLM judge the config uses     openai: its api_key_env is set in the environment (the key itself
                                        is never read here); llamacpp: its GGUF resolves to a file and
                                        llama_cpp.server is importable; `constrain: true` is refused for
                                        an official GPT-4 judge (eval.judge_constraint)
    MT-Bench (when enabled)             its data files (installed, cached, or fetched once: eval.fetch)
    generation.backend vllm             the vllm package is installed (found, not imported)

(AlpacaEval's LC files and the harness's datasets have their own start-up checks:
eval.alpacaeval_metrics.check_lc_available and the check_lm_eval_datasets rule.)
A dry run (`snakemake -n`) only warns: planning a paper run on a laptop needs no key.
"""
from __future__ import annotations

import importlib.util
import logging
import os

log = logging.getLogger(__name__)

BENCHMARKS = ("mtbench", "alpacaeval", "arenahard")


class PreflightError(RuntimeError):
    """What a run is missing, each problem with its config key and its fix."""


def used_judges(config: dict) -> list[tuple[str, dict]]:
    """(config key, judge block) of every judge this run will call."""
    out = [("table1.judge", config["table1"]["judge"])]
    bench = config["benchmarks"]
    for b in BENCHMARKS:
        if bench[b]["enabled"]:
            own = bench[b].get("judge")
            out.append((f"benchmarks.{b}.judge", own) if own else ("benchmarks.judge", bench["judge"]))
    validity = config["judge_validity"]
    if validity["enabled"]:  # asked once per constrain value: check the constrained ask when there is one
        block = validity["judge"] or bench["judge"]
        out.append(("judge_validity.judge", {**block, "constrain": any(validity["constrain"])}))
    seen, unique = set(), []
    for key, block in out:
        if key not in seen:
            seen.add(key)
            unique.append((key, block))
    return unique


def judge_problems(key: str, judge: dict) -> list[str]:
    from eval.judge_constraint import check_constrain
    try:
        check_constrain(judge, key)
    except ValueError as e:
        return [str(e)]
    kind = judge.get("kind")
    if kind == "openai":
        var = judge.get("api_key_env")
        if var and not os.environ.get(var):
            return [f"{key}: the judge {judge['model']!r} reads its API key from ${var}, which is not set "
                    f"(export {var}=...; the key is never written anywhere)"]
    elif kind == "llamacpp":
        from eval.judges import resolve_gguf
        problems = []
        try:
            resolve_gguf(judge["model"])
        except FileNotFoundError as e:
            problems.append(f"{key}.model: {e}")
        if importlib.util.find_spec("llama_cpp") is None:
            problems.append(f"{key}: a llamacpp judge needs llama-cpp-python[server] (pip install -e .)")
        return problems
    return []


def mtbench_problems(config: dict) -> list[str]:
    if not config["benchmarks"]["mtbench"]["enabled"]:
        return []
    from eval import mtbench
    try:
        mtbench.data_dir()
    except FileNotFoundError as e:
        return [f"benchmarks.mtbench: {e}"]
    return []


def backend_problems(config: dict) -> list[str]:
    if config["generation"]["backend"] == "vllm" and importlib.util.find_spec("vllm") is None:
        return ["generation.backend: vllm needs the vllm package (pip install -e '.[vllm]' on the CUDA machines), "
                "or set generation.backend: hf"]
    return []


def check(config: dict, *, dryrun: bool = False) -> list[str]:
    """Every problem found; raises PreflightError listing them unless `dryrun` (then they are logged)."""
    problems = [p for key, judge in used_judges(config) for p in judge_problems(key, judge)]
    problems += mtbench_problems(config) + backend_problems(config)
    if problems and not dryrun:
        raise PreflightError("this run cannot finish; fix before anything is trained:\n  - "
                             + "\n  - ".join(problems))
    for p in problems:
        log.warning("preflight (dry run, not fatal): %s", p)
    return problems
