"""Online rounds (issue 27): what each round's jobs do, one function per Snakemake rule
(workflow/rules/rounds.smk; the training is rpo.round_train):

    python -m rpo round-prompts   the prompt pool (and the study's held-out prompts)
    python -m rpo sample-round    K responses per prompt of the round's slice, from the previous round's policy
    python -m rpo label-round     the labeller's scores (rpo.oracle) and the selection the loss trains on
    python -m rpo evaluate-round  the round's policy on held-out prompts: KL to the reference, gold, proxy
    python -m rpo finish-rounds   the last round's policy as the method's model (Table 1)

Round r samples from round r−1's policy (round 1 from the reference), on prompts r·P..(r+1)·P−1 of the pool
(disjoint slices, P = prompts_per_round of each round), labels the samples and selects what the loss trains on:
    best_worst   the first best and the first worst sample of a prompt (a pair; none when they tie)
    tournament   INPO's pipeline (inpo_original/annotate_data/get_pref_single.py, use_tournament with K = 8):
                 a knockout over the samples for the winner and one over the first round's losers for the loser
    top_k        SuperHF's filter (src/superhf/filtering.py, CompletionFilterTopK): empty completions dropped, a
                 stable sort by score, the first k
    all          every sample with its score, by prompt (REINFORCE-LOO's groups)
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

from rpo import io, oracle

log = logging.getLogger(__name__)

SELECTIONS = ("best_worst", "tournament", "top_k", "all")


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------

def round_prompts(*, out, source: str, seed: int, heldout=None, n_train: int | None = None,
                  n_test: int | None = None, prompts_file: str | None = None, pairs_path=None) -> dict:
    """The rounds' prompt pool, rows {"id", "messages", "meta"}, shuffled with `seed`:
    source "ifeval": IFEval's prompts split as rpo.verifiable.select_prompts splits them (the synthetic data's
    train prompts for the same seed and sizes), the n_test held-out ones to `heldout`;
    source "pairs": the prompts of a preference file (`pairs_path`), once each."""
    if source == "ifeval":
        from rpo import verifiable
        train, test, summary = verifiable.select_prompts(verifiable.load_prompts(prompts_file), n_train=n_train,
                                                         n_test=n_test, seed=seed)

        def row(r):
            return {"id": f"ifeval-{r['key']}", "messages": [{"role": "user", "content": r["prompt"]}],
                    "meta": {"source": verifiable.SOURCE, "key": r["key"],
                             "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]}}
        pool = [row(r) for r in train]
        if heldout is not None:
            io.write_jsonl([row(r) for r in test], heldout)
    elif source == "pairs":
        from rpo.data import read_pairs
        seen, pool = set(), []
        for r in read_pairs(pairs_path):
            key = json.dumps(r["prompt"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                pool.append({"id": r["id"], "messages": r["prompt"], "meta": r.get("meta", {})})
        pool.sort(key=lambda r: r["id"])
        random.Random(seed).shuffle(pool)
        summary = {"pairs_file": str(pairs_path), "prompts": len(pool)}
        if heldout is not None:
            raise ValueError("round_prompts: source 'pairs' has no held-out prompts of its own")
    else:
        raise ValueError(f"round_prompts: source {source!r}: expected 'ifeval' or 'pairs'")
    io.write_jsonl(pool, out)
    return summary


def round_slice(prompts_path, start: int, count: int) -> list[dict]:
    """Prompts start..start+count−1 of the pool; an error naming the pool when it is too short."""
    pool = io.read_jsonl(prompts_path)
    if start + count > len(pool):
        raise ValueError(f"{prompts_path}: the rounds need prompts {start}..{start + count - 1} but the pool holds "
                         f"{len(pool)}; lower rounds.prompts_per_round or rounds.n, or give the pool more prompts")
    return pool[start:start + count]


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

def sample_round(*, ref_dir, prompts_path, out, start: int, count: int, samples_per_prompt: int,
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int, batch_size: int, seed: int,
                 policy_dir=None) -> int:
    """K samples per prompt of the round's slice from the previous round's policy (`policy_dir`, its adapter on
    `ref_dir` (merged in memory) or a whole model; None: the reference itself, as for round 1 and for MPO's
    reference samples), into `out` (rpo.sampling.generate_answers: resumable from its .partial file)."""
    import torch

    from rpo.models import load_model, load_policy, load_tokenizer
    from rpo.sampling import generate_answers
    prompts = [{"id": p["id"], "messages": p["messages"]} for p in round_slice(prompts_path, start, count)]
    tok = load_tokenizer(ref_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = (load_policy(ref_dir, policy_dir, device=device) if policy_dir else load_model(ref_dir, device=device)).eval()
    rows = generate_answers(model, tok, prompts, out, num_return_sequences=samples_per_prompt, seed=seed,
                            desc="sample round", model_name="policy" if policy_dir else "reference",
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            batch_size=batch_size)
    return len(rows)


# ---------------------------------------------------------------------------------------------------
# Selection (pure)
# ---------------------------------------------------------------------------------------------------

def best_worst(scores: list[float]) -> tuple[int, int] | None:
    """(first best, first worst) sample; None when they tie (no preference)."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return None if scores[best] == scores[worst] else (best, worst)


