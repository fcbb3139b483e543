"""The training loop both stages share: AdamW, the transformers warmup schedules, gradient accumulation up
to the global batch, data parallel or FSDP2-sharded over the ranks, resumable sharded checkpoints.

A step's gradient is that of the whole global batch, whatever the micro-batch size and the number of
ranks: `step_fn(model, micro, step_items)` returns the micro-batch's share of the global loss (its terms
divided by the global step's denominator: its example count, or for SFT its token count), and the ranks'
gradients are averaged (DDP all-reduce, FSDP2 reduce-scatter), so each rank's loss is scaled by the world
size. Every rank runs the same number of micro-batches per step (a rank short of examples runs a
zero-weight pass), because under FSDP2 every forward all-gathers parameters from all ranks.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from rpo import checkpoint, io
from rpo import distributed as dist_

log = logging.getLogger(__name__)

# rpo's schedule names -> transformers' (the authors trained with the transformers Trainer's schedules)
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def schedule(n: int, cfg: dict, seed: int) -> list[list[int]]:
    """Optimizer steps as lists of example indices, reshuffled per epoch with a seeded RNG."""
    gb = cfg["global_batch_size"]
    steps = []
    for epoch in range(cfg["epochs"]):
        order = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(order)
        steps += [order[s:s + gb] for s in range(0, n, gb)]
    if cfg.get("max_steps"):
        steps = steps[:cfg["max_steps"]]
    return steps


def warmup_steps(ratio: float, total: int) -> int:
    # transformers TrainingArguments.get_warmup_steps: ceil(ratio x total)
    return math.ceil(ratio * total)


def lr_scheduler(opt, kind: str, warmup: int, total: int):
    """transformers' own schedule: lr 0 at step 0, linear warmup, then cosine / linear decay / constant."""
    from transformers import get_scheduler
    return get_scheduler(SCHEDULES[kind], opt, num_warmup_steps=warmup, num_training_steps=total)


