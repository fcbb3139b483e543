"""One rank of the multi-process CPU (gloo) training tests: runs the real `rpo.train` stage under
`accelerate launch` (or alone), and records what the tests check.

    accelerate launch --multi_gpu --num_processes 2 tests/helpers/dist_worker.py '<json>'

The JSON holds the stage's keyword arguments plus:
    stage        "preference" (default), "sft" or "reward" (rpo.reward.train_reward_model)
    dump_dir     where to save, per rank, each step's synchronised gradients (full tensors) and, at the
                 first step, how each trainable parameter is held (DTensor or not, local/full elements)
    kill_at      SIGKILL this process (a real kill -9) in step `kill_at` before its optimizer step
"""
import json
import os
import signal
import sys

import torch

from rpo import reward, train

kwargs = json.loads(sys.argv[1])
stage = kwargs.pop("stage", "preference")
dump_dir = kwargs.pop("dump_dir", None)
kill_at = kwargs.pop("kill_at", None)
rank = int(os.environ.get("RANK", "0"))


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def hook(step, model):
    if dump_dir:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads = {n: full(p.grad).detach().clone() for n, p in params}
        torch.save(grads, f"{dump_dir}/grads_rank{rank}_step{step}.pt")
        if step == 0:
            layout = {n: {"type": type(p).__name__, "local": p.to_local().numel() if hasattr(p, "to_local")
                          else p.numel(), "full": full(p).numel()} for n, p in params}
            with open(f"{dump_dir}/layout_rank{rank}.json", "w") as f:
                json.dump(layout, f)
    if kill_at is not None and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


fn = {"sft": train.train_sft, "reward": reward.train_reward_model}.get(stage, train.train_preference)
fn(**kwargs, grad_hook=hook)
