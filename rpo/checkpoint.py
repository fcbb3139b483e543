"""Resumable training checkpoints: sharded, atomic, and bound to the run they belong to.

Layout under a stage's checkpoint directory (outside the rule's outputs, so Snakemake does not delete
it when it cleans an interrupted job):

    <ckpt_dir>/step-000040/            one complete checkpoint
        .metadata, __<rank>_0.distcp   torch.distributed.checkpoint: every rank writes and reads its own
                                       shard of the trainable weights and of the optimizer state
        rank<r>.pt                     per rank: scheduler, RNG states, the step (= the data position:
                                       the schedule of examples is a pure function of the seed)
        identity.json                  what the run is (see `identity`)
    <ckpt_dir>/step-000050.tmp/        a checkpoint being written: never loaded, removed on the next start
    <ckpt_dir>/metrics.jsonl           the per-step metrics so far (cut back to the step resumed from)

A checkpoint becomes visible only by the rename of its finished `.tmp` directory (after every rank has
written and reached a barrier), so a kill at any moment leaves either the previous checkpoint or the new
one. A checkpoint whose identity differs from the starting run's is discarded with a log line naming
what changed: it never seeds another run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from rpo import distributed as dist_

log = logging.getLogger(__name__)

IDENTITY = "identity.json"


def sha256_file(path, h=None, chunk: int = 1 << 24):
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def model_fingerprint(model_dir) -> str:
    """Content hash of a model directory's weights and configs (~1 s per GB). A hub pointer
    (`model_source.json` with a revision) is its immutable snapshot commit."""
    from rpo.models import POINTER
    d = Path(model_dir)
    pointer = d / POINTER
    if pointer.is_file():
        p = json.loads(pointer.read_text())
        if p.get("revision"):
            return "hub:" + hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()
        d = Path(p["path"])
    h = hashlib.sha256()
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"))
    if not files:
        raise FileNotFoundError(f"{d}: no model files to fingerprint")
    for f in files:
        h.update(f.name.encode())
        sha256_file(f, h)
    return h.hexdigest()


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def find(ckpt_dir, identity: dict, world) -> Path | None:
    """The latest complete checkpoint of this run, or None. On rank 0 it removes cut (`.tmp`)
    checkpoints and every checkpoint of another run, logging why; all ranks get the same answer."""
    ckpt_dir = Path(ckpt_dir)
    found = None
    if world.main and ckpt_dir.is_dir():
        for tmp in ckpt_dir.glob("step-*.tmp"):
            log.info("removing %s: a checkpoint cut before it was complete", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        dirs = _step_dirs(ckpt_dir)
        if dirs:
            latest = dirs[-1]
            try:
                theirs = json.loads((latest / IDENTITY).read_text())
            except (OSError, json.JSONDecodeError):
                theirs = {}
            changed = _diff(identity, theirs)
            if changed:
                log.warning("discarding the checkpoints in %s: they belong to another run (changed: %s); "
                            "training starts from step 0", ckpt_dir, ", ".join(changed))
                for d in dirs:
                    shutil.rmtree(d, ignore_errors=True)
                (ckpt_dir / "metrics.jsonl").unlink(missing_ok=True)
            else:
                found = str(latest)
    found = dist_.broadcast(found, world)
    return Path(found) if found else None


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # Frozen weights (the base model under LoRA) are the reference's: never copied into a checkpoint.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save(ckpt_dir, step: int, *, model, optimizer, scheduler, identity: dict, world) -> Path:
    """Write the checkpoint of `step` (every rank calls this) and remove the older ones."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist_.barrier(world)
    msd, osd = get_state_dict(dist_.unwrap(model), optimizer, options=_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng}, tmp / f"rank{world.rank}.pt")
    dist_.barrier(world)  # every shard is on disk before the checkpoint becomes visible
    if world.main:
        (tmp / IDENTITY).write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, final)
        for old in _step_dirs(ckpt_dir):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    dist_.barrier(world)
    return final


def load(path, *, model, optimizer, scheduler, world) -> int:
    """Restore a checkpoint written by `save` into this rank's model, optimizer, scheduler and RNG;
    returns the step to continue from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = Path(path)
    inner = dist_.unwrap(model)
    msd, osd = get_state_dict(inner, optimizer, options=_options())
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(path))
    res = set_state_dict(inner, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_options())
    frozen = {n for n, p in inner.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = [k for k in res.missing_keys if k not in frozen and not _is_buffer(inner, k)]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"{path}: checkpoint does not fit the model (missing {missing[:5]}, "
                           f"unexpected {list(res.unexpected_keys)[:5]})")
    extra = torch.load(path / f"rank{world.rank}.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["cpu"])
    if extra["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return int(extra["step"])


def _is_buffer(model, key: str) -> bool:
    return key in dict(model.named_buffers())


def clear(ckpt_dir, world) -> None:
    """Remove a finished run's checkpoints (rank 0, after the final save)."""
    if world.main:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
