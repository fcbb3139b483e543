"""Tokenisation of prompt/response pairs and summed response log-probabilities.

A response is tokenised as the difference between the chat template applied to prompt + response and
the template applied to the prompt with the generation prompt, so the response tokens include the
template's end-of-turn token (the model must learn to stop) and nothing of the prompt.
Sequences longer than `max_length` are cut by the rule of the authors' trainer (the alignment-handbook's
TRL `DPOTrainer.tokenize_row`, truncation_mode "keep_end"): when the prompt plus the LONGER response
exceed `max_length`, the prompt keeps its last `max_prompt_length` tokens; if that is still too long,
every response is cut to `max_length - max_prompt_length` tokens (whatever the prompt's length).
Every cut is counted (see `tokenize_pairs`' summary), never silently applied.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from rpo.trunk import packed_maps


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
    prompt: int = 0      # prompts cut to their last max_prompt_length tokens
    response: int = 0    # responses cut to max_length - max_prompt_length tokens
    pairs: int = 0       # pairs with any cut

    def as_dict(self) -> dict:
        return {"prompt_truncated": self.prompt, "response_truncated": self.response, "pairs_truncated": self.pairs}


def fit(p: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
        counter: Truncation) -> tuple[list[int], list[list[int]]]:
    """Apply the authors' truncation rule (module docstring) to one prompt and its responses.

    With max_length 1024 and max_prompt_length 512, (prompt, chosen, rejected) lengths (276, 1166, 130)
    become (276, 512, 130) and (455, 897, 1016) become (455, 512, 512).
    """
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length {max_prompt_length} leaves no room for a response "
                         f"under max_length {max_length}")
    longer = max(len(r) for r in responses)
    cut = False
    if len(p) + longer > max_length and len(p) > max_prompt_length:
        p = p[-max_prompt_length:]
        counter.prompt += 1
        cut = True
    out = responses
    if len(p) + longer > max_length:
        budget = max_length - max_prompt_length
        out = []
        for r in responses:
            if len(r) > budget:
                r = r[:budget]
                counter.response += 1
                cut = True
            out.append(r)
    counter.pairs += cut
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


def summed_logps(model, batch: dict[str, torch.Tensor], *, chunk_tokens: int = 1024,
                 share_prompts: bool = True, row_tokens: int = 0, trunk=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of log π(response token | prefix), and response token counts.

    The value is the full log-softmax's (tests/test_train.py, tests/test_benchmarks_support.py) up to
    float rounding; how it is computed depends on the model:
    - always: only positions from the earliest response start onwards go through the LM head
      (`logits_to_keep`), prompt positions never need logits;
    - a plain linear LM head (`_plain_lm_head`): for this call only, the head is swapped for one that
      scores just the response tokens, `chunk_tokens` at a time, and keeps no [tokens, vocabulary] tensor
      for the backward (`_TokenLogProbs`); on a 49k-token vocabulary those fp32 logits, their
      log-softmax and its gradient were the largest tensors of the step. A frozen head (LoRA) gets each
      token's gradient in the forward, from the logits already computed (`_FrozenHeadLogProbs`), so its
      backward needs no second pass over the vocabulary;
    - and sdpa, eager or flex attention, with `share_prompts`: sequences of the batch that share a prompt (the
      chosen and rejected sequences of a pair) become ONE row, the prompt once and then each response,
      which attends to the prompt and to itself only, with the positions it has on its own
      (`_share_prompts`). A response's hidden states depend only on its own causal prefix, so the result
      is the same while the prompt is run once instead of twice and the row has no padding between the
      two; in preference training the prompt is often half of the tokens. Under sdpa the custom 4-D
      mask keeps SDPA off its flash kernel; a model loaded with attn_implementation="flex_attention"
      gets the same mask as a FlexAttention BlockMask (fused kernel, fully masked blocks skipped).
    With `trunk` (an rpo.trunk.Trunk), the forward starts at its layer from its states, or keeps that
    layer's input; both in the batch's own [sequences, width, hidden] layout, whatever rows the model runs.
    """
    ids, attn, lab = batch["input_ids"], batch["attention_mask"], batch["labels_mask"]
    first = int(lab.float().argmax(dim=1).min())  # earliest response token over the batch
    keep = ids.shape[1] - first + 1  # logits at position t predict token t+1
    targets = ids[:, first:]
    mask = lab[:, first:]
    head = _plain_lm_head(model)

    def same(hidden):  # the rows the model runs are the batch's own
        return hidden
    if head is None:
        logits = _forward(model, trunk, same, same, input_ids=ids, attention_mask=attn, logits_to_keep=keep)
        logits = logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logp = logp.masked_fill(~mask, 0.0)
        return logp.sum(dim=1), mask.sum(dim=1)
    packed = _share_prompts(ids, lab, _attention_kind(model), row_tokens, attn) if share_prompts else None
    if packed is None:
        def select(hidden):  # [B, keep, H] -> the positions that predict response tokens
            return hidden[:, :-1][mask]
        with _scoring_head(head, select, targets[mask], chunk_tokens):
            token_logps = _forward(model, trunk, same, same, input_ids=ids, attention_mask=attn, logits_to_keep=keep)
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(mask)[mask]
    else:
        def select(hidden):  # [G, W, H] -> the predicting positions, in packed order
            return hidden.reshape(-1, hidden.shape[-1])[packed["predictor"]]
        with _scoring_head(head, select, packed["target"], chunk_tokens):
            token_logps = _forward(model, trunk, *packed_maps(packed), input_ids=packed["input_ids"],
                                   attention_mask=packed["attention_mask"], position_ids=packed["position_ids"],
                                   logits_to_keep=0)
        rows = packed["row"]
    # [n response tokens] -> per sequence
    return token_logps.new_zeros(ids.shape[0]).index_add(0, rows, token_logps), mask.sum(dim=1)