def tournament(prefer, k: int) -> tuple[int, int] | None:
    """INPO's tournament over k samples (k a power of 2), `prefer(i, j)` the preference of sample i over j.
    Each match goes to the first sample unless the second is strictly preferred (get_match_res: `chosen_A >= 0.5`
    keeps A). The winners' bracket gives the winner; the first round's losers play a losers' bracket whose loser
    is the rejected sample. The pair is kept only when the winner is strictly preferred to the loser (the
    authors skip `chosen_A <= 0.5` for k > 2). None otherwise."""
    if k < 2 or k & (k - 1):
        raise ValueError(f"selection tournament needs a power-of-two number of samples per prompt, got {k}")

    def match(i, j):
        return (i, j) if prefer(i, j) >= 0.5 else (j, i)
    first = [match(i, i + 1) for i in range(0, k, 2)]
    winners, losers = [w for w, _ in first], [lo for _, lo in first]
    while len(winners) > 1:
        winners = [match(winners[i], winners[i + 1])[0] for i in range(0, len(winners), 2)]
    while len(losers) > 1:
        losers = [match(losers[i], losers[i + 1])[1] for i in range(0, len(losers), 2)]
    win, lose = winners[0], losers[0]
    return (win, lose) if prefer(win, lose) > 0.5 else None


def top_k(scores: list[float], responses: list[str], k: int) -> list[int]:
    """SuperHF's filter: the indices of the k best non-empty responses, ties in sample order (a stable sort)."""
    keep = [i for i, r in enumerate(responses) if r.strip()]
    return sorted(keep, key=lambda i: -scores[i])[:k]


def select(prompt: dict, responses: list[str], scores: list[float], selection: str, keep: int = 1) -> list[dict]:
    """The training rows one prompt's labelled samples give: {"id", "prompt", "responses", "scores", "index"}
    (for pairs, responses = [chosen, rejected]); [] when the prompt gives none."""
    base = {"prompt": prompt["messages"], "meta": prompt.get("meta", {})}
    if selection in ("best_worst", "tournament"):
        if selection == "best_worst":
            pair = best_worst(scores)
        else:
            pair = tournament(lambda i, j: oracle.preference(scores[i], scores[j]), len(scores))
        if pair is None or responses[pair[0]] == responses[pair[1]]:
            return []
        i, j = pair
        return [{"id": prompt["id"], **base, "responses": [responses[i], responses[j]],
                 "scores": [scores[i], scores[j]], "index": [i, j]}]
    if selection == "top_k":
        return [{"id": f"{prompt['id']}-k{rank}", **base, "responses": [responses[i]], "scores": [scores[i]],
                 "index": [i]} for rank, i in enumerate(top_k(scores, responses, keep))]
    if selection == "all":
        return [{"id": prompt["id"], **base, "responses": list(responses), "scores": list(scores),
                 "index": list(range(len(responses)))}]
    raise ValueError(f"rounds.selection {selection!r}: expected one of {list(SELECTIONS)}")


def label_round(*, samples, prompts_path, labels, selected, summary, labeller: dict, selection: str, keep: int = 1,
                reference_samples=None) -> dict:
    """Score every sample with the labeller (`labels`: {"id", "labeller", "scores"} per prompt), select the training
    rows (`selected`, see `select`; with `reference_samples`, each row also carries "reference_response", MPO's
    regularisation sample for its prompt) and count what was kept (`summary`)."""
    lab = oracle.get_labeller(labeller)
    prompts = {p["id"]: p for p in io.read_jsonl(prompts_path)}
    rows = io.read_jsonl(samples)
    ref = {r["id"]: r["responses"][0] for r in io.read_jsonl(reference_samples)} if reference_samples else None
    label_rows, out = [], []
    for n, row in enumerate(rows, 1):
        if row["id"] not in prompts:
            raise ValueError(f"{samples}:{n}: prompt {row['id']!r} is not in the pool {prompts_path}")
        scores = lab.scores(prompts[row["id"]], row["responses"])
        label_rows.append({"id": row["id"], "labeller": lab.label, "scores": scores})
        for s in select(prompts[row["id"]], row["responses"], scores, selection, keep):
            if ref is not None:
                if row["id"] not in ref:
                    raise ValueError(f"{reference_samples}: no reference sample for prompt {row['id']!r}")
                s["reference_response"] = ref[row["id"]]
            out.append(s)
    if not out:
        raise ValueError(f"{samples}: selection {selection!r} kept nothing from {len(rows)} prompts (every prompt's "
                         "samples tie under the labeller); sample more per prompt or more prompts")
    io.write_jsonl(label_rows, labels)
    io.write_jsonl(out, selected)
    flat = [s for r in label_rows for s in r["scores"]]
    stats = {"prompts": len(rows), "samples": len(flat), "rows": len(out), "selection": selection,
             "labeller": lab.label, "mean_score": sum(flat) / len(flat),
             "prompts_without_rows": len(rows) - len({s["id"].rsplit("-k", 1)[0] if selection == "top_k" else s["id"]
                                                       for s in out})}
    io.write_json(summary, stats, sort_keys=True)
    log.info("labelled %d samples of %d prompts (mean %.3f); %s kept %d rows", len(flat), len(rows),
             stats["mean_score"], selection, len(out))
    return stats


