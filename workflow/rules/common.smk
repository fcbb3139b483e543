import json
import re
from pathlib import Path

import yaml as _yaml
from snakemake.utils import validate

from eval.fusion_config import fold_fusion_methods, resolve_fusion  # noqa: E402
from rpo import launch  # noqa: E402
from rpo import plan as _plan  # noqa: E402
from rpo.config import check_config, resolve_extends, resolve_methods  # noqa: E402

# `extends: <file>` (the paper configs share config/paper-common.yaml): that file's keys under this one's
_resolved = resolve_extends(dict(config), workflow.basedir)
config.clear()
config.update(_resolved)
validate(config, "../schemas/config.schema.yaml", set_default=True)

fold_fusion_methods(config)  # fusion.methods (experts of the fused models) train as methods, when fusion.enabled
resolve_methods(config)
check_config(config)
# Fused models (eval/fusion.py, workflow/rules/fusion.smk): decoded by the `fusion` backend, then models of Table 1
# and the benchmarks like the trained ones; {} unless fusion.enabled (their Table 1 pairs are added to table1.pairs)
FUSED = resolve_fusion(config)

# What will run and with which settings (rpo/plan.py, tested by tests/test_plan.py): the runs and their seeds,
# each method's reference, Table 1's pairs, the study's runs, each training stage's config. This file keeps the
# paths and input functions.
SCHEMA = _yaml.safe_load(Path(workflow.basedir, "workflow/schemas/config.schema.yaml").read_text())
PLAN = _plan.make_plan(config, SCHEMA)

RESULTS = "results"
METHODS = PLAN.methods
MODELS = ["ref"] + METHODS + sorted(FUSED)

# Seed replicates (`seeds`, rpo.plan.Plan): every method is trained once per seed; <method>-seed<s> for the
# seeds after the first
SEEDS = PLAN.seeds
RUNS = PLAN.runs  # every trained policy
run_method = PLAN.run_method
run_seed = PLAN.run_seed
replica = PLAN.replica


def as_json(obj):
    """Rule parameters as one JSON string: deterministic, so a changed value re-runs only its rule."""
    return json.dumps(obj, sort_keys=True)


def train_cfg(stage):
    """A training stage's config ("sft" or "training") as its job gets it (rpo.plan.Plan.train_cfg)."""
    return PLAN.train_cfg(stage)


def launcher(stage):
    """`python -m rpo`, or `accelerate launch ... -m rpo` when the stage has several GPUs or nodes."""
    r = config["resources"][stage]
    return launch.launch_prefix(gpus=r["gpus"], nodes=r["nodes"])


def res(stage):
    """Snakemake resources of a stage: the GPUs its job launches (one node: `gpu`, the SLURM plugin's
    --gpus and what the local GPU profile counts; several nodes: `gres` gpu:<per node>, since --gpus would
    be the job's total), nodes, memory and runtime in minutes. Placement follows from them: a stage that asks
    for GPUs goes to $RPO_GPU_PARTITION when that is set (profiles/slurm); every other job to the profile's
    default partition. CPUs per task are the rule's threads."""
    r = config["resources"][stage]
    out = {"mem_mb": r["mem_mb"], "runtime": r["runtime"]}
    if r["gpus"]:
        if r["nodes"] > 1:
            out["gres"] = f"gpu:{r['gpus']}"
        else:
            out["gpu"] = r["gpus"]
        partition = launch.gpu_partition()
        if partition:
            out["slurm_partition"] = partition
    if r["nodes"] > 1:
        out["nodes"] = r["nodes"]
    return out


# What each judging job asked of its judge (eval.judging.judges.write_calls): items, requests, reuse, empty answers
JUDGE_CALLS = f"{RESULTS}/judge_calls"

# A training run's per-step metrics: the train_preference rule's output, the figures' input
TRAIN_METRICS = f"{RESULTS}/train/{{method}}/metrics.jsonl"


def get_ref_dir():
    return f"{RESULTS}/models/sft/model" if config["sft"]["enabled"] else f"{RESULTS}/models/base"


SOUP_DIR = f"{RESULTS}/models/soup/model"


def sft_dir(seed):
    """An SFT model trained with `seed`: the main one when the seed is sft.train.seed."""
    main = config["sft"]["train"]["seed"]
    return f"{RESULTS}/models/sft/model" if int(seed) == main else f"{RESULTS}/models/sft_seed{seed}/model"


