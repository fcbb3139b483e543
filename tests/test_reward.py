"""Proxy reward models (issue 26; rpo/reward.py): the loss against a hand computation, a member trained on the
tiny model ranks its pairs above chance, members differ only by seed, the saved directory loads with
transformers + peft as its card says and scores as we do, training from the reference pass's trunk follows the
whole forward, kill -9 resumes to the uninterrupted member, and every member's score of sampled candidates.

Run: pytest tests/test_reward.py -q      (about a minute on 2 CPU cores)
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.data import run_paths, tiny_pairs, write_jsonl
from helpers.models import build_tiny_model

from rpo import candidates, reward, train
from rpo.data import read_pairs
from rpo.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CFG = {"finetuning": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": None,
                                      "target_modules": ["q_proj", "v_proj"]},
       "learning_rate": 5e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "epochs": 4, "max_steps": None,
       "micro_batch_size": 2, "global_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
       "weight_decay": 0.0, "max_grad_norm": 10.0, "precision": "float32", "checkpoint_every": 2, "seed": 1,
       "threads": 1, "attention": "sdpa"}


@pytest.fixture()
def data(tmp_path):
    return {"pairs_path": write_jsonl(tiny_pairs(8), tmp_path / "train.jsonl"),
            "test_path": write_jsonl(tiny_pairs(12)[8:], tmp_path / "test.jsonl")}


def train_member(model_dir, data, out, cfg=CFG, **kw):
    return reward.train_reward_model(base_dir=model_dir, **data, **run_paths(out), ckpt_dir=Path(out) / "ckpt",
                                     cfg=cfg, l2=0.001, eval_batch_size=8, **kw)


def adapter(out):
    from safetensors.torch import load_file
    return load_file(Path(out) / "model" / "adapter_model.safetensors")


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------

def test_loss_against_a_hand_computation():
    # s_w = 2, s_l = 0.5: -log sigmoid(1.5) = log(1 + e^-1.5) = log(1.2231302) = 0.2014133;
    # 0.001 * (4 + 0.25) / 2 = 0.002125; s_w = -1, s_l = 1: log(1 + e^2) = 2.1269280, + 0.001 * (1 + 1) / 2
    got = reward.reward_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0]), l2=0.001)
    torch.testing.assert_close(got, torch.tensor([0.2014133 + 0.002125, 2.1269280 + 0.001]), rtol=0, atol=1e-6)
    # its gradient: d/ds_w = -sigmoid(s_l - s_w) + l2 s_w, d/ds_l = sigmoid(s_l - s_w) + l2 s_l
    w, l = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    reward.reward_loss(w, l, l2=0.001).backward()
    s = 1 / (1 + math.exp(1.5))
    assert w.grad.item() == pytest.approx(-s + 0.002, abs=1e-7) and l.grad.item() == pytest.approx(s + 0.0005, abs=1e-7)
    assert reward.reward_loss(torch.tensor([3.0]), torch.tensor([3.0]), l2=0.0).item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------------------------
# Training a member
# ---------------------------------------------------------------------------------------------------

def test_a_trained_member_ranks_its_pairs_above_chance(tiny_model_dir, data, tmp_path):
    summary = train_member(tiny_model_dir, data, tmp_path / "rm")
    m = metrics(tmp_path / "rm")
    assert [r["step"] for r in m] == list(range(1, 9))
    assert m[-1]["loss"] < m[0]["loss"] - 0.1
    for r in m:  # loss = Bradley-Terry + magnitude penalty, logged apart
        assert r["loss"] == pytest.approx(r["loss/bt"] + r["loss/l2"], abs=1e-5)
    # ranked by the saved member, reloaded the way scoring loads it
    member = reward.load_reward_model(tmp_path / "rm" / "model")
    tok = load_tokenizer(tiny_model_dir)
    items, _ = train.tokenize_pairs(tok, read_pairs(data["pairs_path"]), max_length=64, max_prompt_length=32)
    ranked = reward.pair_accuracy(member, items, tok.pad_token_id, batch_size=3)
    assert ranked["accuracy"] >= 0.75 and ranked["mean_margin"] > 0
    assert summary["train"] == pytest.approx(ranked, abs=1e-5)
    assert summary["heldout"]["pairs"] == 4 and 0 <= summary["heldout"]["accuracy"] <= 1
    assert summary["trunk"] is None and summary["resumed_from_step"] == 0
    # the head trained (peft's modules_to_save) and LoRA B moved off zero
    w = adapter(tmp_path / "rm")
    assert any("score" in k for k in w) and all(torch.count_nonzero(v) > 0 for k, v in w.items() if "lora_B" in k)
    assert not (tmp_path / "rm" / "ckpt").exists()


def test_members_differ_only_by_seed(tiny_model_dir, data, tmp_path):
    a = reward.prepare_reward_model(tiny_model_dir, CFG, "cpu", pad_token_id=2)
    b = reward.prepare_reward_model(tiny_model_dir, CFG, "cpu", pad_token_id=2)
    c = reward.prepare_reward_model(tiny_model_dir, {**CFG, "seed": 2}, "cpu", pad_token_id=2)
    head = lambda m: m.inner().score.weight  # noqa: E731
    assert torch.equal(head(a), head(b)) and not torch.equal(head(a), head(c))
    train_member(tiny_model_dir, data, tmp_path / "s1")
    train_member(tiny_model_dir, data, tmp_path / "s1-again")
    train_member(tiny_model_dir, data, tmp_path / "s2", cfg={**CFG, "seed": 2})
    w1, w1b, w2 = adapter(tmp_path / "s1"), adapter(tmp_path / "s1-again"), adapter(tmp_path / "s2")
    assert all(torch.equal(w1[k], w1b[k]) for k in w1)  # one seed, one member
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    # data order: the same 8 pairs, shuffled per epoch by the seed (rpo.loop.schedule)
    from rpo.loop import schedule
    assert schedule(8, CFG, 1) != schedule(8, CFG, 2)


def test_the_saved_member_loads_as_its_card_says(tiny_model_dir, data, tmp_path):
    train_member(tiny_model_dir, data, tmp_path / "rm")
    card = json.loads((tmp_path / "rm" / "model" / reward.CARD).read_text())
    assert card["base_model"] == str(Path(tiny_model_dir).resolve()) and card["num_labels"] == 1
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    hf = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(card["base_model"], num_labels=1),
                                   tmp_path / "rm" / "model").eval()
    ours = reward.load_reward_model(tmp_path / "rm" / "model")
    tok = load_tokenizer(tiny_model_dir)
    items, _ = train.tokenize_pairs(tok, read_pairs(data["test_path"]), max_length=64, max_prompt_length=32)
    for it in items:  # one unpadded sequence: transformers' own last-token pooling sees the same token
        seq = it["prompt"] + it["chosen"]
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor([seq])).logits[0, 0]
        mine = reward.score_sequences(ours, [(it["prompt"], it["chosen"])], tok.pad_token_id, batch_size=1)[0]
        assert mine.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_a_prompts_sequences_in_one_packed_row_score_as_alone(tiny_model_dir):
    """Responses of one prompt share a row (the prompt once, each response attending to it and to itself):
    every score equals the sequence's own forward, and in training the packed batch gives the unpacked loss."""
    member = reward.prepare_reward_model(tiny_model_dir, CFG, "cpu", pad_token_id=2).eval()
    tok = load_tokenizer(tiny_model_dir)
    from rpo.batching import prompt_ids, response_ids
    msgs = [[{"role": "user", "content": f"write a short answer in lowercase letters only {i}"}] for i in range(2)]
    seqs = []
    for m in msgs:
        p = prompt_ids(tok, m)
        seqs += [(p, response_ids(tok, m, [{"role": "assistant", "content": t}], p))
                 for t in ("hello world", "HELLO World this is answer", "no")]
    packed, _ = reward.reward_inputs(seqs, tok.pad_token_id, attention="sdpa")
    plain, _ = reward.reward_inputs(seqs, tok.pad_token_id, attention=None)
    assert packed["input_ids"].shape[0] == 2 and plain["input_ids"].shape[0] == 6  # one row per prompt
    with torch.no_grad():
        alone = torch.stack([member(**reward.reward_inputs([s], tok.pad_token_id, attention="sdpa")[0])[0]
                             for s in seqs])
        torch.testing.assert_close(member(**packed), alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(member(**plain), alone, rtol=1e-5, atol=1e-5)


def test_training_with_packed_prompts_follows_unpacked(tiny_model_dir, data, tmp_path):
    train_member(tiny_model_dir, data, tmp_path / "packed")
    train_member(tiny_model_dir, data, tmp_path / "plain", cfg={**CFG, "share_prompts": False})
    for a, b in zip(metrics(tmp_path / "packed")[:4], metrics(tmp_path / "plain")[:4], strict=True):
        for k in ("loss", "margin", "scores/chosen"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=2e-6), k


def test_full_finetuning_saves_a_whole_model(tiny_model_dir, data, tmp_path):
    train_member(tiny_model_dir, data, tmp_path / "full", cfg={**CFG, "finetuning": "full", "learning_rate": 1e-3})
    d = tmp_path / "full" / "model"
    assert (d / "config.json").is_file() and not (d / "adapter_config.json").exists()
    from transformers import AutoModelForSequenceClassification
    assert AutoModelForSequenceClassification.from_pretrained(d).config.num_labels == 1
    reward.load_reward_model(d)  # and ours


def test_training_from_the_trunk_follows_the_whole_forward(data, tmp_path):
    model_dir = build_tiny_model(tmp_path / "model4", layers=4)
    cfg = {**CFG, "lora": {**CFG["lora"], "top_layers": 2}, "trunk_cache": True}
    cache, trunk_path = tmp_path / "ref.pt", tmp_path / "trunk.f32"
    train.reference_logps(model_dir, data["pairs_path"], cache, max_length=64, max_prompt_length=32, batch_size=4,
                          top_layers=2, trunk_path=trunk_path)
    whole = train_member(model_dir, data, tmp_path / "whole", cfg=cfg)
    fast = train_member(model_dir, data, tmp_path / "fast", cfg=cfg, reference_cache=cache, trunk_path=trunk_path)
    assert whole["trunk"] is None and fast["trunk"] == {"layer": 2, "layer_calls_skipped": 2 * 16}  # 16 micro-batches
    # the same steps: equal up to the logged 6 decimals at first, then float rounding of the two paths grows
    # through the Adam steps at lr 0.05 (about 1e-4 relative by step 8)
    for i, (a, b) in enumerate(zip(metrics(tmp_path / "whole"), metrics(tmp_path / "fast"), strict=True)):
        for k in ("loss", "margin", "scores/chosen", "scores/rejected"):
            assert b[k] == pytest.approx(a[k], rel=1e-5 if i < 4 else 1e-3, abs=2e-6 if i < 4 else 1e-4), (i, k)
    wa, wb = adapter(tmp_path / "whole"), adapter(tmp_path / "fast")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-2, atol=1e-3)
    assert fast["heldout"]["mean_margin"] == pytest.approx(whole["heldout"]["mean_margin"], rel=1e-2, abs=1e-3)


