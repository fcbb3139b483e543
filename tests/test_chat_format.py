"""data.chat_format authors (rpo/chat_format.py): the authors' training text and token boundaries for both paper
series, on local tokenizer files the tests build with each series' chat template (neither tokenizer can be
downloaded here). The expected values come from an independent re-implementation of the authors' code path,
written here from its published logic: the alignment-handbook fork's apply_chat_template(task="rpo") with its
automatic empty system message (YSLIU627/Regularized-Preference-Optimization @ d0389c4,
alignment-handbook/src/alignment/data.py), rendered with jinja2 as transformers renders chat templates
(trim_blocks, lstrip_blocks), then TRL v0.11.0's DPOTrainer._tokenize (_build_tokenized_answer, then
trl.trainer.utils.add_bos_token_if_needed / add_eos_token_if_needed); docs/authors_text.md, section 2.

Run: pytest -q tests/test_chat_format.py        (a few seconds)
"""
from __future__ import annotations

import jinja2
import pytest
from helpers.models import chat_tokenizer
from transformers import AutoTokenizer

from rpo.chat_format import authors_texts, pair_ids

# The zephyr template of the beta series: the chat_template of HuggingFaceH4/alignment-handbook
# recipes/zephyr-7b-beta/sft/config_full.yaml @ a9b8a50a2761bbb2a6a0d24c609cfc17fc26f636 (the recipe of
# mistral-7b-sft-beta), equal to DEFAULT_CHAT_TEMPLATE in the authors' alignment-handbook/src/alignment/data.py.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# The ChatML template of the gemma series (zephyr-7b-gemma-sft-v0.1, trained with philschmid/gemma-tokenizer-chatml):
# the chat_template of HuggingFaceH4/alignment-handbook recipes/zephyr-7b-gemma/sft/config_full.yaml @
# 868d306bb3bab95dac38bed251723798eaeecc6f ("Fix gemma"), which writes that tokenizer's template inline.
GEMMA_TEMPLATE = (
    "{% if messages[0]['role'] == 'user' or messages[0]['role'] == 'system' %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% elif messages[-1]['role'] == 'assistant' %}{{ eos_token }}{% endif %}")

CORPUS = ["what is two plus two", "four is the answer", "and times three", "twelve of course",
          "system user assistant im start end bos eos", "hello world, how are you"] * 10


