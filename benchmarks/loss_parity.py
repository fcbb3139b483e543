"""Loss parity: our `dpo` equals TRL's `sigmoid`, our `rpo_mean` equals TRL's ["sigmoid", "sft"].

    python -m benchmarks.loss_parity            # SmolLM2-135M, one batch of 4 pairs, ~1 min on CPU
    python -m benchmarks.loss_parity --smoke    # tiny random model

One model and one batch for both: the policy is the reference plus a LoRA adapter whose B matrices are
set to seeded random values (at initialisation B = 0, policy == reference and every DPO loss is ln 2, a
test of nothing; TRL, handed a PEFT model, would even copy its adapter as the reference, so TRL gets a
fresh adapter through `peft_config` and then our adapter's weights). Ours goes through the library's
own pieces, as the trainer's step does: the reference log-probs from the cache of
`rpo.train.reference_logps`, `rpo.train.pair_batch`, `rpo.batching.summed_logps`, the loss from
`rpo.losses`, averaged over the batch. TRL's is `DPOTrainer.compute_loss` on its own tokenisation and
collation of the same pairs (reference = the adapter disabled). Both losses and the gradients they
give the LoRA weights are compared.
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import common

NAME = "loss_parity"
TOL = 1e-5
BETA, ALPHA = 0.1, 0.5
CASES = [  # (our loss and hyperparameters, TRL loss_type, TRL loss_weights)
    ({"loss": "dpo", "beta": BETA}, ["sigmoid"], [1.0]),
    ({"loss": "rpo_mean", "beta": BETA, "alpha": ALPHA}, ["sigmoid", "sft"], [1.0, ALPHA]),
]


def make_policy(model_dir, cfg: dict, seed: int = 0, scale: float = 0.02):
    """Our LoRA policy with seeded non-zero B matrices: the same weights on every call."""
    from rpo.train import prepare_model
    torch.manual_seed(seed)  # LoRA A initialisation (newer prepare_model seeds it from cfg["seed"] itself)
    model = prepare_model(model_dir, {**cfg, "seed": seed}, "cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n.replace(".default", ""): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def ours(model_dir, rows, cache_path, cfg, method) -> dict:
    from rpo import losses, train
    from rpo.batching import summed_logps
    from rpo.models import load_tokenizer
    tok = load_tokenizer(model_dir)
    items, _ = train.tokenize_pairs(tok, rows, max_length=cfg["max_length"],
                                    max_prompt_length=cfg["max_prompt_length"])
    cache = torch.load(cache_path, weights_only=False)
    assert cache["fingerprint"] == train.fingerprint(items)
    model = make_policy(model_dir, cfg)
    b = len(items)
    lp, n = summed_logps(model, train.pair_batch(items, tok.pad_token_id))
    hp = {k: v for k, v in method.items() if k != "loss"}
    per_example = losses.get_loss(method["loss"])(
        policy_chosen_logps=lp[:b], policy_rejected_logps=lp[b:],
        reference_chosen_logps=cache["chosen_logps"], reference_rejected_logps=cache["rejected_logps"],
        chosen_lengths=n[:b], rejected_lengths=n[b:], **hp)
    loss = per_example.mean()  # the trainer's sum / n_in_step with one micro-batch per step
    loss.backward()
    return {"loss": float(loss), "grads": lora_grads(model),
            "logps_chosen": float(lp[:b].mean()), "logps_rejected": float(lp[b:].mean()),
            "ref_logps_chosen": float(cache["chosen_logps"].mean())}


def trl(model_dir, rows, cfg, loss_type, weights, beta, work) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from rpo.models import load_model, load_tokenizer
    tok = load_tokenizer(model_dir)
    base = load_model(model_dir)
    base.config.use_cache = False
    lora = cfg["lora"]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    args = DPOConfig(output_dir=str(work / "trl"), beta=beta, loss_type=loss_type, loss_weights=weights,
                     max_length=cfg["max_length"], gradient_checkpointing=False, bf16=False, use_cpu=True,
                     report_to=[], per_device_train_batch_size=len(rows), disable_tqdm=True)
    # A fresh adapter through peft_config, so that TRL's reference is the adapter disabled (a PEFT model
    # passed in would have its current adapter copied as the reference); then our policy's weights.
    trainer = DPOTrainer(model=base, args=args, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"],
                                                lora_dropout=lora["dropout"], target_modules=lora["target_modules"],
                                                task_type="CAUSAL_LM"))
    model = trainer.model
    ours_state = {n: p for n, p in make_policy(model_dir, cfg).named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(ours_state) == sorted(theirs), "the two trainers' LoRA parameters differ"
    with torch.no_grad():
        for n, p in theirs.items():
            p.copy_(ours_state[n])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    m = trainer._metrics["train"]
    return {"loss": float(loss), "grads": lora_grads(model),
            "logps_chosen": float(m["logps/chosen"][-1]) if "logps/chosen" in m else None,
            "logps_rejected": float(m["logps/rejected"][-1]) if "logps/rejected" in m else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    common.add_common_args(ap, NAME)
    ap.add_argument("--pairs", type=int, default=4, help="pairs in the batch")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        ap.error("loss parity runs on CPU in float32 (the tolerance is 1e-5)")
    common.set_threads(args)
    work = common.workdir(args, NAME)
    mdir = common.model_dir(args, work)
    lengths = common.lengths_for(args)
    from rpo import train
    from rpo.models import load_tokenizer
    tok = load_tokenizer(mdir)
    rows = common.make_pairs(tok, args.pairs, **lengths, seed=1)
    pairs = common.write_pairs(rows, work / "pairs.jsonl")
    cfg = {"finetuning": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": None,
                                          "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
           "max_length": lengths["max_length"], "max_prompt_length": lengths["max_prompt_length"], "seed": 0}
    cache = work / "reference.pt"
    train.reference_logps(mdir, pairs, cache, max_length=cfg["max_length"],
                          max_prompt_length=cfg["max_prompt_length"], batch_size=args.pairs)

    results, ok = [], True
    for method, loss_type, weights in CASES:
        a = ours(mdir, rows, cache, cfg, method)
        b = trl(mdir, rows, cfg, loss_type, weights, method["beta"], work)
        keys = sorted(a["grads"])
        assert keys == sorted(b["grads"]), "the two trainers' LoRA parameters differ"
        ga = torch.cat([a["grads"][k].flatten() for k in keys])
        gb = torch.cat([b["grads"][k].flatten() for k in keys])
        diff = abs(a["loss"] - b["loss"])
        grad_rel = float((ga - gb).norm() / gb.norm())
        row = {"ours": f"{method['loss']}({', '.join(f'{k}={v}' for k, v in method.items() if k != 'loss')})",
               "trl": f"{loss_type} w={weights}", "loss_ours": a["loss"], "loss_trl": b["loss"],
               "abs_diff": diff, "grad_rel_diff": grad_rel, "logps_chosen_ours": a["logps_chosen"],
               "logps_chosen_trl": b["logps_chosen"], "ref_logps_chosen": a["ref_logps_chosen"],
               "pass": diff <= TOL}
        ok &= row["pass"]
        results.append(row)
    print(f"model {mdir}, {args.pairs} pairs, tolerance {TOL}")
    table = common.print_table(results, ["ours", "trl", "loss_ours", "loss_trl", "abs_diff", "grad_rel_diff",
                                         "logps_chosen_ours", "logps_chosen_trl", "pass"])
    for r in results:  # the values in full, not rounded for the table
        print(f"{r['ours']}: ours {r['loss_ours']!r}  TRL {r['loss_trl']!r}  |diff| {r['abs_diff']:.3e}")
    out = common.write_json(common.out_path(args, NAME), {
        "benchmark": NAME, "machine": common.finish(common.machine()), "model_dir": str(mdir), "tolerance": TOL,
        "lengths": lengths, "config": cfg, "results": results, "all_pass": ok, "table": table})
    print(f"{'PASS' if ok else 'FAIL'}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
