"""Tiny and randomly initialised models for the tests and the benchmarks (tests/helpers/models.py,
benchmarks/common.py): a byte-level BPE trained in a second, a ChatML-like chat template, a random Llama saved
as a model directory (tiny, or of a real shape for GPU speed and memory measurements)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

# Real shapes (public configs of Llama-3.2-1B and Llama-3.1-8B); weights are random, so only speed and
# memory mean anything on them.
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from "
         "or had by word but what some we can out other were all there when up use your how said an each "
         "she which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over know "
         "water than call first who may down side been now find any new work part take get place made live "
         "where after back little only round man year came show every good me give our under name very "
         "through just form sentence great think say help low line differ turn cause much mean before move "
         "right boy old too same tell does set three want air well also play small end put home read hand "
         "port large spell add even land here must big high such follow act why ask men change went light "
         "kind off need house picture try us again animal point mother world near build self earth father").split()


# ChatML-like, like SmolLM2's: the chat template of every tiny model the tests and benchmarks build
TINY_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE trained in a second on `corpus` (default: the benchmark words), with ChatML special
    tokens and TINY_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    if corpus is None:
        corpus = [" ".join(WORDS[i:i + 12]) for i in range(0, len(WORDS), 12)] * 4
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|endoftext|>")
    tok.chat_template = TINY_TEMPLATE
    return tok


def build_random_llama(path, *, shape: str | None = None, seed: int = 0, device: str = "cpu",
                       tokenizer=None, dims: dict | None = None) -> Path:
    """A randomly initialised Llama saved as a model directory: tiny (shape None; `dims` overrides its
    sizes) or a real shape, with `tokenizer` (default: tiny_tokenizer()).

    A real shape keeps the real vocabulary size (the LM head is a large part of the cost) and simply
    never sees most ids.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok = tokenizer or tiny_tokenizer()
    if shape is None:
        dims = {**dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), **(dims or {})}
    else:
        dims = SHAPES[shape]
    cfg = LlamaConfig(**{"max_position_embeddings": 4096, **dims}, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    if shape is not None:
        model = model.to(torch.bfloat16)  # half the disk; load_model casts back to float32
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    del model
    if device == "cuda":  # the caller goes on to start measured processes on the same GPU
        torch.cuda.empty_cache()
    return path