reference_name = PLAN.reference  # a run's reference: "ref" (Table 1's Ref model), "soup" (SALSA) or "base"


def reference_dir(name):
    return {"soup": SOUP_DIR, "base": f"{RESULTS}/models/base"}.get(name) or get_ref_dir()


def reference_cache(name):
    return f"{RESULTS}/reference/{name}/train_logps.pt"


# The frozen trunk (rpo.trunk): with LoRA on the top layers only, the reference pass also writes the input of
# the first LoRA layer, and training starts there. TRUNK_TOP: those top layers, 0 when there is no trunk.
TRUNK_TOP = PLAN.trunk_top


def reference_trunk(name):
    return f"{RESULTS}/reference/{name}/train_trunk.f32"


def get_base_dir(model):
    """The model a policy's LoRA adapter sits on: its reference (Ref for the "ref" model itself); a fused model's
    directory (its fusion.json)."""
    if model in FUSED:
        return fused_dir(model)
    return get_ref_dir() if model == "ref" else reference_dir(reference_name(model))


def get_policy_dir(model):
    return None if model == "ref" or model in FUSED else f"{RESULTS}/train/{model}/model"


def fused_dir(model):
    return f"{RESULTS}/models/fused/{model}"


def get_table1_pairs():
    """Table 1's pairs, each also for every further seed's runs (rpo.plan.Plan.table1_pairs)."""
    return PLAN.table1_pairs


def seed_pairs():
    """Each configured pair's runs per seed, pooled by make_table1 (empty with one seed)."""
    return PLAN.seed_pairs


RUN_NAMES = "|".join(re.escape(r) for r in RUNS)
MODEL_NAMES = "|".join(["ref", RUN_NAMES, *(re.escape(m) for m in sorted(FUSED))])

wildcard_constraints:
    method=RUN_NAMES,
    model=MODEL_NAMES,


# ---------------------------------------------------------------------------------------------------
# Benchmarks (eval/registry.py: one package, one rule file workflow/rules/<name>.smk, one entry each) and judges
# ---------------------------------------------------------------------------------------------------
from eval import registry  # noqa: E402  (imports no benchmark, and no torch)
from eval.judging import config as judge_config  # noqa: E402
from eval.mtbench import fastchat  # noqa: E402

# the benchmarks the config runs, in the registry's order
BENCHMARKS = registry.enabled(config)


def get_judge_label(judge):
    """How the table names a judge: eval.judging.config.judge_label, the one label function."""
    return judge_config.judge_label(judge)


def judge_threads(judge):
    """CPU threads of a judging job (a llama.cpp server's; 1 for a remote endpoint)."""
    return judge_config.judge_threads(judge)


def bench_judge(benchmark):
    """The judge of one benchmark: its own `judge`, or benchmarks.judge."""
    return config["benchmarks"][benchmark]["judge"] or config["benchmarks"]["judge"]


def validity_judge():
    """The judge whose verdicts judge_validity checks: its own, or benchmarks.judge."""
    return config["judge_validity"]["judge"] or config["benchmarks"]["judge"]


# judge_validity's model pairs and the models whose Table 1 answers it reads; rule all's extra target
VALIDITY_PAIRS = PLAN.validity_pairs
VALIDITY_MODELS = PLAN.validity_models
VALIDITY = [f"{RESULTS}/judge_validity.csv"] if config["judge_validity"]["enabled"] else []


def policy_of(input):
    """The policy (adapter or model) directory among a generation rule's inputs; None for Ref itself."""
    return input.policy[0] if input.policy else None


def job_params(settings, paths):
    """A rule's two `params`: `settings`, the keyword arguments that are not paths, from the wildcards
    alone (so Snakemake sees when one changes and re-runs the job: it does not track params computed
    from input or output), and `paths`, the path arguments taken from the rule's own input and output.
    The shell passes them as `--args {params.settings:q} --paths {params.paths:q}`."""
    return {"settings": lambda w: as_json(settings(w)),
            "paths": lambda w, input, output: as_json(paths(w, input, output))}