def test_kill9_resumes_to_the_uninterrupted_member(tiny_model_dir, data, tmp_path):
    clean = train_member(tiny_model_dir, data, tmp_path / "clean")
    args = {"base_dir": str(tiny_model_dir), **{k: str(v) for k, v in data.items()},
            **{k: str(v) for k, v in run_paths(tmp_path / "cut").items()}, "ckpt_dir": str(tmp_path / "cut" / "ckpt"),
            "cfg": CFG, "l2": 0.001, "eval_batch_size": 8}
    code = ("import json, os, signal, sys\nfrom rpo import reward\n"
            "def hook(step, model):\n    if step == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
            "reward.train_reward_model(**json.loads(sys.argv[1]), grad_hook=hook)\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "cut" / "ckpt" / "step-000004").is_dir() and not (tmp_path / "cut" / "model").exists()
    resumed = train_member(tiny_model_dir, data, tmp_path / "cut")  # the same call again
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == clean["steps"] == 8
    assert [r["step"] for r in metrics(tmp_path / "cut")] == list(range(1, 9))  # none lost, none twice
    wa, wb = adapter(tmp_path / "clean"), adapter(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_members_on_the_top_layers_share_the_layers_below(data, tmp_path):
    """Scoring several LoRA members on the top 2 of 4 layers runs layers 0-1 once and each member from layer 2:
    the same scores as each member loaded and run whole."""
    model_dir = build_tiny_model(tmp_path / "model4", layers=4)
    cfg = {**CFG, "lora": {**CFG["lora"], "top_layers": 2}}
    dirs = []
    for seed in (1, 2, 3):
        train_member(model_dir, data, tmp_path / f"m{seed}", cfg={**cfg, "seed": seed})
        dirs.append(tmp_path / f"m{seed}" / "model")
    assert [reward.lora_floor(d) for d in dirs] == [2, 2, 2]
    tok = load_tokenizer(model_dir)
    items, _ = train.tokenize_pairs(tok, read_pairs(data["test_path"]), max_length=64, max_prompt_length=32)
    seqs = [(it["prompt"], it[side]) for it in items for side in ("chosen", "rejected")]
    calls = []  # attention calls: a layer the trunk passes through calls none
    from transformers.models.llama.modeling_llama import LlamaAttention
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: calls.append(1) if isinstance(m, LlamaAttention) else None)
    try:
        shared = reward.score_with_members(dirs, model_dir, seqs, tok.pad_token_id, batch_size=3)
    finally:
        handle.remove()
    # 3 batches: layers 0-1 once each (6), then 2 layers per member and batch (18); whole would be 36
    assert len(calls) == 3 * 2 + 3 * 3 * 2
    for d, got in zip(dirs, shared, strict=True):
        want = reward.score_sequences(reward.load_reward_model(d), seqs, tok.pad_token_id, batch_size=4)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shared[0], shared[1])  # three members, three scorings


