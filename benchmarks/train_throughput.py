"""Training throughput: our trainer (rpo.train.train_preference) vs TRL's DPOTrainer, same everything.

    python -m benchmarks.train_throughput                       # SmolLM2-135M on CPU, ~34 min on 2 cores
    python -m benchmarks.train_throughput --smoke               # tiny random model, seconds
    python -m benchmarks.train_throughput --device cuda --shape 8b --steps 20   # a GPU (benchmarks/gpu_check.py)

Both trainers get the same model weights, pairs, batches in the same order (TRL's sampler set to
sequential over the pairs laid out in our trainer's seeded step order), sequence lengths (no pair is
truncated by either), micro-batch, LoRA config, precision, AdamW with the same lr, betas, weight decay
and clipping. TRL runs with `gradient_checkpointing=False` and the precision we run (its defaults are
True and bf16), LoRA through its own `peft_config`. RPO is our `rpo_mean`, which is TRL's
`loss_type=["sigmoid", "sft"]`, so the step-1 losses of the two trainers must agree (printed).

Variants, each `<trainer>:<dpo|rpo>`:
    ours            the default: packed rows (prompt shared by chosen and rejected), sdpa with a 4-D mask,
                    and with LoRA on the top layers only (--lora-top-layers, the quickstart's 8) every forward
                    starts at the first LoRA layer from the frozen trunk the reference pass wrote (rpo.trunk)
    ours-no-trunk   training.trunk_cache false: every forward runs all layers
    ours-unpacked   training.share_prompts false: one padded row per sequence, sdpa on the 2-D mask
    ours-flex       training.attention flex_attention: the packed rows with a FlexAttention BlockMask
    trl             DPOTrainer as configured above: a reference forward (adapter disabled) every step
    trl-precompute  precompute_ref_log_probs=True (its reference pass is in its set-up, not in the steps)
    trl-liger       use_liger_kernel=True: Liger's Triton RMSNorm, RoPE and SwiGLU in every layer (TRL 1.16
                    turns off Liger's fused linear cross-entropy, it patches the LM head itself)
    trl-precompute-liger   both
    trl-padding-free       padding_free=True
Each run checks that the path it names ran: the masks our model was handed (BlockMask / 4-D / 2-D, per
policy forward), whether its forwards started from the trunk (the layer calls skipped), the number of
Liger-patched modules; a variant that cannot run here is listed as skipped
with the exact reason (FlexAttention: torch 2.13 has no backward on CPU; Liger: liger-kernel missing, or
Triton's "0 active drivers" without a GPU), never replaced by another path.

What TRL 1.16 does with these (read in trl/trainer/dpo_trainer.py, and reported by every run):
`padding_free=True` logs "`padding_free=True` is temporarily unavailable after a refactor and is
currently disabled. Falling back to standard padding" and sets it back to False, so `trl-padding-free`
is the default TRL run (its `padding_free_in_effect` is False). `use_liger_kernel=True` warns that it
is deprecated in favour of Hub kernels (`model_init_kwargs={"use_kernels": True}`, which needs the Hub
and a model given by name: not available offline, not run). FlashAttention-2 packing is not available:
no flash-attn package.

Every run is a fresh subprocess (peak memory is per process, measured the same way for every variant:
peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA, at the end of the run), and the runs are
interleaved, the order reversed every other repeat, so that a drift in the shared machine's load hits
every variant alike. Our trainer is measured through `rpo.train.train_preference` itself: hooks only
time-stamp its optimizer steps and count the forwards of the model body. Its reference log-probs (and the
trunk) come from the cache written once by `rpo.train.reference_logps` (timed separately, "reference
pass"; TRL's precompute variants do their reference pass in their set-up, "init_seconds").

Tokens/s counts the real (unpadded) prompt + response tokens of the chosen and rejected sequences that
the policy processed, over the measured steps (after `--warmup` steps), divided by their wall time. Each
of our variants is compared with the default TRL run and with the BEST TRL variant that ran for the same
loss (the highest tokens/s): speed, peak memory and step-1 loss.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common

NAME = "train_throughput"
LOSSES = {"dpo": "dpo", "rpo": "rpo_mean"}  # our loss names; TRL's loss_type follows from them
# trainer variant -> its options (module docstring)
TRAINERS = {
    "ours": {"trainer": "ours", "attention": "sdpa", "share_prompts": True, "mask": "4-D", "trunk": True},
    "ours-no-trunk": {"trainer": "ours", "attention": "sdpa", "share_prompts": True, "mask": "4-D", "trunk": False},
    "ours-unpacked": {"trainer": "ours", "attention": "sdpa", "share_prompts": False, "mask": "2-D", "trunk": True},
    "ours-flex": {"trainer": "ours", "attention": "flex_attention", "share_prompts": True, "mask": "BlockMask",
                  "trunk": True},
    "trl": {"trainer": "trl"},
    "trl-precompute": {"trainer": "trl", "precompute": True},
    "trl-liger": {"trainer": "trl", "liger": True},
    "trl-precompute-liger": {"trainer": "trl", "precompute": True, "liger": True},
    "trl-padding-free": {"trainer": "trl", "padding_free": True},
}
VARIANTS = {f"{t}:{l}": {**opts, "loss": loss} for t, opts in TRAINERS.items() for l, loss in LOSSES.items()}
DEFAULT_VARIANTS = ",".join(f"{t}:rpo" for t in TRAINERS) + ",ours:dpo,ours-no-trunk:dpo,trl:dpo,trl-precompute:dpo"
STEP1_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # relative, max(1, |loss|): bf16 rounds at ~4e-3
BETA, ALPHA = 0.1, 1.0


def train_config(args, lengths: dict) -> dict:
    """The quickstart's DPO/RPO training config (config/config.yaml, `training:`), sized to the run."""
    steps = args.warmup + args.steps
    mb = args.micro_batch
    return {"finetuning": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": args.lora_top_layers,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                        "gate_proj", "up_proj", "down_proj"]},
            "learning_rate": 5e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "epochs": 1,
            "max_steps": steps, "micro_batch_size": mb, "global_batch_size": mb,
            "max_length": lengths["max_length"], "max_prompt_length": lengths["max_prompt_length"],
            "weight_decay": 0.0, "max_grad_norm": 1.0, "trunk_cache": True,
            "precision": args.precision or ("bfloat16" if args.device == "cuda" else "float32"),
            "checkpoint_every": 10**9,  # neither trainer checkpoints inside the timed steps
            "seed": 42, "threads": args.threads or torch.get_num_threads()}


