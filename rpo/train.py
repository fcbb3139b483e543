"""Training: SFT (imitation of the chosen responses) and preference optimisation (DPO, RPO, ...).

    python -m rpo train-sft        --params params.json   (see rpo/cli.py)
    python -m rpo reference-logps  --params params.json
    python -m rpo train-preference --params params.json

One flat loop serves both stages: AdamW, warmup + cosine/linear/constant schedule, gradient
accumulation up to the global batch, LoRA (peft) or full fine-tuning, bf16 autocast on GPU.
Preference training reads the reference log-probs from the cache written once by
`reference_logps`, so a LoRA policy never needs a second model in memory and every method and every η
reuses the same reference forwards.

Interruption: a checkpoint (trainable weights, optimizer, scheduler, RNG, step) is written every
`checkpoint_every` optimizer steps into a directory outside the rule's outputs (so Snakemake does not
delete it when it cleans an interrupted job); a re-run with the same resolved config resumes from it and
truncates the metrics file to the checkpoint's step. A checkpoint made under a different config is ignored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rpo import losses
from rpo.batching import Truncation, collate, fit, prompt_ids, response_ids, summed_logps
from rpo.models import load_model, load_tokenizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def tokenize_pairs(tok, rows, *, max_length: int, max_prompt_length: int) -> tuple[list[dict], dict]:
    """Token ids of every pair, with the truncation rule of rpo.batching applied and counted."""
    counter = Truncation()
    out = []
    for r in rows:
        p = prompt_ids(tok, r["prompt"])
        c = response_ids(tok, r["prompt"], r["chosen"], p)
        j = response_ids(tok, r["prompt"], r["rejected"], p)
        p, (c, j) = fit(p, [c, j], max_length, max_prompt_length, counter)
        out.append({"id": r["id"], "prompt": p, "chosen": c, "rejected": j})
    summary = {"pairs": len(out), **counter.as_dict()}
    if counter.prompt or counter.response:
        log.warning("truncated to max_length=%d / max_prompt_length=%d: %d prompts, %d responses",
                    max_length, max_prompt_length, counter.prompt, counter.response)
    return out, summary


def fingerprint(items: list[dict]) -> str:
    """Hash of the exact token ids, so a cache made under another tokenisation is never reused."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["id"], it["prompt"], it["chosen"], it["rejected"]]).encode())
    return h.hexdigest()


def pair_batch(items: list[dict], pad_id: int) -> dict:
    """Chosen and rejected sequences of a micro-batch in ONE forward: [chosen_1..B, rejected_1..B]."""
    seqs = [(it["prompt"], it["chosen"]) for it in items] + [(it["prompt"], it["rejected"]) for it in items]
    return collate(seqs, pad_id)


# ---------------------------------------------------------------------------------------------------
# Reference log-probs (computed once, cached as a file)
# ---------------------------------------------------------------------------------------------------

@torch.inference_mode()
def reference_logps(model_dir, pairs_path, out_path, *, max_length: int, max_prompt_length: int,
                    batch_size: int = 8, dtype: str = "float32") -> dict:
    from rpo.data import read_pairs
    tok = load_tokenizer(model_dir)
    items, summary = tokenize_pairs(tok, read_pairs(pairs_path), max_length=max_length,
                                    max_prompt_length=max_prompt_length)
    device = _device()
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    chosen, rejected, n_c, n_r = [], [], [], []
    for s in tqdm(range(0, len(items), batch_size), desc="reference log-probs", unit="batch"):
        chunk = items[s:s + batch_size]
        batch = {k: v.to(device) for k, v in pair_batch(chunk, tok.pad_token_id).items()}
        with _autocast(device, dtype):
            lp, n = summed_logps(model, batch)
        b = len(chunk)
        chosen.append(lp[:b].float().cpu()); rejected.append(lp[b:].float().cpu())
        n_c.append(n[:b].cpu()); n_r.append(n[b:].cpu())
    cache = {"ids": [it["id"] for it in items], "fingerprint": fingerprint(items),
             "chosen_logps": torch.cat(chosen), "rejected_logps": torch.cat(rejected),
             "chosen_lengths": torch.cat(n_c), "rejected_lengths": torch.cat(n_r),
             "model_dir": str(model_dir), "tokenization": summary}
    _atomic_torch_save(cache, out_path)
    return summary


# ---------------------------------------------------------------------------------------------------
# Model set-up
# ---------------------------------------------------------------------------------------------------

def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _autocast(device, dtype: str):
    device = torch.device(device).type
    if device == "cuda" and dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device, enabled=False)


