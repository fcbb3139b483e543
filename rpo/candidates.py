"""Many responses per prompt from the reference policy, and their scores: the candidates of best-of-n
(eval.bon) and of RSO's rejection sampling (rpo.rso).

    python -m rpo sample-candidates --args '<json>'   N samples per prompt, temperature 1, no top-k / top-p
    python -m rpo gold-candidates   --args '<json>'   the gold score of every sample (rpo.verifiable)
    python -m rpo score-candidates  --args '<json>'   one reward model's score of every sample (rpo.reward)

The samples come from rpo.sampling.generate_answers, so an interrupted job resumes from its `.partial` file
(bound to the model's weights and the decoding settings) and a finished prompt is never sampled again.
Files (JSONL, one row per prompt, in the prompts' order): samples {"id", "messages", "responses": [N],
"n_tokens", "finished"}; gold {"id", "gold": [N]}; scores {"id", "scores": [N]}.
"""
from __future__ import annotations

import logging

import torch

from rpo import io

log = logging.getLogger(__name__)


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sample_candidates(*, ref_dir, prompts_path, out, n: int, max_new_tokens: int, batch_size: int, seed: int,
                      n_prompts: int | None = None) -> list[dict]:
    """`n` samples from the reference at temperature 1 with no top-k and no top-p (the reference itself, so
    that KL_bon(n) = log n - (n-1)/n applies) for each prompt of `prompts_path` (its first `n_prompts`)."""
    from rpo.models import load_model, load_tokenizer
    from rpo.sampling import generate_answers
    prompts = read_prompts(prompts_path)[:n_prompts]
    if not prompts:
        raise ValueError(f"{prompts_path}: no prompts to sample")
    tok = load_tokenizer(ref_dir)
    model = load_model(ref_dir, device=_device()).eval()
    rows = generate_answers(model, tok, [{"id": p["id"], "messages": p["messages"]} for p in prompts], out,
                            max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                            batch_size=batch_size, seed=seed, num_return_sequences=n, model_name="ref",
                            desc=f"sample {n} per prompt")
    cut = sum(not f for r in rows for f in r["finished"])
    log.info("%s: %d prompts x %d samples; %d cut at max_new_tokens=%d", out, len(rows), n, cut, max_new_tokens)
    return rows


def read_prompts(path) -> list[dict]:
    """{"id", "messages", "meta"} of each row of a prompts file (rpo.data.prompts_of's rows) or of a
    preference-pairs file (its prompts: RSO samples the training prompts)."""
    rows = []
    for n, r in io.read_json_objects(path):
        if "messages" not in r and "prompt" not in r:
            raise ValueError(f"{path}, line {n}: neither 'messages' (a prompts file) nor 'prompt' (a pairs file)")
        rows.append({"id": r["id"], "messages": r.get("messages", r.get("prompt")), "meta": r.get("meta") or {}})
    return rows


def read_samples(path) -> list[dict]:
    """The samples file's rows, each with as many responses as the first (a file of one N)."""
    rows = io.read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no samples")
    n = len(rows[0]["responses"])
    for i, r in enumerate(rows, start=1):
        if len(r["responses"]) != n:
            raise ValueError(f"{path}, line {i}: {len(r['responses'])} responses, expected {n} as on line 1")
    return rows


def gold_candidates(*, prompts_path, samples_path, out) -> list[dict]:
    """The gold score (rpo.verifiable: the mean of IFEval's strict and loose instruction-following fractions)
    of every sample to its prompt, whose meta must carry the verifiable instructions."""
    from rpo import verifiable
    prompts = {p["id"]: p for p in read_prompts(prompts_path)}
    rows = []
    for s in read_samples(samples_path):
        p = prompts.get(s["id"])
        if p is None:
            raise ValueError(f"{samples_path}: prompt {s['id']!r} is not in {prompts_path}")
        meta = p.get("meta") or {}
        if "instruction_id_list" not in meta:
            raise ValueError(f"{prompts_path}: prompt {s['id']!r} has no verifiable instructions "
                             "(meta.instruction_id_list): the gold score needs a gold-scored data source")
        user = [m["content"] for m in p["messages"] if m["role"] == "user"][-1]
        rows.append({"id": s["id"], "gold": [verifiable.gold_score_for(t, user, meta)["score"] for t in s["responses"]]})
    io.write_jsonl(rows, out)
    return rows


def score_candidates(*, model_dirs: list, base_dir, samples_path, outs: list, max_length: int,
                     max_prompt_length: int, batch_size: int) -> list[list[dict]]:
    """Every member's score of every sample (rpo.reward.score_with_members: LoRA members on the top layers share
    the frozen layers below them), each (prompt, response) tokenised and cut as the members' training pairs
    were (rpo.batching's rule, counted in the log); member i's scores go to outs[i]."""
    from rpo.batching import Truncation, fit, prompt_ids, response_ids
    from rpo.models import load_tokenizer
    from rpo.reward import score_with_members
    if len(model_dirs) != len(outs) or not outs:
        raise ValueError(f"score_candidates: {len(model_dirs)} members for {len(outs)} output files")
    tok = load_tokenizer(base_dir)
    samples = read_samples(samples_path)
    counter = Truncation()
    seqs = []
    for s in samples:
        p = prompt_ids(tok, s["messages"])
        rs = [response_ids(tok, s["messages"], [{"role": "assistant", "content": t}], p) for t in s["responses"]]
        q, rs = fit(p, rs, max_length, max_prompt_length, counter)
        seqs += [(q, r) for r in rs]
    if counter.pairs:
        log.warning("%s: cut to max_length=%d / max_prompt_length=%d: %d prompts' samples (%s)", samples_path,
                    max_length, max_prompt_length, counter.pairs, counter.as_dict())
    n = len(samples[0]["responses"])
    every = []
    for scores, out in zip(score_with_members(model_dirs, base_dir, seqs, tok.pad_token_id, batch_size=batch_size,
                                              device=_device()), outs):
        rows = [{"id": s["id"], "scores": scores[i * n:(i + 1) * n].tolist()} for i, s in enumerate(samples)]
        io.write_jsonl(rows, out)
        every.append(rows)
    return every
