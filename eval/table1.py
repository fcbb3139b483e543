"""The paper's Table 1: pairwise win rates of the trained models on held-out prompts.

    select_prompts            the prompts of the protocol: `paper` the first n in dataset order (the authors'
                              test_prefs[:200]), `both_orders` n drawn by id hash
    question_prompts          what the models are asked and the judge is shown (`table1.prompt`)
    generate_table1_answers   one model's answers to the held-out prompts (generation.backend: hf or vllm)
    judge_pair                both models' answers judged prompt by prompt (one JSONL per pair), with the
                              gold judge or an LLM judge under `table1.protocol` (eval.pairwise_judge)
    make_table1               win rates with seeded bootstrap CIs -> results/table1.csv, table1.md,
                              and the chosen log-prob figure (paper Fig. 1 right)
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

from eval import figures, results_table
from eval.bootstrap import hierarchical_bootstrap
from eval.generation import answer_prompts
from eval.judging import config as judge_config
from eval.judging.judges import get_judge, is_empty, write_calls
from eval.pairwise import win_rate
from eval.pairwise_judge import PROTOCOLS, judge_items
from eval.paper import write_comparison
from rpo import io
from rpo.data import read_records, write_jsonl

log = logging.getLogger(__name__)


def get_judge_label(cfg: dict, judge) -> str:
    return judge_config.judge_label(cfg)  # the one label function (eval/judging/config.py)


def _read_jsonl(path) -> list[dict]:
    return read_records(path)


def select_prompts(prompts: list[dict], n: int | None, protocol: str = "both_orders") -> list[dict]:
    """`n` test prompts, the same for every model and every run, in dataset order.

    `paper`: the first n rows in dataset order, as the authors' gen_eval.py loads `test_prefs[:200]`.
    `both_orders`: those with the smallest sha1 of their id (a deterministic draw that does not follow the
    split's order, which is often sorted by source), in that hash order.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"table1.protocol {protocol!r}: expected one of {list(PROTOCOLS)}")
    if n is not None and n > len(prompts):
        log.warning("table1.generation.n_prompts is %d, but the test split has %d prompts: all %d are answered "
                    "and judged (n in table1.csv says how many had a verdict)", n, len(prompts), len(prompts))
    if n is None or n >= len(prompts):
        return prompts
    if protocol == "paper":
        return prompts[:n]
    return sorted(prompts, key=lambda p: hashlib.sha1(str(p["id"]).encode()).hexdigest())[:n]


# table1.prompt: which question of a held-out prompt row the models answer and the judge sees
QUESTIONS = ("history", "dataset_prompt", "first_message", "first_user_message")


def question_of(row: dict, mode: str) -> str | None:
    """The one question `mode` asks of a prompt row (None for `history`: the whole conversation):
    dataset_prompt      the dataset's own prompt string (meta.dataset_prompt; the authors' gen_eval.py, beta)
    first_message       the conversation's first message, whatever its role (gen_eval_gemma.py: chosen[0]["content"])
    first_user_message  its first user message"""
    if mode not in QUESTIONS:
        raise ValueError(f"table1.prompt {mode!r}: expected one of {list(QUESTIONS)}")
    msgs = row["messages"]
    if mode == "dataset_prompt":
        text = (row.get("meta") or {}).get("dataset_prompt")
        if not isinstance(text, str):
            raise ValueError(f"prompt {row['id']!r}: table1.prompt is dataset_prompt, but the row has no dataset prompt "
                             "string (meta.dataset_prompt: a hub or file source with a string 'prompt' column beside "
                             "whole conversations, as UltraFeedback's)")
        return text
    if mode == "first_message":
        return msgs[0]["content"]
    if mode == "first_user_message":
        return next(m["content"] for m in msgs if m["role"] == "user")  # a prompt always has a user turn
    return None


def question_prompts(prompts: list[dict], mode: str) -> list[dict]:
    """The prompt rows as `mode` asks them: one user message holding question_of, or the rows as they are."""
    out = []
    for p in prompts:
        q = question_of(p, mode)
        out.append(p if q is None else {**p, "messages": [{"role": "user", "content": q}]})
    return out


def generate_table1_answers(*, model_name: str, ref_dir: str, policy_dir: str | None, prompts_path: str,
                            out: str, n_prompts: int | None, max_new_tokens: int, temperature: float,
                            top_p: float, top_k: int, batch_size: int, seed: int, backend: str = "hf",
                            vllm_dtype: str | None = None, protocol: str = "both_orders", prompt: str = "history",
                            dtype: str | None = None, add_special_tokens: bool = False, stop_token_ids=(),
                            answer_text: str = "stripped", gguf: dict | None = None) -> None:
    """One model's Table 1 answers: the protocol's prompts asked as `prompt` (table1.prompt), decoded with
    table1.generation's settings (eval.generation, rpo.sampling)."""
    prompts = question_prompts(select_prompts(_read_jsonl(prompts_path), n_prompts, protocol), prompt)
    answer_prompts(backend=backend, vllm_dtype=vllm_dtype, dtype=dtype, gguf=gguf, ref_dir=ref_dir, policy_dir=policy_dir,
                   prompts=[{"id": p["id"], "messages": p["messages"]} for p in prompts], out=out,
                   max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   batch_size=batch_size, seed=seed, model_name=model_name, desc=f"answers {model_name}",
                   add_special_tokens=add_special_tokens, stop_token_ids=stop_token_ids, answer_text=answer_text)


def judge_pair(*, model_a: str, model_b: str, answers_a: str, answers_b: str, prompts_path: str,
               judge: dict, out: str, calls_out: str, protocol: str = "both_orders",
               judge_max_tokens: int = 1024, prompt: str = "history") -> None:
    """Both models' answers judged prompt by prompt (`out`), and what judging them asked (`calls_out`,
    eval.judging.judges.write_calls); the judge is shown the question the models were asked (`prompt`,
    table1.prompt: question_prompts)."""
    prompts = question_prompts(_read_jsonl(prompts_path), prompt)
    a = {r["id"]: r for r in _read_jsonl(answers_a)}
    b = {r["id"]: r for r in _read_jsonl(answers_b)}
    if set(a) != set(b):
        raise ValueError(f"{answers_a} and {answers_b} answer different prompts: "
                         f"{len(set(a) - set(b))} only in the first, {len(set(b) - set(a))} only in the second")
    missing = sorted(set(a) - {p["id"] for p in prompts})
    if missing:
        raise ValueError(f"{answers_a}: prompt ids not in {prompts_path}: {missing[:5]}")
    by_id = {p["id"]: p for p in prompts}
    # The paper protocol draws one order per prompt in dataset order; the others keep sorted ids (the
    # order the win rate's bootstrap resamples in, so their tables stay as before).
    ids = [p["id"] for p in prompts if p["id"] in a] if protocol == "paper" else sorted(a)
    items = [(by_id[pid], a[pid]["responses"][0], b[pid]["responses"][0]) for pid in ids]
    empty = {model_a: sum(is_empty(x) for _, x, _ in items), model_b: sum(is_empty(y) for _, _, y in items),
             "both": sum(is_empty(x) and is_empty(y) for _, x, y in items)}
    with get_judge(judge, scope=out) as j:
        if judge.get("kind") == "gold":
            results, used = j.compare_many(items), "gold"
        else:  # an LLM judge under the configured protocol; every call is cached by the client
            results, used = judge_items(protocol, j, items, max_tokens=judge_max_tokens), protocol
        name = get_judge_label(judge, j)
        write_calls(calls_out, j, benchmark="table1", models=[model_a, model_b], judged=len(items), unit="prompts",
                    empty=empty)
    rows = [{"id": pid, "model_a": model_a, "model_b": model_b, "outcome": o, "judge": name, "protocol": used,
             **details} for pid, (o, details) in zip(ids, results)]
    n_invalid = sum(r["outcome"] is None for r in rows)
    if n_invalid:
        log.warning("%s vs %s: %d of %d judgments without a valid verdict (%s protocol); they stay in the "
                    "judgment file and are left out of the win rate", model_a, model_b, n_invalid, len(rows), used)
    write_jsonl(rows, out)


def _pooled_rows(seed_pairs: dict, outcomes: dict, rows: list[dict], bootstrap: dict) -> list[dict]:
    """One POOLED_WIN_RATE row per pair of `seed_pairs`: the mean over seeds of the per-seed win rates, with
    a hierarchical bootstrap over seeds and prompts (eval.bootstrap)."""

    judge = {(r["model_a"], r["model_b"]): r["judge"] for r in rows if r["metric"] == results_table.WIN_RATE}
    out = []
    for key, runs in seed_pairs.items():
        missing = [f"{a}_vs_{b}" for a, b in runs if (a, b) not in outcomes]
        if missing:
            raise ValueError(f"seed_pairs[{key!r}]: no judgments for {missing}")
        groups = [outcomes[(a, b)] for a, b in runs]
        value, lo, hi = hierarchical_bootstrap(groups, n_boot=bootstrap["n"], seed=bootstrap["seed"],
                                               ci=bootstrap["ci"])
        a, b = runs[0]
        out.append(results_table.make_row(model_a=a, model_b=b, metric=results_table.POOLED_WIN_RATE,
                                          value=100 * value, ci_low=100 * lo, ci_high=100 * hi,
                                          n=sum(len(g) for g in groups), judge=judge[(a, b)]))
    return out


def judge_trust_markdown(rows: list[dict], validity: str | None) -> str:
    """table1.md's line on how far Table 2's LLM judges can be trusted: each one's Cohen's kappa against the gold
    verdicts on Table 1's answer pairs, from results/judge_validity.csv when the run made it
    (judge_validity.enabled), else how to measure it."""
    judges = sorted({r["judge"] for r in rows if r["metric"] not in (results_table.WIN_RATE,
                                                                      results_table.POOLED_WIN_RATE)
                     and not r["metric"].startswith("lm_eval/") and r["judge"] != judge_config.GOLD_LABEL})
    if not judges:
        return ""
    kappa = {}
    if validity:
        with open(validity, newline="") as f:
            kappa = {r["judge"]: r for r in csv.DictReader(f) if r["statistic"] == "kappa"}
    lines = [""]
    for j in judges:
        r = kappa.get(j)
        if r is None:
            lines.append(f"Agreement of the Table 2 judge {j} with gold: not measured in this run "
                         "(`snakemake --cores all results/judge_validity.csv` measures it on Table 1's answer pairs; "
                         "docs/benchmarks.md, \"Judge validity\").")
            continue
        ci = f" [{float(r['ci_low']):.2f}, {float(r['ci_high']):.2f}]" if r["ci_low"] and r["ci_high"] else ""
        value = f"{float(r['value']):.2f}" if r["value"] else "undefined"
        lines.append(f"Agreement of the Table 2 judge {j} with gold on Table 1's answer pairs (results/judge_validity.csv): "
                     f"Cohen's kappa {value}{ci}, n = {r['n']}.")
    return "\n".join(lines) + "\n"


def calls_markdown(records: list[dict], labels: dict[str, str]) -> str:
    """table1.md's note on the judge calls behind its numbers (eval.judging.judges.write_calls records): per
    benchmark, the items judged, the requests they needed, how many identical ones were answered once
    (judge.reuse_identical), and the empty answers judged."""
    if not records:
        return ""
    lines = ["", "## Judge calls", "",
             "| benchmark | models | judge | judged | requests | distinct | identical, reused | empty answers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        models = " vs ".join(labels.get(m, m) for m in r["models"])
        counts = r["empty_answers"]
        keys = [m for m in r["models"] if m in counts] + sorted(set(counts) - set(r["models"]))
        empty = ", ".join(f"{labels.get(k, k)} {counts[k]}" for k in keys if counts[k]) or "0"
        if r.get("llm_calls") is False:  # the gold judge: no LLM calls
            lines.append(f"| {r['benchmark']} | {models} | {r['judge']} | {r['judged']} {r['unit']} | 0 | 0 | 0 | {empty} |")
            continue
        lines.append(f"| {r['benchmark']} | {models} | {r['judge']} | {r['judged']} {r['unit']} | {r['items']} | "
                     f"{r['distinct_requests']} | {r['reused_identical']} | {empty} |")
    reuse = {r.get("reuse_identical") for r in records if r.get("llm_calls") is not False}
    if True in reuse:
        lines += ["", "Identical requests (the same judge prompt, e.g. two models with the same answer) are asked "
                      "once and their verdict reused (judge.reuse_identical: true, the default); false asks once per "
                      "item, as the authors' scripts do."]
    return "\n".join(lines) + "\n"


def make_table1(*, judgments: list[str], out_csv: str, out_md: str, metrics: dict[str, str],
                figure: str, raw_figure: str, labels: dict[str, str], pair_order: list[list[str]],
                bootstrap: dict, scores: list[str] = (), paper_series: str | None = None,
                comparison: tuple[str, str] | None = None, methods_metrics: dict | None = None,
                methods_figure: str | None = None, seed_pairs: dict | None = None,
                judge_calls: list[str] = (), validity: str | None = None) -> None:
    """Table 1 and the benchmark rows as results/table1.csv (tidy) and table1.md; the figures; with a
    paper series, the paper's numbers beside ours (`comparison`: its csv and md paths). Every path is the
    rule's output. `seed_pairs` ({"a_vs_b": [[a_s, b_s] per seed]}, with several training seeds): a
    POOLED_WIN_RATE row for each pair, over its per-seed judgments."""
    rows, protocols, outcomes = [], set(), {}
    for path in scores:  # per-model benchmark rows (MT-Bench, AlpacaEval, Arena-Hard)
        rows += [results_table.make_row(**r) for r in json.loads(Path(path).read_text())]
    for path in judgments:
        js = _read_jsonl(path)
        if not js:
            raise ValueError(f"{path}: no judgments")
        protocols |= {r.get("protocol", "both_orders") for r in js}
        valid = [r["outcome"] for r in js if r["outcome"] is not None]  # None: the judge's verdicts were invalid
        if not valid:
            raise ValueError(f"{path}: every judgment is invalid; no win rate can be computed")
        outcomes[(js[0]["model_a"], js[0]["model_b"])] = valid
        wr = win_rate(valid, n_boot=bootstrap["n"], seed=bootstrap["seed"],
                      ci=bootstrap["ci"])
        rows.append(results_table.make_row(model_a=js[0]["model_a"], model_b=js[0]["model_b"],
                                           metric=results_table.WIN_RATE, value=wr["value"],
                                           ci_low=wr["ci_low"], ci_high=wr["ci_high"], n=wr["n"],
                                           judge=js[0]["judge"]))
    rows = results_table.complete_pairs(rows + _pooled_rows(seed_pairs or {}, outcomes, rows, bootstrap))
    results_table.write_table(rows, out_csv)
    md = results_table.render_markdown(rows, model_labels=labels, pair_order=[tuple(p) for p in pair_order])
    md += (f"\nWin rates in %, ties count half; [low, high] = {int(bootstrap['ci'] * 100)}% seeded "
           f"percentile bootstrap over prompts (n_boot={bootstrap['n']}, seed={bootstrap['seed']}).\n")
    if protocols - {"gold"}:
        md += (f"Judging protocol: {', '.join(sorted(protocols))} (paper: the authors' gpt_eval.py, one order per "
               "prompt; both_orders: each prompt in both orders); n counts the prompts with a verdict.\n")
    md += judge_trust_markdown(rows, validity)
    md += calls_markdown([json.loads(Path(p).read_text()) for p in judge_calls], labels)
    io.write_text(out_md, md)
    if methods_figure and methods_metrics:
        # every method: the chosen log-ratio over training and its final win rate against Ref
        figures.plot_methods(methods_metrics, rows, methods_figure, labels=labels)
    if paper_series:
        write_comparison(out_csv, paper_series, *comparison)
    if metrics:
        # Paper Fig. 1 (right). Each step's batch holds other examples, so the raw batch mean of
        # log π(y_w|x) mostly tracks response length; the change from the reference on the same
        # examples is the comparable curve. The raw one is drawn beside it.
        figures.plot_metric(metrics, "logratio/chosen", figure, labels=labels, smooth=3,
                            ylabel="log π(y_w|x) − log π_ref(y_w|x)  (summed, chosen)",
                            title="Chosen log-probability vs the reference (paper Fig. 1 right)")
        figures.plot_logps_chosen_raw(metrics, raw_figure, labels=labels, smooth=3)
