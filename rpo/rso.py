"""Statistical rejection sampling (RSO: Liu et al., "Statistical Rejection Sampling Improves Preference
Optimization", ICLR 2024): responses from the estimated optimal policy pi_r(y|x) ∝ pi_sft(y|x) exp(r(x, y)/beta)
(their eq. 4), drawn out of N candidates of the SFT policy.

`rejection_sample` is their Appendix A.1 Algorithm 1: while fewer than m are accepted, r_max is the best reward
among the candidates not yet accepted, and each of those, in order, is accepted when u < exp((r - r_max)/beta),
u ~ U[0, 1), until m are. beta -> infinity accepts the first m candidates (pi_sft itself); beta -> 0 only
the best (top-m-of-N, the "rejection sampling" of Llama 2 and Anthropic's HH). Their algorithm keys the
candidates by text (a Python dict), so identical responses are one candidate: `distinct` does that here.
"""
from __future__ import annotations

import math


def rejection_sample(rewards, m: int, beta: float, rng) -> list[int]:
    """Indices of the accepted candidates (of `rewards`, in candidate order), in the order accepted.
    `rng`: a numpy Generator (one uniform draw per candidate visited, as their np.random.uniform)."""
    rewards = [float(r) for r in rewards]
    if not 1 <= m <= len(rewards):
        raise ValueError(f"rejection sampling: m_accepted must be in 1..{len(rewards)} (the candidates), got {m}")
    if not beta > 0:
        raise ValueError(f"rejection sampling: beta must be > 0, got {beta!r}")
    if any(math.isnan(r) for r in rewards):
        raise ValueError("rejection sampling: a reward is NaN")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < m:
        r_max = max(rewards[i] for i in remaining)
        taken = []
        for i in remaining:
            # r <= r_max, so the exponent is <= 0 and exp never overflows; 1/inf gives exp(0) = 1
            if rng.uniform() >= math.exp((rewards[i] - r_max) / beta):
                continue
            accepted.append(i)
            taken.append(i)
            if len(accepted) == m:
                break
        remaining = [i for i in remaining if i not in set(taken)]
    return accepted


def distinct(texts: list[str]) -> list[int]:
    """Index of the first occurrence of each distinct text, in order (Algorithm 1's dict keys)."""
    seen: set[str] = set()
    out = []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            out.append(i)
    return out


def first_round_pairs(accepted: list[int]) -> list[tuple[int, int]]:
    """RSO's "first-round-rank" (their Sec. 5.2, Table 2): the accepted samples paired in order, (1, 2),
    (3, 4), ...; each pair is then labelled by the ranker. An odd last sample is left unpaired."""
    return [(accepted[j], accepted[j + 1]) for j in range(0, len(accepted) - 1, 2)]


def _gold_order(rows: list[dict]) -> dict[str, int]:
    """How many pairs the gold orders as they are (agree), ties, or orders the other way (disagree): with a
    reward-model labeller, how often the proxy's pair labels are the gold's."""
    g = [(r["meta"]["rso"]["chosen_gold"], r["meta"]["rso"]["rejected_gold"]) for r in rows]
    return {"agree": sum(c > w for c, w in g), "tie": sum(c == w for c, w in g), "disagree": sum(c < w for c, w in g)}