def prepare_model(model_dir, cfg: dict, device: str):
    # Weights stay fp32 on CPU; on GPU bf16 runs through autocast with fp32 master weights.
    model = load_model(model_dir, dtype="float32", device=device)
    model.config.use_cache = False
    if cfg["finetuning"] == "full":
        model.train()
        return model
    from peft import LoraConfig, get_peft_model
    lora = cfg["lora"]
    # LoRA's A matrices are drawn from the global RNG: seed it so that the start does not depend on what
    # ran before in the process (and every rank of a distributed run starts from the same adapter).
    torch.manual_seed(cfg["seed"])
    n_layers = model.config.num_hidden_layers
    layers = None
    if lora.get("top_layers"):
        # LoRA on the top k layers only: backward then stops at layer n-k, the cheap setting that lets
        # the offline quickstart train on 2 CPU cores (a documented deviation, off in the paper configs).
        layers = list(range(max(0, n_layers - lora["top_layers"]), n_layers))
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], layers_to_transform=layers, task_type="CAUSAL_LM"))
    model.train()
    return model


def _run_cfg(cfg: dict) -> dict:
    """The training config as far as it decides the result (the checkpoint key): the thread count and
    the world size / accumulation split do not change the step's mean gradient."""
    return {k: v for k, v in cfg.items() if k not in ("threads", "world_size", "gradient_accumulation_steps")}


def trainable_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters() if v.requires_grad}


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------

def _schedule(n: int, cfg: dict, seed: int) -> list[list[int]]:
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


def accelerator():
    """The process's `accelerate.Accelerator`: one process on CPU or one GPU, or one rank of a
    `accelerate launch` (DDP, or FSDP through an accelerate config file) started by `rpo.launch`."""
    from accelerate import Accelerator
    return Accelerator()


def local_share(idx: list[int], rank: int, world: int) -> tuple[list[int], bool]:
    """This rank's examples of one optimizer step (a strided slice of the global batch).

    A rank left without an example (a last step smaller than the world) runs the step's first example
    with weight 0, so that every rank takes part in the gradient all-reduce; returns (indices, is_dummy).
    """
    local = idx[rank::world]
    return (local, False) if local else (idx[:1], True)


