"""Training over several processes, proven on CPU with gloo: data parallel (DDP) and FSDP2 full sharding
through `accelerate launch` (the launcher the workflow uses), sharded checkpoints that survive kill -9,
and the launch arithmetic that keeps the global batch fixed.

Run: pytest tests/test_distributed.py -q            (about 2 minutes on 2 CPU cores)
     pytest tests/test_distributed.py -q -m slow    (kill -9 of 2-process runs, full FT and LoRA)

Every multi-process run has a timeout: a collective called by one rank alone would hang there, and the
test would fail on the timeout instead of passing.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.data import run_paths, tiny_pairs, write_jsonl
from helpers.distributed import TOL_2RANKS, env, ok, run_ranks
from helpers.training import TRAIN_CFG
from safetensors.torch import load_file

from rpo import launch, train

# test_train's tiny LoRA config, with 9 pairs in global batches of 4: steps of 4, 4 and 1 example
# (in the last, rank 1 has none: a zero-weight pass)
CFG = {**TRAIN_CFG, "epochs": 1, "micro_batch_size": 1, "global_batch_size": 4, "max_grad_norm": 100.0,
       "checkpoint_every": 100}
METHOD = {"name": "rpo", "loss": "rpo", "beta": 0.5, "eta": 0.5}



def test_accumulation_keeps_the_global_batch():
    # 128 = micro 2 x 8 GPUs x 8 micro-batches per rank per step
    assert launch.accumulation_steps(128, 2, launch.world_size(8, 1)) == 8
    # 2 nodes of 8 GPUs: 128 / (2 x 16) = 4
    assert launch.accumulation_steps(128, 2, launch.world_size(8, 2)) == 4
    # no GPU counts as one process
    assert launch.world_size(0) == 1
    with pytest.raises(ValueError, match=r"global_batch_size 128 is not a multiple of micro_batch_size 4 x 3"):
        launch.accumulation_steps(128, 4, 3)


def test_launch_prefix_forms():
    assert launch.launch_prefix(gpus=1) == "python -m rpo"
    assert launch.launch_prefix(gpus=0) == "python -m rpo"
    eight = launch.launch_prefix(gpus=8)
    assert eight.startswith("accelerate launch --multi_gpu --num_processes 8 --num_machines 1")
    assert eight.endswith(" -m rpo")
    multi = launch.launch_prefix(gpus=8, nodes=2)
    assert multi.startswith("srun --nodes 2 --ntasks-per-node 1 bash -c ")
    assert "--num_processes 16 --num_machines 2" in multi and "$SLURM_NODEID" in multi
    # the rendezvous port: on one node a free one when the job starts (two trainings on a host never share
    # one); across nodes one every node derives from the SLURM job id
    assert eight.endswith(" --main_process_port $(python -m rpo.launch free-port) -m rpo")
    assert "--main_process_port $((20000 + SLURM_JOB_ID % 30000))" in multi
    ports = [subprocess.run([sys.executable, "-m", "rpo.launch", "free-port"], capture_output=True, text=True,
                            env=env(), check=True).stdout for _ in range(2)]
    assert all(1024 < int(p) < 65536 for p in ports)
    assert launch.launch_prefix(gpus=2, main_process_port=29517).endswith("--main_process_port 29517 -m rpo")


def test_every_rank_takes_its_share_of_the_jobs_threads(monkeypatch):
    assert launch.rank_threads(8, {}) == 8  # one process: all of them
    assert launch.rank_threads(8, {"LOCAL_WORLD_SIZE": "8"}) == 1
    assert launch.rank_threads(8, {"LOCAL_WORLD_SIZE": "2"}) == 4
    assert launch.rank_threads(2, {"LOCAL_WORLD_SIZE": "8"}) == 1  # never 0
    # and `python -m rpo --threads N` applies it in each rank (accelerate / torchrun set LOCAL_WORLD_SIZE)
    import torch

    from rpo.__main__ import main
    seen = []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before = torch.get_num_threads()
    try:
        main(["probe", "--threads", "4"], commands={"probe": lambda: seen.append(torch.get_num_threads())})
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


def test_every_rank_runs_as_many_micro_batches():
    from rpo.loop import local_micros
    # 5 examples over 2 ranks in micro-batches of 2: rank 0 has [0, 2, 4] (2 micro-batches), rank 1 [1, 3]
    # (1): rank 1 adds a zero-weight pass, since under FSDP2 every forward is a collective
    assert local_micros([0, 1, 2, 3, 4], 0, 2, 2) == [([0, 2], False), ([4], False)]
    assert local_micros([0, 1, 2, 3, 4], 1, 2, 2) == [([1, 3], False), ([0], True)]
    assert local_micros([7], 1, 2, 1) == [([7], True)]  # no example at all: one zero-weight pass


def test_world_size_mismatch_is_refused(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tiny_pairs(4), tmp_path / "train.jsonl")
    cache = tmp_path / "ref.pt"
    train.reference_logps(tiny_model_dir, pairs, cache, max_length=64, max_prompt_length=32, batch_size=4)
    with pytest.raises(RuntimeError, match="resolved for 8 training processes .* this run has 1"):
        train.train_preference(ref_dir=tiny_model_dir, pairs_path=pairs, reference_cache=cache,
                               **run_paths(tmp_path / "m"), ckpt_dir=tmp_path / "ck",
                               cfg={**CFG, "world_size": 8}, method=METHOD)


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def paths(run_dir) -> dict:
    """run_paths as JSON-ready strings, for the worker's command line."""
    return {k: str(v) for k, v in run_paths(run_dir).items()}


