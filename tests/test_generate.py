"""Answer generation (rpo/sampling.py) on a tiny random model: equals HF generate, resumes, is seeded.

Run: pytest tests/test_generate.py -q
"""
from __future__ import annotations

import json

import torch

from rpo.sampling import generate_answers, generation_identity
from rpo.models import load_model, load_tokenizer

PROMPTS = [{"id": f"q{i}", "messages": [{"role": "user", "content": "hello world " * (i + 1)}]} for i in range(5)]


def test_greedy_batched_answers_equal_one_by_one_hf_generate(tiny_model_dir, tmp_path):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    rows = generate_answers(model, tok, PROMPTS, tmp_path / "a.jsonl", max_new_tokens=8, batch_size=3)
    assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]  # input order, though batches are length-sorted
    for p, r in zip(PROMPTS, rows):
        ids = tok.apply_chat_template(p["messages"], add_generation_prompt=True, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[:new.index(tok.eos_token_id)]
        assert r["responses"][0] == tok.decode(new, skip_special_tokens=True).strip()


def test_sampling_is_seeded_and_gives_n_samples(tiny_model_dir, tmp_path):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=20, batch_size=2, num_return_sequences=3, seed=7)
    a = generate_answers(model, tok, PROMPTS, tmp_path / "a.jsonl", **kw)
    b = generate_answers(model, tok, PROMPTS, tmp_path / "b.jsonl", **kw)
    assert a == b and all(len(r["responses"]) == 3 for r in a)
    c = generate_answers(model, tok, PROMPTS, tmp_path / "c.jsonl", **{**kw, "seed": 8})
    assert [r["responses"] for r in c] != [r["responses"] for r in a]


def test_interrupted_generation_resumes_without_redoing_answers(tiny_model_dir, tmp_path):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    full = generate_answers(model, tok, PROMPTS, tmp_path / "full.jsonl", max_new_tokens=5, batch_size=2)
    out = tmp_path / "cut.jsonl"
    partial = tmp_path / "cut.jsonl.partial"
    # A killed run left its identity line, two finished answers and half a line.
    identity = generation_identity(model, tok, max_new_tokens=5, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                                   num_return_sequences=1, model_name="")
    partial.write_text(json.dumps({"identity": identity}) + "\n" + json.dumps(full[0]) + "\n"
                       + json.dumps(full[3]) + "\n" + '{"id": "q1", "resp')
    calls = []
    real = model.forward

    def counting_forward(*a, **k):
        calls.append(tuple(k["input_ids"].shape))
        return real(*a, **k)

    model.forward = counting_forward
    rows = generate_answers(model, tok, PROMPTS, out, max_new_tokens=5, batch_size=2)
    assert rows == full and not partial.exists()
    # Prefills (more than one token) of the resumed run saw only the 3 unfinished prompts: 2 + 1.
    assert sorted(b for b, t in calls if t > 1) == [1, 2]
