"""How a training job is started: one process, or `accelerate launch` over several GPUs and nodes.

The workflow keeps the configured global batch whatever the hardware: with G GPUs per node on N nodes
the world has W = G x N ranks, and each optimizer step accumulates
global_batch_size / (micro_batch_size x W) micro-batches per rank (`accumulation_steps`). The trainer
(`rpo.loop.run_loop`) checks that it was launched with the world the config was resolved for.

    launch_prefix(gpus=1, nodes=1)          -> "python -m rpo"
    launch_prefix(gpus=8, nodes=1)          -> "accelerate launch --multi_gpu --num_processes 8 ... -m rpo"
    launch_prefix(gpus=8, nodes=2)          -> one `accelerate launch` per node through `srun` (SLURM)
    launch_prefix(gpus=2, cpu=True)        -> 2 CPU processes over gloo (how the tests prove DDP here)

`accelerate launch` only starts the ranks (as torchrun would); how the model is spread over them is the
trainer's (`training.sharding`: `none` = DDP, `full` = FSDP2, rpo.distributed), the same on CPU and GPU.
"""
from __future__ import annotations

import os
import shlex
import socket
import sys


def world_size(gpus: int, nodes: int = 1) -> int:
    if gpus < 0 or nodes < 1:
        raise ValueError(f"resources: gpus must be >= 0 and nodes >= 1, got gpus={gpus}, nodes={nodes}")
    return max(1, gpus) * nodes


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world: int, where: str = "training") -> int:
    """Micro-batches per rank per optimizer step that keep the global batch at `global_batch_size`."""
    per_step = micro_batch_size * world
    if global_batch_size % per_step:
        raise ValueError(
            f"{where}: global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
            f"{micro_batch_size} x {world} training processes = {per_step}; change micro_batch_size or "
            "the GPU count so that the global batch stays as configured")
    return global_batch_size // per_step


# The rendezvous port of a training job. One node: a port that is free on this host when the job starts
# (two trainings on one host never share one). Several nodes: every node must compute the same port
# without talking, so it comes from the SLURM job id (SLURM_JOB_ID is the same on all of the job's nodes).
FREE_PORT = "$(python -m rpo.launch free-port)"
SLURM_PORT = "$((20000 + SLURM_JOB_ID % 30000))"


def free_port() -> int:
    """A TCP port that nothing listens on now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch_prefix(*, gpus: int, nodes: int = 1, cpu: bool = False, main_process_port: int | None = None) -> str:
    """The shell words that run `python -m rpo <command> ...` on `gpus` x `nodes` processes; the rendezvous
    port is `main_process_port` when given, else chosen when the job starts (FREE_PORT, SLURM_PORT)."""
    n = world_size(gpus, nodes)
    if n == 1:
        return "python -m rpo"
    # On CPU, accelerate's own --cpu flag needs mpirun for several processes; torchrun's launcher with
    # ACCELERATE_USE_CPU gives the ranks gloo instead.
    words = (["env", "ACCELERATE_USE_CPU=true"] if cpu else []) + ["accelerate", "launch", "--multi_gpu"]
    words += ["--num_processes", str(n), "--num_machines", str(nodes), "--mixed_precision", "no"]
    port = str(main_process_port) if main_process_port is not None else None
    if nodes == 1:
        return (" ".join(shlex.quote(w) for w in words) + f" --main_process_port {port or FREE_PORT}"
                " -m rpo")
    # Several nodes (SLURM): one launcher per node, rank from SLURM_NODEID, rendezvous on the first host.
    # The inner command is single-quoted so that the variables expand on each node, not here.
    inner = " ".join(shlex.quote(w) for w in words) + f" --main_process_port {port or SLURM_PORT}"
    return ("srun --nodes {n} --ntasks-per-node 1 bash -c '{inner} --machine_rank $SLURM_NODEID "
            "--main_process_ip $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) -m rpo \"$@\"' rpo"
            ).format(n=nodes, inner=inner)


def rank_threads(threads: int, environ=os.environ) -> int:
    """CPU threads of one process of a job that has `threads` CPUs: the job's share of each of its ranks on
    this node (accelerate / torchrun set LOCAL_WORLD_SIZE), so 8 ranks of a job with 8 CPUs take 1 each."""
    local = int(environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(1, threads // max(1, local))


def gpu_partition() -> str | None:
    """The SLURM partition of jobs whose stage asks for GPUs: $RPO_GPU_PARTITION, set for profiles/slurm
    (optional: unset, such jobs go to the profile's default partition). Read on the submitting host only,
    when the workflow computes the jobs' resources."""
    return os.environ.get("RPO_GPU_PARTITION") or None


if __name__ == "__main__":  # `python -m rpo.launch free-port`: the shell's way to FREE_PORT
    if sys.argv[1:] != ["free-port"]:
        sys.exit("usage: python -m rpo.launch free-port")
    print(free_port())