@pytest.mark.slow  # two accelerate launches of 2 gloo ranks: about a minute
@pytest.mark.parametrize("sharding", ["none", "full"])
def test_two_ranks_train_the_member_one_process_trains(tiny_model_dir, data, tmp_path, sharding):
    """DDP (sharding none) and FSDP2 (full) over 2 CPU ranks: the global batch and its gradient are one
    process's, so the saved member is one process's within fp32 reduction-order rounding."""
    from helpers.distributed import TOL_2RANKS, ok, run_ranks
    cfg = {**CFG, "epochs": 2, "micro_batch_size": 1, "max_grad_norm": 100.0, "learning_rate": 1e-2}
    train_member(tiny_model_dir, data, tmp_path / "one", cfg={**cfg, "world_size": 1})
    ok(run_ranks({"stage": "reward", "base_dir": str(tiny_model_dir), **{k: str(v) for k, v in data.items()},
                  **{k: str(v) for k, v in run_paths(tmp_path / "two").items()}, "ckpt_dir": str(tmp_path / "ck"),
                  "cfg": {**cfg, "world_size": 2, "sharding": sharding}, "l2": 0.001, "eval_batch_size": 8}, 2))
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharding"] == sharding
    wa, wb = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], **TOL_2RANKS)
    for x, y in zip(metrics(tmp_path / "two"), metrics(tmp_path / "one"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# Candidates: gold and member scores of sampled responses
# ---------------------------------------------------------------------------------------------------

def test_candidates_are_scored_by_the_gold_and_by_each_member(tiny_model_dir, data, tmp_path):
    from rpo.data import prompts_of
    prompts = write_jsonl(prompts_of(read_pairs(data["test_path"])), tmp_path / "prompts.jsonl")
    samples = tmp_path / "samples.jsonl"
    rows = candidates.sample_candidates(ref_dir=tiny_model_dir, prompts_path=prompts, out=samples, n=3,
                                        max_new_tokens=5, batch_size=2, seed=0)
    assert len(rows) == 4 and all(len(r["responses"]) == 3 for r in rows)
    # the decoding settings of KL_bon: temperature 1, no top-k, no top-p (recorded in the partial's identity)
    gold = candidates.gold_candidates(prompts_path=prompts, samples_path=samples, out=tmp_path / "gold.jsonl")
    from rpo import verifiable
    p0 = read_pairs(data["test_path"])[0]
    assert gold[0]["gold"][1] == verifiable.gold_score_for(rows[0]["responses"][1], p0["prompt"][-1]["content"],
                                                           p0["meta"])["score"]
    train_member(tiny_model_dir, data, tmp_path / "rm")
    (scored,) = candidates.score_candidates(model_dirs=[tmp_path / "rm" / "model"], base_dir=tiny_model_dir,
                                            samples_path=samples, outs=[tmp_path / "s.jsonl"], max_length=64,
                                            max_prompt_length=32, batch_size=5)
    member = reward.load_reward_model(tmp_path / "rm" / "model")
    tok = load_tokenizer(tiny_model_dir)
    from rpo.batching import prompt_ids, response_ids
    p = prompt_ids(tok, rows[2]["messages"])
    r = response_ids(tok, rows[2]["messages"], [{"role": "assistant", "content": rows[2]["responses"][0]}], p)
    assert scored[2]["scores"][0] == pytest.approx(
        reward.score_sequences(member, [(p, r)], tok.pad_token_id, batch_size=1)[0].item(), abs=1e-5)
    bad = write_jsonl([{**json.loads(line), "meta": {}} for line in prompts.read_text().splitlines()],
                      tmp_path / "nometa.jsonl")
    with pytest.raises(ValueError, match="no verifiable instructions"):
        candidates.gold_candidates(prompts_path=bad, samples_path=samples, out=tmp_path / "g2.jsonl")
