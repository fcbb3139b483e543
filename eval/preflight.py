"""One check, at the start of a run, of everything the run's jobs will need, so that a run that cannot
finish stops before its first job (not after GPU hours or billed judge calls), each problem naming its
config key and its fix.

    settings       combinations the scorers require: Arena-Hard v2.0 needs a category; AlpacaEval's LC
                   win rate needs all 805 instructions; the offline IFEval task needs IFEval prompts
    judges         every LLM judge a judging job will call: an `openai` judge's key variable is set and
                   its endpoint answers one cheap request (eval.judging.client.OpenAIClient.probe: GET
                   /models, the key sent to the configured base URL only); a `llamacpp` judge's GGUF and
                   llama.cpp's server; `constrain` refused for an official GPT-4 judge
    hub sources    the base model, the data and the fused models' model-source parts (`hf:`) are in the hub
                   cache or reachable; `file` sources and local model directories exist
    benchmark data MT-Bench's files; Arena-Hard's (v0.1 from the hub: fetched into the hub cache now, on
                   the submitting host, so that no compute node needs the network for them); AlpacaEval's
                   LC file df_gamed.csv when `lc_win_rate: required` (fetched likewise)
    lm-eval        every hub task's dataset is in the cache or reachable
    backend        generation.backend vllm: the vllm package is installed

Which checks run follows the jobs: the Snakefile's `onstart` passes the rules of the jobs this run will
execute (`rules`), so `results/overoptimization.csv` asks nothing of the judges. A real run may use the
network (`online`); a dry run (`snakemake -n`) checks what it can offline and only warns, so a paper run
can be planned on a laptop without a key or the hub. Parsing the workflow never calls this.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from eval import harness, registry
from eval.harness import LOCAL_IFEVAL, PACKAGED_IFEVAL
from eval.fusion_config import configured_sources
from eval.judging.client import OpenAIClient
from eval.judging.config import resolve_judge
from eval.judging.constraint import check_constrain
from eval.judging.judges import resolve_gguf
from rpo.config import deep_merge
from rpo.data import gold_meta_problem, read_records
from rpo.decontamination import HUMANEVAL_SOURCE
from rpo.models import find_packaged_gguf, parse_source

log = logging.getLogger(__name__)

BENCHMARKS = registry.NAMES
JUDGE_RULES = {"judge_table1": "table1", "judge_validity": "judge_validity",
               **{b.rule("judge"): b.name for b in registry.BENCHMARKS}}
HUB_TIMEOUT_S = 10.0


class PreflightError(RuntimeError):
    """What a run is missing, each problem with its config key and its fix."""


def _needs(rules: set[str] | None, *names: str) -> bool:
    """Whether a job of any of the rules `names` will run (every rule when `rules` is None)."""
    return rules is None or any(n in rules for n in names)


def _offline(online: bool) -> bool:
    from huggingface_hub import constants
    return not online or bool(constants.HF_HUB_OFFLINE)


# ---------------------------------------------------------------------------------------------------
# Settings the scorers require together
# ---------------------------------------------------------------------------------------------------

def settings_problems(config: dict, rules: set[str] | None = None) -> list[str]:
    out = []
    # each benchmark's own (eval/<name>/checks.py); a benchmark that is off asks nothing
    for b in registry.BENCHMARKS:
        if config["benchmarks"][b.name]["enabled"]:
            out += b.checks().settings_problems(config["benchmarks"][b.name], functools.partial(_needs, rules))
    lm = config["lm_eval"]
    if lm["enabled"] and _needs(rules, "make_lm_eval_ifeval", "run_lm_eval"):
        synthetic = config["data"]["source"] == "synthetic:verifiable"
        for i, t in enumerate(lm["tasks"]):
            problem = None if t["name"] != LOCAL_IFEVAL or synthetic else heldout_ifeval_problem(config["data"])
            if problem:
                out.append(f"lm_eval.tasks[{i}]: {LOCAL_IFEVAL!r} evaluates the held-out prompts by their IFEval "
                           f"key (meta.key, which data.source synthetic:verifiable writes), and {problem}; use "
                           f"{PACKAGED_IFEVAL!r} (the 541 packaged IFEval prompts, offline) or the hub task "
                           "'ifeval', or lm_eval.enabled: false")
            if t["name"] == PACKAGED_IFEVAL and synthetic:
                out.append(f"lm_eval.tasks[{i}]: {PACKAGED_IFEVAL!r} evaluates every packaged IFEval prompt, and "
                           "data.source synthetic:verifiable trains on some of them; use "
                           f"{LOCAL_IFEVAL!r} (the held-out ones)")
    # the gold scorer (the IFEval verifiers) needs verifiable instructions in the rows it scores

    def no_gold(row):
        return gold_meta_problem(row) is not None
    what = "verifiable instructions (meta.instruction_id_list and kwargs)"
    if rules is not None and "study_rso_gold" in rules:  # an RSO family of the study labelled or rewarded by gold
        study_data = deep_merge(config["data"], config["overoptimization"]["data"])
        problem = (study_data["source"] != "synthetic:verifiable"
                   and test_rows_problem(study_data, no_gold, what, split="train"))
        if problem:
            out.append(f"overoptimization.grid.<rso>.sampling: the gold verifiers score the study's training prompts' "
                       f"samples (sampling.reward or labeller gold), which need {what} (data.source "
                       f"synthetic:verifiable has them), and {problem}; use reward and labeller of the reward models")
    if config["data"]["source"] != "synthetic:verifiable":
        validity = config["judge_validity"]["enabled"] if rules is None else "judge_validity" in rules
        for needed, split, key, fix in (
                (validity, "test", "judge_validity", "set judge_validity.enabled: false"),
                (rules is not None and "gold_bon" in rules, "test", "best_of_n",
                 "best-of-n is measured by the gold verifiers: use data.source synthetic:verifiable"),
                (rules is not None and "rso_gold" in rules, "train", "methods.<rso>.sampling.labeller",
                 "label RSO's samples with a reward model (sampling.labeller) or use synthetic:verifiable data")):
            problem = needed and test_rows_problem(config["data"], no_gold, what, split=split)
            if problem:
                out.append(f"{key}: the gold verifiers score these prompts, which need {what} "
                           f"(data.source synthetic:verifiable has them), and {problem}; {fix}")
    return out


def heldout_ifeval_problem(data: dict) -> str | None:
    """Why the test prompts of a hub or file source carry no IFEval keys, or None (a file whose every test
    row has meta.key, such as IFEval pairs written by hand)."""
    return test_rows_problem(data, lambda row: (row.get("meta") or {}).get("key") in (None, ""), "them")


def test_rows_problem(data: dict, lacks, what: str, split: str = "test") -> str | None:
    """Why a hub or file source's `split` rows lack `what` (`lacks(row)` is true for a row without it), naming the
    first such row of a file (1-based); None when every row has it."""
    if data["source"].startswith("hf:"):
        return f"data.source is {data['source']!r}, a hub preference set without {what}"
    path = data["splits"].get(split)
    if not path or not Path(path).is_file():
        return None  # data_problems names the missing file
    for i, row in enumerate(read_records(path), 1):
        if lacks(row):
            return f"row {i} of {path} (data.splits.{split}) has none"
    return None


# ---------------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------------

def used_judges(config: dict, rules: set[str] | None = None) -> list[tuple[str, dict]]:
    """(config key, judge block) of every LLM judge the run's judging jobs will call."""
    out = []
    if _needs(rules, "judge_table1") and config["table1"]["judge"]["kind"] != "gold":
        out.append(("table1.judge", config["table1"]["judge"]))
    bench = config["benchmarks"]
    for b in BENCHMARKS:
        if bench[b]["enabled"] and _needs(rules, f"judge_{b}"):
            own = bench[b].get("judge")
            out.append((f"benchmarks.{b}.judge", own) if own else ("benchmarks.judge", bench["judge"]))
    validity = config["judge_validity"]
    if (validity["enabled"] if rules is None else "judge_validity" in rules):
        # asked once per constrain value: check the constrained ask when there is one
        block = validity["judge"] or bench["judge"]
        out.append(("judge_validity.judge", {**block, "constrain": any(validity["constrain"])}))
    seen, unique = set(), []
    for key, block in out:
        if key not in seen:
            seen.add(key)
            unique.append((key, block))
    return unique


