"""Where the overoptimization study's measurement spends its time (issue 12): one run's snapshots measured by
rpo.overopt.evaluate_snapshots, with the seconds of each stage (decode, the reference's KL pass, the pairs'
log-probs, gold scoring) recorded in-process.

    snakemake --cores 2 results/overopt/runs/rpo-beta0.05/seed1/snapshots results/overopt/reference/answers.jsonl
    python -m benchmarks.study_eval              # that run, 1 thread, ~5 min on 2 cores

The settings are the study's in config/config.yaml (pass others to match another config); run it alone on the
machine, since it times wall-clock seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study-dir", default="results/overopt")
    ap.add_argument("--run", default="rpo-beta0.05")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--ref-dir", default="results/models/base")
    ap.add_argument("--kl-samples-per-prompt", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(common.RESULTS / f"{NAME}.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = Path(args.study_dir)
    snapshots = d / "runs" / args.run / f"seed{args.seed}" / "snapshots"
    if not snapshots.is_dir():
        raise SystemExit(f"{snapshots}: no snapshots; build them first (see this module's docstring)")
    info = common.machine()
    with timed() as seconds, tempfile.TemporaryDirectory() as tmp:  # the records are the study's business
        t = time.perf_counter()
        n = overopt.evaluate_snapshots(
            ref_dir=args.ref_dir, snapshots=snapshots, prompts_path=d / "data" / "prompts_test.jsonl",
            pairs_path=d / "data" / "test.jsonl", ref_answers=d / "reference" / "answers.jsonl",
            out=Path(tmp) / "records.jsonl", beta=args.beta, max_length=args.max_length,
            max_prompt_length=args.max_prompt_length, kl_samples_per_prompt=args.kl_samples_per_prompt,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
        total = time.perf_counter() - t
    result = {"settings": vars(args), "snapshots": n, "total_s": round(total, 1),
              "per_snapshot_s": round(total / n, 1), "stage_seconds": seconds, "machine": common.finish(info)}
    common.write_json(args.out, result)
    print(f"{n} snapshots in {total:.1f} s ({total / n:.1f} s each); stage seconds: {seconds}")
    return result


if __name__ == "__main__":
    main()
