"""Overoptimization measurements of one trained policy at its snapshots (issue 12; Gao et al. 2023, Rafailov
et al. 2024): how far it moved from the reference and what that bought, by the gold scorer and by the proxy.

For each snapshot, on the held-out prompts and pairs:
    kl       KL(π‖π_ref) estimated from responses sampled from π at temperature 1 (no top-k/top-p):
             per sample Σ_t [log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)] over its tokens (the stop token
             included when it was sampled), averaged over a prompt's samples. A sample cut at
             `max_new_tokens` makes this the KL of the first `max_new_tokens` tokens, a lower bound of the
             full sequence's KL; the share of cut samples is recorded.
    gold     the gold score (rpo.verifiable.gold_score) of π's greedy answer, and its outcome against the
             reference's greedy answer to the same prompt (1 win, 0.5 tie, 0 loss).
    pair     on each held-out preference pair: the implicit reward margin β·(Δ_chosen − Δ_rejected) with
             Δ = log π − log π_ref (the proxy DPO optimises), whether it ranks the pair right (ties half),
             and Δ_chosen, the chosen response's log-prob against the reference (paper Fig. 1).
One JSON record per item (prompt, sample or pair) and snapshot, so that intervals can resample prompts and
seeds (eval.overoptimization); step 0 is the reference itself (KL 0 and margins 0 exactly, not estimated).
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from rpo import io, verifiable
from rpo.batching import collate, summed_logps
from rpo.data import read_pairs
from rpo.loop import snapshot_steps
from rpo.models import load_model, load_tokenizer
from rpo.sampling import decode_answer, derived_seed, encode_prompt, sample_prompts, stop_token_ids

log = logging.getLogger(__name__)


@torch.inference_mode()
def decode(model, tok, prompts: list[dict], *, n: int, max_new_tokens: int, temperature: float | list[float],
           seed: int, batch_size: int) -> list[dict]:
    """Per prompt: its token ids, and for each of `n` responses (greedy when its temperature is 0; a list gives
    each response its own, from one prefill: rpo.sampling.sample) the token ids
    up to and including the first stop token, the decoded text, whether it stopped by itself, and the summed
    log-prob of those tokens under `model` (from the sampler's own logits: no second forward pass). The
    sampler is rpo.sampling's, seeded per batch from (seed, first prompt id); temperature 1 with
    top_k 0 and top_p 1 samples from π itself. `model`: a transformers model or an rpo.llamacpp.Engine
    (llama.cpp's logits, the same next-token choice and log-probs)."""
    encoded = [encode_prompt(tok, p["messages"]) for p in prompts]
    stop = stop_token_ids(tok)
    out: list[dict | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        gen = torch.Generator().manual_seed(derived_seed(seed, prompts[idx[0]]["id"]))
        new, lps = sample_prompts(model, [encoded[i] for i in idx], max_new_tokens=max_new_tokens,
                                  num_return_sequences=n, temperature=temperature, top_p=1.0, top_k=0,
                                  stop_ids=stop, pad_id=tok.pad_token_id, generator=gen, return_logps=True)
        for j, i in enumerate(idx):
            tokens, texts, finished, logps = [], [], [], []
            for k in range(n):
                seq = new[j * n + k].tolist()
                text, length = decode_answer(tok, seq, stop)
                done = length < len(seq)
                # the stop token is part of what was sampled: its probability counts in the KL
                tokens.append(seq[:length + 1] if done else seq)
                logps.append(float(lps[j * n + k, :len(tokens[-1])].double().sum()))
                texts.append(text)
                finished.append(done)
            out[i] = {"id": prompts[i]["id"], "prompt_ids": encoded[i], "response_ids": tokens,
                      "texts": texts, "finished": finished, "logps": logps}
    return out


def _logps(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, *,
           pairs: bool = False) -> torch.Tensor:
    """Summed log-probs of each (prompt, response) sequence's response tokens. Batches are cut from the
    sequences in length order (a pair's two sequences stay together), so little of a batch is padding."""
    device = next(model.parameters()).device
    out = torch.zeros(len(seqs))
    per = 2 if pairs else 1
    groups = sorted((list(range(i, min(i + per, len(seqs)))) for i in range(0, len(seqs), per)),
                    key=lambda g: max(len(seqs[i][0]) + len(seqs[i][1]) for i in g))
    step = max(1, batch_size // per)
    for s in range(0, len(groups), step):
        idx = [i for g in groups[s:s + step] for i in g]
        batch = {k: v.to(device) for k, v in collate([seqs[i] for i in idx], pad_id).items()}
        lp, _ = summed_logps(model, batch)
        out[idx] = lp.float().cpu()
    return out


class Reference:
    """Where log π_ref comes from: `model`, a separately loaded reference (for a fully fine-tuned policy),
    or None: the policy itself with its LoRA adapter switched off (peft's disable_adapter)."""

    def __init__(self, model=None):
        self.model = model

    def __call__(self, policy):
        return (policy.disable_adapter(), policy) if self.model is None else (nullcontext(), self.model)


@torch.inference_mode()
def pair_logps(model, tok, items: list[dict], batch_size: int) -> dict[str, torch.Tensor]:
    """Summed log-probs of tokenised pairs' chosen and rejected responses under `model`. A pair's two
    sequences go into the same batch, one after the other, so that rpo.batching.summed_logps runs their
    shared prompt once (as in training)."""
    seqs = [(it["prompt"], it[side]) for it in items for side in ("chosen", "rejected")]
    lp = _logps(model, seqs, tok.pad_token_id, batch_size, pairs=True)
    return {"chosen": lp[0::2], "rejected": lp[1::2]}


def pair_logratios(policy, ref_logps: dict[str, torch.Tensor], tok, items: list[dict],
                   batch_size: int) -> dict[str, torch.Tensor]:
    """Δ_chosen and Δ_rejected (log π − log π_ref) of tokenised held-out pairs; `ref_logps`: pair_logps of
    the reference, the same for every snapshot (computed once per job)."""
    lp = pair_logps(policy, tok, items, batch_size)
    return {side: lp[side] - ref_logps[side] for side in lp}


@torch.inference_mode()
def kl_samples(policy, ref: Reference, tok, prompts: list[dict], *, n: int, max_new_tokens: int, seed: int,
               batch_size: int) -> list[dict]:
    """Per prompt: each temperature-1 sample's log π − log π_ref (summed over its tokens)."""
    decoded = decode(policy, tok, prompts, n=n, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed,
                     batch_size=batch_size)
    return kl_values(policy, ref, tok, decoded, batch_size)


@torch.inference_mode()
def kl_values(policy, ref: Reference, tok, decoded: list[dict], batch_size: int) -> list[dict]:
    """log π − log π_ref of each of `decode`'s responses (temperature-1 samples of the policy): log π is the
    sampler's own, log π_ref a forward pass of the reference over the sampled sequences."""
    seqs = [(d["prompt_ids"], r) for d in decoded for r in d["response_ids"]]
    lp = torch.tensor([x for d in decoded for x in d["logps"]], dtype=torch.float64)
    ctx, rm = ref(policy)
    with ctx:
        lr = _logps(rm, seqs, tok.pad_token_id, batch_size)
    diff = (lp - lr.double()).tolist()
    out, at = [], 0
    for d in decoded:
        n = len(d["response_ids"])
        out.append({"id": d["id"], "values": diff[at:at + n],
                    "n_tokens": [len(r) for r in d["response_ids"]], "finished": d["finished"]})
        at += n
    return out


def _responses(decoded: list[dict], ks: slice) -> list[dict]:
    """`decode`'s rows restricted to the responses `ks`."""
    per = ("response_ids", "texts", "finished", "logps")
    return [{**d, **{f: d[f][ks] for f in per}} for d in decoded]


def gold_scores(prompts: list[dict], texts: list[str]) -> list[float]:
    """The gold score of each answer to its held-out prompt (the prompt's IFEval meta)."""
    out = []
    for p, t in zip(prompts, texts):
        if "meta" not in p or "instruction_id_list" not in p["meta"]:
            raise ValueError(f"held-out prompt {p['id']!r} has no verifiable instructions (meta."
                             "instruction_id_list): the overoptimization study needs a gold-scored source")
        user = [m["content"] for m in p["messages"] if m["role"] == "user"][-1]
        out.append(verifiable.gold_score_for(t, user, p["meta"])["score"])
    return out


def outcome(a: float, b: float) -> float:
    return 1.0 if a > b else 0.0 if a < b else 0.5


def reference_answers(*, ref_dir, prompts_path, out, max_new_tokens: int, batch_size: int, backend: str = "hf",
                      gguf: str | None = None) -> list[dict]:
    """The reference's greedy answers to the held-out prompts and their gold scores (step 0 of every curve,
    and the other side of every snapshot's gold win rate); backend "llamacpp" decodes on `gguf`, the
    reference's GGUF."""
    tok = load_tokenizer(ref_dir)
    prompts = io.read_jsonl(prompts_path)
    model = _sampler(backend, ref_dir, gguf)
    decoded = decode(model, tok, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0, seed=0,
                     batch_size=batch_size)
    scores = gold_scores(prompts, [d["texts"][0] for d in decoded])
    rows = [{"id": d["id"], "answer": d["texts"][0], "finished": d["finished"][0], "gold": s}
            for d, s in zip(decoded, scores)]
    io.write_jsonl(rows, out)
    return rows


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sampler(backend: str, ref_dir, gguf: str | None):
    """What decodes the reference's answers: its transformers model (hf) or its GGUF on llama.cpp."""
    if backend == "llamacpp":
        from rpo.llamacpp import engine_for
        return engine_for(ref_dir=ref_dir, policy_dir=None, gguf={"model": gguf})
    if backend != "hf":
        raise ValueError(f"overoptimization: sampling backend {backend!r}; expected 'hf' or 'llamacpp'")
    return load_model(ref_dir, device=_device()).eval()


def snapshot_engine(ref_dir, gguf: str, snapshot, tmp: Path):
    """llama.cpp's engine of one snapshot: the reference's GGUF with the snapshot's LoRA adapter (or the
    snapshot's full model) written as GGUF into `tmp`, a scratch folder of the measuring job (each snapshot is
    decoded once, by that job only)."""
    from rpo.gguf import export
    from rpo.llamacpp import engine_for
    path = export(model_dir=str(snapshot), base_dir=str(ref_dir), out=str(tmp / f"{Path(snapshot).name}.gguf"))
    return engine_for(ref_dir=ref_dir, policy_dir=snapshot, gguf={"model": gguf, "policy": str(path)})


def evaluate_snapshots(*, ref_dir, snapshots, prompts_path, pairs_path, ref_answers, out, beta: float,
                       max_length: int, max_prompt_length: int, kl_samples_per_prompt: int,
                       max_new_tokens: int, batch_size: int, seed: int, chat_format: str = "model",
                       backend: str = "hf", gguf: str | None = None) -> int:
    """Every snapshot of one run (and step 0, the reference) measured as the module docstring says; the held-out
    pairs are tokenised under `chat_format` (data.chat_format), as the run's training pairs were. Writes the item
    records to `out` (JSONL) and returns the number of snapshots. Backend "llamacpp" decodes the answers and KL
    samples on llama.cpp (snapshot_engine on `gguf`, the reference's GGUF; log π from its logits); log π_ref and
    the pairs' log-probs are the transformers models' forward passes either way."""
    from rpo.train import tokenize_pairs

    if backend not in ("hf", "llamacpp") or (backend == "llamacpp" and not gguf):
        raise ValueError(f"overoptimization: sampling backend {backend!r} with GGUF {gguf!r}; expected 'hf', or "
                         "'llamacpp' with the reference's GGUF")
    steps = snapshot_steps(snapshots)
    if not steps:
        raise ValueError(f"{snapshots}: no snapshots (step-XXXXXX directories); train with snapshot_every > 0")
    tok = load_tokenizer(ref_dir)
    prompts = io.read_jsonl(prompts_path)
    ref_rows = {r["id"]: r for r in io.read_jsonl(ref_answers)}
    missing = [p["id"] for p in prompts if p["id"] not in ref_rows]
    if missing:
        raise ValueError(f"{ref_answers}: no reference answer for held-out prompts {missing[:5]}")
    items, _ = tokenize_pairs(tok, read_pairs(pairs_path), max_length=max_length,
                              max_prompt_length=max_prompt_length, chat_format=chat_format)
    records = []
    # step 0: the policy is the reference (every Δ is 0 exactly, its answers are the reference's)
    records += [{"step": 0, "kind": "kl", "id": p["id"], "values": [0.0] * kl_samples_per_prompt,
                 "n_tokens": None, "finished": None} for p in prompts]
    records += [{"step": 0, "kind": "gold", "id": p["id"], "gold": ref_rows[p["id"]]["gold"], "win": 0.5}
                for p in prompts]
    records += [{"step": 0, "kind": "pair", "id": it["id"], "logratio_chosen": 0.0, "logratio_rejected": 0.0,
                 "margin": 0.0, "correct": 0.5} for it in items]
    device = _device()
    adapters = (Path(snapshots) / f"step-{steps[0]:06d}" / "adapter_config.json").is_file()
    ref = Reference(None if adapters else load_model(ref_dir, device=device).eval())
    base = load_model(ref_dir, device=device).eval() if adapters else None
    ref_pairs = pair_logps(base if adapters else ref.model, tok, items, batch_size)
    policy, prev = None, None
    for step in tqdm(steps, desc="snapshots", unit="snapshot"):
        path = Path(snapshots) / f"step-{step:06d}"
        if adapters:
            from peft import PeftModel
            if policy is None:
                policy = PeftModel.from_pretrained(base, path, adapter_name=f"s{step}").eval()
            else:
                policy.load_adapter(path, adapter_name=f"s{step}")
                policy.set_adapter(f"s{step}")
                policy.delete_adapter(prev)
            prev = f"s{step}"
        else:
            policy = load_model(path, device=device).eval()
        # one prefill per prompt for both: response 0 greedy (the gold score), then the temperature-1 samples
        settings = dict(n=1 + kl_samples_per_prompt, max_new_tokens=max_new_tokens,
                        temperature=[0.0] + [1.0] * kl_samples_per_prompt, seed=seed * 1_000_003 + step,
                        batch_size=batch_size)
        if backend == "llamacpp":
            with tempfile.TemporaryDirectory() as tmp, \
                    snapshot_engine(ref_dir, gguf, path, Path(tmp)) as engine:
                decoded = decode(engine, tok, prompts, **settings)
        else:
            decoded = decode(policy, tok, prompts, **settings)
        for r in kl_values(policy, ref, tok, _responses(decoded, slice(1, None)), batch_size):
            records.append({"step": step, "kind": "kl", **r})
        scores = gold_scores(prompts, [d["texts"][0] for d in decoded])
        records += [{"step": step, "kind": "gold", "id": p["id"], "gold": s,
                     "win": outcome(s, ref_rows[p["id"]]["gold"])} for p, s in zip(prompts, scores)]
        lr = pair_logratios(policy, ref_pairs, tok, items, batch_size)
        for it, c, j in zip(items, lr["chosen"].tolist(), lr["rejected"].tolist()):
            margin = beta * (c - j)
            records.append({"step": step, "kind": "pair", "id": it["id"], "logratio_chosen": c,
                            "logratio_rejected": j, "margin": margin, "correct": outcome(margin, 0.0)})
    io.write_jsonl(records, out)
    return len(steps)