def judge_problems(key: str, judge: dict, *, online: bool = False) -> list[str]:
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
        if online:
            problem = openai_probe(judge)
            if problem:
                return [f"{key}: {problem} (judge {judge['model']!r}; fix {key}.base_url / {key}.model, "
                        "or start the server)"]
    elif kind == "llamacpp":
        problems = []
        try:
            resolve_gguf(judge["model"])
        except FileNotFoundError as e:
            problems.append(f"{key}.model: {e}")
        if importlib.util.find_spec("llama_cpp") is None:
            problems.append(f"{key}: a llamacpp judge needs llama-cpp-python[server] (pip install -e .)")
        return problems
    return []


def openai_probe(judge: dict) -> str | None:
    """OpenAIClient.probe of one `openai` judge block (its defaults filled from the schema); asked once per
    endpoint, model and key variable, however many config keys name that judge."""
    cfg = resolve_judge(judge)
    return _probe(cfg["base_url"], cfg["model"], cfg["api_key_env"], float(cfg["timeout_s"]), cfg["constrain_request"])


@functools.lru_cache(maxsize=None)
def _probe(base_url: str, model: str, api_key_env: str | None, timeout_s: float, constrain_request: str) -> str | None:
    """(cleared by every `check`, so a new run asks again)"""
    client = OpenAIClient(base_url, model, api_key_env, max_concurrency=1, max_retries=0, timeout_s=timeout_s,
                          cache_dir=None, backoff_base_s=1.0, backoff_max_s=1.0, constrain=False,
                          constrain_request=constrain_request)
    return client.probe(timeout_s=min(HUB_TIMEOUT_S, timeout_s))


