"""One rank of the 2-process CPU (gloo) data-parallel test: runs the real `train_preference` under
`accelerate launch` and saves each optimizer step's synchronised gradients of this rank.

    accelerate launch --cpu --num_processes 2 tests/helpers/dist_worker.py '<json kwargs + dump_dir>'
"""
import json
import sys

import torch

from rpo import train

kwargs = json.loads(sys.argv[1])
dump_dir = kwargs.pop("dump_dir")
run_loop = train.run_loop


def hooked(**kw):
    acc = kw["acc"]

    def save_grads(step, model):
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(grads, f"{dump_dir}/grads_rank{acc.process_index}_step{step}.pt")

    return run_loop(**kw, grad_hook=save_grads)


train.run_loop = hooked
train.train_preference(**kwargs)