def _forward(model, trunk, to_model, from_model, **inputs) -> torch.Tensor:
    if trunk is None:
        return model(**inputs).logits
    with trunk.hooked(model, to_model, from_model):
        return model(**inputs).logits


# Causal LMs whose forward ends in exactly `logits = self.lm_head(hidden_states[:, slice])`: no logit
# scaling or soft-capping after the head (Gemma 2/3, Cohere, Granite... have some), so the head's output
# can be replaced by per-token log-probs. Others take the plain path.
_PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _plain_lm_head(model):
    """The model's LM head if it is a bias-free nn.Linear of an allow-listed architecture, unsharded and
    not under LoRA; else None (the plain log-softmax path, always correct)."""
    inner = _unwrap(model)
    if not hasattr(inner, "get_output_embeddings") or not hasattr(inner, "config"):
        return None  # e.g. FSDP-1 wrapper: keep its forward untouched
    peft_cfg = getattr(inner, "peft_config", None)
    if peft_cfg and any(getattr(c, "is_prompt_learning", False) for c in peft_cfg.values()):
        return None
    if getattr(inner.config, "model_type", None) not in _PLAIN_HEAD_MODELS:
        return None
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if type(head.weight.data) is not torch.Tensor:  # a DTensor (FSDP-2 / tensor parallel shard)
        return None
    return head


def _attention_kind(model) -> str | None:
    """How the model takes a custom attention mask: 'sdpa' or 'eager' (a 4-D tensor in that format),
    'flex_attention' (a FlexAttention BlockMask), else None (no packing)."""
    kind = getattr(_unwrap(model).config, "_attn_implementation", None)
    return kind if kind in ("sdpa", "eager", "flex_attention") else None


def _packed_mask_mod(group: torch.Tensor, part: torch.Tensor):
    """Which key position `kv` query position `q` of packed row `b` attends to: causally, within its
    group, the prompt (part 0) and its own response only; padding (group -1) attends to itself, so no
    row of scores is all masked. The one rule of both masks: evaluated on broadcast index grids it is
    the 4-D boolean mask (sdpa, eager), as a FlexAttention mask_mod the BlockMask."""
    def mask_mod(b, h, q, kv):
        gq, gk, pq, pk = group[b, q], group[b, kv], part[b, q], part[b, kv]
        seen = (q >= kv) & (gq == gk) & (gq >= 0) & ((pk == 0) | (pk == pq))
        return seen | ((q == kv) & (gq < 0))
    return mask_mod