def method_of(loss: str) -> dict:
    return {"name": loss, "loss": "dpo", "beta": BETA} if loss == "dpo" else \
        {"name": loss, "loss": "rpo_mean", "beta": BETA, "alpha": ALPHA}


# ---------------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ---------------------------------------------------------------------------------------------------

def worker_reference(spec: dict) -> dict:
    """Our one-off reference pass (rpo.train.reference_logps), written to the cache the runs share."""
    import time
    from rpo import train, trunk
    cfg = spec["cfg"]
    top = trunk.top_layers_of(cfg)  # the trunk of the default config: ours:*'s runs read it
    t0 = time.perf_counter()
    train.reference_logps(spec["model_dir"], spec["pairs"], spec["cache"], max_length=cfg["max_length"],
                          max_prompt_length=cfg["max_prompt_length"], batch_size=spec["ref_batch_size"],
                          dtype=cfg["precision"], top_layers=top, trunk_path=spec["trunk"] if top else None)
    if spec["device"] == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "peak_mib": common.peak_memory_mib(spec["device"])}


def worker_ours(spec: dict, opts: dict) -> dict:
    from rpo import train, trunk
    cfg = {**spec["cfg"], "attention": opts["attention"], "share_prompts": opts["share_prompts"],
           "trunk_cache": opts["trunk"]}
    probe = common.Probe(spec["device"]).start_step_clock()
    train.summed_logps = probe.wrap(train.summed_logps)  # observes the trainer's own calls
    work = Path(spec["run_dir"])
    summary = train.train_preference(
        ref_dir=spec["model_dir"], pairs_path=spec["pairs"], reference_cache=spec["cache"],
        out_dir=work / "out" / "model", metrics_path=work / "out" / "metrics.jsonl",
        summary_path=work / "out" / "train_summary.json", ckpt_dir=work / "ckpt", cfg=cfg,
        method=method_of(opts["loss"]), trunk_path=spec["trunk"] if trunk.top_layers_of(cfg) else None)
    metrics = [json.loads(l) for l in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    return {"steps": probe.measured(spec["warmup"]), "n_steps": len(probe.steps),
            "step1_loss": metrics[0]["loss"], "losses": [m["loss"] for m in metrics],
            "peak_mib": common.peak_memory_mib(spec["device"]),
            "attention": summary["attention"], "policy_masks": probe.masks, "trunk": summary["trunk"]}


def worker_trl(spec: dict, opts: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from rpo import loop
    from rpo.data import read_pairs
    from rpo.models import load_model, load_tokenizer
    cfg, device = spec["cfg"], spec["device"]
    torch.manual_seed(cfg["seed"])
    rows = read_pairs(spec["pairs"])
    # Our trainer's seeded step order, laid out for TRL's sequential sampler: the same batches.
    order = [i for step in loop.schedule(len(rows), cfg, cfg["seed"]) for i in step]
    data = Dataset.from_list([{k: rows[i][k] for k in ("prompt", "chosen", "rejected")} for i in order])
    tok = load_tokenizer(spec["model_dir"])
    model = load_model(spec["model_dir"], dtype="float32", device=device)
    model.config.use_cache = False
    probe = common.Probe(device).attach(model)
    n_layers = model.config.num_hidden_layers
    lora = cfg["lora"]
    layers = list(range(n_layers - lora["top_layers"], n_layers)) if lora.get("top_layers") else None
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], layers_to_transform=layers,
                             task_type="CAUSAL_LM")
    method = method_of(opts["loss"])
    loss_type, weights = ((["sigmoid"], [1.0]) if opts["loss"] == "dpo"
                          else (["sigmoid", "sft"], [1.0, method["alpha"]]))
    args = DPOConfig(
        output_dir=str(Path(spec["run_dir"]) / "trl"), seed=cfg["seed"], data_seed=cfg["seed"],
        per_device_train_batch_size=cfg["micro_batch_size"],
        gradient_accumulation_steps=cfg["global_batch_size"] // cfg["micro_batch_size"],
        max_steps=cfg["max_steps"], learning_rate=cfg["learning_rate"], lr_scheduler_type=cfg["lr_scheduler"],
        warmup_steps=cfg["warmup_ratio"], weight_decay=cfg["weight_decay"], max_grad_norm=cfg["max_grad_norm"],
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
        beta=method["beta"], loss_type=loss_type, loss_weights=weights,
        max_length=cfg["max_length"], precompute_ref_log_probs=opts.get("precompute", False),
        precompute_ref_batch_size=spec["ref_batch_size"],
        use_liger_kernel=opts.get("liger", False), padding_free=opts.get("padding_free", False),
        gradient_checkpointing=False, bf16=cfg["precision"] == "bfloat16", fp16=False,
        use_cpu=device == "cpu", train_sampling_strategy="sequential", dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True)
    import time
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft_config)
    init_s = time.perf_counter() - t0
    precompute_forwards = probe.reference_totals()
    probe.start_step_clock()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # Liger patches module instances in place; a patched module names itself Liger*
    liger_modules = sum(m._get_name().startswith("Liger") for m in trainer.model.modules())
    return {"steps": probe.measured(spec["warmup"]), "n_steps": len(probe.steps), "step1_loss": losses[0],
            "init_seconds": init_s, "precompute_reference": precompute_forwards,
            "peak_mib": common.peak_memory_mib(device), "policy_masks": probe.masks,
            "liger_modules": liger_modules, "padding_free_in_effect": bool(trainer.padding_free)}