@pytest.fixture(scope="module")
def beta_tok(tmp_path_factory):
    # mistral-7b-sft-beta: <s> and </s> are special tokens, <|user|> & co. are plain text
    return chat_tokenizer(tmp_path_factory.mktemp("beta"), template=ZEPHYR_TEMPLATE, corpus=CORPUS,
                          specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", pad="</s>")


@pytest.fixture(scope="module")
def gemma_tok(tmp_path_factory):
    # the ChatML gemma tokenizer: <bos>, <eos> and the two ChatML markers are special tokens
    return chat_tokenizer(tmp_path_factory.mktemp("gemma"), template=GEMMA_TEMPLATE, corpus=CORPUS,
                          specials=["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>", "<|im_end|>"],
                          bos="<bos>", eos="<eos>", pad="<pad>")


def user(t):
    return {"role": "user", "content": t}


def asst(t):
    return {"role": "assistant", "content": t}


ONE_TURN = [user("what is two plus two")]
TWO_TURNS = [user("what is two plus two"), asst("four"), user("and times three")]
CHOSEN, REJECTED = [asst("twelve of course")], [asst("hello world")]


# ----------------------------------------------------------------- the authors' code path, re-implemented here

def handbook_texts(template: str, bos: str, eos: str, prompt, chosen, rejected):
    """apply_chat_template(task="rpo") on a row whose chosen/rejected are whole conversations: the prompt is
    chosen[:-1] with an empty system message first (the template names "system"), each response its last turn."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def render(msgs):
        return env.from_string(template).render(messages=msgs, bos_token=bos, eos_token=eos,
                                                add_generation_prompt=False)
    row_chosen, row_rejected = prompt + chosen, prompt + rejected
    prompt_messages = row_chosen[:-1]
    if prompt_messages[0]["role"] != "system" and ("system" in template or "<|im_start|>" in template):
        prompt_messages = [{"role": "system", "content": ""}] + prompt_messages
    return render(prompt_messages), render(row_chosen[-1:]), render(row_rejected[-1:])


def trl_tokenize(tok, text_prompt, text_chosen, text_rejected):
    """TRL v0.11.0 _tokenize for one row: prompt ids and each answer's ids, BOS and EOS added where missing."""
    def enc(t):
        return tok(t, add_special_tokens=False)["input_ids"]
    alone = enc(text_prompt)
    rows = {}
    for name, answer in (("chosen", text_chosen), ("rejected", text_rejected)):
        full = enc(text_prompt + answer)
        answer_ids = full[len(alone):]
        start = len(alone) - (alone != full[:len(alone)])
        rows[name] = {"prompt": full[:start], "answer": answer_ids}
    for r in rows.values():
        if not r["prompt"] or r["prompt"][0] != tok.bos_token_id:
            r["prompt"] = [tok.bos_token_id] + r["prompt"]
        if not r["answer"] or r["answer"][-1] != tok.eos_token_id:
            r["answer"] = r["answer"] + [tok.eos_token_id]
    return rows


# ----------------------------------------------------------------- beta series

def test_beta_one_turn_is_the_authors_text_and_boundaries(beta_tok):
    texts = authors_texts(beta_tok, ONE_TURN, CHOSEN, REJECTED)
    # the authors' strings: an empty system turn; no generation prompt: the assistant header opens the response
    assert texts == ("<|system|>\n</s>\n<|user|>\nwhat is two plus two</s>\n",
                     "<|assistant|>\ntwelve of course</s>\n", "<|assistant|>\nhello world</s>\n")
    assert texts == handbook_texts(ZEPHYR_TEMPLATE, "<s>", "</s>", ONE_TURN, CHOSEN, REJECTED)
    p, c, r = pair_ids(beta_tok, ONE_TURN, CHOSEN, REJECTED, "authors")
    want = trl_tokenize(beta_tok, *texts)
    assert (p, c, r) == (want["chosen"]["prompt"], want["chosen"]["answer"], want["rejected"]["answer"])
    assert want["rejected"]["prompt"] == p
    # read back: TRL put <s> before the prompt (the template writes none) and </s> after the response (it ends
    # in "\n"), so the response's summed log-prob covers "<|assistant|>\n", the answer, "</s>\n" and "</s>"
    assert beta_tok.decode(p) == "<s><|system|>\n</s>\n<|user|>\nwhat is two plus two</s>\n"
    assert beta_tok.decode(c) == "<|assistant|>\ntwelve of course</s>\n</s>"
    assert p[0] == beta_tok.bos_token_id and p.count(beta_tok.bos_token_id) == 1
    # not the model format: there the header is in the prompt, no system turn, no BOS
    mp, mc, _ = pair_ids(beta_tok, ONE_TURN, CHOSEN, REJECTED, "model")
    assert beta_tok.decode(mp) == "<|user|>\nwhat is two plus two</s>\n<|assistant|>\n"
    assert beta_tok.decode(mc) == "twelve of course</s>\n" and (mp, mc) != (p, c)


def test_beta_two_turns_split_at_the_last_assistant_turn(beta_tok):
    texts = authors_texts(beta_tok, TWO_TURNS, CHOSEN, REJECTED)
    assert texts[0] == ("<|system|>\n</s>\n<|user|>\nwhat is two plus two</s>\n<|assistant|>\nfour</s>\n"
                        "<|user|>\nand times three</s>\n")
    assert texts == handbook_texts(ZEPHYR_TEMPLATE, "<s>", "</s>", TWO_TURNS, CHOSEN, REJECTED)
    p, c, r = pair_ids(beta_tok, TWO_TURNS, CHOSEN, REJECTED, "authors")
    want = trl_tokenize(beta_tok, *texts)
    assert (p, c, r) == (want["chosen"]["prompt"], want["chosen"]["answer"], want["rejected"]["answer"])
    assert beta_tok.decode(r) == "<|assistant|>\nhello world</s>\n</s>"


# ----------------------------------------------------------------- gemma series

def test_gemma_one_turn_is_the_authors_text_and_boundaries(gemma_tok):
    texts = authors_texts(gemma_tok, ONE_TURN, CHOSEN, REJECTED)
    # the template writes <bos> before a conversation that starts with a user or system turn, and <eos> after one
    # that ends with an assistant turn: the response alone gets no <bos> and ends in <eos>
    assert texts == ("<bos><|im_start|>system\n<|im_end|>\n<|im_start|>user\nwhat is two plus two<|im_end|>\n",
                     "<|im_start|>assistant\ntwelve of course<|im_end|>\n<eos>",
                     "<|im_start|>assistant\nhello world<|im_end|>\n<eos>")
    assert texts == handbook_texts(GEMMA_TEMPLATE, "<bos>", "<eos>", ONE_TURN, CHOSEN, REJECTED)
    p, c, r = pair_ids(gemma_tok, ONE_TURN, CHOSEN, REJECTED, "authors")
    want = trl_tokenize(gemma_tok, *texts)
    assert (p, c, r) == (want["chosen"]["prompt"], want["chosen"]["answer"], want["rejected"]["answer"])
    # TRL adds neither: the prompt already starts with <bos>, each response already ends with <eos>
    assert p.count(gemma_tok.bos_token_id) == 1 and p[0] == gemma_tok.bos_token_id
    assert c[-1] == gemma_tok.eos_token_id and c.count(gemma_tok.eos_token_id) == 1
    assert gemma_tok.decode(c) == "<|im_start|>assistant\ntwelve of course<|im_end|>\n<eos>"


def test_gemma_two_turns_and_a_row_that_has_its_own_system_message(gemma_tok):
    texts = authors_texts(gemma_tok, TWO_TURNS, CHOSEN, REJECTED)
    assert texts[0] == ("<bos><|im_start|>system\n<|im_end|>\n<|im_start|>user\nwhat is two plus two<|im_end|>\n"
                        "<|im_start|>assistant\nfour<|im_end|>\n<|im_start|>user\nand times three<|im_end|>\n")
    assert texts == handbook_texts(GEMMA_TEMPLATE, "<bos>", "<eos>", TWO_TURNS, CHOSEN, REJECTED)
    want = trl_tokenize(gemma_tok, *texts)
    assert pair_ids(gemma_tok, TWO_TURNS, CHOSEN, REJECTED, "authors") == (
        want["chosen"]["prompt"], want["chosen"]["answer"], want["rejected"]["answer"])
    # a conversation that starts with a system message keeps it: no empty one is put before it
    with_system = [{"role": "system", "content": "be brief"}] + ONE_TURN
    assert authors_texts(gemma_tok, with_system, CHOSEN, REJECTED)[0] == (
        "<bos><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is two plus two<|im_end|>\n")


# ----------------------------------------------------------------- TRL's merge rule

def test_a_merged_boundary_token_is_dropped_as_trl_drops_it(tmp_path):
    """A template without separators, and merges that join the prompt's last character to the response's first:
    TRL takes the answer after the standalone prompt's length and shortens the prompt by one, so the merged
    token is in neither part."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set("system:user:assistant:qa") | {"<s>", "</s>"})
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["qa"] = len(vocab)  # 'q' (the prompt's last character) + 'a' (the response's first)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[("q", "a")]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    prompt, chosen, rejected = [user("q")], [asst("a")], [asst("aa")]
    texts = authors_texts(tok, prompt, chosen, rejected)
    assert texts == ("user:q", "assistant:a", "assistant:aa")  # no "system" in this template: none inserted
    want = trl_tokenize(tok, *texts)
    p, c, r = pair_ids(tok, prompt, chosen, rejected, "authors")
    assert (p, c, r) == (want["chosen"]["prompt"], want["chosen"]["answer"], want["rejected"]["answer"])
    alone = tok("user:q", add_special_tokens=False)["input_ids"]
    assert tok("user:qassistant:a", add_special_tokens=False)["input_ids"][len(alone) - 1] == vocab["qa"]
    assert len(p) == len(alone)  # BOS added, the merged last token dropped
    assert vocab["qa"] not in p + c  # in neither part