def flex_attention_problem(device, *, backward: bool) -> str | None:
    """Why FlexAttention cannot run here (torch's own error, e.g. no backward on CPU), or None: a
    one-head 16-token flex_attention call on `device`, with a backward when `backward`."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:
        return f"torch {torch.__version__} has no FlexAttention ({e})"
    q = torch.zeros(1, 1, 16, 16, device=device, requires_grad=backward)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile()": a probe, not a kernel
            out = flex_attention(q, q, q)
        if backward:
            out.sum().backward()
    except (NotImplementedError, RuntimeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _share_prompts(ids: torch.Tensor, lab: torch.Tensor, kind: str | None, row_tokens: int = 0,
                   attn: torch.Tensor | None = None) -> dict | None:
    """Pack sequences that share a prompt into one row: [prompt, response_1, response_2, ...].

    Returns the packed input_ids, position_ids and attention mask (for `kind` 'flex_attention' a
    FlexAttention BlockMask built from the per-token group and part ids, else a 4-D tensor in the
    format of `kind`), and for every response token in
    the order of `lab`'s True entries (row-major) its target id, the flat index of the packed position
    that predicts it, and its original row; `where` ([sequences, width]) is the flat packed position
    of each sequence's every token (-1: padding). None when nothing is shared, the mask kind is unknown, or
    the batch is not `collate`'s layout (each row: prompt, then its response, then only padding).
    """
    if kind is None:
        return None
    lab_cpu, ids_cpu = lab.cpu(), ids.cpu()
    n_resp = lab_cpu.sum(dim=1).tolist()
    start = lab_cpu.float().argmax(dim=1).tolist()  # = prompt length (right-padded rows)
    if min(n_resp) < 1 or min(start) < 1:
        return None
    cols = torch.arange(ids.shape[1])
    end = torch.tensor(start) + torch.tensor(n_resp)
    real = cols < end[:, None]
    if not torch.equal(lab_cpu, real & (cols >= torch.tensor(start)[:, None])):
        return None  # a response that is not one block after its prompt
    if attn is not None and not torch.equal(attn.cpu().bool(), real):
        return None  # padding inside or before a sequence
    groups: dict[tuple, list[int]] = {}
    for i in range(ids.shape[0]):
        groups.setdefault(tuple(ids_cpu[i, :start[i]].tolist()), []).append(i)
    if len(groups) == ids.shape[0]:
        return None  # nothing shared: the plain layout is as good
    # Rows of at most `row_tokens` (or the longest group): first fit, longest group first. Fewer, fuller
    # rows waste less on padding; a row's attention costs its width squared.
    sizes = {p: len(p) + sum(n_resp[i] for i in rows) for p, rows in groups.items()}
    cap = max(max(sizes.values()), row_tokens)
    fill: list[int] = []
    place: dict[tuple, tuple[int, int]] = {}
    for p in sorted(groups, key=lambda p: -sizes[p]):
        r = next((r for r, used in enumerate(fill) if used + sizes[p] <= cap), None)
        if r is None:
            r = len(fill)
            fill.append(0)
        place[p] = (r, fill[r])
        fill[r] += sizes[p]
    width = max(fill)
    packed_ids = torch.zeros((len(fill), width), dtype=ids.dtype)
    positions = torch.zeros((len(fill), width), dtype=torch.long)
    group = torch.full((len(fill), width), -1, dtype=torch.long)  # -1: padding
    part = torch.zeros((len(fill), width), dtype=torch.long)  # 0: prompt, k: the group's k-th response
    predictor = [0] * int(sum(n_resp))
    where = torch.full(ids.shape, -1, dtype=torch.long)  # each (sequence, column)'s flat packed position
    offsets = [0] * ids.shape[0]  # where each row's response tokens start in the flat token order
    acc = 0
    for i in range(ids.shape[0]):
        offsets[i], acc = acc, acc + n_resp[i]
    for gi, (prompt, rows) in enumerate(groups.items()):
        r, at = place[prompt]
        p = len(prompt)
        packed_ids[r, at:at + p] = torch.tensor(prompt, dtype=ids.dtype)
        positions[r, at:at + p] = torch.arange(p)
        group[r, at:at + sizes[prompt]] = gi
        last_prompt = r * width + at + p - 1
        prompt_at = r * width + at
        at += p
        for k, i in enumerate(rows, start=1):
            n = n_resp[i]
            where[i, :p] = torch.arange(prompt_at, prompt_at + p)
            where[i, p:p + n] = torch.arange(r * width + at, r * width + at + n)
            packed_ids[r, at:at + n] = ids_cpu[i, start[i]:start[i] + n]
            positions[r, at:at + n] = torch.arange(p, p + n)
            part[r, at:at + n] = k
            # token j of this response is predicted by the previous position of ITS sequence:
            # the last prompt token for j = 0, else the previous response token
            predictor[offsets[i]:offsets[i] + n] = [last_prompt] + [r * width + at + j for j in range(n - 1)]
            at += n
    device = ids.device
    if kind == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask
        # No [rows, W, W] mask is kept: the kernel evaluates mask_mod on the blocks it does not skip.
        mask = create_block_mask(_packed_mask_mod(group.to(device), part.to(device)), B=len(fill), H=None,
                                 Q_LEN=width, KV_LEN=width, device=device)
    else:
        cols = torch.arange(width)
        allowed = _packed_mask_mod(group, part)(torch.arange(len(fill))[:, None, None], None,
                                                cols[None, :, None], cols[None, None, :])
        allowed = allowed.unsqueeze(1)  # [rows, 1, W, W]
        if kind == "eager":  # eager attention adds the mask to the scores
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        else:
            mask = allowed
        mask = mask.to(device)
    return {"input_ids": packed_ids.to(device), "position_ids": positions.to(device),
            "attention_mask": mask, "target": ids[lab], "row": lab.nonzero()[:, 0],
            "predictor": torch.tensor(predictor, dtype=torch.long, device=device), "where": where.to(device)}


class _scoring_head:
    """Context: `head(hidden)` returns the log-probs of `targets` at the positions `select(hidden)` picks
    (one per target, in order) instead of the logits."""

    def __init__(self, head, select, targets: torch.Tensor, chunk_tokens: int):
        self.head, self.select, self.targets, self.chunk = head, select, targets, chunk_tokens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.select(hidden)
        if torch.is_grad_enabled() and self.head.weight.requires_grad:
            return _TokenLogProbs.apply(h, self.head.weight, self.targets, self.chunk)
        if torch.is_grad_enabled() and h.requires_grad:  # a frozen head (LoRA): its gradient in the forward
            return _FrozenHeadLogProbs.apply(h, self.head.weight, self.targets, self.chunk)
        return _token_logps(h, self.head.weight, self.targets, self.chunk)[0]

    def __enter__(self):
        self.saved = self.head.__dict__.get("forward")  # an instance-level forward someone set, if any
        self.head.forward = self.forward
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            del self.head.forward  # back to the class's forward
        else:
            self.head.forward = self.saved
        return False


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Under autocast the head's matmul would run in the autocast dtype: keep that, accumulate in fp32.
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _token_logps(h, weight, targets, chunk: int, *, grad_h: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(h @ weight.T)[targets] and the log-normaliser, `chunk` rows of logits at a time; with
    `grad_h` ([N, H]) also d log p(target) / d h of each row into it, from the same logits."""
    dtype = _compute_dtype(h)
    w = weight.to(dtype)
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    lse = torch.empty_like(out)
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, h.shape[0], chunk):
            z = (h[s:s + chunk].to(dtype) @ w.t()).float()
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            if grad_h is not None:  # through the head, d / d h = d / d z @ weight
                dz = _grad_logits(z, lse[s:s + chunk], targets[s:s + chunk], torch.ones_like(lse[s:s + chunk]))
                grad_h[s:s + chunk] = (dz.to(dtype) @ w).to(grad_h.dtype)
    return out, lse