def why_not(opts: dict, device: str) -> str | None:
    """The exact reason a variant cannot run on `device` here, or None."""
    if opts.get("attention") == "flex_attention":
        from rpo.batching import flex_attention_problem
        problem = flex_attention_problem(device, backward=True)
        return f"FlexAttention cannot train on {device} (torch {torch.__version__}): {problem}" if problem else None
    if opts.get("liger"):
        problem = common.liger_problem(device)
        return f"use_liger_kernel cannot run on {device}: {problem}" if problem else None
    return None


def worker_main(spec_path: str, variant: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if variant == "reference":
        res = worker_reference(spec)
    else:
        opts = VARIANTS[variant]
        reason = why_not(opts, spec["device"])
        if reason:
            res = {"skipped": reason}
        else:
            res = worker_ours(spec, opts) if opts["trainer"] == "ours" else worker_trl(spec, opts)
    Path(result_path).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------

def run_worker(spec_path: Path, variant: str, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = json.loads(spec_path.read_text())
    spec["run_dir"] = str(run_dir)
    local = run_dir / "spec.json"
    local.write_text(json.dumps(spec))
    result = run_dir / "result.json"
    log = run_dir / "log.txt"
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--worker", variant,
                               "--spec", str(local), "--result", str(result)],
                              cwd=common.ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}); log: {log}\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))
    return json.loads(result.read_text())


