"""The distributed tests' runner: helpers/dist_worker.py on several CPU processes through `accelerate launch`."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from rpo import launch

WORKER = Path(__file__).parent / "dist_worker.py"
TIMEOUT = 300  # seconds; a hung collective fails the test here
# 2 ranks against 1 process: fp32 sums in another order (gloo's all-reduce / reduce-scatter).
TOL_2RANKS = {"rtol": 1e-4, "atol": 1e-5}


def env():
    """The workers' environment: one thread each, this checkout first on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2]),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


_PORT = [29517]


def run_ranks(kwargs: dict, world: int) -> subprocess.CompletedProcess:
    """The worker on `world` CPU processes through `accelerate launch` (world 1: a plain process)."""
    if world == 1:
        cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(WORKER))} {shlex.quote(json.dumps(kwargs))}"
    else:
        _PORT[0] += 1
        prefix = launch.launch_prefix(gpus=world, cpu=True, main_process_port=_PORT[0]).removesuffix(" -m rpo")
        assert prefix.startswith(f"env ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {world}")
        cmd = f"{prefix} {shlex.quote(str(WORKER))} {shlex.quote(json.dumps(kwargs))}"
    return subprocess.run(cmd, shell=True, env=env(), capture_output=True, text=True, timeout=TIMEOUT)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