def _grad_logits(z, lse, targets, g) -> torch.Tensor:
    """g · d log p(target) / d z = g · (onehot(target) − softmax(z)) per row, computed in place in the fp32
    logits `z` (consumed)."""
    dz = z.sub_(lse[:, None]).exp_().mul_(-g[:, None])
    return dz.scatter_add_(1, targets[:, None], g[:, None])


class _FrozenHeadLogProbs(torch.autograd.Function):
    """Per-token log-probs through a frozen linear head (LoRA): each log-prob is one scalar of its own row's
    hidden state, so its gradient d log p / d h is computed in the forward from the logits already there and
    the backward only scales it by the incoming gradient. Two head matmuls per chunk, against three for
    _TokenLogProbs (forward, recomputed logits, gradient), and one [N, H] tensor kept, as there."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        out, _ = _token_logps(h, weight, targets, chunk, grad_h=dh)
        ctx.save_for_backward(dh)
        return out

    @staticmethod
    def backward(ctx, grad):
        (dh,) = ctx.saved_tensors
        return dh * grad.to(dh.dtype)[:, None], None, None, None


class _TokenLogProbs(torch.autograd.Function):
    """Per-token log-probs through a linear head whose backward recomputes each chunk of logits, so only
    the hidden states and one log-normaliser per token are kept between forward and backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        out, lse = _token_logps(h, weight, targets, chunk)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk, ctx.dtype = chunk, _compute_dtype(h)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        dtype, chunk = ctx.dtype, ctx.chunk
        w = weight.to(dtype)
        grad_h = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc, g = h[s:s + chunk].to(dtype), grad[s:s + chunk].float()
                dz = _grad_logits((hc @ w.t()).float(), lse[s:s + chunk], targets[s:s + chunk], g).to(dtype)
                if need_h:
                    grad_h[s:s + chunk] = (dz @ w).to(h.dtype)
                if need_w:
                    grad_w.addmm_(dz.t().float(), hc.float())
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None