def make_rso_pairs(*, samples_path, pairs_path, out, summary_path, reward: str, labeller: str, m_accepted: int,
                   beta: float, seed: int, uwo_lambda: float = 0.5, gold_path=None, score_paths=None) -> dict:
    """RSO's preference pairs ("rso-sample-rank", their Sec. 3.1) for the prompts of `samples_path` (the
    reference's candidates, rpo.candidates): per prompt, its distinct non-empty candidates, the reward r of
    each (`reward`: "gold", the gold scores of `gold_path`; or "mean" / "wco" / "uwo", the ensemble objective
    of the members' scores in `score_paths`, rpo.reward), `m_accepted` of them by rejection_sample with
    `beta`, paired by first_round_pairs and ranked by `labeller` ("gold", or "reward": r itself); a tie
    gives no pair. Each prompt's messages and meta come from its pair in `pairs_path` (the training pairs).
    Writes the pairs (the normalised schema of rpo.data) to `out` and the counts to `summary_path`. Gold scores
    given with a reward and labeller that are not gold change no pair: they are only recorded (each pair's gold,
    the mean gold of the candidates and of the accepted, and how the gold orders the pairs)."""
    import numpy as np

    from rpo import io
    from rpo.candidates import read_samples
    from rpo.data import read_pairs, validate_row
    from rpo.reward import OBJECTIVES, ensemble_objective
    if reward not in ("gold", *OBJECTIVES):
        raise ValueError(f"sampling.reward {reward!r}: expected gold or one of {OBJECTIVES}")
    if labeller not in ("gold", "reward"):
        raise ValueError(f"sampling.labeller {labeller!r}: expected gold or reward")
    if (reward == "gold" or labeller == "gold") and gold_path is None:
        raise ValueError("make_rso_pairs: the gold reward or labeller needs gold_path")
    if reward != "gold" and not score_paths:
        raise ValueError(f"make_rso_pairs: sampling.reward {reward!r} needs the reward models' scores")
    source = {p["id"]: p for p in read_pairs(pairs_path)}
    gold = {r["id"]: r["gold"] for r in io.read_jsonl(gold_path)} if gold_path else {}
    members = [{r["id"]: r["scores"] for r in io.read_jsonl(p)} for p in score_paths or []]
    rng = np.random.default_rng(seed)
    out_rows = []
    counts = {"prompts": 0, "candidates": 0, "distinct_nonempty": 0, "prompts_with_fewer_than_m": 0,
              "prompts_with_fewer_than_2": 0, "accepted": 0, "pairs": 0, "ties_dropped": 0}
    gold_all, gold_accepted = [], []
    for s in read_samples(samples_path):
        pid = s["id"]
        if pid not in source:
            raise ValueError(f"{samples_path}: prompt {pid!r} has no pair in {pairs_path}")
        counts["prompts"] += 1
        counts["candidates"] += len(s["responses"])
        keep = [i for i in distinct(s["responses"]) if s["responses"][i].strip()]
        counts["distinct_nonempty"] += len(keep)
        if reward == "gold":
            r = [gold[pid][i] for i in keep]
        else:
            r = ensemble_objective(np.array([m[pid] for m in members])[:, keep], reward, lam=uwo_lambda).tolist()
        m = min(m_accepted, len(keep))
        counts["prompts_with_fewer_than_m"] += m < m_accepted
        if m < 2:
            counts["prompts_with_fewer_than_2"] += 1
            continue
        accepted = rejection_sample(r, m, beta, rng)  # positions in `keep`
        counts["accepted"] += len(accepted)
        if gold:
            gold_all += [gold[pid][i] for i in keep]
            gold_accepted += [gold[pid][keep[a]] for a in accepted]
        label = [gold[pid][i] for i in keep] if labeller == "gold" else r
        for j, (a, b) in enumerate(first_round_pairs(accepted)):
            if label[a] == label[b]:
                counts["ties_dropped"] += 1
                continue
            w, lo = (a, b) if label[a] > label[b] else (b, a)
            row = {"id": f"{pid}-rso{j}", "prompt": source[pid]["prompt"],
                   "chosen": [{"role": "assistant", "content": s["responses"][keep[w]]}],
                   "rejected": [{"role": "assistant", "content": s["responses"][keep[lo]]}],
                   "meta": {**{k: v for k, v in source[pid]["meta"].items() if k in ("source", "instruction_id_list", "kwargs")},
                            "rso": {"reward": reward, "labeller": labeller, "beta": beta,
                                    "chosen_reward": r[w], "rejected_reward": r[lo],
                                    **({"chosen_gold": gold[pid][keep[w]], "rejected_gold": gold[pid][keep[lo]]}
                                       if gold else {})}}}
            out_rows.append(validate_row(row, f"RSO pair {row['id']}"))
    counts["pairs"] = len(out_rows)
    if not out_rows:
        raise ValueError(f"RSO: no pairs from {samples_path} ({counts}); more candidates or a larger m_accepted")
    summary = {**counts, "reward": reward, "labeller": labeller, "m_accepted": m_accepted, "beta": beta,
               "seed": seed, **({"mean_gold_candidates": float(np.mean(gold_all)),
                                 "mean_gold_accepted": float(np.mean(gold_accepted)),
                                 "pairs_by_gold": _gold_order(out_rows)} if gold_all else {})}
    io.write_jsonl(out_rows, out)
    io.write_json(summary_path, summary, sort_keys=True)
    return summary
