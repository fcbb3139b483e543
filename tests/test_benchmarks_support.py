"""What the benchmarks rely on: the fast summed_logps paths equal the plain log-softmax, and every
benchmark entry point runs end to end (`--smoke`, a tiny random model).

Run: pytest tests/test_benchmarks_support.py -q            (about 30 s on 2 CPU cores)
     pytest tests/test_benchmarks_support.py -q -m slow    (the benchmarks that train, ~6 min)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.logps import PAIRS, pair_batch, plain

import rpo.batching as batching
from rpo.batching import collate, summed_logps
from rpo.models import load_model

def value_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    lp, n = fn()
    (lp * torch.arange(1, lp.shape[0] + 1)).sum().backward()  # a different weight per sequence
    return lp.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kw", [dict(share_prompts=False, chunk_tokens=3),  # chunked head, padded rows
                                dict(share_prompts=True, chunk_tokens=3),  # + prompts shared, packed
                                dict(share_prompts=True, row_tokens=64)])  # + several pairs per row
def test_fast_summed_logps_equal_the_full_log_softmax(tiny_model_dir, attn, kw):
    model = load_model(tiny_model_dir)
    model.config._attn_implementation = attn
    model.train()
    batch = pair_batch()
    want, n_want, g_want = value_and_grads(model, lambda: plain(model, batch))
    got, n_got, g_got = value_and_grads(model, lambda: summed_logps(model, batch, **kw))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert n_got.tolist() == n_want.tolist() == [2, 4, 1, 5, 1, 2]
    # every weight gets its gradient, the tied embedding / LM head included (full fine-tuning)
    assert sorted(g_got) == sorted(g_want)
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # the reference pass: no autograd, same values
        torch.testing.assert_close(summed_logps(model, batch, **kw)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(share_prompts=False, chunk_tokens=3), dict(share_prompts=True, chunk_tokens=4)])
def test_a_frozen_head_gets_its_gradient_in_the_forward_and_equals_the_full_log_softmax(tiny_model_dir,
                                                                                       monkeypatch, kw):
    # LoRA's case: the head (tied to the embedding here) is frozen, the layers below it train
    model = load_model(tiny_model_dir)
    model.lm_head.weight.requires_grad_(False)
    model.train()
    paths = {"frozen": 0, "trainable": 0}
    for name, cls in (("frozen", batching._FrozenHeadLogProbs), ("trainable", batching._TokenLogProbs)):
        monkeypatch.setattr(cls, "apply", (lambda f, n: lambda *a: (paths.__setitem__(n, paths[n] + 1), f(*a))[1])(
            cls.apply, name))
    batch = pair_batch()
    want, _, g_want = value_and_grads(model, lambda: plain(model, batch))
    got, _, g_got = value_and_grads(model, lambda: summed_logps(model, batch, **kw))
    assert paths == {"frozen": 1, "trainable": 0}  # the path this test is about ran, once
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(g_got) == sorted(g_want) and "lm_head.weight" not in g_got and g_got
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-4, atol=1e-5)


def test_shared_prompts_are_run_once_in_one_row(tiny_model_dir):
    batch = pair_batch()
    packed = batching._share_prompts(batch["input_ids"], batch["labels_mask"], "sdpa")
    # one row per pair: prompt + chosen + rejected, padded to the longest (6 + 1 + 2 = 9; 3 + 2 + 5 = 10)
    assert packed["input_ids"].shape == (3, 10)
    assert packed["attention_mask"].shape == (3, 1, 10, 10)
    rows = packed["input_ids"].tolist()
    assert [5, 6, 7, 8, 9, 10, 11, 12, 13, 14] in rows
    # the rejected response continues from the prompt's positions, not from the chosen one's
    r = rows.index([5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
    assert packed["position_ids"][r].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    mask = packed["attention_mask"][r, 0]
    assert not mask[5, 3] and mask[5, 2] and mask[4, 3]  # rejected sees the prompt, not the chosen
    # several pairs per row when allowed: 10 + 9 + 7 = 26 tokens fit in one row of 32
    assert batching._share_prompts(batch["input_ids"], batch["labels_mask"], "sdpa", 32)["input_ids"].shape[0] == 1
    # nothing shared (SFT batches): the plain layout
    seqs = [(p, c) for p, c, _ in PAIRS]
    sft = collate(seqs, 2)
    assert batching._share_prompts(sft["input_ids"], sft["labels_mask"], "sdpa") is None
    assert batching._share_prompts(batch["input_ids"], batch["labels_mask"], None) is None


def test_heads_that_cannot_be_swapped_take_the_plain_path(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    model = load_model(tiny_model_dir)
    assert batching._plain_lm_head(model) is model.lm_head
    lora_head = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, target_modules=["lm_head"]))
    assert batching._plain_lm_head(lora_head) is None  # the head's output has a LoRA term
    model.config.model_type = "gemma2"  # logit soft-capping after the head
    assert batching._plain_lm_head(model) is None
    batch = pair_batch()
    torch.testing.assert_close(summed_logps(model, batch)[0], plain(model, batch)[0], rtol=1e-5, atol=1e-5)
    assert "forward" not in model.lm_head.__dict__  # the swap never outlives the call


ROOT = Path(__file__).resolve().parent.parent


def _run(module, tmp_path, *extra):
    """The entry point as a user runs it: `python -m benchmarks.<module> --smoke` from the repository."""
    out = tmp_path / f"{module}.json"
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--smoke", "--workdir",
                           str(tmp_path / "work" / module), "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads(out.read_text())


def test_loss_parity_smoke(tmp_path):
    rc, res = _run("loss_parity", tmp_path)
    assert rc == 0 and res["all_pass"]
    assert all(r["abs_diff"] <= 1e-5 and r["grad_rel_diff"] < 1e-4 for r in res["results"])
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["versions"]["torch"]


def test_generation_throughput_smoke(tmp_path):
    rc, res = _run("generation_throughput", tmp_path, "--generators", "hf,llamacpp-f32,naive")
    assert rc == 0 and res["naive_identical_to_hf"]
    by = {(r["generator"], r["mode"]): r for r in res["results"]}
    assert list(by) == [("hf", "greedy"), ("llamacpp-f32", "greedy"), ("naive", "greedy"), ("hf", "sampled"),
                        ("llamacpp-f32", "sampled")]
    # llama.cpp ran on the GGUF it wrote; on the tiny model its greedy answers are the HF backend's
    assert by[("llamacpp-f32", "greedy")]["gguf_export_s"] > 0 and by[("hf", "greedy")]["gguf_export_s"] is None
    assert by[("llamacpp-f32", "greedy")]["identical_to_hf"] >= 5 / 6
    assert by[("hf", "sampled")]["answers"] == 4 * by[("hf", "greedy")]["answers"]


def test_sharded_check_smoke(tmp_path):
    # the GPU check's path on CPU: FSDP2 at world size 1, interrupted, resumed from step 4, saved
    rc, res = _run("sharded_check", tmp_path)
    assert rc == 0 and res["resumed_from_step_ok"]
    assert res["clean"]["sharding"] == res["resumed"]["sharding"] == "full"
    assert res["resumed"]["resumed_from_step"] == 4 and res["resumed"]["checkpoint_mib"] > 0
    assert res["max_abs_weight_diff_resumed_vs_clean"] == 0.0  # fp32 on CPU: bitwise


@pytest.mark.slow
def test_train_throughput_smoke(tmp_path):
    variants = ("ours:dpo,trl:dpo,ours:rpo,ours-no-trunk:rpo,ours-unpacked:rpo,ours-flex:rpo,trl:rpo,trl-liger:rpo,"
                "trl-padding-free:rpo")
    rc, res = _run("train_throughput", tmp_path, "--variants", variants)
    assert rc == 0 and res["tokens_per_step_equal"]  # every trainer that ran saw the same batches
    by = {r["variant"]: r for r in res["results"]}
    assert by["ours:dpo"]["reference_forwards_per_step"] == 0 and by["trl:dpo"]["reference_forwards_per_step"] == 1
    # same model, data and loss: the first step's loss agrees (TRL's sigmoid+sft is our rpo_mean)
    assert by["ours:rpo"]["step1_loss_diff_vs_trl"] < 1e-4
    assert by["ours:dpo"]["step1_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    # each attention path ran on its own mask, and trains to the same first loss
    assert by["ours:rpo"]["policy_masks"].keys() == {"4-D"}
    assert by["ours-unpacked:rpo"]["policy_masks"].keys() == {"2-D"}
    assert by["ours-unpacked:rpo"]["step1_loss"] == pytest.approx(by["ours:rpo"]["step1_loss"], abs=1e-5)
    # LoRA on the top layer of 2: the default starts at layer 1 from the trunk, ours-no-trunk runs both layers
    assert by["ours:rpo"]["trunk"]["layer"] == 1 and by["ours:rpo"]["trunk"]["layer_calls_skipped"] > 0
    assert by["ours-no-trunk:rpo"]["trunk"] is None
    assert by["ours-no-trunk:rpo"]["step1_loss"] == pytest.approx(by["ours:rpo"]["step1_loss"], abs=1e-5)
    flex_problem = batching.flex_attention_problem("cpu", backward=True)
    if flex_problem:  # torch 2.13 on CPU: no FlexAttention backward, said so
        assert by["ours-flex:rpo"]["status"] == "skipped" and flex_problem in by["ours-flex:rpo"]["reason"]
    else:
        assert by["ours-flex:rpo"]["policy_masks"].keys() == {"BlockMask"}
    # Liger's Triton kernels need a GPU (or liger-kernel is not installed): skipped, with the reason
    assert by["trl-liger:rpo"]["status"] == "skipped"
    assert by["trl-liger:rpo"]["reason"].startswith("use_liger_kernel cannot run on cpu: ")
    # TRL 1.16 turns padding_free back off (it warns and pads)
    assert by["trl-padding-free:rpo"]["padding_free_in_effect"] is False
    # ours against the best TRL variant that ran for the same loss
    assert res["best_trl"]["rpo"] in ("trl:rpo", "trl-padding-free:rpo") and res["best_trl"]["dpo"] == "trl:dpo"
    best = by[res["best_trl"]["rpo"]]
    assert by["ours:rpo"]["speedup_vs_best_trl"] == pytest.approx(by["ours:rpo"]["tokens_per_s"] / best["tokens_per_s"])
    assert by["ours:rpo"]["step1_loss_agrees_best_trl"]
    csv = (tmp_path / "train_throughput.csv").read_text().splitlines()
    assert csv[0].startswith("variant,status,") and len(csv) == 1 + len(variants.split(","))


def test_gpu_check_dry_run_plans_both_shapes(tmp_path):
    # the GPU script's commands parse with train_throughput's own parser, on CUDA, both shapes, LoRA
    from benchmarks import gpu_check
    assert gpu_check.main(["--out-dir", str(tmp_path), "--dry-run"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["shapes"] == ["1b", "8b"] and len(plan["commands"]) == 2
    for shape, cmd in zip(("1b", "8b"), plan["commands"]):
        assert f"--device cuda --shape {shape}" in cmd and f"--out {tmp_path}/train_throughput_{shape}.json" in cmd
    variants = {v.split(":")[0] for v in gpu_check.PLAN["1b"]["variants"]}
    assert {"ours", "ours-unpacked", "ours-flex", "trl", "trl-precompute", "trl-liger"} <= variants
    with pytest.raises(SystemExit):
        gpu_check.main(["--out-dir", str(tmp_path), "--dry-run", "--shapes", "70b"])


@pytest.mark.slow
def test_gpu_check_smoke_runs_the_plan_on_cpu(tmp_path):
    from benchmarks import gpu_check
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--smoke", "--shapes", "8b",
                           "--out-dir", str(tmp_path / "out"), "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"] == [] and (tmp_path / "out" / "summary.csv").is_file()
    rows = {r["variant"]: r for r in summary["results"]}
    assert set(rows) == set(gpu_check.PLAN["8b"]["variants"])
    assert rows["ours:rpo"]["best_trl"] == "trl-precompute:rpo" and rows["ours:rpo"]["step1_loss_agrees_best_trl"]


@pytest.mark.slow
def test_reference_reuse_smoke(tmp_path):
    rc, res = _run("reference_reuse", tmp_path, "--modes", "ours,trl")
    assert rc == 0 and res["ours_exactly_one_pass"]
    by = {r["trainer"]: r for r in res["results"]}
    assert by["ours"]["reference_passes"] == 1.0
    assert by["trl"]["reference_passes"] == pytest.approx(4.0)  # once per method


def test_saved_sizes_counts_the_paper_models_parameters(tmp_path, monkeypatch):
    from benchmarks import saved_sizes
    monkeypatch.setattr(saved_sizes, "RESULTS", tmp_path)
    rows = {r["model"]: r for r in saved_sizes.main([])}
    # Mistral-7B-v0.1's published parameter count (its model card: 7.24B; 7,241,732,096 exactly)
    assert rows["mistral-7b-sft-beta"]["parameters"] == 7_241_732_096
    assert rows["mistral-7b-sft-beta"]["bf16_GB"] == 14.5 and rows["mistral-7b-sft-beta"]["fp32_GB"] == 29.0
    # gemma-7b: 8.54B with its 256k-token embeddings tied to the head (counted once, as saved)
    assert rows["zephyr-7b-gemma-sft"]["parameters"] == 8_537_680_896
    assert (tmp_path / "saved_sizes.json").is_file()


def test_fusion_cost_smoke(tmp_path):
    rc, res = _run("fusion_cost", tmp_path, "--threads", "1")
    assert rc == 0 and [r["decoder"] for r in res["results"]] == ["plain", "proxy", "dynamic"]
    assert all(r["tokens"] == 36 and r["ms_per_token"] > 0 for r in res["results"])  # 6 prompts x 6 tokens each
    assert res["results"][0]["x_plain"] == 1 and set(res["search_ms_per_step"]) == {"fixed", "dynamic"}
