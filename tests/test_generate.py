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


def test_one_temperature_per_response_equals_separate_decodes(tiny_model_dir):
    """temperature=[0.0, 1.0]: one prefill, a greedy answer and a sample per prompt; the greedy rows equal a
    greedy decode and, since greedy rows draw nothing, the sampled rows equal a temperature-1 decode with the
    same generator; the log-probs are the full log-softmax's of the tokens chosen."""
    import pytest
    from rpo.sampling import encode_prompt, left_pad, sample
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    ids, attn = left_pad([encode_prompt(tok, p["messages"]) for p in PROMPTS], tok.pad_token_id)
    kw = dict(max_new_tokens=6, top_k=0, top_p=1.0, pad_id=tok.pad_token_id)
    both, lps = sample(model, ids, attn, num_return_sequences=2, temperature=[0.0, 1.0],
                       generator=torch.Generator().manual_seed(5), return_logps=True, **kw)
    greedy = sample(model, ids, attn, temperature=0.0, **kw)
    sampled = sample(model, ids, attn, temperature=1.0, generator=torch.Generator().manual_seed(5), **kw)
    width = min(both.shape[1], greedy.shape[1], sampled.shape[1])  # each call stops once all its rows stopped
    assert torch.equal(both[0::2, :width], greedy[:, :width])
    assert torch.equal(both[1::2, :width], sampled[:, :width])
    mask = torch.cat([attn.repeat_interleave(2, 0), torch.ones_like(both)], 1)
    with torch.inference_mode():
        full = torch.log_softmax(model(input_ids=torch.cat([ids.repeat_interleave(2, 0), both], 1),
                                       attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
                                       ).logits.float(), -1)
    want = full[:, ids.shape[1] - 1:-1].gather(-1, both[..., None]).squeeze(-1)
    stop = {tok.eos_token_id, tok.pad_token_id}
    scored = torch.tensor([[not any(t in stop for t in row[:j]) for j in range(len(row))] for row in both.tolist()])
    assert scored.sum() > both.shape[0]  # more than the first token of each row is compared
    torch.testing.assert_close(lps[scored], want[scored], rtol=1e-4, atol=1e-4)
    assert torch.all(lps[~scored] == 0.0)
    with pytest.raises(ValueError, match="one per response"):
        sample(model, ids, attn, num_return_sequences=3, temperature=[0.0, 1.0], **kw)


def test_the_authors_prompt_text_bos_stops_and_raw_text(tiny_model_dir, tmp_path):
    """A prompt row's own text (an AlpacaEval template, FastChat's conversation) tokenized as a string prompt is
    (the BOS in front), the stage's extra stop ids, and answers left unstripped (answer_text raw)."""
    from helpers.models import with_bos_tokenizer
    model_dir = with_bos_tokenizer(tiny_model_dir, tmp_path / "bos_model")
    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    prompts = [{**p, "text": f"<|im_start|>user\nhello world {i}<|im_end|>\n<|im_start|>assistant\n"}
               for i, p in enumerate(PROMPTS)]
    seen, real = [], model.forward

    def spy(*a, **k):
        if k["input_ids"].shape[1] > 1:
            seen.extend(row[m.bool()].tolist() for row, m in zip(k["input_ids"], k["attention_mask"]))
        return real(*a, **k)

    model.forward = spy
    plain = generate_answers(model, tok, prompts, tmp_path / "a.jsonl", max_new_tokens=8, batch_size=5,
                             add_special_tokens=True)
    assert sorted(seen) == sorted(tok(p["text"])["input_ids"] for p in prompts)  # the text, BOS first
    assert all(ids[0] == tok.bos_token_id for ids in seen)
    assert [r["text"] for r in plain] == [p["text"] for p in prompts]
    # an extra stop id: the first token greedy decoding gives the first prompt ends its answer there
    from rpo.sampling import encode_row, sample
    ids = torch.tensor([encode_row(tok, prompts[0], True)])
    first = int(sample(model, ids, torch.ones_like(ids), max_new_tokens=1)[0, 0])
    assert first not in (tok.eos_token_id, tok.pad_token_id) and plain[0]["n_tokens"][0] > 0
    cut = generate_answers(model, tok, prompts, tmp_path / "b.jsonl", max_new_tokens=8, batch_size=5,
                           add_special_tokens=True, extra_stop_ids=(first,))
    assert cut[0]["n_tokens"] == [0] and cut[0]["responses"] == [""] and cut[0]["finished"] == [True]
    raw = generate_answers(model, tok, prompts, tmp_path / "c.jsonl", max_new_tokens=8, batch_size=5,
                           add_special_tokens=True, answer_text="raw")
    assert [r["responses"][0].strip() for r in raw] == [r["responses"][0] for r in plain]
    assert any(r["responses"][0] != r["responses"][0].strip() for r in raw)  # the tiny model answers whitespace
