"""Reference reuse: a sweep of k = 4 methods costs our trainer ONE pass of reference forwards.

    python -m benchmarks.reference_reuse            # SmolLM2-135M on CPU, 16 pairs x 4 methods, ~8 min
    python -m benchmarks.reference_reuse --smoke    # tiny random model

The sweep (DPO and RPO at three SFT weights, the same losses on both sides: our `dpo` / `rpo_mean` =
TRL's `sigmoid` / ["sigmoid", "sft"]) runs in one process per trainer, each method a fresh model and a
full training run of one epoch. Reference forwards are counted by a hook on the model body: every
forward that autograd does not record is a reference forward (ours: `rpo.train.reference_logps`, run
once before the sweep; TRL: the adapter-disabled forward in each step, or with
`precompute_ref_log_probs=True` its pass before each run). "Passes" = reference tokens / the real tokens
of one pass over the pairs (chosen and rejected sequences, prompt included).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.train_throughput import train_config

NAME = "reference_reuse"
BETA = 0.1
SWEEP = [{"name": "dpo", "loss": "dpo", "beta": BETA}] + [
    {"name": f"rpo_a{a}", "loss": "rpo_mean", "beta": BETA, "alpha": a} for a in (0.2, 0.5, 1.0)]
MODES = ("ours", "trl", "trl-precompute")


def sweep_ours(spec: dict) -> dict:
    from rpo import train
    probe = common.Probe(spec["device"])
    train.summed_logps = probe.wrap(train.summed_logps)  # every log-prob pass of the sweep is counted
    work, cfg = Path(spec["run_dir"]), spec["cfg"]
    t0 = time.perf_counter()
    train.reference_logps(spec["model_dir"], spec["pairs"], work / "reference.pt", max_length=cfg["max_length"],
                          max_prompt_length=cfg["max_prompt_length"], batch_size=cfg["micro_batch_size"],
                          dtype=cfg["precision"])
    per_method = []
    for method in SWEEP:
        t = time.perf_counter()
        train.train_preference(ref_dir=spec["model_dir"], pairs_path=spec["pairs"],
                               reference_cache=work / "reference.pt", out_dir=work / method["name"] / "model",
                               metrics_path=work / method["name"] / "metrics.jsonl",
                               summary_path=work / method["name"] / "train_summary.json",
                               ckpt_dir=work / f"ckpt-{method['name']}", cfg=cfg, method=method)
        per_method.append({"method": method["name"], "seconds": time.perf_counter() - t})
    return {"seconds": time.perf_counter() - t0, "reference": probe.reference_totals(), "per_method": per_method,
            "peak_mib": common.peak_memory_mib(spec["device"])}


def sweep_trl(spec: dict, precompute: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from rpo.data import read_pairs
    from rpo.models import load_model, load_tokenizer
    work, cfg, device = Path(spec["run_dir"]), spec["cfg"], spec["device"]
    rows = read_pairs(spec["pairs"])
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    probe = common.Probe(device)
    t0 = time.perf_counter()
    per_method = []
    for method in SWEEP:
        t = time.perf_counter()
        before = probe.reference_totals()["forwards"]
        tok = load_tokenizer(spec["model_dir"])
        model = load_model(spec["model_dir"], dtype="float32", device=device)
        model.config.use_cache = False
        probe.attach(model)
        lora = cfg["lora"]
        n = model.config.num_hidden_layers
        layers = list(range(n - lora["top_layers"], n)) if lora.get("top_layers") else None
        loss_type, weights = (["sigmoid"], [1.0]) if method["loss"] == "dpo" else \
            (["sigmoid", "sft"], [1.0, method["alpha"]])
        args = DPOConfig(
            output_dir=str(work / method["name"]), seed=cfg["seed"],
            per_device_train_batch_size=cfg["micro_batch_size"],
            num_train_epochs=cfg["epochs"], learning_rate=cfg["learning_rate"], lr_scheduler_type=cfg["lr_scheduler"],
            warmup_steps=cfg["warmup_ratio"], max_grad_norm=cfg["max_grad_norm"], optim="adamw_torch",
            beta=method["beta"], loss_type=loss_type, loss_weights=weights, max_length=cfg["max_length"],
            precompute_ref_log_probs=precompute, precompute_ref_batch_size=cfg["micro_batch_size"],
            gradient_checkpointing=False, bf16=cfg["precision"] == "bfloat16", use_cpu=device == "cpu",
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                    lora_dropout=lora["dropout"],
                                                    target_modules=lora["target_modules"],
                                                    layers_to_transform=layers, task_type="CAUSAL_LM"))
        trainer.train()
        trainer.save_model(str(work / method["name"] / "model"))  # as ours saves its adapter
        per_method.append({"method": method["name"], "seconds": time.perf_counter() - t,
                           "reference_forwards": probe.reference_totals()["forwards"] - before})
    return {"seconds": time.perf_counter() - t0, "reference": probe.reference_totals(), "per_method": per_method,
            "peak_mib": common.peak_memory_mib(device)}


def worker_main(spec_path: str, mode: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # Imports happen before the clock starts, for both trainers.
    import trl  # noqa: F401

    import rpo.train  # noqa: F401
    res = sweep_ours(spec) if mode == "ours" else sweep_trl(spec, precompute=mode == "trl-precompute")
    Path(result_path).write_text(json.dumps(res))


def one_pass_tokens(spec: dict) -> int:
    """Real tokens of one pass over the pairs: chosen and rejected sequences, prompt included."""
    from rpo.data import read_pairs
    from rpo.models import load_tokenizer
    from rpo.train import tokenize_pairs
    cfg = spec["cfg"]
    items, _ = tokenize_pairs(load_tokenizer(spec["model_dir"]), read_pairs(spec["pairs"]),
                              max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"])
    return sum(2 * len(it["prompt"]) + len(it["chosen"]) + len(it["rejected"]) for it in items)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    common.add_common_args(ap, NAME)
    ap.add_argument("--pairs", type=int, default=16, help="training pairs (one epoch per method)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lora-top-layers", type=int, default=8)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    common.add_worker_args(ap)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.spec, args.worker, args.result)
        return 0
    if args.smoke:
        args.pairs = min(args.pairs, 8)
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; expected one of {MODES}")
    common.set_threads(args)
    work = common.workdir(args, NAME)
    mdir = common.model_dir(args, work)
    lengths = common.lengths_for(args)
    args.steps, args.warmup = 1, 0  # train_config's max_steps: replaced by one epoch below
    # trunk_cache off: this figure counts reference forwards (the trunk changes only the policy's) and was
    # measured without it
    cfg = {**train_config(args, lengths), "max_steps": None, "epochs": 1, "trunk_cache": False}
    cfg["lora"]["top_layers"] = args.lora_top_layers or None
    from rpo.models import load_tokenizer
    pairs = common.write_pairs(common.make_pairs(load_tokenizer(mdir), args.pairs, **lengths, seed=2),
                               work / "pairs.jsonl")
    spec = {"model_dir": str(mdir), "pairs": str(pairs), "cfg": cfg, "device": args.device,
            "threads": args.threads}
    one_pass = one_pass_tokens(spec)
    info = common.machine(args.device)
    print(f"model {mdir}, {args.pairs} pairs, sweep {[m['name'] for m in SWEEP]}, modes {modes}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for mode in modes:
            run_dir = Path(tmp) / mode
            run_dir.mkdir()
            (run_dir / "spec.json").write_text(json.dumps({**spec, "run_dir": str(run_dir)}))
            log = run_dir / "log.txt"
            with log.open("w") as f:
                proc = subprocess.run([sys.executable, "-m", f"benchmarks.{NAME}", "--worker", mode, "--spec",
                                       str(run_dir / "spec.json"), "--result", str(run_dir / "result.json")],
                                      cwd=common.ROOT, stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} failed; log:\n" + "\n".join(log.read_text().splitlines()[-30:]))
            res = json.loads((run_dir / "result.json").read_text())
            rows.append({"trainer": mode, "methods": len(SWEEP), "sweep_s": res["seconds"],
                         "reference_forwards": res["reference"]["forwards"],
                         "reference_tokens": res["reference"]["tokens"],
                         "reference_passes": res["reference"]["tokens"] / one_pass,
                         "peak_mib": res["peak_mib"], "per_method": res["per_method"]})
            print(f"  {mode}: {res['seconds']:.1f} s, {rows[-1]['reference_passes']:.2f} reference passes",
                  flush=True)
    by = {r["trainer"]: r for r in rows}
    if "ours" in by:
        for r in rows:
            r["sweep_time_vs_ours"] = r["sweep_s"] / by["ours"]["sweep_s"]
    table = common.print_table(rows, ["trainer", "methods", "reference_forwards", "reference_passes", "sweep_s",
                                      "sweep_time_vs_ours", "peak_mib"])
    ok = "ours" not in by or by["ours"]["reference_tokens"] == one_pass
    out = common.write_json(common.out_path(args, NAME), {
        "benchmark": NAME, "machine": common.finish(info), "model_dir": str(mdir), "lengths": lengths, "config": cfg,
        "sweep": SWEEP, "one_pass_tokens": one_pass, "ours_exactly_one_pass": ok, "results": rows,
        "table": table})
    print(f"one pass = {one_pass} tokens; ours exactly one pass: {ok}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