def run_loop(*, model, items, step_fn, cfg: dict, out_dir, ckpt_dir, run_config: dict, desc: str,
             acc=None, grad_hook=None) -> dict:
    """Generic training loop; `step_fn(model, micro_items, n_in_step) -> (loss_to_backward, metrics)`,
    where the loss is the micro-batch's SUM of per-example losses divided by `n_in_step`, the number of
    examples in the whole (global) optimizer step.

    Data parallel over `acc.num_processes` ranks: each rank takes a strided share of every global
    batch and accumulates its micro-batches without gradient sync until the last; the loss is scaled by
    the world size because DDP averages the ranks' gradients, so a step's gradient is the mean over the
    global batch whatever the number of ranks (the gradient accumulation steps follow from
    global_batch_size / (micro_batch_size x ranks)). Metrics and checkpoints are written by rank 0.
    `grad_hook(step, model)`, if given, sees the synchronised gradients before the optimizer step (tests).
    """
    from contextlib import nullcontext
    acc = acc or accelerator()
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    expected = cfg.get("world_size")
    if expected is not None and expected != world:
        raise RuntimeError(f"the config was resolved for {expected} training processes (gradient "
                           f"accumulation computed for them) but this run has {world}; launch it through "
                           "the workflow (rpo.launch) or fix resources")
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg["seed"]
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                            betas=(0.9, 0.999))
    steps = _schedule(len(items), cfg, seed)
    warmup = int(round(cfg["warmup_ratio"] * len(steps)))
    # Not prepared by accelerate: its scheduler wrapper steps once per process, our steps are global.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg["lr_scheduler"], warmup, len(steps)))
    config_hash = hashlib.sha256(json.dumps(run_config, sort_keys=True).encode()).hexdigest()
    # Metrics grow in the checkpoint directory (Snakemake deletes a rule's declared outputs before it
    # re-runs it, which would lose the steps a resumed run keeps) and are copied out when training ends.
    metrics_path = ckpt_dir / "metrics.jsonl"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    start = 0
    state_file = ckpt_dir / "state.pt"
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        if state["config_hash"] == config_hash:
            named = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in state["trainable"].items():
                    named[k].copy_(v)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            start = state["step"]
            log.info("resuming from %s at step %d of %d", ckpt_dir, start, len(steps))
        else:
            log.info("ignoring checkpoint in %s: it was made under a different config", ckpt_dir)
    if main:
        _truncate_metrics(metrics_path, start)
    wrapped, opt_w = acc.prepare(model, opt) if world > 1 else (model, opt)
    # Sharding wrappers (FSDP) may replace the parameters: clip those the prepared model holds.
    params = [p for p in wrapped.parameters() if p.requires_grad]

    mb = cfg["micro_batch_size"]
    seen = [0]
    for s in steps:
        seen.append(seen[-1] + len(s))
    t0 = time.time()
    mf = metrics_path.open("a") if main else nullcontext()
    with mf, tqdm(total=len(steps), initial=start, desc=desc, unit="step", disable=not main) as bar:
        for step in range(start, len(steps)):
            idx = steps[step]
            local, dummy = local_share(idx, rank, world)
            micros = [local[s:s + mb] for s in range(0, len(local), mb)]
            sums: dict[str, float] = {}
            for j, mi in enumerate(micros):
                micro = [items[i] for i in mi]
                sync = j == len(micros) - 1 or world == 1
                with nullcontext() if sync else acc.no_sync(wrapped):
                    loss, m = step_fn(wrapped, micro, len(idx))
                    acc.backward(loss * (0.0 if dummy else float(world)))
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + (0.0 if dummy else v * len(micro) / len(idx))
            if world > 1:  # each rank holds its share of the weighted means: add them up
                keys = sorted(sums)
                total = acc.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                device=acc.device), reduction="sum")
                sums = dict(zip(keys, total.tolist()))
            grad_norm = acc.clip_grad_norm_(params, cfg["max_grad_norm"]) if world > 1 else \
                torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
            if grad_hook is not None:
                grad_hook(step, model)
            opt_w.step(); sched.step(); opt_w.zero_grad(set_to_none=True)
            rec = {"step": step + 1, "epoch": round(seen[step + 1] / len(items), 4),
                   **{k: round(v, 6) for k, v in sums.items()},
                   "grad_norm": round(float(grad_norm), 6), "lr": sched.get_last_lr()[0],
                   "elapsed_s": round(time.time() - t0, 2)}
            bar.set_postfix(loss=f"{sums.get('loss', 0):.4f}")
            bar.update(1)
            if not main:
                continue
            mf.write(json.dumps(rec) + "\n"); mf.flush()
            if (step + 1) % cfg["checkpoint_every"] == 0 and step + 1 < len(steps):
                _atomic_torch_save({"config_hash": config_hash, "step": step + 1,
                                    "trainable": trainable_state(model), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "rng": torch.get_rng_state()},
                                   state_file)
    if main:
        shutil.copyfile(metrics_path, out_dir / "metrics.jsonl")
    acc.wait_for_everyone()
    return {"steps": len(steps), "warmup_steps": warmup, "resumed_from_step": start, "world_size": world,
            "gradient_accumulation_steps": math.ceil(cfg["global_batch_size"] / (mb * world))}


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
    path.write_text("".join(l + "\n" for l in keep))