# ---------------------------------------------------------------------------------------------------
# Measurement and the method's model
# ---------------------------------------------------------------------------------------------------

def evaluate_round(*, ref_dir, policy_dir, prompts_path, ref_answers, out, round: int, labeller: dict,
                   kl_samples_per_prompt: int, max_new_tokens: int, batch_size: int, seed: int) -> int:
    """Round `round`'s policy on the held-out prompts, by rpo.overopt's measurement (one prefill per prompt: the
    greedy answer, then `kl_samples_per_prompt` temperature-1 samples): records at step = round of kind "kl"
    (log π − log π_ref of each sample), "gold" (the greedy answer's gold score and its outcome against the
    reference's greedy answer) and "proxy" (the labeller's score of the greedy answer: the training signal)."""
    import torch

    from rpo import overopt
    from rpo.models import load_model, load_tokenizer
    tok = load_tokenizer(ref_dir)
    prompts = io.read_jsonl(prompts_path)
    ref_rows = {r["id"]: r for r in io.read_jsonl(ref_answers)}
    missing = [p["id"] for p in prompts if p["id"] not in ref_rows]
    if missing:
        raise ValueError(f"{ref_answers}: no reference answer for held-out prompts {missing[:5]}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_model(ref_dir, device=device).eval()
    if (Path(policy_dir) / "adapter_config.json").is_file():
        from peft import PeftModel
        policy, ref = PeftModel.from_pretrained(base, policy_dir).eval(), overopt.Reference(None)
    else:
        policy, ref = load_model(policy_dir, device=device).eval(), overopt.Reference(base)
    decoded = overopt.decode(policy, tok, prompts, n=1 + kl_samples_per_prompt, max_new_tokens=max_new_tokens,
                             temperature=[0.0] + [1.0] * kl_samples_per_prompt, seed=seed * 1_000_003 + round,
                             batch_size=batch_size)
    records = [{"step": round, "kind": "kl", **r}
               for r in overopt.kl_values(policy, ref, tok, overopt._responses(decoded, slice(1, None)), batch_size)]
    answers = [d["texts"][0] for d in decoded]
    gold = overopt.gold_scores(prompts, answers)
    records += [{"step": round, "kind": "gold", "id": p["id"], "gold": g, "win": overopt.outcome(g, ref_rows[p["id"]]["gold"])}
                for p, g in zip(prompts, gold)]
    records += proxy_records(prompts, answers, labeller, round)
    io.write_jsonl(records, out)
    return len(records)


def proxy_records(prompts: list[dict], answers: list[str], labeller: dict, step: int) -> list[dict]:
    lab = oracle.get_labeller(labeller)
    return [{"step": step, "kind": "proxy", "id": p["id"], "score": lab.scores(p, [a])[0]}
            for p, a in zip(prompts, answers)]


def reference_records(*, prompts_path, ref_answers, out, labeller: dict, kl_samples_per_prompt: int) -> int:
    """Step 0 of every run's curve: the reference itself (KL 0 exactly; its greedy answers' gold and proxy)."""
    prompts = io.read_jsonl(prompts_path)
    ref_rows = {r["id"]: r for r in io.read_jsonl(ref_answers)}
    records = [{"step": 0, "kind": "kl", "id": p["id"], "values": [0.0] * kl_samples_per_prompt, "n_tokens": None,
                "finished": None} for p in prompts]
    records += [{"step": 0, "kind": "gold", "id": p["id"], "gold": ref_rows[p["id"]]["gold"], "win": 0.5}
                for p in prompts]
    records += proxy_records(prompts, [ref_rows[p["id"]]["answer"] for p in prompts], labeller, 0)
    io.write_jsonl(records, out)
    return len(records)


def finish_rounds(*, models: list, metrics: list, summaries: list, out_dir, metrics_path, summary_path) -> dict:
    """The last round's policy as the method's model (`out_dir`, what Table 1 answers with), every round's
    training metrics in one file (each record with its "round"), and the rounds' summaries."""
    if not (len(models) == len(metrics) == len(summaries)) or not models:
        raise ValueError("finish_rounds: one model, metrics file and summary per round")
    with io.atomic_dir(out_dir) as tmp:
        shutil.copytree(models[-1], tmp, dirs_exist_ok=True)
    lines, done = [], 0
    for r, path in enumerate(metrics, 1):
        recs = io.read_jsonl(path)
        # "step" counts over all rounds (one curve per method); "round_step" is the step within its round
        lines += [json.dumps({**rec, "round": r, "round_step": rec["step"], "step": done + rec["step"]}) for rec in recs]
        done += len(recs)
    io.write_text(metrics_path, "".join(line + "\n" for line in lines))
    summary = {"rounds": len(models), "per_round": [json.loads(Path(s).read_text()) for s in summaries],
               "model_from": str(models[-1])}
    io.write_json(summary_path, summary, sort_keys=True)
    return summary