def summarise(variant: str, runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["steps"]]
    secs = [s["seconds"] for s in steps]
    tokens = sum(s["policy_tokens"] for s in steps)
    masks: dict[str, int] = {}
    for r in runs:
        for k, n in r["policy_masks"].items():
            masks[k] = masks.get(k, 0) + n
    extra = {k: runs[0][k] for k in ("attention", "trunk", "liger_modules", "padding_free_in_effect") if k in runs[0]}
    return {"variant": variant, "status": "ran", "runs": len(runs), "measured_steps": len(steps),
            "median_step_s": common.median(secs), "tokens_per_s": tokens / sum(secs),
            "tokens_per_step": tokens / len(steps),
            "reference_forwards_per_step": sum(s["reference_forwards"] for s in steps) / len(steps),
            "peak_mib": max(r["peak_mib"] for r in runs), "peak_mib_runs": [r["peak_mib"] for r in runs],
            "step1_loss": runs[0]["step1_loss"], "policy_masks": masks, **extra,
            **({"losses": runs[0]["losses"]} if "losses" in runs[0] else {}),
            "step_seconds": [[round(s["seconds"], 4) for s in r["steps"]] for r in runs],
            **({"init_seconds": [round(r["init_seconds"], 2) for r in runs],
                "precompute_reference": runs[0]["precompute_reference"]} if "init_seconds" in runs[0] else {})}


def check_path(row: dict, top_layers) -> None:
    """Raise when a variant's run did not take the path its name claims (no silent fallback); the trunk is
    the claim only with LoRA on the top layers (`top_layers`)."""
    opts = VARIANTS[row["variant"]]
    if opts["trainer"] == "ours":
        if row["attention"] != opts["attention"] or set(row["policy_masks"]) != {opts["mask"]}:
            raise RuntimeError(f"{row['variant']} claims {opts['attention']} with {opts['mask']} masks, but its "
                               f"model ran {row['attention']} on masks {row['policy_masks']}")
        trunk = row["trunk"]
        if (opts["trunk"] and bool(top_layers)) != bool(trunk and trunk["layer_calls_skipped"]):
            raise RuntimeError(f"{row['variant']} claims trunk={opts['trunk']}, but its run had trunk {trunk}")
    elif opts.get("liger") and not row["liger_modules"]:
        raise RuntimeError(f"{row['variant']}: use_liger_kernel=True but no module was patched by Liger")