def generation_backend(model=None):
    """The answer backend of every generation job (config `generation`, eval/generation.py): vllm_dtype only
    with vllm, so that changing it re-runs no hf job (llamacpp's GGUFs are inputs: workflow/rules/gguf.smk); a
    fused model's is `fusion` (its parts are decoded in process, whatever generation.backend says)."""
    if model in FUSED:
        return {"backend": "fusion"}
    g = config["generation"]
    return {"backend": "vllm", "vllm_dtype": g["vllm_dtype"]} if g["backend"] == "vllm" else {"backend": g["backend"]}


def bench_gen_params(benchmark, **extra):
    """job_params of a benchmark's generation rule; its `dtype` only when set (eval/generation.py)."""

    def settings(w):
        b = config["benchmarks"][benchmark]
        return {"model_name": w.model, "n_questions": b["n_questions"], "max_new_tokens": b["max_new_tokens"],
                "batch_size": b["batch_size"], "seed": config["seed"], **generation_backend(w.model),
                **({"dtype": b["dtype"]} if b["dtype"] else {}), **extra}

    return job_params(settings, lambda w, input, output: {"ref_dir": input.ref, "policy_dir": policy_of(input),
                                                         "out": output[0], **gguf_paths(input)})


def bench_subset(benchmark):
    return {"subset": config["benchmarks"][benchmark]["subset"]}


def _policy_input(wildcards):
    d = get_policy_dir(wildcards.model)
    return [d] if d else []


def train_params(stage_cfg, ckpt_dir, extra=None, **inputs):
    """job_params of a training rule: `inputs` (argument name -> input name) and the model / metrics /
    summary outputs as paths; the checkpoint directory, the stage config and `extra(wildcards)`'s keys
    as settings. `stage_cfg` and `ckpt_dir` may be functions of the wildcards."""

    def value(x, wildcards):
        return x(wildcards) if callable(x) else x

    def settings(w):
        return {"ckpt_dir": value(ckpt_dir, w), "cfg": value(stage_cfg, w), **(extra(w) if extra else {})}

    def paths(w, input, output):
        snapshots = dict(output.items()).get("snapshots")  # the study's runs keep snapshots
        return {**{k: input[v] for k, v in inputs.items()}, "out_dir": output.model,
                **({"snapshots_path": snapshots} if snapshots else {}),
                "metrics_path": output.metrics, "summary_path": output.summary}

    return job_params(settings, paths)


# ---------------------------------------------------------------------------------------------------
# One set of rules for the main pipeline and the overoptimization study: make_data, reference_logps and
# train_preference (data.smk, train.smk) serve the study too (overopt.smk reuses each with the study's paths), each
# given its data and training configs through these functions, so a change to either is made once.
# ---------------------------------------------------------------------------------------------------

def synthetic(data):
    return data["source"] == "synthetic:verifiable"


def data_inputs(data):
    """make_data's inputs for the data config `data`: the base model (and, with the llamacpp backend, its GGUF:
    the synthetic source samples its responses from it); a file source's train/test files, so that editing one in
    place re-runs the rule."""
    return {**(gguf_base_input(f"{RESULTS}/models/base") if synthetic(data) else {}), "base": f"{RESULTS}/models/base",
            **(data["splits"] if data["source"] == "file" else {})}


def data_outputs(directory, data):
    """make_data's outputs in `directory`; the synthetic source also keeps every sampled response (resumable while
    it is samples.jsonl.partial)."""
    return {"train": f"{directory}/train.jsonl", "test": f"{directory}/test.jsonl",
            "prompts": f"{directory}/prompts_test.jsonl", "summary": f"{directory}/summary.json",
            **({"samples": f"{directory}/samples.jsonl"} if synthetic(data) else {})}


def data_params(data, *, gold_judge, dataset_prompt):
    """make_data's job_params. check_gold_meta: a gold judge (`gold_judge`) needs every test prompt's verifiable
    instructions; only a hub/file source can lack them, and only there is it a parameter, so switching the judge of
    the synthetic data re-runs nothing. require_dataset_prompt (`dataset_prompt`: Table 1 asks the dataset's prompt
    string, which every held-out row must then carry) only when asked, so the default's make_data keeps its
    parameters."""
    return job_params(
        lambda w: {**data_settings(data), "seed": config["seed"],
                   **({"require_dataset_prompt": True} if dataset_prompt else {}),
                   "check_gold_meta": gold_judge and not synthetic(data),
                   **(sampler_backend() if synthetic(data) else {})},
        lambda w, input, output: {"base_dir": input.base, **dict(output.items()), **gguf_arg(input)})