# ---------------------------------------------------------------------------------------------------
# Models and data on the hub or on disk
# ---------------------------------------------------------------------------------------------------

def hub_problem(key: str, repo: str, *, repo_type: str, revision: str | None, online: bool) -> str | None:
    """None when `repo` is in the hub cache, or (online) the hub answers for it; else the problem."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hub_errors
    kind = "dataset" if repo_type == "dataset" else "model"
    fill = (f"huggingface-cli download {repo}" + (" --repo-type dataset" if kind == "dataset" else "")
            + (f" --revision {revision}" if revision else ""))
    try:
        snapshot_download(repo_id=repo, repo_type=repo_type, revision=revision, local_files_only=True,
                          allow_patterns=["*.json"])
        return None
    except Exception:  # noqa: BLE001  (not cached: ask the hub, if we may)
        pass
    if _offline(online):
        return (f"{key}: the hub {kind} {repo!r} is not in the hub cache ({os.environ.get('HF_HUB_CACHE') or 'default'}) "
                f"and the hub is not asked (offline); fill the cache on a machine with network: {fill}")
    try:
        HfApi().repo_info(repo, repo_type=repo_type, revision=revision, timeout=HUB_TIMEOUT_S)
        return None
    except hub_errors.GatedRepoError:
        return (f"{key}: the hub {kind} {repo!r} is gated: accept its licence on its hub page and export HF_TOKEN "
                "with access to it")
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as e:
        return f"{key}: the hub has no {kind} {repo!r}" + (f" at revision {revision!r}" if revision else "") + \
            f" ({type(e).__name__}), or it is private (export HF_TOKEN)"
    except Exception as e:  # noqa: BLE001  (network errors of every kind)
        return f"{key}: the hub {kind} {repo!r} is not reachable ({type(e).__name__}: {str(e)[:200]}); {fill}"


def model_problems(key: str, source: str, *, online: bool) -> list[str]:
    kind, name, extra = parse_source(source)
    if kind == "hf":
        problem = hub_problem(key, name, repo_type="model", revision=extra, online=online)
        return [problem] if problem else []
    if kind == "pypi":
        try:
            find_packaged_gguf(name, extra)
        except (FileNotFoundError, ModuleNotFoundError) as e:
            return [f"{key}: {e}"]
        return []
    if not (Path(name).expanduser() / "config.json").is_file():
        return [f"{key}: {source!r} is not a model directory (no config.json)"]
    return []


def data_problems(key: str, data: dict, *, online: bool) -> list[str]:
    out = []
    if data.get("humaneval_decontamination") == "required":  # the authors' run_rpo.py filter (rpo.decontamination)
        problem = hub_problem(f"{key}.humaneval_decontamination 'required'", HUMANEVAL_SOURCE[len("hf:"):],
                              repo_type="dataset", revision=None, online=online)
        out += [problem] if problem else []
    return out + _source_problems(key, data, online=online)


def _source_problems(key: str, data: dict, *, online: bool) -> list[str]:
    source = data["source"]
    if source.startswith("hf:"):
        repo, _, revision = source[len("hf:"):].partition("@")
        problem = hub_problem(f"{key}.source", repo, repo_type="dataset", revision=revision or None, online=online)
        return [problem] if problem else []
    if source == "file":
        return [f"{key}.splits.{split}: no file {path!r}" for split, path in data["splits"].items()
                if not Path(path).is_file()]
    return []


# ---------------------------------------------------------------------------------------------------
# Benchmark data and harness tasks
# ---------------------------------------------------------------------------------------------------

def benchmark_data_problems(config: dict, rules: set[str] | None, *, online: bool) -> list[str]:
    """Each enabled benchmark's data (eval/<name>/checks.py: data_problems)."""
    enabled = [b for b in registry.BENCHMARKS if config["benchmarks"][b.name]["enabled"]]
    if not enabled:
        return []
    hub_offline = _offline(online)
    return [p for b in enabled for p in b.checks().data_problems(
        config["benchmarks"][b.name], functools.partial(_needs, rules), online=online, hub_offline=hub_offline)]


