"""A hub cache for the paper configs' own sources, written by hand (HF_HUB_CACHE layout), so that
config/paper-beta.yaml runs offline on a CPU (tests/test_paper_path.py):

    HuggingFaceH4/mistral-7b-sft-beta        a tiny random 2-layer Llama with the zephyr chat template and <s>, </s>
    HuggingFaceH4/ultrafeedback_binarized    train_prefs / test_prefs in its layout (prompt, prompt_id, chosen and
                                             rejected as whole conversations, messages, scores)
    lmarena-ai/arena-hard-auto               Arena-Hard v0.1's question file (500) and gpt-4-0314's answers
    tatsu-lab/alpaca_eval                    df_gamed.csv: a stand-in with the columns and rows (2 gamed models x 805
                                             instructions) alpaca_eval's LC GLM reads, random values
    openai/openai_humaneval                  two HumanEval rows; one training pair's chosen answer holds the first
                                             one's docstring, so the authors' decontamination removes it
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from helpers.hub import hub_repo, write_hub_dataset, write_hub_model
from helpers.models import CORPUS

# HuggingFaceH4/mistral-7b-sft-beta's chat template (its tokenizer_config.json), the zephyr format
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
N_TRAIN, N_TEST = 16, 6


def zephyr_tokenizer():
    """A byte-level BPE on the tests' corpus with Mistral's special tokens and the zephyr template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ZEPHYR_TEMPLATE
    return tok


HUMANEVAL = [
    {"task_id": "HumanEval/0", "prompt": 'def f(x):\n    """Return the answer of x."""\n',
     "canonical_solution": "    return x * 42\n", "test": "", "entry_point": "f"},
    {"task_id": "HumanEval/1", "prompt": 'def g(s):\n    """Count the vowels in s."""\n',
     "canonical_solution": "    return sum(c in 'aeiou' for c in s)\n", "test": "", "entry_point": "g"},
]
CONTAMINATED = 3  # the training pair whose chosen answer quotes HumanEval/0's docstring


def _pairs(ids) -> list[dict]:
    rows = []
    for i in ids:
        q = f"write a short answer in lowercase letters only {i}"
        user = {"role": "user", "content": q}
        answer = "return the answer of x. done" if i == CONTAMINATED else f"hello world this is answer {i}"
        chosen = [user, {"role": "assistant", "content": answer}]
        rejected = [user, {"role": "assistant", "content": f"HELLO World {i}"}]
        rows.append({"prompt": q, "prompt_id": f"uf{i}", "chosen": chosen, "rejected": rejected, "messages": chosen,
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def write_hub(cache: Path) -> Path:
    from benchmarks.common import build_random_llama
    cache = Path(cache)
    model = build_random_llama(cache.parent / f"{cache.name}-model", tokenizer=zephyr_tokenizer(), seed=0, dims=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=False))  # untied: greedy answers are not the prompt's last token
    write_hub_model(cache, "HuggingFaceH4/mistral-7b-sft-beta", model)
    write_hub_dataset(cache, "HuggingFaceH4/ultrafeedback_binarized",
                      {"train_prefs": _pairs(range(N_TRAIN)), "test_prefs": _pairs(range(100, 100 + N_TEST))})
    write_hub_dataset(cache, "openai/openai_humaneval", {"test": HUMANEVAL})
    snap = hub_repo(cache, "dataset", "lmarena-ai/arena-hard-auto")
    (snap / "data/arena-hard-v0.1/model_answer").mkdir(parents=True, exist_ok=True)
    (snap / "data/arena-hard-v0.1/question.jsonl").write_text("".join(
        json.dumps({"question_id": f"q{i}", "category": "arena-hard-v0.1", "cluster": "c",
                    "turns": [{"content": f"write a short answer {i}"}]}) + "\n" for i in range(500)))
    (snap / "data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl").write_text("".join(
        json.dumps({"question_id": f"q{i}", "model_id": "gpt-4-0314",
                    "choices": [{"index": 0, "turns": [{"content": f"the answer {i}"}]}]}) + "\n" for i in range(500)))
    snap = hub_repo(cache, "dataset", "tatsu-lab/alpaca_eval")
    rng = random.Random(0)
    lines = ["model,index,preference,std_delta_len,instruction_difficulty,not_gamed_baseline"]
    for m in ("gamed_concise", "gamed_verbose"):
        lines += [f"{m},{i},{rng.random():.4f},{rng.uniform(-1, 1):.4f},{rng.uniform(-1, 1):.4f},False"
                  for i in range(805)]
    (snap / "df_gamed.csv").write_text("\n".join(lines) + "\n")
    return cache