def reference_params(training, data, top):
    """reference_logps' job_params: the tokenisation and precision of the training config `training`, the chat
    format of the data config `data`, and the trunk's `top` layers (0: no trunk)."""
    return job_params(
        lambda w: {"max_length": training["max_length"], "max_prompt_length": training["max_prompt_length"],
                   "batch_size": config["reference"]["batch_size"], "dtype": training["precision"],
                   "attention": training["attention"], "top_layers": top, **chat_format_param(w, data)},
        lambda w, input, output: {"model_dir": input.ref, "pairs_path": input.train, "out_path": output.logps,
                                  **({"trunk_path": output.trunk} if top else {})})


def preference_params(cfg, ckpt_dir, method, data, top):
    """train_preference's job_params: the run's training config `cfg(w)`, checkpoint directory `ckpt_dir(w)` and
    method `method(w)` (its name, loss and hyperparameters), the chat format of the data config `data`, the trunk
    input when `top`."""
    return train_params(cfg, ckpt_dir, extra=lambda w: {"method": method(w), **chat_format_param(w, data)},
                        ref_dir="ref", pairs_path="train", reference_cache="cache",
                        **({"trunk_path": "trunk"} if top else {}))


# the harness's task files, inputs of run_lm_eval (the LM_EVAL_* names are lm_eval.smk's)
def local_task_files(task):
    """The files rule make_lm_eval_ifeval writes for one offline IFEval task."""
    return {"yaml": f"{LM_EVAL_TASK_DIR}/{task}.yaml", "data": f"{LM_EVAL_TASK_DIR}/{task}.jsonl",
            "summary": f"{LM_EVAL_TASK_DIR}/{task}_summary.json"}


def lm_eval_task_inputs(wildcards):
    out = []
    for task in LM_EVAL_LOCAL:
        files = local_task_files(task)
        out += [files["yaml"], files["data"]]
    if LM_EVAL_HUB:
        out.append(LM_EVAL_DATASETS)
    return out


# ---------------------------------------------------------------------------------------------------
# The overoptimization study (workflow/rules/overopt.smk): runs of overoptimization.grid x seeds, from the
# base model on the study's own data (rpo.plan.Study: data and training with its keys on top)
# ---------------------------------------------------------------------------------------------------
STUDY = PLAN.study
STUDY_DIR = f"{RESULTS}/overopt"
STUDY_RUNS = STUDY.run_names
STUDY_RUN_NAMES = "|".join(re.escape(r) for r in STUDY_RUNS) or "^$"  # names hold "." and "-"

# one run of the study with one seed: its model, snapshots, metrics and measurements
STUDY_RUN = f"{STUDY_DIR}/runs/{{run}}/seed{{seed}}"
STUDY_EVAL = f"{STUDY_RUN}/snapshot_eval.jsonl"  # its measurements, the input of results/overoptimization.csv


# RSO in the study (workflow/rules/overopt_rso.smk): a grid family with `sampling` trains on pairs rejection-sampled
# from the base model's candidates for the study's training prompts, with the base model's log-probs of them
STUDY_RSO_DIR = f"{STUDY_DIR}/rso"
STUDY_RSO_NAMES = "|".join(re.escape(f) for f in STUDY.rso) or "^$"
STUDY_RM_DIR = f"{STUDY_DIR}/reward_models"  # the study's reward models (an RSO family's ensemble reward)


def study_run_input(rso_file, study_file):
    """An input function of a study run: `rso_file` of its RSO family's directory, or the study's own `study_file`."""
    def path(w):
        family = STUDY.rso_family(w.run)
        return f"{STUDY_RSO_DIR}/{family}/{rso_file}" if family else study_file
    return path


def study_records(w):
    """Every run's and seed's measurements (the input of rule overoptimization)."""
    if not STUDY_RUNS:
        raise ValueError("results/overoptimization.csv: overoptimization.grid is empty; give the study its runs "
                         "(config/config.yaml has the quickstart's grid)")
    return [STUDY_EVAL.format(run=run, seed=seed) for run in STUDY_RUNS for seed in STUDY.seeds]