def compare(rows: list[dict], precision: str) -> dict:
    """Each of our variants against TRL's default and its best variant that ran, per loss; returns the
    best TRL variant of each loss."""
    tol = STEP1_TOLERANCE[precision]
    best = {}
    for loss in LOSSES:
        trl = [r for r in rows if r["status"] == "ran" and VARIANTS[r["variant"]]["trainer"] == "trl"
               and r["variant"].endswith(":" + loss)]
        if trl:
            best[loss] = max(trl, key=lambda r: r["tokens_per_s"])["variant"]
    by = {r["variant"]: r for r in rows}
    for r in rows:
        loss = r["variant"].split(":")[1]
        if r["status"] != "ran" or VARIANTS[r["variant"]]["trainer"] != "ours":
            continue
        for tag, other in (("trl", f"trl:{loss}"), ("best_trl", best.get(loss))):
            o = by.get(other)
            if not o or o["status"] != "ran":
                continue
            diff = abs(r["step1_loss"] - o["step1_loss"])
            r.update({f"speedup_vs_{tag}": r["tokens_per_s"] / o["tokens_per_s"],
                      f"memory_vs_{tag}": r["peak_mib"] / o["peak_mib"],
                      f"step1_loss_diff_vs_{tag}": diff,
                      f"step1_loss_agrees_{tag}": diff <= tol * max(1.0, abs(o["step1_loss"]))})
            if tag == "best_trl":
                r["best_trl"] = other
    return best