def lm_eval_problems(config: dict, rules: set[str] | None, *, online: bool) -> list[str]:
    lm = config["lm_eval"]
    if not lm["enabled"] or not _needs(rules, "run_lm_eval", "check_lm_eval_datasets"):
        return []
    hub_tasks = [(i, t["name"]) for i, t in enumerate(lm["tasks"]) if t["name"] not in harness.LOCAL_TASKS]
    if not hub_tasks:
        return []
    try:
        datasets = harness.task_datasets([name for _, name in hub_tasks])
    except harness.TaskDataError as e:
        return [f"lm_eval.tasks: {e}"]
    out = []
    for i, name in hub_tasks:
        for repo in datasets[name]:
            if harness.dataset_cached(repo):
                continue
            problem = hub_problem(f"lm_eval.tasks[{i}] ({name})", repo, repo_type="dataset", revision=None,
                                  online=online)
            if problem:
                out.append(problem)
    return out


def gpu_limit(workflow) -> int | None:
    """The run's `gpu` resource limit (`--resources gpu=N`, a profile's `resources`), None without one."""
    r = workflow.global_resources.get("gpu")
    value = getattr(r, "value", r)
    return None if value is None else int(value)


def gpu_problems(config: dict, gpu_limit: int | None) -> list[str]:
    """A stage whose job launches more GPUs than the run may use (`--resources gpu=N`, profiles/gpu: 1)
    would be scheduled as if it used fewer (Snakemake scales a request down to the limit), beside other
    GPU jobs on the same GPUs."""
    if gpu_limit is None:
        return []
    return [f"resources.{stage}.gpus: its jobs launch {r['gpus']} GPUs, but this run may use gpu={gpu_limit} "
            f"(the profile's resources); run with --resources gpu={r['gpus']} (or more) on a machine that has them"
            for stage, r in config["resources"].items() if r.get("gpus", 0) > gpu_limit]


def backend_problems(config: dict, rules: set[str] | None = None) -> list[str]:
    generates = rules is None or any(r.startswith("generate_") or r == "run_lm_eval" for r in rules)
    if generates and config["generation"]["backend"] == "vllm" and importlib.util.find_spec("vllm") is None:
        return ["generation.backend: vllm needs the vllm package (pip install -e '.[vllm]' on the CUDA machines), "
                "or set generation.backend: hf"]
    return []


# ---------------------------------------------------------------------------------------------------
# All of it
# ---------------------------------------------------------------------------------------------------

def dry_run_requested(workflow, argv: list[str]) -> bool:
    """Whether the command the user typed is a dry run (`-n`, `-np`, `--dry-run`, `--dryrun`): Snakemake
    knows it only after parsing, and only the user's own process (not a job re-parsing) should warn."""
    from snakemake_interface_executor_plugins.settings import ExecMode
    if workflow.exec_mode != ExecMode.DEFAULT:
        return False
    return any(a in ("--dry-run", "--dryrun") or (a.startswith("-") and not a.startswith("--") and a[1:].isalpha()
                                                  and "n" in a[1:]) for a in argv)


def check(config: dict, *, rules: Iterable[str] | None = None, online: bool = False, dryrun: bool = False,
          gpu_limit: int | None = None) -> list[str]:
    """Every problem found for the jobs of `rules` (None: everything the config enables); raises
    PreflightError listing them unless `dryrun` (then they are printed as warnings). `online`: the judge
    endpoints and the hub may be asked (a real run); otherwise only what is on this machine is checked.
    `gpu_limit`: the run's `gpu` resource limit (None: none)."""
    start = time.monotonic()
    _probe.cache_clear()
    rules = None if rules is None else set(rules)
    problems = settings_problems(config, rules)
    problems += [p for key, judge in used_judges(config, rules) for p in judge_problems(key, judge, online=online)]
    if _needs(rules, "materialise_base"):
        problems += model_problems("base_model.source", config["base_model"]["source"], online=online)
    if _needs(rules, "make_data"):
        problems += data_problems("data", config["data"], online=online)
    if _needs(rules, "materialise_fusion_source"):  # a fused model's part given as a model source
        problems += [p for key, source in configured_sources(config) for p in model_problems(key, source, online=online)]
    if rules is not None and "study_data" in rules:
        problems += data_problems("overoptimization.data", deep_merge(config["data"], config["overoptimization"]["data"]),
                                  online=online)
    problems += benchmark_data_problems(config, rules, online=online)
    problems += lm_eval_problems(config, rules, online=online)
    problems += backend_problems(config, rules) + gpu_problems(config, gpu_limit)
    took = time.monotonic() - start
    if problems and not dryrun:
        raise PreflightError(f"this run cannot finish ({len(problems)} problem(s) found in {took:.1f} s before "
                             "any job); fix them first:\n  - " + "\n  - ".join(problems))
    for p in problems:
        print(f"rpo preflight (dry run, not fatal): {p}", file=sys.stderr)
    print(f"rpo preflight: {f'{len(problems)} problem(s)' if problems else 'nothing missing'} in {took:.1f} s "
          f"({'dry run, offline' if dryrun else ('online' if online else 'offline')})", file=sys.stderr)
    return problems
