"""Answer generation: batched, the model's own chat template, seeded; the sampler of the HF backend, whose
next-token choice (next_tokens) and answer files rpo.llamacpp's backend shares.

Answers are appended to `<out>.partial` batch by batch and the finished file is written to `<out>` at
the end, so an interrupted run resumes where it stopped and never regenerates a finished answer.
The partial file's first line records what produced it (`generation_identity`: a fingerprint of the
weights in memory and of the tokenizer, the decoding settings); a re-run with anything of that changed
discards it with a log line instead of mixing old answers into the new file, and keeps an answer only
while its prompt is unchanged. Each batch is seeded from (seed, its first prompt id), so resumed and
uninterrupted runs sample the same answers.

How a prompt becomes token ids and an answer text (the settings of every generation stage):
* a prompt row {"id", "messages"} is the chat template with the assistant turn opened; one that also holds
  "text" (an AlpacaEval prompt template filled in, FastChat's conversation) is that string;
* add_special_tokens False: the template's tokens as they stand (transformers' apply_chat_template); True: the
  text tokenized as a string prompt is by vLLM's LLM.generate or FastChat's `tokenizer([prompt])`, the
  tokenizer's BOS in front (the authors' scripts);
* an answer stops at the tokenizer's eos and pad ids and at `stop_token_ids` (gen_eval_gemma.py's [3, 107]);
* answer_text "stripped": decoded without special tokens, stripped; "raw": not stripped (the authors' Table 1
  takes vLLM's text as it comes; the vLLM backend then takes vLLM's own detokenized text).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from rpo import io

log = logging.getLogger(__name__)

ANSWER_TEXTS = ("stripped", "raw")


def derived_seed(seed: int, key: str) -> int:
    """A 32-bit seed from (seed, key): a batch's from its first prompt id here, a request's in eval.vllm_backend."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


def encode_prompt(tok, messages: list[dict], *, text: str | None = None, add_special_tokens: bool = False) -> list[int]:
    """The prompt's token ids: `text`, or the model's own chat template with the assistant turn opened, tokenized
    with or without the tokenizer's special tokens (module docstring). Every backend builds its prompts here, so
    they are the same tokens (eval.vllm_backend passes them to vLLM as is)."""
    if text is None and not add_special_tokens:
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)
    if text is None:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_row(tok, prompt: dict, add_special_tokens: bool = False) -> list[int]:
    """encode_prompt of a prompt row ({"id", "messages"[, "text"]})."""
    return encode_prompt(tok, prompt["messages"], text=prompt.get("text"), add_special_tokens=add_special_tokens)


def stop_token_ids(tok, extra=()) -> set[int]:
    """Where an answer ends: the tokenizer's end-of-sequence and pad ids, and the `extra` ids."""
    return ({tok.eos_token_id, tok.pad_token_id} | {int(i) for i in extra}) - {None}


def check_answer_text(answer_text: str) -> None:
    if answer_text not in ANSWER_TEXTS:
        raise ValueError(f"answer_text {answer_text!r}: expected one of {list(ANSWER_TEXTS)}")


def decode_answer(tok, seq: list[int], stop_ids, *, strip: bool = True) -> tuple[str, int]:
    """(text, length) of one generated sequence: the tokens before its first stop token, decoded without
    special tokens and (`strip`) stripped."""
    length = next((pos for pos, t in enumerate(seq) if t in stop_ids), len(seq))
    text = tok.decode(seq[:length], skip_special_tokens=True)
    return (text.strip() if strip else text), length


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of prompts left-padded to one width (generation continues on the right)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, width - len(s):] = torch.tensor(s)
        attn[j, width - len(s):] = 1
    return ids, attn


