"""Tokenisation of prompt/response pairs and summed response log-probabilities.

A response is tokenised as the difference between the chat template applied to prompt + response and
the template applied to the prompt with the generation prompt, so the response tokens include the
template's end-of-turn token (the model must learn to stop) and nothing of the prompt.
Sequences longer than `max_length` are cut by a documented rule, the same as TRL's "keep_end" default
for prompts: the prompt keeps its last `max_prompt_length` tokens, then the response is cut to fit.
Every cut is counted (see `tokenize_pairs`' summary), never silently applied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _ids(tok, messages, *, add_generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def prompt_ids(tok, prompt_messages) -> list[int]:
    return _ids(tok, prompt_messages, add_generation_prompt=True)


def response_ids(tok, prompt_messages, response_messages, p_ids: list[int] | None = None) -> list[int]:
    p_ids = prompt_ids(tok, prompt_messages) if p_ids is None else p_ids
    full = _ids(tok, list(prompt_messages) + list(response_messages), add_generation_prompt=False)
    if full[:len(p_ids)] != p_ids:
        # Templates that rewrite earlier turns break the prefix property; fall back to the raw text.
        text = "".join(m["content"] for m in response_messages)
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return full[len(p_ids):]


@dataclass
class Truncation:
    prompt: int = 0
    response: int = 0

    def as_dict(self) -> dict:
        return {"prompt_truncated": self.prompt, "response_truncated": self.response}


def fit(p: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
        counter: Truncation) -> tuple[list[int], list[list[int]]]:
    """Apply the truncation rule to one prompt and its responses (counted in `counter`)."""
    if len(p) + max(len(r) for r in responses) > max_length and len(p) > max_prompt_length:
        p = p[-max_prompt_length:]
        counter.prompt += 1
    budget = max_length - len(p)
    if budget < 1:
        raise ValueError(f"max_prompt_length {max_prompt_length} leaves no room for a response "
                         f"under max_length {max_length}")
    out = []
    for r in responses:
        if len(r) > budget:
            r = r[:budget]
            counter.response += 1
        out.append(r)
    return p, out


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad [prompt + response] sequences; `labels_mask` marks response tokens."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    lab = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        lab[i, len(p):n] = True
    return {"input_ids": ids, "attention_mask": attn, "labels_mask": lab}


def summed_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log π(response token | prefix), and response token counts.

    Only positions from the earliest response start onwards go through the LM head (`logits_to_keep`):
    prompt positions never need logits, and the fp32 logits over a 49k-49k-token vocabulary are the
    largest tensor of the step.
    """
    ids, attn, lab = batch["input_ids"], batch["attention_mask"], batch["labels_mask"]
    first = int(lab.float().argmax(dim=1).min())  # earliest response token over the batch
    keep = ids.shape[1] - first + 1  # logits at position t predict token t+1
    logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
    logits = logits[:, :-1].float()
    targets = ids[:, first:]
    mask = lab[:, first:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = logp.masked_fill(~mask, 0.0)
    return logp.sum(dim=1), mask.sum(dim=1)
