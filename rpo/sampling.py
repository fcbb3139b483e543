"""Answer generation with the Hugging Face backend: batched, the model's own chat template, seeded.

Answers are appended to `<out>.partial` batch by batch and the file is renamed to `<out>` at the end,
so an interrupted run resumes where it stopped and never regenerates a finished answer.
Each batch is seeded from (seed, its first prompt id), so resumed and uninterrupted runs sample the
same answers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def _batch_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def _read_done(path: Path) -> dict[str, dict]:
    done = {}
    if path.is_file():
        with path.open() as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything before it is intact
                done[row["id"]] = row
    return done


def _sample_top_k_top_p(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                        generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row from softmax(logits / T) restricted to the top-k, then the top-p mass.

    Restricting to the top-k first keeps each step's sort to k entries instead of the whole vocabulary
    (a sort over 49k logits per row per step costs more than the model step itself on CPU).
    """
    k = logits.shape[-1] if top_k <= 0 else min(top_k, logits.shape[-1])
    vals, idx = torch.topk(logits.float() / temperature, k, dim=-1)  # sorted, descending
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above this one
        probs = probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
    return idx.gather(-1, choice).squeeze(-1)


@torch.inference_mode()
def sample(model, input_ids, attention_mask, *, max_new_tokens: int, num_return_sequences: int = 1,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop_ids=(), pad_id: int = 0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Decode up to `max_new_tokens` for a left-padded batch; returns [B * n, T] new tokens (pad after stop).

    Unlike `model.generate(num_return_sequences=n)`, which copies every prompt n times before the
    prefill, the prompt is run once and its KV cache is repeated: with 4 samples per prompt the
    prefill, the larger part of the cost for short answers on CPU, is 4x cheaper.
    temperature 0 means greedy decoding.
    """
    n = num_return_sequences
    prefill_pos = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=prefill_pos,
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1].float()
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
    stop = torch.tensor(sorted(stop_ids), device=logits.device, dtype=torch.long)
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    # Positions continue from each row's own last prompt token (rows are left-padded).
    position = attention_mask.sum(dim=1, keepdim=True)
    new = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            nxt = _sample_top_k_top_p(logits, temperature, top_k, top_p, generator)
        else:
            nxt = logits.argmax(dim=-1)
        nxt = nxt.masked_fill(done, pad_id)
        new.append(nxt)
        done |= torch.isin(nxt, stop)
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=attention_mask, past_key_values=cache,
                    position_ids=position, use_cache=True)
        position = position + 1
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
    return torch.stack(new, dim=1).cpu()


def generate_answers(model, tok, prompts: list[dict], out_path: str | Path, *, max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     batch_size: int = 16,
                     seed: int = 0, num_return_sequences: int = 1, model_name: str = "",
                     desc: str = "generate") -> list[dict]:
    """Generate answers for `prompts` = [{"id": str, "messages": [...]}, ...] into a JSONL file.

    Each output row: {"id", "model", "messages", "responses": [str] * num_return_sequences,
    "n_tokens": [int], "finished": [bool]} (finished = the model stopped before max_new_tokens).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{out_path}: duplicate prompt ids in the generation input")
    partial = out_path.with_name(out_path.name + ".partial")
    done = _read_done(partial)
    # Rewrite the partial file without a possibly cut last line before appending to it.
    with partial.open("w") as f:
        for row in done.values():
            f.write(json.dumps(row) + "\n")
    todo = [p for p in prompts if p["id"] not in done]
    if done:
        log.info("%s: resuming, %d of %d answers already done", out_path, len(done), len(prompts))

    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    encoded = []
    for p in todo:
        enc = tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True)
        encoded.append(list(enc["input_ids"] if hasattr(enc, "keys") else enc))
    # Length-sorted batches waste less compute on padding; the output order is restored below.
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    stop_ids = {tok.eos_token_id, tok.pad_token_id} - {None}
    with partial.open("a") as f, tqdm(total=len(todo), desc=desc, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(input_ids)
            for j, i in enumerate(idx):
                input_ids[j, width - len(encoded[i]):] = torch.tensor(encoded[i])
                attn[j, width - len(encoded[i]):] = 1
            gen = torch.Generator().manual_seed(_batch_seed(seed, todo[idx[0]]["id"]))
            new = sample(model, input_ids.to(device), attn.to(device), max_new_tokens=max_new_tokens,
                         num_return_sequences=num_return_sequences, temperature=temperature,
                         top_p=top_p, top_k=top_k, stop_ids=stop_ids, pad_id=tok.pad_token_id, generator=gen)
            for j, i in enumerate(idx):
                texts, lens, finished = [], [], []
                for k in range(num_return_sequences):
                    seq = new[j * num_return_sequences + k].tolist()
                    n = len(seq)
                    for pos, t in enumerate(seq):
                        if t in stop_ids:
                            n = pos
                            break
                    texts.append(tok.decode(seq[:n], skip_special_tokens=True).strip())
                    lens.append(n)
                    finished.append(n < len(seq))
                row = {"id": todo[i]["id"], "model": model_name, "messages": todo[i]["messages"],
                       "responses": texts, "n_tokens": lens, "finished": finished}
                f.write(json.dumps(row) + "\n")
                done[row["id"]] = row
            f.flush()
            bar.update(len(idx))
    rows = [done[i] for i in ids]
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out_path)
    partial.unlink()
    return rows
