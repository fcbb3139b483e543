"""Training on a tiny random Llama the tests build: log-probs, SFT, DPO/RPO, reference cache, resume.

Run: pytest tests/test_train.py -q     (about a minute on 2 CPU cores)
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers.data import run_paths, tiny_pairs, write_jsonl
from helpers.training import TRAIN_CFG as CFG

from rpo import train
from rpo.batching import collate, summed_logps
from rpo.models import load_model, load_policy, load_tokenizer


@pytest.fixture()
def pairs_file(tmp_path):
    return write_jsonl(tiny_pairs(8), tmp_path / "train.jsonl")


def test_summed_logps_matches_full_softmax(tiny_model_dir):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    seqs = [([5, 6, 7], [8, 9]), ([5, 6], [10, 11, 12, 13])]
    batch = collate(seqs, tok.pad_token_id)
    got, n = summed_logps(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.float(), -1)
    # log π(response | prompt) = Σ over response positions t of log p(token_t | tokens_<t)
    want = torch.stack([sum(logp[i, t - 1, batch["input_ids"][i, t]] for t in range(len(p), len(p) + len(r)))
                        for i, (p, r) in enumerate(seqs)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert n.tolist() == [2, 4]


def _train(tiny_model_dir, pairs_file, tmp_path, method, cfg=CFG, tag="run"):
    cache = tmp_path / "ref.pt"
    if not cache.exists():
        train.reference_logps(tiny_model_dir, pairs_file, cache, max_length=cfg["max_length"],
                              max_prompt_length=cfg["max_prompt_length"], batch_size=4)
    out = tmp_path / tag / "model"
    summary = train.train_preference(ref_dir=tiny_model_dir, pairs_path=pairs_file, reference_cache=cache,
                                     **run_paths(out.parent), ckpt_dir=tmp_path / f"ckpt-{tag}", cfg=cfg,
                                     method=method)
    metrics = [json.loads(l) for l in (out.parent / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics, out


def test_dpo_loss_falls_and_adapter_changes(tiny_model_dir, pairs_file, tmp_path):
    summary, metrics, out = _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "dpo", "beta": 0.5})
    # global batch = all 8 pairs, so every step sees the same batch: the loss must fall from ln 2.
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference at step 1
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.05
    assert metrics[-1]["rewards/margins"] > 0
    for key in ("loss/dpo", "loss/sft", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "lr", "grad_norm"):
        assert key in metrics[-1]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    from safetensors.torch import load_file
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) > 0 for v in lora_b)  # LoRA B starts at zero


def test_rpo_sft_part_is_eta_beta_times_nll(tiny_model_dir, pairs_file, tmp_path):
    _, metrics, _ = _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "rpo", "beta": 0.5, "eta": 0.1})
    for m in metrics:
        # eq. 4.8: the SFT part is η·β·(−Σ log π(y_w|x)), averaged over the batch
        assert m["loss/sft"] == pytest.approx(0.1 * 0.5 * -m["logps/chosen"], rel=1e-3)
        assert m["loss"] == pytest.approx(m["loss/dpo"] + m["loss/sft"], abs=1e-4)


def test_interrupted_training_resumes_to_the_same_weights(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    method = {"loss": "rpo", "beta": 0.5, "eta": 0.1}
    _, full_metrics, full_out = _train(tiny_model_dir, pairs_file, tmp_path, method, tag="full")

    calls = {"n": 0}
    real = train.losses.rewards

    def dying_rewards(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2 * 2 * 5:  # 2 micro-batches x 2 reward calls per step: die inside step 6
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train.losses, "rewards", dying_rewards)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model_dir, pairs_file, tmp_path, method, tag="cut")
    assert (tmp_path / "ckpt-cut" / "step-000004" / "identity.json").is_file()
    monkeypatch.setattr(train.losses, "rewards", real)
    summary, metrics, out = _train(tiny_model_dir, pairs_file, tmp_path, method, tag="cut")
    assert summary["resumed_from_step"] == 4  # checkpoints every 2 steps; step 6 never finished
    assert [m["step"] for m in metrics] == list(range(1, 7))  # no step lost, none twice
    from safetensors.torch import load_file
    a, b = load_file(full_out / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert metrics[-1]["loss"] == pytest.approx(full_metrics[-1]["loss"], rel=1e-4)


def test_checkpoint_of_another_config_is_ignored(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setattr(train.losses, "rewards", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "dpo", "beta": 0.5}, tag="x")
    # A checkpoint from a run with eta = 0.1 must not seed a run with eta = 0.2.
    cfg = {**CFG, "checkpoint_every": 1}
    monkeypatch.undo()
    calls = {"n": 0}
    real = train.losses.rewards

    def die_late(*a, **k):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train.losses, "rewards", die_late)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "rpo", "beta": 0.5, "eta": 0.1}, cfg=cfg, tag="y")
    monkeypatch.setattr(train.losses, "rewards", real)
    summary, _, _ = _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "rpo", "beta": 0.5, "eta": 0.2},
                           cfg=cfg, tag="y")
    assert summary["resumed_from_step"] == 0


def test_reference_cache_of_other_data_is_refused(tiny_model_dir, pairs_file, tmp_path):
    cache = tmp_path / "ref.pt"
    train.reference_logps(tiny_model_dir, pairs_file, cache, max_length=64, max_prompt_length=32)
    other = write_jsonl(tiny_pairs(6), tmp_path / "other.jsonl")
    with pytest.raises(ValueError, match="another tokenisation or data"):
        train.train_preference(ref_dir=tiny_model_dir, pairs_path=other, reference_cache=cache,
                               **run_paths(tmp_path / "o"), ckpt_dir=tmp_path / "c", cfg=CFG,
                               method={"loss": "dpo", "beta": 0.1})


def test_unknown_loss_fails_before_training(tiny_model_dir, pairs_file, tmp_path):
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        train.train_preference(ref_dir=tiny_model_dir, pairs_path=pairs_file, reference_cache=tmp_path / "none",
                               **run_paths(tmp_path / "o"), ckpt_dir=tmp_path / "c", cfg=CFG,
                               method={"loss": "ppo", "beta": 0.1})


def test_sft_raises_chosen_logps_and_saves_a_merged_model(tiny_model_dir, pairs_file, tmp_path):
    cfg = {**CFG, "epochs": 5}
    summary = train.train_sft(base_dir=tiny_model_dir, pairs_path=pairs_file, **run_paths(tmp_path / "sft"),
                              ckpt_dir=tmp_path / "ckpt", cfg=cfg)
    metrics = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert summary["steps"] == 5
    merged = load_model(tmp_path / "sft" / "model")  # a plain model: LoRA merged, no adapter files
    assert not (tmp_path / "sft" / "model" / "adapter_config.json").exists()
    base = load_model(tiny_model_dir)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed


def test_full_finetuning_saves_a_whole_model_that_generation_loads(tiny_model_dir, pairs_file, tmp_path):
    cfg = {**CFG, "finetuning": "full", "learning_rate": 1e-3, "epochs": 2}
    _, metrics, out = _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "rpo", "beta": 0.5, "eta": 0.1},
                             cfg=cfg, tag="full-ft")
    assert not (out / "adapter_config.json").exists() and (out / "config.json").exists()
    policy = load_policy(tiny_model_dir, out)
    base = load_model(tiny_model_dir)
    # every weight matrix is trainable under full fine-tuning: the embeddings moved too
    assert not torch.equal(policy.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert len(metrics) == 2


@pytest.mark.parametrize("method,has_sft", [({"loss": "ipo+sft", "beta": 0.5, "eta": 0.5}, True),
                                            ({"loss": "hinge", "beta": 0.5}, False)])
def test_related_losses_train_and_split_their_sft_part(tiny_model_dir, pairs_file, tmp_path, method, has_sft):
    cfg = {**CFG, "epochs": 2}
    _, metrics, out = _train(tiny_model_dir, pairs_file, tmp_path, method, cfg=cfg)
    assert (out / "adapter_model.safetensors").is_file()
    for m in metrics:
        assert m["loss"] == pytest.approx(m["loss/pref"] + m["loss/sft"], abs=1e-5)
        # the SFT part of ipo+sft is eta * beta * (-log pi(y_w)) > 0; hinge has none
        assert (m["loss/sft"] > 0) if has_sft else (m["loss/sft"] == 0)
    if not has_sft:  # hinge at policy == reference: max(0, 1 - 0) = 1
        assert metrics[0]["loss/pref"] == pytest.approx(1.0, abs=1e-4)


def test_truncation_follows_the_authors_trainer():
    from rpo.batching import Truncation, fit
    counter = Truncation()
    # The authors' rule (TRL tokenize_row, keep_end) at max_length 1024 / max_prompt_length 512: when
    # prompt + the longer response overflow, every response is cut to 1024 - 512 = 512 tokens.
    p, (c, r) = fit([1] * 276, [[2] * 1166, [3] * 130], 1024, 512, counter)
    assert (len(p), len(c), len(r)) == (276, 512, 130)
    p, (c, r) = fit([1] * 455, [[2] * 897, [3] * 1016], 1024, 512, counter)
    assert (len(p), len(c), len(r)) == (455, 512, 512)
    # a prompt over max_prompt_length keeps its last 512 tokens first
    p, (c, r) = fit(list(range(600)), [[2] * 500, [3] * 100], 1024, 512, counter)
    assert p == list(range(88, 600)) and (len(c), len(r)) == (500, 100)  # then 512 + 500 fits: no response cut
    p, (c, r) = fit([1] * 100, [[2] * 200, [3] * 100], 1024, 512, counter)  # fits: untouched
    assert (len(p), len(c), len(r)) == (100, 200, 100)
    assert counter.as_dict() == {"prompt_truncated": 1, "response_truncated": 3, "pairs_truncated": 3}


def test_warmup_and_cosine_are_the_transformers_schedule(tiny_model_dir, pairs_file, tmp_path):
    cfg = {**CFG, "lr_scheduler": "cosine", "warmup_ratio": 0.25, "learning_rate": 1e-2}
    _, metrics, _ = _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "dpo", "beta": 0.5}, cfg=cfg)
    # 6 steps, warmup ceil(0.25 x 6) = 2: lr 0 at step 0, then 1/2; then 0.5 (1 + cos(pi (s - 2) / 4))
    want = [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466]
    assert [m["lr"] for m in metrics] == pytest.approx([1e-2 * w for w in want], abs=1e-9)


@pytest.mark.parametrize("micro", [1, 8])
def test_sft_step_is_the_token_mean_of_the_global_batch(tiny_model_dir, tmp_path, micro):
    # 8 pairs of different lengths in one global batch: the gradient must be that of
    # -sum(log p of every chosen token) / (number of chosen tokens), whatever the micro-batch size
    rows = tiny_pairs(8)
    for i, r in enumerate(rows):
        r["chosen"][0]["content"] = "hello world " * (1 + 2 * i)
    pairs = write_jsonl(rows, tmp_path / "train.jsonl")
    cfg = {**CFG, "epochs": 1, "global_batch_size": 8, "micro_batch_size": micro}
    got = {}

    def hook(step, model):
        got.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    train.train_sft(base_dir=tiny_model_dir, pairs_path=pairs, **run_paths(tmp_path / "sft"),
                    ckpt_dir=tmp_path / "ck", cfg=cfg, grad_hook=hook)
    # independently: the same initial model, the full log-softmax, one backward over the whole batch
    tok = load_tokenizer(tiny_model_dir)
    model = train.prepare_model(tiny_model_dir, cfg, "cpu")
    items, _ = train.tokenize_pairs(tok, rows, max_length=64, max_prompt_length=32)
    nll, n_tokens = 0.0, 0
    for it in items:
        ids = torch.tensor([it["prompt"] + it["chosen"]])
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        p = len(it["prompt"])
        nll = nll - sum(logp[t - 1, ids[0, t]] for t in range(p, ids.shape[1]))
        n_tokens += len(it["chosen"])
    (nll / n_tokens).backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_saved_adapter_names_its_base_portably(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    _, _, out = _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "dpo", "beta": 0.5}, cfg={**CFG, "epochs": 1})
    cfg = json.loads((out / "adapter_config.json").read_text())
    # an absolute path (it was given as a path relative to nothing in particular), loadable from another cwd
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path.parent)
    from peft import PeftConfig
    assert PeftConfig.from_pretrained(str(out)).base_model_name_or_path == str(tiny_model_dir.resolve())
    # a base that came from the hub (a model_source.json pointer) is named by its hub id and commit
    from rpo.models import POINTER, portable_base
    pointer = tmp_path / "hubbase"
    pointer.mkdir()
    (pointer / POINTER).write_text(json.dumps({"source": "hf:HuggingFaceH4/mistral-7b-sft-beta",
                                               "path": str(tiny_model_dir), "revision": "abc123"}))
    assert portable_base(pointer) == ("HuggingFaceH4/mistral-7b-sft-beta", "abc123")


def test_a_bf16_run_saves_its_model_in_bf16_and_counts_the_update_kept(tiny_model_dir, pairs_file, tmp_path):
    from safetensors import safe_open
    base = {**CFG, "finetuning": "full", "learning_rate": 1e-3, "epochs": 1}
    sizes = {}
    for save in ("float32", "bfloat16"):
        summary, _, out = _train(tiny_model_dir, pairs_file, tmp_path, {"loss": "dpo", "beta": 0.5},
                                 cfg={**base, "save_precision": save}, tag=save)
        (f,) = out.glob("*.safetensors")
        with safe_open(str(f), framework="pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {getattr(torch, save)}
        assert summary["saved"]["kind"] == "full" and summary["saved"]["dtype"] == save
        sizes[save] = summary["saved"]["bytes"]
        assert load_model(out, dtype="auto").dtype == getattr(torch, save)  # as saved
    assert sizes["bfloat16"] < 0.55 * sizes["float32"]
    kept = summary["saved"]["update_kept"]  # the bf16 run's: the fp32 run keeps every update
    fp32 = load_model(tmp_path / "float32" / "model")
    bf16 = load_model(tmp_path / "bfloat16" / "model")
    start = load_model(tiny_model_dir)
    # the count is what it says, recomputed here from the saved files: updated weights of the master (the fp32
    # save) and those that still differ from the start after both are rounded to bf16
    updated = kept_by_hand = 0
    seen = set()
    for name, w in fp32.state_dict().items():
        if w.data_ptr() in seen:  # the head tied to the embeddings: one tensor, counted once
            continue
        seen.add(w.data_ptr())
        s = start.state_dict()[name]
        moved = w != s
        updated += int(moved.sum())
        kept_by_hand += int((moved & (bf16.state_dict()[name].bfloat16() != s.bfloat16())).sum())
    assert kept["weights_updated"] == updated > 0
    assert kept["kept_after_cast"] == kept_by_hand and 0 < kept["fraction"] <= 1
    # auto is the training precision (fp32 here): the quickstart's models stay as they were
    assert train.save_dtype({**base, "save_precision": "auto"}) == "float32"
    assert train.save_dtype({**base, "precision": "bfloat16", "save_precision": "auto"}) == "bfloat16"


def test_authors_chat_format_reaches_every_stage_and_binds_the_reference_cache(tiny_model_dir, pairs_file, tmp_path):
    """data.chat_format authors: the reference pass and training both tokenise with the authors' recipe (the
    response holds the assistant header and ends with the tokenizer's EOS); a cache made under the model format
    is refused by an authors-format training, never reused."""
    from rpo.chat_format import pair_ids
    LENGTHS = {"max_length": 128, "max_prompt_length": 64}  # the authors' prompts are longer: no cut here
    from rpo.data import read_pairs
    tok = load_tokenizer(tiny_model_dir)
    rows = read_pairs(pairs_file)
    items, summary = train.tokenize_pairs(tok, rows, **LENGTHS, chat_format="authors")
    assert summary["chat_format"] == "authors" and summary["pairs_truncated"] == 0
    for it, r in zip(items, rows):
        assert (it["prompt"], it["chosen"], it["rejected"]) == pair_ids(tok, r["prompt"], r["chosen"], r["rejected"],
                                                                        "authors")
        assert tok.decode(it["chosen"]).startswith("<|im_start|>assistant\n")  # the header is the response's
        assert it["chosen"][-1] == tok.eos_token_id
    model_items, _ = train.tokenize_pairs(tok, rows, **LENGTHS)
    assert [it["chosen"] for it in model_items] != [it["chosen"] for it in items]

    cache = tmp_path / "ref.pt"
    train.reference_logps(tiny_model_dir, pairs_file, cache, **LENGTHS)  # model format
    kw = dict(ref_dir=tiny_model_dir, pairs_path=pairs_file, **run_paths(tmp_path / "o"), ckpt_dir=tmp_path / "c",
              cfg={**CFG, **LENGTHS, "epochs": 1}, method={"loss": "rpo", "beta": 0.5, "eta": 0.1})
    with pytest.raises(ValueError, match="another tokenisation or data"):
        train.train_preference(reference_cache=cache, chat_format="authors", **kw)
    authors_cache = tmp_path / "ref_authors.pt"
    train.reference_logps(tiny_model_dir, pairs_file, authors_cache, **LENGTHS,
                          chat_format="authors")
    saved = torch.load(authors_cache, weights_only=False)
    assert saved["chosen_lengths"].tolist() == [len(it["chosen"]) for it in items]  # every response token counted
    summary = train.train_preference(reference_cache=authors_cache, chat_format="authors", **kw)
    assert summary["tokenization"]["chat_format"] == "authors"
    metrics = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss/dpo"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference at step 1: same ids
