"""Shared fixtures: a tiny randomly initialised Llama model with a byte-level BPE tokenizer and a chat
template, written to disk the way `rpo.models.materialise_model` writes a model (built in ~1 s)."""
from __future__ import annotations

import json

import pytest

CORPUS = [
    "write a short answer in lowercase letters only",
    "The quick brown fox jumps over the lazy dog. No commas here please",
    "hello world this is a tiny corpus for a tiny tokenizer",
    "Answer with at least three words and end your reply with the phrase is there anything else",
] * 20


def build_tiny_model(path, *, seed: int = 0, layers: int = 2, hidden: int = 32):
    """The benchmarks' tiny random Llama (benchmarks.common), sized for tests, with a tokenizer trained on
    CORPUS (the words of the tests' prompts and answers)."""
    from benchmarks.common import build_random_llama, tiny_tokenizer
    return build_random_llama(path, seed=seed, tokenizer=tiny_tokenizer(CORPUS, vocab_size=320), dims=dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def add_bos_on_tokenize(tok):
    """Make `tok` put its BOS before every text it tokenizes with special tokens (a TemplateProcessing
    post-processor), as the Llama and Gemma tokenizers of the paper's models do; the chat template is unchanged."""
    from tokenizers import processors
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def with_bos_tokenizer(model_dir, out):
    """A copy of a tiny model directory whose tokenizer adds its BOS (add_bos_on_tokenize)."""
    import shutil

    from transformers import AutoTokenizer
    shutil.copytree(model_dir, out)
    add_bos_on_tokenize(AutoTokenizer.from_pretrained(model_dir)).save_pretrained(out)
    return out


def chat_tokenizer(path, *, template: str, specials: list[str], bos: str, eos: str, pad: str, corpus=CORPUS,
                   add_bos: bool = False):
    """A byte-level BPE trained on `corpus` with the given special tokens and chat template, saved as tokenizer
    files in `path` and read back (a stand-in for a hub model's tokenizer; with add_bos, it adds its BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad)
    tok.chat_template = template
    if add_bos:
        add_bos_on_tokenize(tok)
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def make_adapter(model_dir, out):
    """A LoRA adapter with non-zero weights on the tiny model, saved as training saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def pair(i: int, *, chosen: str, rejected: str, prompt: str | None = None, meta: dict | None = None) -> dict:
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": prompt or f"write a short answer {i}"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "meta": meta or {}}


LOWERCASE_META = {"source": "synthetic:verifiable", "instruction_id_list": ["change_case:english_lowercase"],
                  "kwargs": [{}]}


def tiny_pairs(n: int = 8) -> list[dict]:
    """Pairs whose chosen answer follows 'lowercase only' and whose rejected one does not."""
    return [pair(i, chosen=f"hello world this is answer {i}", rejected=f"HELLO World {i}",
                 prompt=f"write a short answer in lowercase letters only {i}", meta=LOWERCASE_META)
            for i in range(n)]


def run_paths(run_dir) -> dict:
    """The output paths a training stage is told (as its Snakemake rule tells it): model, metrics, summary."""
    from pathlib import Path
    d = Path(run_dir)
    return {"out_dir": d / "model", "metrics_path": d / "metrics.jsonl", "summary_path": d / "train_summary.json"}


def write_jsonl(rows, path):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# A Hugging Face hub cache written by hand (HF_HUB_CACHE layout), so that the hub-loading code of the paper
# configs runs under HF_HUB_OFFLINE=1: <cache>/<kind>s--<owner>--<name>/{refs/main, snapshots/<commit>/...}
# ---------------------------------------------------------------------------------------------------

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_repo(cache, kind: str, repo_id: str):
    from pathlib import Path
    root = Path(cache) / f"{kind}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    return snap


def write_hub_model(cache, repo_id: str, model_dir):
    import shutil
    snap = _hub_repo(cache, "model", repo_id)
    shutil.copytree(model_dir, snap, dirs_exist_ok=True)
    return snap


def write_hub_dataset(cache, repo_id: str, splits: dict[str, list[dict]]):
    """Parquet files named as the hub names them (data/<split>-00000-of-00001.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    snap = _hub_repo(cache, "dataset", repo_id)
    (snap / "data").mkdir(exist_ok=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), snap / "data" / f"{split}-00000-of-00001.parquet")
    return snap


def ultrafeedback_rows(pairs: list[dict]) -> list[dict]:
    """Normalised pairs in HuggingFaceH4/ultrafeedback_binarized's layout: prompt (str), prompt_id, and
    chosen / rejected as whole conversations."""
    return [{"prompt": p["prompt"][-1]["content"], "prompt_id": f"uf-{p['id']}",
             "chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"],
             "score_chosen": 8.0, "score_rejected": 3.0} for p in pairs]
