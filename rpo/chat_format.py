"""How a preference pair becomes token ids (config `data.chat_format`): the one place that does it for the SFT
stage, the reference log-probs and preference training (rpo.train.tokenize_pairs).

    model     the model's own chat template (the default): the prompt is the template with the assistant turn
              opened (add_generation_prompt), the response the template's continuation after it
              (rpo.batching.prompt_ids / response_ids); no system message, no token the template does not write
    authors   the authors' recipe (YSLIU627/Regularized-Preference-Optimization @ d0389c4: the alignment-handbook
              fork's `apply_chat_template(task="rpo")` in src/alignment/data.py, then TRL v0.11.0's
              `DPOTrainer._tokenize`, which the fork's scripts/rpo_trainer.py copies):
              1. an empty system message is put first when the prompt has none and the template mentions
                 "system" or "<|im_start|>" (`maybe_insert_system_message`);
              2. the prompt text is the template over the prompt messages WITHOUT the generation prompt; each
                 response text is the template over the response messages alone (so the assistant header and
                 the closing tokens belong to the response, and enter its summed log-probability);
              3. TRL tokenizes the prompt alone and prompt + response as one string (add_special_tokens False),
                 the response being the ids after the prompt's; if the prompt's last token merged with the
                 response, the prompt is one token shorter and that token is in neither part (TRL's own rule);
              4. the tokenizer's BOS is put in front of the prompt unless it already starts with it, its EOS after
                 each response unless it already ends with it (trl.trainer.utils.add_bos/eos_token_if_needed).
              Beta series (zephyr template): prompt `<s><|system|>\\n</s>\\n<|user|>\\n{q}</s>\\n`, response
              `<|assistant|>\\n{a}</s>\\n</s>`. Gemma series (ChatML template writing bos and eos): prompt
              `<bos><|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n`, response
              `<|im_start|>assistant\\n{a}<|im_end|>\\n<eos>` (docs/authors_text.md, section 2).

Truncation (rpo.batching.fit) applies to the ids either way.
"""
from __future__ import annotations

FORMATS = ("model", "authors")


def check_format(chat_format: str) -> None:
    if chat_format not in FORMATS:
        raise ValueError(f"data.chat_format: unknown format {chat_format!r}; expected one of {list(FORMATS)}")


def template_of(tok) -> str:
    """The tokenizer's chat template as text (a tokenizer may hold several, by name: the default one)."""
    template = tok.chat_template if isinstance(tok.chat_template, str) else tok.get_chat_template()
    if not template:
        raise ValueError(f"{getattr(tok, 'name_or_path', 'tokenizer')}: no chat template")
    return template


def with_empty_system(tok, messages: list[dict]) -> list[dict]:
    """`messages` with an empty system message first, where the handbook's maybe_insert_system_message puts one:
    no system message yet, and a template that mentions "system" or "<|im_start|>"."""
    template = template_of(tok)
    if messages and messages[0]["role"] == "system":
        return list(messages)
    if "system" in template or "<|im_start|>" in template:
        return [{"role": "system", "content": ""}, *messages]
    return list(messages)


def render(tok, messages: list[dict]) -> str:
    """The template over `messages` as text, no generation prompt (the handbook's apply_chat_template call)."""
    return tok.apply_chat_template(list(messages), tokenize=False)


def authors_texts(tok, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> tuple[str, str, str]:
    """The handbook's text_prompt, text_chosen and text_rejected of one pair (steps 1-2 of the docstring)."""
    return render(tok, with_empty_system(tok, prompt)), render(tok, chosen), render(tok, rejected)


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _answer(tok, text_prompt: str, prompt_alone: list[int], text_answer: str) -> tuple[list[int], list[int]]:
    """TRL's _build_tokenized_answer: (the prompt's ids as in prompt + answer, the answer's ids)."""
    full = _ids(tok, text_prompt + text_answer)
    answer = full[len(prompt_alone):]  # taken before the merge check, as TRL takes it
    start = len(prompt_alone)
    if prompt_alone != full[:start]:
        start -= 1  # the prompt's last token merged with the answer's first
    return full[:start], answer


def authors_ids(tok, text_prompt: str, text_chosen: str, text_rejected: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids (prompt, chosen, rejected) of the handbook's texts as TRL v0.11 tokenizes them (steps 3-4)."""
    alone = _ids(tok, text_prompt)
    p_c, chosen = _answer(tok, text_prompt, alone, text_chosen)
    p_r, rejected = _answer(tok, text_prompt, alone, text_rejected)
    if p_c != p_r:
        # TRL keeps a prompt per response; here a pair shares one (rpo.batching packs it once). Only a merge of
        # the prompt's last token with one response's first token could make them differ.
        raise ValueError("data.chat_format authors: the prompt's last token merges with one response's first "
                         f"token and not the other's ({p_c[-3:]} vs {p_r[-3:]}); the pair has no shared prompt")
    prompt = p_c
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if bos is not None and (not prompt or prompt[0] != bos):
        prompt = [bos] + prompt
    if eos is None:
        raise ValueError(f"{getattr(tok, 'name_or_path', 'tokenizer')}: no eos token; TRL appends one to every response")
    chosen = chosen if chosen and chosen[-1] == eos else chosen + [eos]
    rejected = rejected if rejected and rejected[-1] == eos else rejected + [eos]
    return prompt, chosen, rejected


def pair_ids(tok, prompt: list[dict], chosen: list[dict], rejected: list[dict],
             chat_format: str = "model") -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of one normalised pair under `chat_format` (module docstring)."""
    check_format(chat_format)
    if chat_format == "authors":
        return authors_ids(tok, *authors_texts(tok, prompt, chosen, rejected))
    from rpo.batching import prompt_ids, response_ids
    p = prompt_ids(tok, prompt)
    return p, response_ids(tok, prompt, chosen, p), response_ids(tok, prompt, rejected, p)