def local_micros(idx: list[int], rank: int, world: int, mb: int) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of one optimizer step: a strided share of the global batch, cut into
    micro-batches, padded with zero-weight passes (the step's first example, flagged True) up to the
    number of micro-batches the fullest rank runs, so that every rank runs as many forwards."""
    local = idx[rank::world]
    n_micro = math.ceil(math.ceil(len(idx) / world) / mb)
    micros = [(local[s:s + mb], False) for s in range(0, len(local), mb)]
    return micros + [(idx[:1], True)] * (n_micro - len(micros))


def run_loop(*, model, items, step_fn, cfg: dict, metrics_path, ckpt_dir, identity: dict, desc: str,
             world, grad_hook=None, save_snapshot=None) -> tuple[object, dict]:
    """Train `model` (as `prepare_model` made it) on `items`; returns (the trained, possibly wrapped,
    model, a summary) and writes the per-step metrics (JSONL) to `metrics_path` at the end. Checkpoints:
    see rpo.checkpoint. `grad_hook(step, model)`, if given, sees the synchronised gradients before each
    optimizer step (tests).

    Snapshots (cfg["snapshot_every"] > 0): every rank calls `save_snapshot(model, dir)` after every
    `snapshot_every`-th optimizer step and after the last, with dir = snapshot_dir(ckpt_dir, step): they
    live beside the checkpoints, so a resumed run keeps the ones it had (those after the checkpoint it
    resumes from are written again), and the caller moves them to their output when training ends."""
    expected = cfg.get("world_size")
    if expected is not None and expected != world.size:
        raise RuntimeError(f"the config was resolved for {expected} training processes (gradient "
                           f"accumulation computed for them) but this run has {world.size}; launch it "
                           "through the workflow (rpo.launch) or fix resources")
    ckpt_dir = Path(ckpt_dir)
    torch.manual_seed(cfg["seed"])
    if cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = dist_.wrap(model, world, precision=cfg["precision"])
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the DTensor shards
    opt = torch.optim.AdamW(params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                            betas=(0.9, 0.999))
    steps = schedule(len(items), cfg, cfg["seed"])
    warmup = warmup_steps(cfg["warmup_ratio"], len(steps))
    sched = lr_scheduler(opt, cfg["lr_scheduler"], warmup, len(steps))
    identity = {**identity, "world_size": world.size}

    # Metrics grow in the checkpoint directory (Snakemake deletes a rule's declared outputs before it
    # re-runs it, which would lose the steps a resumed run keeps) and are copied out when training ends.
    running = ckpt_dir / "metrics.jsonl"
    if world.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    found = checkpoint.find(ckpt_dir, identity, world)
    if found is not None:
        start = checkpoint.load(found, model=model, optimizer=opt, scheduler=sched, world=world)
        log.info("resuming from %s at step %d of %d", found, start, len(steps))
    every = cfg.get("snapshot_every", 0)
    if every and save_snapshot is None:
        raise ValueError("snapshot_every is set but the training stage gave no way to save a snapshot")
    if world.main:
        _truncate_metrics(running, start)
        _truncate_snapshots(ckpt_dir / SNAPSHOTS, start)
    dist_.barrier(world)

    mb, n_total = cfg["micro_batch_size"], len(items)
    seen = [0]
    for s in steps:
        seen.append(seen[-1] + len(s))
    t0 = time.time()
    mf = running.open("a") if world.main else nullcontext()
    with mf, tqdm(total=len(steps), initial=start, desc=desc, unit="step", disable=not world.main) as bar:
        for step in range(start, len(steps)):
            idx = steps[step]
            step_items = [items[i] for i in idx]
            micros = local_micros(idx, world.rank, world.size, mb)
            sums: dict[str, float] = {}
            for j, (mi, dummy) in enumerate(micros):
                with dist_.no_sync(model, enabled=j < len(micros) - 1):
                    loss, m = step_fn(model, [items[i] for i in mi], step_items)
                    (loss * (0.0 if dummy else float(world.size))).backward()
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + (0.0 if dummy else v)
            keys = sorted(sums)  # every rank has the same keys: each ran at least one micro-batch
            sums = dict(zip(keys, dist_.all_reduce_sum([sums[k] for k in keys], world)))
            grad_norm = dist_.clip_grad_norm(params, cfg["max_grad_norm"])
            if grad_hook is not None:
                grad_hook(step, dist_.unwrap(model))
            lr = sched.get_last_lr()[0]  # the rate this step's update uses
            opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
            rec = {"step": step + 1, "epoch": round(seen[step + 1] / n_total, 4),
                   **{k: round(v, 6) for k, v in sums.items()},
                   "grad_norm": round(grad_norm, 6), "lr": lr, "elapsed_s": round(time.time() - t0, 2)}
            bar.set_postfix(loss=f"{sums.get('loss', 0):.4f}")
            bar.update(1)
            if world.main:
                mf.write(json.dumps(rec) + "\n"); mf.flush()
            if every and ((step + 1) % every == 0 or step + 1 == len(steps)):
                save_snapshot(model, snapshot_dir(ckpt_dir, step + 1))
            if (step + 1) % cfg["checkpoint_every"] == 0 and step + 1 < len(steps):
                checkpoint.save(ckpt_dir, step + 1, model=model, optimizer=opt, scheduler=sched,
                                identity=identity, world=world)
    if world.main:
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(running, metrics_path)
    dist_.barrier(world)
    return model, {"steps": len(steps), "warmup_steps": warmup, "resumed_from_step": start,
                   "world_size": world.size, "sharding": world.sharding,
                   "gradient_accumulation_steps": math.ceil(cfg["global_batch_size"] / (mb * world.size))}


SNAPSHOTS = "snapshots"


def snapshot_dir(ckpt_dir, step: int) -> Path:
    return Path(ckpt_dir) / SNAPSHOTS / f"step-{step:06d}"


def snapshot_steps(snapshots) -> list[int]:
    """The steps of the finished snapshots in a snapshots directory, in order."""
    return sorted(int(p.name.removeprefix("step-")) for p in Path(snapshots).glob("step-*")
                  if p.is_dir() and p.name.removeprefix("step-").isdigit())


def _truncate_snapshots(snapshots: Path, step: int) -> None:
    """Keep the snapshots of steps <= `step` (none for a fresh start: they belong to another run)."""
    if not snapshots.is_dir():
        return
    for p in snapshots.iterdir():
        tail = p.name.removeprefix("step-")
        if not tail.isdigit() or int(tail) > step:
            shutil.rmtree(p, ignore_errors=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of finished steps <= `step` (a resumed run rewrites the rest)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill
        if rec["step"] <= step:
            keep.append(line)
    io.write_text(path, "".join(l + "\n" for l in keep))  # atomically: a kill now loses no kept step