@pytest.fixture()
def prefs(tiny_model_dir, tmp_path):
    """9 pairs and their reference log-probs."""
    pairs = write_jsonl(tiny_pairs(9), tmp_path / "train.jsonl")
    cache = tmp_path / "ref.pt"
    train.reference_logps(tiny_model_dir, pairs, cache, max_length=64, max_prompt_length=32, batch_size=4)
    return {"ref_dir": str(tiny_model_dir), "pairs_path": str(pairs), "reference_cache": str(cache),
            "method": METHOD}


def one_process(common: dict, tmp_path, tag: str, cfg: dict, *, stage="preference"):
    """The same run in this process (unsharded), with each step's gradients recorded."""
    grads = {}

    def hook(step, model):
        grads[step] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    fn = train.train_sft if stage == "sft" else train.train_preference
    fn(**common, **run_paths(tmp_path / tag), ckpt_dir=tmp_path / f"ck-{tag}", cfg=cfg, grad_hook=hook)
    return grads


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    f = model_dir / "adapter_model.safetensors"
    return load_file(f if f.is_file() else model_dir / "model.safetensors")


def assert_weights_close(a: Path, b: Path, **tol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], msg=lambda m: f"{k}: {m}", **tol)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]




# ---------------------------------------------------------------------------------------------------
# data parallel (sharding: none)
# ---------------------------------------------------------------------------------------------------