def model_fingerprint(model) -> str:
    """sha256 of the weights in memory: every tensor's name, dtype, shape and bytes.

    It binds a resumable output to the model that actually generates (a merged LoRA adapter included),
    whatever directory it came from. Exact, and cheap next to generation: sha256 runs at about 1 GB/s
    (about 1 s for SmolLM2-135M in fp32 on the 2 shared CPU cores of this package's machine, measured;
    about 15 s for a 7B model in bf16). GPU tensors are copied to the CPU one at a time. An engine that is not
    a torch module (rpo.llamacpp.Engine) brings its own: the digest of the files its GGUFs were written from.
    """
    if hasattr(model, "fingerprint"):
        return model.fingerprint
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def tokenizer_fingerprint(tok) -> str:
    """A hash of what turns messages into token ids and back: vocabulary, special ids, chat template."""
    blob = json.dumps([type(tok).__name__, sorted(tok.get_vocab().items()), tok.eos_token_id, tok.pad_token_id,
                       tok.chat_template], ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def generation_identity(model, tok, *, weights: str | None = None, **settings) -> dict:
    """What a resumable answer file depends on besides its prompts: model, tokenizer, `settings`.
    `weights`: model_fingerprint(model) when the caller already has it (one hash per job, not per call)."""
    return {"model": weights or model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tok),
            **{k: settings[k] for k in sorted(settings)}}


def _prompt_key(row: dict) -> tuple:
    """What an answer's prompt is: its messages and, when it has one, its text."""
    return row.get("messages"), row.get("text")


def _text_identity(add_special_tokens: bool, extra_stop_ids, answer_text: str) -> dict:
    """The prompt/answer text settings as far as they differ from the defaults (whose partial files keep the
    identity they had before these settings existed)."""
    out = {"add_special_tokens": True} if add_special_tokens else {}
    if extra_stop_ids:
        out["stop_token_ids"] = sorted(int(i) for i in extra_stop_ids)
    if answer_text != "stripped":
        out["answer_text"] = answer_text
    return out


def _read_done(path: Path, identity: dict, prompts: dict[str, tuple]) -> dict[str, dict]:
    """Answers of `path` made by `identity` for prompts still in `prompts`; anything else is discarded."""
    if not path.is_file():
        return {}
    try:
        records = io.read_jsonl(path, allow_cut_tail=True)  # a kill cuts at most the last line
    except io.JSONLError as e:
        log.warning("%s: unreadable partial file, discarding it (%s)", path, e)
        return {}
    header = records[0] if records and isinstance(records[0], dict) else {}
    old = header.get("identity")
    if len(records) <= 1:
        return {}  # nothing answered yet
    if old != identity:
        changed = sorted(k for k in set(identity) | set(old or {}) if (old or {}).get(k) != identity.get(k))
        log.warning("%s: discarding %d answers of an interrupted run made with a different %s",
                    path, len(records) - 1, ", ".join(changed) if old else "or unknown producer")
        return {}
    done = {}
    for row in records[1:]:
        if isinstance(row, dict) and prompts.get(row.get("id")) == _prompt_key(row):
            done[row["id"]] = row
    if len(done) < len(records) - 1:
        log.warning("%s: discarding %d answers whose prompt changed or is gone", path, len(records) - 1 - len(done))
    return done


