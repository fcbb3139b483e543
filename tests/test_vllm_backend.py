"""The vLLM backend's contract that can be checked without a GPU: its rows have the HF backend's format,
and asking for it without vllm installed is a clear error. (Generation itself needs vLLM on a CUDA GPU.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import tiny_pairs

from eval import vllm_backend
from rpo.sampling import generate_answers
from eval.table1 import select_prompts
from rpo.models import load_model, load_tokenizer


def test_rows_have_the_hf_backend_format(tiny_model_dir, tmp_path):
    prompts = [{"id": p["id"], "messages": p["prompt"]} for p in tiny_pairs(2)]
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    hf_rows = generate_answers(model, tok, prompts, tmp_path / "hf.jsonl", max_new_tokens=3, model_name="m")
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(text=" hi there ", token_ids=[5, 6, 7], finish_reason="stop")]),
               SimpleNamespace(outputs=[SimpleNamespace(text="cut", token_ids=[8, 9, 10], finish_reason="length")])]
    rows = vllm_backend.rows_from_outputs(prompts, outputs, "m")
    assert [list(r) for r in rows] == [list(r) for r in hf_rows]  # same keys in the same order
    assert rows[0] == {"id": "p0", "model": "m", "messages": prompts[0]["messages"], "responses": ["hi there"],
                       "n_tokens": [3], "finished": [True]}
    assert rows[1]["finished"] == [False]  # stopped by max_tokens
    with pytest.raises(ValueError, match="1 outputs for 2 prompts"):
        vllm_backend.rows_from_outputs(prompts, outputs[:1], "m")


def test_missing_vllm_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(RuntimeError, match=r"pip install -e '.\[vllm\]'.*or set backend: hf"):
        vllm_backend.require_vllm()


def test_table1_prompt_selection_is_a_fixed_draw():
    prompts = [{"id": f"q{i}", "messages": []} for i in range(50)]
    a = select_prompts(prompts, 10)
    assert len(a) == 10 and a == select_prompts(list(reversed(prompts)), 10)  # independent of file order
    assert [p["id"] for p in a] != [f"q{i}" for i in range(10)]  # not the head of the split
    assert select_prompts(prompts, None) == prompts and select_prompts(prompts, 99) == prompts
