"""Where the overoptimization study's measurement spends its time (issue 12): one run's snapshots measured by
rpo.overopt.evaluate_snapshots, with the seconds of each stage (decode, the reference's KL pass, the pairs'
log-probs, gold scoring) recorded in-process.

    snakemake --cores 2 results/overopt/runs/rpo-beta0.05/seed1/snapshots results/overopt/reference/answers.jsonl
    python -m benchmarks.study_eval              # that run's measurement, as the study runs it (~3 min on 2 cores)

The job's settings, paths and threads are the study_evaluate rule's, read from Snakemake's dry run of that job
(`--configfile` for another config), so they are the ones the study uses; the records go to a temporary file,
not the study's. Run it alone on the machine, since it times wall-clock seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from rpo import overopt

NAME = "study_eval"
STAGES = ("decode", "kl_values", "pair_logps", "gold_scores")


@contextlib.contextmanager
def timed(stages=STAGES):
    """Within the block, each call of rpo.overopt's stage functions appends its seconds to the yielded dict
    (evaluate_snapshots looks them up as module globals); the functions are restored afterwards."""
    seconds: dict[str, list[float]] = {s: [] for s in stages}
    saved = {name: getattr(overopt, name) for name in stages}

    def wrap(name, f):
        @functools.wraps(f)
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                seconds[name].append(round(time.perf_counter() - t, 2))
        return g
    try:
        for name, f in saved.items():
            setattr(overopt, name, wrap(name, f))
        yield seconds
    finally:
        for name, f in saved.items():
            setattr(overopt, name, f)


def job_command(run: str, seed: int, configfile=None, directory=common.ROOT) -> dict:
    """The study_evaluate job of (`run`, `seed`) as Snakemake would run it in `directory`: {"threads",
    "settings", "paths"} (paths relative to `directory`), parsed from the command its dry run prints (forced,
    so it prints even when the records exist)."""
    target = f"results/overopt/runs/{run}/seed{seed}/snapshot_eval.jsonl"
    # the target first: --configfile and --forcerun take every value that follows them
    cmd = [sys.executable, "-m", "snakemake", target, "--snakefile", str(common.ROOT / "Snakefile"), "--directory",
           str(directory), "--dry-run", "--printshellcmds", "--cores", "1", "--forcerun", "study_evaluate",
           *(["--configfile", str(configfile)] if configfile else [])]
    res = subprocess.run(cmd, cwd=directory, capture_output=True, text=True, timeout=300)
    lines = [ln.strip() for ln in res.stdout.splitlines() if "rpo evaluate-snapshots" in ln]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"no study_evaluate job for {target} in `{' '.join(cmd[2:])}`:\n{res.stdout}{res.stderr}")
    argv = shlex.split(lines[-1].split("2>&1")[0])
    get = {a: argv[argv.index(a) + 1] for a in ("--threads", "--args", "--paths")}
    return {"threads": int(get["--threads"]), "settings": json.loads(get["--args"]),
            "paths": json.loads(get["--paths"])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="rpo-beta0.05", help="a run of overoptimization.grid")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--configfile", default=None, help="the config the study was built with (default: the Snakefile's)")
    ap.add_argument("--directory", default=str(common.ROOT), help="the study's working directory")
    ap.add_argument("--out", default=str(common.RESULTS / f"{NAME}.json"))
    args = ap.parse_args(argv)
    job = job_command(args.run, args.seed, args.configfile, args.directory)
    snapshots = Path(args.directory, job["paths"]["snapshots"])
    if not snapshots.is_dir():
        raise SystemExit(f"{snapshots}: no snapshots; build them first (see this module's docstring)")
    torch.set_num_threads(job["threads"])
    paths = {k: Path(args.directory, v) for k, v in job["paths"].items() if k != "out"}
    info = common.machine()
    with timed() as seconds, tempfile.TemporaryDirectory() as tmp:  # the records are the study's business
        t = time.perf_counter()
        n = overopt.evaluate_snapshots(**job["settings"], **paths, out=Path(tmp) / "records.jsonl")
        total = time.perf_counter() - t
    result = {"run": args.run, "seed": args.seed, "job": job, "snapshots": n, "total_s": round(total, 1),
              "per_snapshot_s": round(total / n, 1), "stage_seconds": seconds, "machine": common.finish(info)}
    common.write_json(args.out, result)
    print(f"{n} snapshots in {total:.1f} s ({total / n:.1f} s each); stage seconds: {seconds}")
    return result


if __name__ == "__main__":
    main()
