"""The round trainer on a tiny model (issue 27): SuperHF's KL term is 0 at initialisation (LoRA B = 0) and with
kl_coef 0 its loss is the kept completions' NLL (computed independently through transformers' own loss); INPO's
first step sits at (1/(2η))² and iterative DPO against the previous policy restarts at ln 2; APO's round policies
are the weight-space extrapolation of the trained ones; a round that starts from the previous one continues its
adapter.

Run: pytest tests/test_round_train.py -q     (about a minute on 2 CPU cores)
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from rpo import apo, io
from rpo import round_train as rt
from rpo.models import load_model, load_tokenizer
from rpo.train import prepare_model

CFG = {"finetuning": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": 1,
                                      "target_modules": ["q_proj", "v_proj"]}, "trunk_cache": True,
       "learning_rate": 5e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "epochs": 3, "max_steps": None,
       "micro_batch_size": 2, "global_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
       "weight_decay": 0.0, "max_grad_norm": 10.0, "precision": "float32", "checkpoint_every": 10,
       "snapshot_every": 0, "seed": 0, "threads": 1, "attention": "sdpa"}
ROUNDS = {"reference": "initial", "extrapolation": 0.0}


def prompt(i):
    return [{"role": "user", "content": f"write a short answer in lowercase letters only {i}"}]


PAIRS = [{"id": f"p{i}", "prompt": prompt(i), "responses": [f"hello world this is answer {i}", f"HELLO World {i}"],
          "scores": [1.0, 0.0], "reference_response": f"hello {i}"} for i in range(4)]
KEPT = [{"id": f"p{i}-k0", "prompt": prompt(i), "responses": [f"hello world this is answer {i}"], "scores": [1.0]}
        for i in range(4)]


def run_round(tmp_path, tiny_model_dir, name, method, rows, r=1, start=None, previous_proximal=None, cfg=CFG):
    io.write_jsonl(rows, tmp_path / f"{name}.jsonl")
    d = tmp_path / name / f"round{r}"
    summary = rt.train_round(ref_dir=tiny_model_dir, selected=tmp_path / f"{name}.jsonl", out_dir=d / "model",
                             metrics_path=d / "metrics.jsonl", summary_path=d / "summary.json",
                             ckpt_dir=tmp_path / "ckpt" / name / str(r), cfg=cfg, method={"name": name, **method},
                             round=r, start_dir=start, previous_proximal=previous_proximal)
    return d, summary, io.read_jsonl(d / "metrics.jsonl")


def test_superhf_kl_is_zero_at_init_and_kl_coef_zero_is_the_kept_nll(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    items, _ = rt.tokenize_rows(tok, KEPT, kind="kept", max_length=64, max_prompt_length=32)
    model = prepare_model(tiny_model_dir, CFG, "cpu")  # a fresh LoRA: B = 0, the policy is the reference
    layer = 1  # LoRA on the top 1 of 2 layers: the trunk is layer 1's input
    model.eval()
    with model.disable_adapter():
        ref = rt.logps_pass(model, items, tok.pad_token_id, "cpu", batch_size=4, precision="float32", layer=layer)
    for it, lp in zip(items, ref):
        it["ref"] = it["prev"] = lp
    step = rt.superhf_step({"kl_coef": 0.0}, reference_model=None, pad_id=tok.pad_token_id, device="cpu",
                           precision="float32", layer=layer)
    loss, m = step(model, items, items)
    assert m["kl"] == 0.0  # identical next-token distributions at every position: exactly 0
    # the same loss by transformers: the model's mean cross-entropy over the completions' tokens (prompt masked)
    base = load_model(tiny_model_dir).eval()
    ids = [it["prompt"] + it["seqs"][0] for it in items]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    attn = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (it, x) in enumerate(zip(items, ids)):
        input_ids[i, :len(x)] = torch.tensor(x)
        labels[i, len(it["prompt"]):len(x)] = torch.tensor(it["seqs"][0])
        attn[i, :len(x)] = 1
    with torch.no_grad():
        expected = base(input_ids=input_ids, attention_mask=attn, labels=labels).loss
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    # with a KL weight the loss is unchanged at init (the KL term is 0) and the clamp keeps it >= 0 after
    loss_kl, _ = rt.superhf_step({"kl_coef": 0.35}, reference_model=None, pad_id=tok.pad_token_id, device="cpu",
                                 precision="float32", layer=layer)(model, items, items)
    assert float(loss_kl.detach()) == float(loss.detach())


def test_inpo_starts_at_its_target_and_iterative_dpo_at_ln2(tmp_path, tiny_model_dir):
    eta = 0.5
    _, _, m1 = run_round(tmp_path, tiny_model_dir, "inpo", {"loss": "inpo", "eta": eta, "ratio": 1 / 3,
                                                             "rounds": ROUNDS}, PAIRS)
    # π = π_t = π_ref at the first step of round 1: h_t = 0, loss (0 - 1/(2 eta))^2
    assert math.isclose(m1[0]["loss"], (1 / (2 * eta)) ** 2, abs_tol=1e-4)
    assert m1[-1]["loss"] < m1[0]["loss"]
    dpo = {"loss": "dpo", "beta": 0.1, "rounds": {**ROUNDS, "reference": "previous"}}
    d1, _, _ = run_round(tmp_path, tiny_model_dir, "idpo", dpo, PAIRS)
    d2, s2, m2 = run_round(tmp_path, tiny_model_dir, "idpo", dpo, PAIRS, r=2, start=d1 / "model")
    # round 2 starts from round 1's policy, which is also its reference: DPO's loss at margin 0
    assert math.isclose(m2[0]["loss"], math.log(2), abs_tol=1e-4)
    assert s2["start_model"] == str(d1 / "model") and s2["reference_logps"] == "previous policy"
    # and from round 1's adapter, not a fresh one: its first-step log-ratio against the reference is round 1's end
    assert abs(m2[0]["logratio/chosen"]) > 1e-3


def test_apo_rounds_are_the_weight_space_extrapolation(tmp_path, tiny_model_dir):
    alpha = 0.5
    method = {"loss": "dpo", "beta": 0.1, "rounds": {"reference": "previous", "extrapolation": alpha}}
    d1, s1, _ = run_round(tmp_path, tiny_model_dir, "apo", method, PAIRS)
    d2, s2, _ = run_round(tmp_path, tiny_model_dir, "apo", method, PAIRS, r=2, start=d1 / "model",
                          previous_proximal=d1 / "model" / rt.PROXIMAL)
    hat1, hat2 = apo.lora_delta(d1 / "model" / rt.PROXIMAL), apo.lora_delta(d2 / "model" / rt.PROXIMAL)
    pi1, pi2 = apo.lora_delta(d1 / "model"), apo.lora_delta(d2 / "model")
    for k in hat1:
        # round 1: π̂_1 = π_ref (ΔW = 0), so ΔW_2 = (1 + α) ΔŴ_2
        torch.testing.assert_close(pi1[k], (1 + alpha) * hat1[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pi2[k], (1 + alpha) * hat2[k] - alpha * hat1[k], rtol=1e-5, atol=1e-6)
    r = json.loads((d2 / "model" / "adapter_config.json").read_text())["r"]
    assert s1["extrapolation"]["rank"] == 4 and s2["extrapolation"]["rank"] == r == 8


def test_mpo_needs_its_reference_sample(tmp_path, tiny_model_dir):
    rows = [{k: v for k, v in p.items() if k != "reference_response"} for p in PAIRS]
    with pytest.raises(ValueError, match="no reference_response"):
        run_round(tmp_path, tiny_model_dir, "mpo", {"loss": "mpo", "kl_coef": 0.1, "rounds": ROUNDS}, rows)
    _, _, m = run_round(tmp_path, tiny_model_dir, "mpo", {"loss": "mpo", "kl_coef": 0.1, "rounds": ROUNDS}, PAIRS)
    assert all(math.isfinite(r["loss"]) for r in m)