def _sample_top_k_top_p(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                        generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row from softmax(logits / T) restricted to the top-k, then the top-p mass.

    Restricting to the top-k first keeps each step's sort to k entries instead of the whole vocabulary
    (a sort over 49k logits per row per step costs more than the model step itself on CPU).
    """
    if (top_k <= 0 or top_k >= logits.shape[-1]) and top_p >= 1.0:
        # the whole distribution: no sort needed (a full-vocabulary topk per step costs more than the model)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device).squeeze(-1)
    k = logits.shape[-1] if top_k <= 0 else min(top_k, logits.shape[-1])
    vals, idx = torch.topk(logits.float() / temperature, k, dim=-1)  # sorted, descending
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above this one
        probs = probs.masked_fill(before >= top_p, 0.0)
    choice = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
    return idx.gather(-1, choice).squeeze(-1)


def _next_tokens(logits, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    if temperature > 0:
        return _sample_top_k_top_p(logits, temperature, top_k, top_p, generator)
    return logits.argmax(dim=-1)


def temperature_groups(temperature: float | list[float], n: int, n_prompts: int, device=None) -> list:
    """[(temperature, row indices)] of a batch of `n_prompts` x `n` responses (rows prompt-major): one float
    for all, or one per response of a prompt (see `sample`)."""
    temps = [float(temperature)] * n if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
    if len(temps) != n:
        raise ValueError(f"temperature: {len(temps)} values for num_return_sequences={n}; expected one per response")
    row_temp = torch.tensor(temps * n_prompts)
    return [(t, (row_temp == t).nonzero().squeeze(-1).to(device)) for t in sorted(set(temps))]


def next_tokens(logits: torch.Tensor, groups: list, top_k: int, top_p: float, generator) -> torch.Tensor:
    """One decoding step's token per row of `logits` [rows, vocab]: each temperature group (temperature_groups)
    greedy (0) or sampled, in the groups' order, so that every backend draws the same from `generator`."""
    if len(groups) == 1:
        return _next_tokens(logits, groups[0][0], top_k, top_p, generator)
    nxt = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for t, rows in groups:
        nxt[rows] = _next_tokens(logits[rows], t, top_k, top_p, generator)
    return nxt


def sample_step(logits: torch.Tensor, done: torch.Tensor, *, groups: list, top_k: int, top_p: float, generator,
                pad_id: int, stop: torch.Tensor, logps: list | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of every row, finished or not (so the generator's stream does not depend on which rows
    finished): (the tokens, pad where a row had finished; the rows finished after it). With `logps`, appends each
    chosen token's log-probability (0 for finished rows)."""
    nxt = next_tokens(logits, groups, top_k, top_p, generator)
    if logps is not None:
        logps.append(torch.log_softmax(logits, dim=-1).gather(-1, nxt[:, None]).squeeze(-1).masked_fill(done, 0.0))
    nxt = nxt.masked_fill(done, pad_id)
    return nxt, done | torch.isin(nxt, stop)


@torch.inference_mode()
def sample(model, input_ids, attention_mask, *, max_new_tokens: int, num_return_sequences: int = 1,
           temperature: float | list[float] = 0.0, top_p: float = 1.0, top_k: int = 0, stop_ids=(),
           pad_id: int = 0, generator: torch.Generator | None = None, return_logps: bool = False):
    """Decode up to `max_new_tokens` for a left-padded batch; returns [B * n, T] new tokens (pad after stop),
    and with `return_logps` also [B * n, T] float32: each new token's log-prob under the model's own
    next-token distribution (the log-softmax of its logits, whatever the sampling temperature; 0 after stop).

    Unlike `model.generate(num_return_sequences=n)`, which copies every prompt n times before the
    prefill, the prompt is run once and its KV cache is repeated: with 4 samples per prompt the
    prefill, the larger part of the cost for short answers on CPU, is 4x cheaper.
    temperature 0 means greedy decoding. A list gives each of the n responses to a prompt its own
    temperature (e.g. [0.0, 1.0]: a greedy answer and a sample from one prefill); rows of one temperature
    are sampled together, so greedy rows draw nothing from `generator`.
    """
    n = num_return_sequences
    groups = temperature_groups(temperature, n, input_ids.shape[0], input_ids.device)
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
    new, logps = [], []
    for _ in range(max_new_tokens):
        nxt, done = sample_step(logits, done, groups=groups, top_k=top_k, top_p=top_p, generator=generator,
                                pad_id=pad_id, stop=stop, logps=logps if return_logps else None)
        new.append(nxt)
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=nxt[:, None], attention_mask=attention_mask, past_key_values=cache,
                    position_ids=position, use_cache=True)
        position = position + 1
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
    tokens = torch.stack(new, dim=1).cpu()
    return (tokens, torch.stack(logps, dim=1).cpu()) if return_logps else tokens


def sample_prompts(model, prompts: list[list[int]], *, pad_id: int, **kw):
    """`sample` for prompts given as token ids: by a transformers model (left-padded here), or by an engine
    that takes the ids as they are (rpo.llamacpp.Engine.sample_ids, the same contract)."""
    if hasattr(model, "sample_ids"):
        return model.sample_ids(prompts, pad_id=pad_id, **kw)
    device = next(model.parameters()).device
    input_ids, attn = left_pad(prompts, pad_id)
    return sample(model, input_ids.to(device), attn.to(device), pad_id=pad_id, **kw)


def generate_answers(model, tok, prompts: list[dict], out_path: str | Path, *, max_new_tokens: int,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     batch_size: int = 16,
                     seed: int = 0, num_return_sequences: int = 1, model_name: str = "",
                     desc: str = "generate", weights: str | None = None, add_special_tokens: bool = False,
                     extra_stop_ids: tuple = (), answer_text: str = "stripped") -> list[dict]:
    """Generate answers for `prompts` = [{"id": str, "messages": [...][, "text": str]}, ...] into a JSONL file,
    with `model` a transformers model or an rpo.llamacpp.Engine.

    Each output row: {"id", "model", "messages"[, "text"], "responses": [str] * num_return_sequences,
    "n_tokens": [int], "finished": [bool]} (finished = the model stopped before max_new_tokens).
    `weights`: the model's model_fingerprint, if the caller computed it already. `add_special_tokens`,
    `extra_stop_ids` (a stage's stop_token_ids), `answer_text`: the module docstring.
    """
    check_answer_text(answer_text)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{out_path}: duplicate prompt ids in the generation input")
    partial = out_path.with_name(out_path.name + ".partial")
    identity = generation_identity(model, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, top_k=top_k, seed=seed, num_return_sequences=num_return_sequences,
                                   model_name=model_name, weights=weights,
                                   **_text_identity(add_special_tokens, extra_stop_ids, answer_text))
    done = _read_done(partial, identity, {p["id"]: _prompt_key(p) for p in prompts})
    # Rewrite the partial file (its identity first, no cut last line, no discarded row) before appending;
    # atomically, so a kill now loses nothing that was kept.
    io.write_jsonl([{"partial_of": out_path.name, "identity": identity}, *done.values()], partial)
    todo = [p for p in prompts if p["id"] not in done]
    if done:
        log.info("%s: resuming, %d of %d answers already done", out_path, len(done), len(prompts))

    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    encoded = [encode_row(tok, p, add_special_tokens) for p in todo]
    # Length-sorted batches waste less compute on padding; the output order is restored below.
    order = sorted(range(len(todo)), key=lambda i: len(encoded[i]))
    stop_ids = stop_token_ids(tok, extra_stop_ids)
    with partial.open("a", encoding="utf-8") as f, tqdm(total=len(todo), desc=desc, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            gen = torch.Generator().manual_seed(derived_seed(seed, todo[idx[0]]["id"]))
            new = sample_prompts(model, [encoded[i] for i in idx], max_new_tokens=max_new_tokens,
                                 num_return_sequences=num_return_sequences, temperature=temperature,
                                 top_p=top_p, top_k=top_k, stop_ids=stop_ids, pad_id=tok.pad_token_id, generator=gen)
            rows = [_answer_row(tok, todo[i], new, j, num_return_sequences, stop_ids, model_name,
                                strip=answer_text == "stripped") for j, i in enumerate(idx)]
            # One write per batch, so a kill leaves whole batches (and at most one cut line).
            f.write("".join(io.jsonl_line(r) for r in rows))
            f.flush()
            done.update((r["id"], r) for r in rows)
            bar.update(len(idx))
    rows = [done[i] for i in ids]
    io.write_jsonl(rows, out_path)
    partial.unlink()
    return rows


def _answer_row(tok, prompt: dict, new: torch.Tensor, j: int, n: int, stop_ids, model_name: str, *,
                strip: bool = True) -> dict:
    """The output row of the j-th prompt of a batch: its n decoded samples, cut at the first stop token."""
    samples = []
    for k in range(n):
        seq = new[j * n + k].tolist()
        text, length = decode_answer(tok, seq, stop_ids, strip=strip)
        samples.append((text, length, length < len(seq)))  # finished: a stop token before max_new_tokens
    return answer_row(prompt, model_name, samples)


def answer_row(prompt: dict, model_name: str, samples: list[tuple[str, int, bool]]) -> dict:
    """An answer file's row, whichever backend generated it: {"id", "model", "messages"[, "text"], "responses",
    "n_tokens", "finished"}, from each sample's (text, length, finished); "text" when the prompt had one."""
    return {"id": prompt["id"], "model": model_name, "messages": prompt["messages"],
            **({"text": prompt["text"]} if "text" in prompt else {}),
            "responses": [t for t, _, _ in samples], "n_tokens": [n for _, n, _ in samples],
            "finished": [f for _, _, f in samples]}
