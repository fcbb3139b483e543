"""Data-parallel training through `accelerate launch`, proven on CPU with 2 processes (gloo), and the
launch arithmetic the workflow uses to keep the global batch fixed.

The 2-process test takes about half a minute (two Python start-ups with torch and transformers).
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_pairs, write_jsonl
from safetensors.torch import load_file

from rpo import launch, train
from test_train import CFG as TRAIN_CFG

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
    fsdp = launch.launch_prefix(gpus=8, accelerate_config="config/accelerate/fsdp.yaml")
    assert "--config_file config/accelerate/fsdp.yaml" in fsdp and "--multi_gpu" not in fsdp
    multi = launch.launch_prefix(gpus=8, nodes=2)
    assert multi.startswith("srun --nodes 2 --ntasks-per-node 1 bash -c ")
    assert "--num_processes 16 --num_machines 2" in multi and "$SLURM_NODEID" in multi


def test_world_size_mismatch_is_refused(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tiny_pairs(4), tmp_path / "train.jsonl")
    cache = tmp_path / "ref.pt"
    train.reference_logps(tiny_model_dir, pairs, cache, max_length=64, max_prompt_length=32, batch_size=4)
    with pytest.raises(RuntimeError, match="resolved for 8 training processes .* this run has 1"):
        train.train_preference(ref_dir=tiny_model_dir, pairs_path=pairs, reference_cache=cache,
                               out_dir=tmp_path / "m" / "model", ckpt_dir=tmp_path / "ck",
                               cfg={**CFG, "world_size": 8}, method=METHOD)


def test_two_cpu_processes_match_one_process(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tiny_pairs(9), tmp_path / "train.jsonl")
    cache = tmp_path / "ref.pt"
    train.reference_logps(tiny_model_dir, pairs, cache, max_length=64, max_prompt_length=32, batch_size=4)
    common = dict(ref_dir=str(tiny_model_dir), pairs_path=str(pairs), reference_cache=str(cache), method=METHOD)

    # Two ranks through `accelerate launch` (the launcher the workflow uses), gloo on CPU.
    dump = tmp_path / "dump"
    dump.mkdir()
    kwargs = {**common, "out_dir": str(tmp_path / "ddp" / "model"), "ckpt_dir": str(tmp_path / "ck-ddp"),
              "cfg": {**CFG, "world_size": 2}, "dump_dir": str(dump)}
    prefix = launch.launch_prefix(gpus=2, cpu=True, main_process_port=29517).removesuffix(" -m rpo")
    worker = Path(__file__).parent / "helpers" / "dist_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert prefix.startswith("env ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2")
    cmd = f"{prefix} {shlex.quote(str(worker))} {shlex.quote(json.dumps(kwargs))}"
    proc = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert ddp["world_size"] == 2 and ddp["steps"] == 3 and ddp["gradient_accumulation_steps"] == 2

    # One process, same global batch (4 micro-batches of 1 per step).
    single_grads = {}
    orig = train.run_loop

    def hooked(**kw):
        return orig(**kw, grad_hook=lambda step, model: single_grads.__setitem__(step, {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))

    train.run_loop = hooked
    try:
        train.train_preference(**common, out_dir=tmp_path / "one" / "model", ckpt_dir=tmp_path / "ck-one",
                               cfg={**CFG, "world_size": 1})
    finally:
        train.run_loop = orig

    for step in range(3):
        g0 = torch.load(dump / f"grads_rank0_step{step}.pt")
        g1 = torch.load(dump / f"grads_rank1_step{step}.pt")
        assert g0.keys() == g1.keys() == single_grads[step].keys()
        for name in g0:
            # after the all-reduce both ranks hold the same gradient ...
            torch.testing.assert_close(g0[name], g1[name], rtol=0, atol=0)
            # ... and it is the gradient of the whole global batch in one process
            torch.testing.assert_close(g0[name], single_grads[step][name], rtol=1e-4, atol=1e-6)
    a = load_file(tmp_path / "ddp" / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    m_ddp = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    m_one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(m_ddp, m_one, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
        assert x["logps/chosen"] == pytest.approx(y["logps/chosen"], rel=1e-4)