# ---------------------------------------------------------------------------------------------------
# The authors' text and decoding (issue 23): how the data, training and answer rules pass their settings
# ---------------------------------------------------------------------------------------------------

def data_settings(data):
    """make_data's data settings: data.chat_format is the training jobs' (rule train_*), not the data's, and
    data.humaneval_decontamination travels as its own argument, only when on; so the default's make_data keeps
    its parameters (and a run with them re-samples nothing)."""
    settings = {k: v for k, v in data.items() if k not in ("chat_format", "humaneval_decontamination")}
    mode = data["humaneval_decontamination"]
    return {"data_cfg": settings, **({} if mode == "disabled" else {"humaneval_decontamination": mode})}


def mtbench_template():
    """benchmarks.mtbench.template fastchat: the FastChat conversation template the answers are generated with,
    as named (fastchat_template) or as the authors' FastChat picks it by the base model's name
    (eval/mtbench/fastchat.py)."""
    b = config["benchmarks"]["mtbench"]
    if b["template"] != "fastchat":
        return {}
    name = b["fastchat_template"] or fastchat.template_for(config["base_model"]["source"])
    fastchat.get_template(name)  # a known template, or the error naming the key
    return {"fastchat_template": name}


def bench_decoding(benchmark):
    """The decoding settings of a sampled benchmark (AlpacaEval, Arena-Hard): rpo/sampling.py."""
    b = config["benchmarks"][benchmark]
    return {k: b[k] for k in ("temperature", "top_p", "add_special_tokens", "stop_token_ids")}


def chat_format_param(wildcards, data=None):
    # How every training-side job turns a pair into token ids (rpo/chat_format.py): SFT, reference, training.
    # Passed only when not the default, so that the default's jobs keep their parameters (and re-run nothing).
    fmt = (data or config["data"])["chat_format"]
    return {} if fmt == "model" else {"chat_format": fmt}


# The llamacpp generation backend's GGUF files (workflow/rules/gguf.smk; rpo/gguf.py): which a job needs as
# inputs, and the arguments that hand them to it. The other backends add no input and no parameter.
# ---------------------------------------------------------------------------------------------------
LLAMACPP = config["generation"]["backend"] == "llamacpp"
GGUF_DIR = f"{RESULTS}/gguf"
GGUF_SOURCES = {"base": f"{RESULTS}/models/base", "sft": f"{RESULTS}/models/sft/model", "soup": SOUP_DIR}


def gguf_of(model_dir):
    """The GGUF of a reference model directory (base, sft or soup)."""
    name = {d: n for n, d in GGUF_SOURCES.items()}[model_dir]
    return f"{GGUF_DIR}/{name}.gguf"


def gguf_inputs(wildcards):
    """A generation job's GGUF inputs (with unpack): its reference's, and the policy's unless it is Ref."""
    if not LLAMACPP or wildcards.model in FUSED:  # a fused model is decoded by the fusion backend
        return {}
    out = {"gguf_model": gguf_of(get_base_dir(wildcards.model))}
    if wildcards.model != "ref":
        out["gguf_policy"] = f"{GGUF_DIR}/policy/{wildcards.model}.gguf"
    return out


def gguf_base_input(model_dir):
    """The GGUF input (with unpack) of a job that samples from the reference model `model_dir` alone."""
    return {"gguf_model": gguf_of(model_dir)} if LLAMACPP else {}


def gguf_paths(input):
    """The `gguf` argument of a generation job (eval.generation.answer_prompts), from its GGUF inputs."""
    named = dict(input.items())
    if not LLAMACPP or "gguf_model" not in named:
        return {}
    return {"gguf": {"model": named["gguf_model"], "policy": named.get("gguf_policy")}}


def gguf_arg(input):
    """The `gguf` argument (the reference model's GGUF) of a job that samples from it alone: make_data, the
    study's reference answers and snapshot measurements."""
    named = dict(input.items())
    return {"gguf": named["gguf_model"]} if LLAMACPP and "gguf_model" in named else {}


def sampler_backend():
    """The settings key of make_data's and the study's sampling jobs: only with llamacpp, so that the other
    backends (whose sampling there is the hf sampler) re-run nothing."""
    return {"backend": "llamacpp"} if LLAMACPP else {}
