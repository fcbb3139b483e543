"""Tiny models the tests build themselves: a randomly initialised Llama with a byte-level BPE tokenizer and a
chat template, written to disk the way `rpo.models.materialise_model` writes a model (built in ~1 s); tokenizers
with other templates and special tokens; a LoRA adapter with non-zero weights."""
from __future__ import annotations

from rpo.testing import build_random_llama, tiny_tokenizer

# transformers, tokenizers and peft are imported by the functions that use them: heavy, and most tests that import
# this module need only build_tiny_model

CORPUS = [
    "write a short answer in lowercase letters only",
    "The quick brown fox jumps over the lazy dog. No commas here please",
    "hello world this is a tiny corpus for a tiny tokenizer",
    "Answer with at least three words and end your reply with the phrase is there anything else",
] * 20


def build_tiny_model(path, *, seed: int = 0, layers: int = 2, hidden: int = 32):
    """The tiny random Llama of rpo.testing (the benchmarks' too), sized for tests, with a tokenizer trained on
    CORPUS (the words of the tests' prompts and answers)."""
    return build_random_llama(path, seed=seed, tokenizer=tiny_tokenizer(CORPUS, vocab_size=320), dims=dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512))


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
