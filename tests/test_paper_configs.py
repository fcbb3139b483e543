"""The paper-scale configs resolve their whole DAG here (dry runs on this CPU machine): the jobs, the GPUs
each asks for, the SLURM partitions, the launcher and the gradient accumulation that keeps the global batch
at 128. Nothing is downloaded or trained: the hub is offline (HF_HUB_OFFLINE=1) and the one hub file a paper
config's start-up needs (alpaca_eval's df_gamed.csv for the LC win rate) is in a hub cache the test writes.

Run:  pytest -q tests/test_paper_configs.py        (about a minute)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.workflow import REPO, args_of, dry_run, jobs

pytestmark = pytest.mark.workflow  # every test here starts Snakemake


@pytest.mark.parametrize("series,accum_file", [("beta", "paper-beta.yaml"), ("gemma", "paper-gemma.yaml")])
def test_paper_config_on_slurm_resolves_the_whole_dag(tmp_path, series, accum_file):
    out = dry_run(tmp_path, f"config/{accum_file}", "profiles/slurm")
    js = jobs(out)
    by_rule = {}
    for j in js:
        by_rule.setdefault(j["rule"], []).append(j)
    # no SFT stage: the hub SFT model is the reference; 2 methods; 3 models x 3 benchmarks; 3 pairs
    assert "train_sft" not in by_rule
    assert {r: len(v) for r, v in by_rule.items()} == {
        "materialise_base": 1, "make_data": 1, "reference_logps": 1, "train_preference": 2,
        "generate_table1": 3, "judge_table1": 3, "make_table1": 1, "resolved_config": 1,
        **{f"{s}_{b}": 3 for s in ("generate", "judge", "score") for b in ("mtbench", "alpacaeval", "arenahard")},
        "check_lm_eval_datasets": 1, "run_lm_eval": 3, "score_lm_eval": 3}
    for j in by_rule["train_preference"]:
        r = j["resources"]
        assert r["gpu"] == "8" and r["slurm_partition"] == "gpuq" and r["slurm_account"] == "acct42"
        cfg = args_of(j)["cfg"]
        # 128 = micro-batch 2 x 8 GPUs x 8 accumulation steps
        assert (cfg["global_batch_size"], cfg["micro_batch_size"], cfg["world_size"],
                cfg["gradient_accumulation_steps"]) == (128, 2, 8, 8)
        assert cfg["finetuning"] == "full" and cfg["precision"] == "bfloat16" and cfg["learning_rate"] == 5e-7
        # FSDP2 full sharding by the trainer itself (rpo.distributed); accelerate only starts the 8 ranks
        assert cfg["sharding"] == "full" and cfg["gradient_checkpointing"] is True and "threads" not in cfg
        assert j["shell"].startswith("accelerate launch --multi_gpu --num_processes 8 --num_machines 1")
    methods = {args_of(j)["method"]["name"]: args_of(j)["method"] for j in by_rule["train_preference"]}
    beta = {"beta": 0.01, "gemma": 0.05}[series]
    assert methods["dpo"] == {"name": "dpo", "loss": "dpo", "beta": beta, "reference": "ref"}
    assert methods["rpo"] == {"name": "rpo", "loss": "rpo", "beta": beta, "eta": 0.005, "reference": "ref"}
    for rule in ("reference_logps", "generate_table1", "generate_mtbench", "run_lm_eval"):
        assert all(j["resources"]["gpu"] == "1" and j["resources"]["slurm_partition"] == "gpuq"
                   for j in by_rule[rule])
    # placement follows the resources (no list of rule names): make_data asks for no GPU, so CPU nodes
    for rule in ("make_data", "judge_table1", "score_mtbench", "make_table1"):  # CPU-only rules on CPU nodes
        assert all("gpu" not in j["resources"] and j["resources"]["slurm_partition"] == "cpuq"
                   for j in by_rule[rule])
    # Table 1 as the authors ran it (issue 10 §1): the first 200 test prompts, greedy, 1024 new tokens; and as
    # their gen_eval*.py (issue 23): vLLM in bf16 from a string prompt (BOS), vLLM's text as it comes, each series'
    # question (beta: the dataset's prompt string; gemma: the first message) and stop ids
    gen = args_of(by_rule["generate_table1"][0])
    assert (gen["protocol"], gen["n_prompts"], gen["temperature"], gen["max_new_tokens"]) == ("paper", 200, 0.0, 1024)
    question, stops = {"beta": ("dataset_prompt", []), "gemma": ("first_message", [3, 107])}[series]
    assert (gen["add_special_tokens"], gen["answer_text"], gen["dtype"], gen["prompt"], gen["stop_token_ids"]) == (
        True, "raw", "bfloat16", question, stops)
    # every answer through vLLM
    gens = [args_of(j) for r in by_rule if r.startswith("generate_") for j in by_rule[r]]
    assert len(gens) == 4 * 3 and all(a["backend"] == "vllm" and a["vllm_dtype"] == "bfloat16" for a in gens)
    assert {(args_of(j)["protocol"], args_of(j)["prompt"]) for j in by_rule["judge_table1"]} == {("paper", question)}
    # AlpacaEval as the authors' models_configs: sampled at 0.7 / 1.0, 2048 tokens, their prompt.txt, bf16
    alpaca = args_of(by_rule["generate_alpacaeval"][0])
    template = {"beta": "<|system|>\n</s>\n<|user|>\n{instruction}</s>\n<|assistant|>\n",
                "gemma": "<bos> <|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"}[series]
    assert (alpaca["temperature"], alpaca["top_p"], alpaca["max_new_tokens"], alpaca["dtype"], alpaca["prompt_template"],
            alpaca["add_special_tokens"], alpaca["stop_token_ids"]) == (0.7, 1.0, 2048, "bfloat16", template, True, stops)
    # MT-Bench as the authors' FastChat: the conversation template its adapters pick by name, float16
    mt = args_of(by_rule["generate_mtbench"][0])
    assert (mt["fastchat_template"], mt["dtype"]) == ({"beta": "zephyr", "gemma": "h4_gemma_zephyr"}[series], "float16")
    # the training text of the authors' handbook + TRL, for the reference pass and both trainings; HumanEval
    # decontamination of the data, required
    assert all(args_of(j)["chat_format"] == "authors" for r in ("reference_logps", "train_preference")
               for j in by_rule[r])
    data = args_of(by_rule["make_data"][0])
    assert data["humaneval_decontamination"] == "required" and "chat_format" not in data["data_cfg"]
    assert data.get("require_dataset_prompt", False) is (series == "beta")  # checked at the data stage
    # the harness on every model: the model cards' tasks and few-shot counts, their datasets checked first
    harness = {j["wildcards"]: args_of(j) for j in by_rule["run_lm_eval"]}
    assert sorted(harness) == ["model=dpo", "model=ref", "model=rpo"]
    assert {t["name"]: t["num_fewshot"] for t in harness["model=ref"]["tasks"]} == {
        "ifeval": 0, "gsm8k": 5, "arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "winogrande": 5, "mmlu": 5}
    assert harness["model=dpo"]["policy_dir"] == "results/train/dpo/model" and harness["model=ref"]["limit"] is None
    assert args_of(by_rule["check_lm_eval_datasets"][0])["tasks"] == harness["model=ref"]["tasks"]
    assert [f"results/scores/lm_eval/{m}.json" for m in ("ref", "dpo", "rpo")] == [
        p for p in args_of(by_rule["make_table1"][0])["scores"] if "lm_eval" in p]
    # the paper's numbers beside ours
    assert "results/paper_comparison.csv" in by_rule["make_table1"][0]["output"]
    assert args_of(by_rule["make_table1"][0])["paper_series"] == series
    judge = args_of(by_rule["judge_table1"][0])["judge"]
    assert judge["model"] == "gpt-4" and judge["api_key_env"] == "OPENAI_API_KEY"  # gpt_eval.py's model
    assert "sk-" not in out  # only the variable's name travels


@pytest.mark.slow  # several dry runs of the paper configs (default run: < 10 min)
def test_two_nodes_keep_the_global_batch(tmp_path):
    cfg = yaml.safe_load((REPO / "config/paper-beta.yaml").read_text())
    cfg["resources"]["training"]["nodes"] = 2  # 16 ranks: 128 = 2 x 16 x 4
    path = tmp_path / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = dry_run(tmp_path, path, "profiles/slurm")
    train = [j for j in jobs(out) if j["rule"] == "train_preference"]
    assert len(train) == 2
    for j in train:
        # SLURM's --gpus is the job's total: 8 GPUs on each of 2 nodes are booked per node, --gres=gpu:8
        assert j["resources"]["nodes"] == "2" and j["resources"]["gres"] == "gpu:8" and "gpu" not in j["resources"]
        assert args_of(j)["cfg"]["world_size"] == 16 and args_of(j)["cfg"]["gradient_accumulation_steps"] == 4
        assert j["shell"].startswith("srun --nodes 2 --ntasks-per-node 1 bash -c ")


def test_single_gpu_config_with_the_local_gpu_profile(tmp_path):
    out = dry_run(tmp_path, "config/single-gpu.yaml", "profiles/gpu")
    js = jobs(out)
    rules = [j["rule"] for j in js]
    assert rules.count("train_sft") == 1 and rules.count("train_preference") == 2
    for j in js:
        if j["rule"] in ("train_sft", "train_preference"):
            assert j["resources"]["gpu"] == "1"
            cfg = args_of(j)["cfg"]
            assert cfg["finetuning"] == "lora" and cfg["world_size"] == 1
            assert cfg["gradient_accumulation_steps"] == 16  # 128 = 8 x 1 x 16
            assert j["shell"].startswith("python -m rpo ")
    # every answer through vLLM (generation.backend), lm-eval too
    for rule in ("generate_table1", "generate_mtbench", "generate_alpacaeval", "generate_arenahard"):
        assert {(args_of(j)["backend"], args_of(j)["vllm_dtype"]) for j in js if j["rule"] == rule} == \
            {("vllm", "bfloat16")}, rule
    # not the paper: the model's own template and decoding defaults (greedy benchmarks, the whole history); the
    # default's data and training jobs get no new parameter (so a finished run re-runs none of them)
    assert all("chat_format" not in args_of(j) for j in js if j["rule"] in ("train_sft", "train_preference",
                                                                             "reference_logps"))
    data = next(args_of(j) for j in js if j["rule"] == "make_data")
    assert not {"chat_format", "humaneval_decontamination", "require_dataset_prompt"} & (set(data["data_cfg"]) | set(data))
    assert {args_of(j)["prompt"] for j in js if j["rule"] == "generate_table1"} == {"history"}
    assert {args_of(j)["backend"] for j in js if j["rule"] == "run_lm_eval"} == {"vllm"}


@pytest.mark.slow  # several dry runs of the paper configs (default run: < 10 min)
def test_the_local_gpu_profile_books_the_gpus_a_training_launches(tmp_path):
    cfg = yaml.safe_load((REPO / "config/single-gpu.yaml").read_text())
    cfg["resources"]["training"]["gpus"] = 2  # 128 = 8 x 2 x 8
    path = tmp_path / "two-gpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the profile's one GPU: Snakemake would run the 2-GPU training as gpu=1 beside other GPU jobs; refused
    out = dry_run(tmp_path, path, "profiles/gpu")
    assert ("rpo preflight (dry run, not fatal): resources.training.gpus: its jobs launch 2 GPUs, but this run may "
            "use gpu=1") in out
    js = jobs(dry_run(tmp_path, path, "profiles/gpu", "--resources=gpu=2"))
    train = [j for j in js if j["rule"] == "train_preference"]
    assert len(train) == 2 and {j["resources"]["gpu"] for j in train} == {"2"}
    assert {j["resources"]["gpu"] for j in js if j["rule"] == "generate_table1"} == {"1"}
    assert all(j["shell"].startswith("accelerate launch --multi_gpu --num_processes 2 --num_machines 1") and
               "--main_process_port $(python -m rpo.launch free-port)" in j["shell"] for j in train)


def test_quickstart_with_the_method_zoo_switched_on(tmp_path):
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["method_zoo"]["enabled"] = True
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    js = jobs(dry_run(tmp_path, path, "profiles/default"))
    count = {}
    for j in js:
        count[j["rule"]] = count.get(j["rule"], 0) + 1
    # dpo, rpo + 8 zoo methods; one more SFT model (seed 43) and its soup; reference log-probs of Ref and soup
    assert (count["train_preference"], count["train_sft"], count["train_sft_seed"], count["make_soup"],
            count["reference_logps"]) == (10, 1, 1, 1, 2)
    assert count["judge_table1"] == 3 + 8  # the paper's three pairs + each zoo method vs Ref
    rso = next(j for j in js if j["rule"] == "train_preference" and j["wildcards"] == "method=rso")
    assert "/rso/" in args_of(rso)["pairs_path"]  # RSO trains on its own rejection-sampled pairs
    soup = next(j for j in js if j["rule"] == "train_preference" and "rpo_soup" in j["wildcards"])
    assert args_of(soup)["ref_dir"] == "results/models/soup/model"


def test_paper_config_without_the_lc_file_plans_offline_and_stops_at_start_up(tmp_path):
    # lc_win_rate: required, the hub offline and an empty cache. Parsing touches no network: the dry run plans
    # the whole DAG and warns (before, it failed while parsing, fetching df_gamed.csv); a real run stops in its
    # preflight, before any job, naming the file and the fix
    (tmp_path / "empty").mkdir()
    out = dry_run(tmp_path, "config/paper-beta.yaml", "profiles/slurm", hub_cache=tmp_path / "empty")
    assert "rpo preflight (dry run, not fatal): benchmarks.alpacaeval.lc_win_rate is 'required'" in out
    assert "df_gamed.csv" in out and "rule materialise_base" in out
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "OPENAI_API_KEY": "sk-unused"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(REPO / "config/paper-beta.yaml"), "--cores", "1", "results/table1.csv"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "this run cannot finish" in run.stderr
    assert "benchmarks.alpacaeval.lc_win_rate is 'required'" in run.stderr
    assert not (tmp_path / "results" / "models").exists()  # no job ran