def test_two_ddp_processes_match_one_process(prefs, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    ok(run_ranks({**prefs, **paths(tmp_path / "ddp"), "ckpt_dir": str(tmp_path / "ck-ddp"),
                  "cfg": {**CFG, "world_size": 2}, "dump_dir": str(dump)}, 2))
    ddp = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["sharding"] == "none"
    assert ddp["steps"] == 3 and ddp["gradient_accumulation_steps"] == 2
    layout = json.loads((dump / "layout_rank0.json").read_text())
    assert {v["type"] for v in layout.values()} == {"Parameter"}  # replicated, not sharded

    single = one_process(prefs, tmp_path, "one", {**CFG, "world_size": 1})
    for step in range(3):
        g0 = torch.load(dump / f"grads_rank0_step{step}.pt")
        g1 = torch.load(dump / f"grads_rank1_step{step}.pt")
        assert g0.keys() == g1.keys() == single[step].keys()
        for name in g0:
            # after the all-reduce both ranks hold the same gradient ...
            torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0)
            # ... and it is the gradient of the whole global batch in one process
            torch.testing.assert_close(g0[name], single[step][name], rtol=1e-4, atol=1e-6)
    assert_weights_close(tmp_path / "ddp" / "model", tmp_path / "one" / "model", **TOL_2RANKS)
    for x, y in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "one"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["logps/chosen"] == pytest.approx(y["logps/chosen"], rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# FSDP2 full sharding (sharding: full)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_fsdp_shards_every_parameter_and_matches_one_process(prefs, tmp_path, finetuning):
    cfg = {**CFG, "finetuning": finetuning, "learning_rate": 5e-2 if finetuning == "lora" else 1e-3}
    dump = tmp_path / "dump"
    dump.mkdir()
    ok(run_ranks({**prefs, **paths(tmp_path / "fsdp"), "ckpt_dir": str(tmp_path / "ck-fsdp"),
                  "cfg": {**cfg, "world_size": 2, "sharding": "full"}, "dump_dir": str(dump)}, 2))
    summary = json.loads((tmp_path / "fsdp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharding"] == "full"

    # Every trainable parameter is a DTensor shard: the two ranks hold disjoint halves (dim 0 split,
    # the larger half first when it is odd), never a replica.
    l0, l1 = (json.loads((dump / f"layout_rank{r}.json").read_text()) for r in (0, 1))
    assert l0.keys() == l1.keys() and l0
    for name in l0:
        assert l0[name]["type"] == l1[name]["type"] == "DTensor", name
        full = l0[name]["full"]
        assert l0[name]["local"] + l1[name]["local"] == full, name
        assert max(l0[name]["local"], l1[name]["local"]) <= math.ceil(full / 2), name
    if finetuning == "full":  # the embeddings too, not only the adapters
        assert any("embed_tokens" in n for n in l0)

    single = one_process(prefs, tmp_path, "one", {**cfg, "world_size": 1})
    for step in range(3):
        g0 = torch.load(dump / f"grads_rank0_step{step}.pt")
        for name, g in g0.items():
            torch.testing.assert_close(g, single[step][name], rtol=1e-4, atol=1e-6)
    # the final save: one safetensors model (gathered on both ranks, written by rank 0) that equals the
    # unsharded run's and that transformers / peft load
    assert_weights_close(tmp_path / "fsdp" / "model", tmp_path / "one" / "model", **TOL_2RANKS)
    from rpo.models import load_policy
    policy = load_policy(prefs["ref_dir"], tmp_path / "fsdp" / "model")
    assert sum(p.numel() for p in policy.parameters()) > 0


def test_fsdp_sft_merges_the_gathered_adapter(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tiny_pairs(8), tmp_path / "train.jsonl")
    common = {"base_dir": str(tiny_model_dir), "pairs_path": str(pairs)}
    cfg = {**CFG, "epochs": 2, "global_batch_size": 8, "micro_batch_size": 2}
    ok(run_ranks({**common, "stage": "sft", **paths(tmp_path / "fsdp"),
                  "ckpt_dir": str(tmp_path / "ck-fsdp"), "cfg": {**cfg, "world_size": 2, "sharding": "full"}}, 2))
    one_process(common, tmp_path, "one", {**cfg, "world_size": 1}, stage="sft")
    assert not (tmp_path / "fsdp" / "model" / "adapter_config.json").exists()  # merged: a plain model
    assert_weights_close(tmp_path / "fsdp" / "model", tmp_path / "one" / "model", **TOL_2RANKS)


# ---------------------------------------------------------------------------------------------------
# kill -9 and resume
# ---------------------------------------------------------------------------------------------------

def _kill_and_resume(prefs, tmp_path, *, world: int, cfg: dict):
    """An uninterrupted run, and a run SIGKILLed in step 4 (after the checkpoint of step 2) then started
    again with the same command; returns the two output directories and the resumed summary."""
    cfg = {**CFG, "epochs": 2, "global_batch_size": 2, "checkpoint_every": 2, "world_size": world, **cfg}
    clean = {**prefs, **paths(tmp_path / "clean"), "ckpt_dir": str(tmp_path / "ck-clean"),
             "cfg": cfg}
    ok(run_ranks(clean, world))
    cut = {**prefs, **paths(tmp_path / "cut"), "ckpt_dir": str(tmp_path / "ck-cut"), "cfg": cfg}
    killed = run_ranks({**cut, "kill_at": 3}, world)  # step index 3 = the 4th step
    assert killed.returncode != 0
    assert (tmp_path / "ck-cut" / "step-000002" / "identity.json").is_file()
    assert not (tmp_path / "cut" / "model").exists()
    ok(run_ranks(cut, world))  # the same command again
    summary = json.loads((tmp_path / "cut" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 10
    assert [m["step"] for m in metrics(tmp_path / "cut")] == list(range(1, 11))  # none lost, none twice
    assert not (tmp_path / "ck-cut").exists()  # finished: its checkpoints are gone
    return tmp_path / "clean" / "model", tmp_path / "cut" / "model"


@pytest.mark.slow  # two sharded ranks twice, one killed: ~30 s each on 2 quiet cores (default run: < 10 min)
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_kill9_one_sharded_process_resumes_bitwise(prefs, tmp_path, finetuning):
    clean, cut = _kill_and_resume(prefs, tmp_path, world=1,
                                  cfg={"finetuning": finetuning, "sharding": "full", "learning_rate": 1e-2})
    assert_weights_close(clean, cut, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("finetuning", ["lora", "full"])
def test_kill9_two_sharded_processes_resume(prefs, tmp_path, finetuning):
    clean, cut = _kill_and_resume(prefs, tmp_path, world=2,
                                  cfg={"finetuning": finetuning, "sharding": "full", "learning_rate": 1e-2})
    assert_weights_close(clean, cut, **TOL_2RANKS)


def test_fsdp_bf16_computes_in_bf16_over_fp32_shards(tiny_model_dir):
    # the mixed-precision policy of sharding: full + precision: bfloat16 (the paper configs): bf16
    # parameters inside forward, fp32 shards (the master weights the optimizer steps) outside it
    from rpo import distributed as dist_
    from rpo.models import load_model
    world = dist_.setup("full")  # a one-process gloo group
    try:
        model = dist_.wrap(load_model(tiny_model_dir), world, precision="bfloat16")
        seen = []
        q = model.model.layers[0].self_attn.q_proj
        handle = q.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
        model(input_ids=torch.tensor([[5, 6, 7]])).logits.float().sum().backward()
        handle.remove()
        assert seen == [torch.bfloat16]
        assert type(q.weight).__name__ == "DTensor" and q.weight.dtype == torch.float32
        assert q.weight.grad is not None and q.weight.grad.dtype == torch.float32
    finally:
        dist_.teardown()


def test_the_group_a_process_created_is_destroyed_before_it_exits():
    # Left to interpreter finalisation, gloo's threads can abort a rank that finished its work (SIGABRT);
    # the group setup() created is destroyed at exit. An atexit handler registered before setup() runs
    # after setup's (last in, first out), so it sees whether the group is still there.
    code = ("import atexit, torch.distributed as dist\n"
            "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
            "from rpo import distributed\n"
            "world = distributed.setup('full')\n"
            "assert world.distributed\n")
    alone = {k: v for k, v in env().items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], env=alone, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "initialized at exit: False"