COLUMNS = ["variant", "status", "measured_steps", "median_step_s", "tokens_per_s", "peak_mib",
           "reference_forwards_per_step", "step1_loss", "speedup_vs_trl", "best_trl", "speedup_vs_best_trl",
           "memory_vs_best_trl", "step1_loss_diff_vs_best_trl"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    common.add_common_args(ap, NAME)
    ap.add_argument("--steps", type=int, default=6, help="measured optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="steps run before measuring (>= 1)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved")
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch (= global batch)")
    ap.add_argument("--lora-top-layers", type=int, default=8,
                    help="LoRA on the top k layers (the quickstart's 8; --smoke: 1); 0 = every layer (no trunk)")
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default=None,
                    help="training precision (default: bfloat16 on cuda, float32 on cpu; bfloat16 on cpu is autocast)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {sorted(VARIANTS)}, or all")
    common.add_worker_args(ap)
    return ap


def parse_variants(ap: argparse.ArgumentParser, text: str) -> list[str]:
    variants = list(VARIANTS) if text == "all" else text.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; expected one of {sorted(VARIANTS)}")
    return variants


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.spec, args.worker, args.result)
        return 0
    if args.smoke:  # LoRA on the top layer of the tiny model's 2: the trunk path runs too
        args.steps, args.warmup, args.repeats = min(args.steps, 2), 1, 1
        args.lora_top_layers = min(args.lora_top_layers, 1)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (a measured step needs the previous step's end as its start)")
    args.lora_top_layers = args.lora_top_layers or None
    variants = parse_variants(ap, args.variants)
    common.set_threads(args)
    work = common.workdir(args, NAME)
    mdir = common.model_dir(args, work)
    lengths = common.lengths_for(args)
    cfg = train_config(args, lengths)
    from rpo.models import load_tokenizer
    tok = load_tokenizer(mdir)
    n_pairs = cfg["micro_batch_size"] * cfg["max_steps"]
    pairs = common.write_pairs(common.make_pairs(tok, n_pairs, **lengths), work / "pairs.jsonl")
    spec = {"model_dir": str(mdir), "pairs": str(pairs), "cache": str(work / "reference.pt"),
            "trunk": str(work / "reference_trunk.f32"), "cfg": cfg,
            "device": args.device, "warmup": args.warmup, "ref_batch_size": cfg["micro_batch_size"],
            "threads": args.threads}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    info = common.machine(args.device)
    print(f"model {mdir}, {n_pairs} pairs, {args.repeats} x {variants}, {args.warmup}+{args.steps} steps each; "
          f"{info['cpu_count']} CPUs, torch {info['versions']['torch']}, trl {info['versions']['trl']}",
          flush=True)

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        tmp = Path(tmp)
        reference = run_worker(spec_path, "reference", tmp / "reference")
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        skipped: dict[str, str] = {}
        for rep in range(args.repeats):
            for v in (variants if rep % 2 == 0 else variants[::-1]):
                if v in skipped:
                    continue
                res = run_worker(spec_path, v, tmp / f"{v.replace(':', '_')}-{rep}")
                if "skipped" in res:
                    skipped[v] = res["skipped"]
                    print(f"  {v}: skipped: {res['skipped']}", flush=True)
                    continue
                runs[v].append(res)
                print(f"  repeat {rep} {v}: median step "
                      f"{common.median([s['seconds'] for s in res['steps']]):.3f} s, "
                      f"peak {res['peak_mib']:.0f} MiB",
                      flush=True)

    rows = [summarise(v, runs[v]) if v not in skipped else {"variant": v, "status": "skipped",
                                                            "reason": skipped[v]} for v in variants]
    for r in rows:
        if r["status"] == "ran":
            check_path(r, cfg["lora"]["top_layers"])
    best = compare(rows, cfg["precision"])
    table = common.print_table(rows, COLUMNS)
    for v, reason in skipped.items():
        print(f"skipped {v}: {reason}")
    for r in rows:
        if r["status"] == "ran" and r.get("padding_free_in_effect") is False and VARIANTS[r["variant"]].get("padding_free"):
            print(f"{r['variant']}: padding_free=True requested, not in effect (TRL {info['versions']['trl']} "
                  "falls back to padding)")
    for r in rows:
        if "best_trl" in r:
            print(f"{r['variant']} vs the best TRL variant that ran, {r['best_trl']}: {r['speedup_vs_best_trl']:.3g}x "
                  f"its tokens/s at {r['memory_vs_best_trl']:.3g}x its peak memory; step-1 loss "
                  f"{r['step1_loss']:.6g} vs {by_name(rows, r['best_trl'])['step1_loss']:.6g} "
                  f"({'agrees' if r['step1_loss_agrees_best_trl'] else 'DIFFERS'})")
    print(f"our reference pass (once, shared by every method): {reference['seconds']:.2f} s, "
          f"peak {reference['peak_mib']:.0f} MiB", flush=True)
    ran = [r for r in rows if r["status"] == "ran"]
    result = {
        "benchmark": NAME, "machine": common.finish(info), "model_dir": str(mdir), "lengths": lengths,
        "shape": args.shape or ("tiny" if args.smoke else None), "config": cfg,
        "methods": {"dpo": method_of("dpo"), "rpo": method_of("rpo_mean")},
        "tokens_per_step_equal": len({round(r["tokens_per_step"], 6) for r in ran}) == 1,
        "step1_tolerance": STEP1_TOLERANCE[cfg["precision"]], "best_trl": best, "skipped": skipped,
        "reference_pass": reference, "results": rows, "table": table}
    out = common.write_json(common.out_path(args, NAME), result)
    common.write_csv(out.with_suffix(".csv"), rows, COLUMNS + ["reason"])
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


def by_name(rows: list[dict], variant: str) -> dict:
    return next(r for r in rows if r["variant"] == variant)


if __name__ == "__main__":
    sys.exit(main())