def _atomic_torch_save(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_model(model, tok, out_dir: Path, *, merge: bool) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# SFT: imitation of the chosen responses; the merged result is the reference model
# ---------------------------------------------------------------------------------------------------

def train_sft(*, base_dir, pairs_path, out_dir, ckpt_dir, cfg: dict) -> dict:
    from rpo.data import read_pairs
    tok = load_tokenizer(base_dir)
    items, tok_summary = tokenize_pairs(tok, read_pairs(pairs_path), max_length=cfg["max_length"],
                                        max_prompt_length=cfg["max_prompt_length"])
    acc = accelerator()
    device = acc.device
    model = prepare_model(base_dir, cfg, device)

    def step_fn(model, micro, n_in_step):
        batch = {k: v.to(device) for k, v in
                 collate([(it["prompt"], it["chosen"]) for it in micro], tok.pad_token_id).items()}
        with _autocast(device, cfg["precision"]):
            lp, n = summed_logps(model, batch)
        # Token-mean NLL of the micro-batch, weighted by its share of the optimizer step.
        nll = -lp.sum() / n.sum()
        return nll * len(micro) / n_in_step, {"loss": float(nll.detach()), "logps/chosen": float(lp.detach().mean())}

    out_dir = Path(out_dir)
    info = run_loop(model=model, items=items, step_fn=step_fn, cfg=cfg, out_dir=out_dir.parent,
                    ckpt_dir=ckpt_dir, run_config={"stage": "sft", **_run_cfg(cfg), "base": str(base_dir)},
                    desc="SFT", acc=acc)
    summary = {**info, "tokenization": tok_summary, "config": cfg, "base_model": str(base_dir)}
    if acc.is_main_process:
        _save_model(model, tok, out_dir, merge=True)
        _write_json(out_dir.parent / "train_summary.json", summary)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    acc.wait_for_everyone()
    return summary


# ---------------------------------------------------------------------------------------------------
# Preference optimisation (any loss of rpo.losses)
# ---------------------------------------------------------------------------------------------------

def train_preference(*, ref_dir, pairs_path, reference_cache, out_dir, ckpt_dir, cfg: dict,
                     method: dict) -> dict:
    from rpo.data import read_pairs
    loss_name = method["loss"]
    loss_fn = losses.get_loss(loss_name)
    hparams = {k: v for k, v in method.items() if k not in ("loss", "name", "reference")}
    losses.check_hyperparameters(loss_name, hparams, where=f"method {method.get('name', loss_name)}")
    tok = load_tokenizer(ref_dir)
    items, tok_summary = tokenize_pairs(tok, read_pairs(pairs_path), max_length=cfg["max_length"],
                                        max_prompt_length=cfg["max_prompt_length"])
    cache = torch.load(reference_cache, weights_only=False)
    if cache["fingerprint"] != fingerprint(items):
        raise ValueError(f"{reference_cache}: reference log-probs were computed for another tokenisation "
                         f"or data ({pairs_path}); re-run the reference_logps rule")
    for i, it in enumerate(items):
        it["ref_c"], it["ref_r"] = float(cache["chosen_logps"][i]), float(cache["rejected_logps"][i])
    acc = accelerator()
    device = acc.device
    model = prepare_model(ref_dir, cfg, device)
    dpo = losses.get_loss("dpo")
    beta = hparams["beta"]
    # The loss without its SFT term (DPO for RPO, IPO for ipo+sft, the loss itself when it has none).
    pref_name = losses.preference_part(loss_name)
    pref_fn = losses.get_loss(pref_name)
    pref_hparams = {k: hparams[k] for k in losses.loss_hyperparameters(pref_name)}

    def step_fn(model, micro, n_in_step):
        b = len(micro)
        batch = {k: v.to(device) for k, v in pair_batch(micro, tok.pad_token_id).items()}
        with _autocast(device, cfg["precision"]):
            lp, n = summed_logps(model, batch)
        lp = lp.float()
        args = dict(policy_chosen_logps=lp[:b], policy_rejected_logps=lp[b:],
                    reference_chosen_logps=torch.tensor([it["ref_c"] for it in micro], device=device),
                    reference_rejected_logps=torch.tensor([it["ref_r"] for it in micro], device=device),
                    chosen_lengths=n[:b], rejected_lengths=n[b:])
        per_example = loss_fn(**args, **hparams)
        with torch.no_grad():
            dpo_part = dpo(**args, beta=beta)
            pref_part = pref_fn(**args, **pref_hparams)
            rc = losses.rewards(args["policy_chosen_logps"], args["reference_chosen_logps"], beta)
            rr = losses.rewards(args["policy_rejected_logps"], args["reference_rejected_logps"], beta)
        pe = per_example.detach()
        # loss = loss/pref + loss/sft; loss/dpo is the DPO loss of the same batch, for comparing methods
        m = {"loss": float(pe.mean()), "loss/dpo": float(dpo_part.mean()), "loss/pref": float(pref_part.mean()),
             "loss/sft": float((pe - pref_part).mean()),
             "rewards/chosen": float(rc.mean()), "rewards/rejected": float(rr.mean()),
             "rewards/margins": float((rc - rr).mean()), "rewards/accuracies": float((rc > rr).float().mean()),
             "logps/chosen": float(lp[:b].detach().mean()), "logps/rejected": float(lp[b:].detach().mean()),
             # The change from the reference on the same examples: batches differ in length, so the
             # raw batch mean above moves with the batch; this one moves only with training.
             "logratio/chosen": float(rc.mean()) / beta, "logratio/rejected": float(rr.mean()) / beta}
        return per_example.sum() / n_in_step, m

    out_dir = Path(out_dir)
    run_config = {"stage": "preference", **_run_cfg(cfg), "method": method, "ref": str(ref_dir),
                  "reference_cache": cache["fingerprint"]}
    info = run_loop(model=model, items=items, step_fn=step_fn, cfg=cfg, out_dir=out_dir.parent,
                    ckpt_dir=ckpt_dir, run_config=run_config, desc=f"train {method.get('name', loss_name)}",
                    acc=acc)
    summary = {**info, "tokenization": tok_summary, "config": cfg, "method": method,
               "reference_model": str(ref_dir), "finetuning": cfg["finetuning"]}
    if acc.is_main_process:
        _save_model(model, tok, out_dir, merge=False)
        _write_json(out_dir.parent / "train_summary.json", summary)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    acc.wait_for_everyone()
    return summary
