"""Table 1's pairwise LLM judging: two protocols over one judge client (`eval.judging.judges`).

`both_orders` (the default outside the paper configs)
    Each prompt is judged twice, answer A shown first and then answer B shown first, with a system
    message and a user message (`PAIRWISE_SYSTEM`, `PAIRWISE_USER`). A verdict is valid when every
    `[[A]]`/`[[B]]`/`[[C]]` marker in the text agrees; the prompt's outcome is the mean over its valid
    orders (0, 0.25, 0.5, 0.75 or 1), so position bias cancels. Same expected value as `paper`, lower
    variance (`protocol_variance`).

`paper` (config/paper-beta.yaml, config/paper-gemma.yaml)
    The authors' `eval/test_split_eval/gpt_eval.py` (YSLIU627/Regularized-Preference-Optimization):
    one order per prompt, chosen by `random.Random(0).randint(0, 1)` drawn once per prompt in dataset
    order (a draw for every prompt, also for one whose judgment fails later); one user message, FastChat's
    `pair-v2` with three changes (`paper_message`); the verdict is the first match of `\\[\\[([ABC])\\]\\]`
    (C is a tie, half a win); a text without one skips the prompt.

Both give, per prompt, the outcome for answer A (1 win, 0 loss, 0.5 tie) or None (no valid verdict: the
prompt is left out of the win rate and counted). A judge call that fails after the client's retries is an
error, never a skipped prompt (the authors' `except: continue` would drop it silently); the re-run is
served from the judge cache.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence

from eval.mtbench.data import load_judge_prompts
from rpo.io import read_json_objects

PROTOCOLS = ("both_orders", "paper")
PAPER_SEED = 0  # gpt_eval.py: random.seed(0), one randint(0, 1) per prompt
JUDGE_TEMPERATURE = 0.0  # FastChat judges pairs at temperature 0; the authors' API wrapper is not published

# ----------------------------------------------------------------------------- both_orders

PAIRWISE_SYSTEM = (
    "You are an impartial judge. Compare two AI assistants' answers to the user's question and decide "
    "which one is more helpful, correct, relevant and follows the user's instructions better. Do not "
    "let the order of the answers, their length or the assistants' names influence you. Explain briefly, "
    "then give your final verdict on the last line in exactly this format: [[A]] if assistant A is "
    "better, [[B]] if assistant B is better, [[C]] for a tie.")

PAIRWISE_USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")

_VERDICT = re.compile(r"\[\[([ABC])\]\]")
# what a constrained judge may answer (eval.judging.constraint): the verdict alone
VERDICTS = ("[[A]]", "[[B]]", "[[C]]")
# outcome for the answer shown first ("A") given the verdict
_SHOWN_FIRST = {"A": 1.0, "B": 0.0, "C": 0.5}


def prompt_text(prompt_row: dict) -> str:
    """The question of a prompt row: its single message, or the conversation as 'role: content' lines."""
    msgs = prompt_row.get("messages") or prompt_row.get("prompt")
    if isinstance(msgs, str):
        return msgs
    if len(msgs) == 1:
        return msgs[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs)


def parse_verdict(text: str | None) -> str | None:
    """'A', 'B' or 'C' when the text's [[X]] markers all agree; None (invalid) when none or they conflict.

    Strict: only the exact markers count ('[[a]]', '[A]', 'A is better' are invalid, never guessed).
    """
    if not isinstance(text, str):
        return None
    found = set(_VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


def pairwise_requests(question: str, answer_a: str, answer_b: str, *, temperature: float = 0.0,
                      max_tokens: int = 1024) -> list[dict]:
    """The two complete_many requests: answer_a shown first, then answer_b shown first."""
    def req(first, second):
        return {"messages": [{"role": "system", "content": PAIRWISE_SYSTEM},
                             {"role": "user", "content": PAIRWISE_USER.format(
                                 question=question, answer_a=first, answer_b=second)}],
                "temperature": temperature, "max_tokens": max_tokens, "constraint": VERDICTS}
    return [req(answer_a, answer_b), req(answer_b, answer_a)]


def pairwise_outcome(text_ab: str, text_ba: str) -> tuple[float | None, dict]:
    """Outcome for answer_a from the verdicts of both orders; see llm_pairwise."""
    v_ab, v_ba = parse_verdict(text_ab), parse_verdict(text_ba)
    o_ab = _SHOWN_FIRST[v_ab] if v_ab else None
    o_ba = 1.0 - _SHOWN_FIRST[v_ba] if v_ba else None  # answer_a is shown second here
    valid = [o for o in (o_ab, o_ba) if o is not None]
    n_invalid = 2 - len(valid)
    o = sum(valid) / len(valid) if valid else None
    details = {"verdict_ab": v_ab, "verdict_ba": v_ba, "outcome_ab": o_ab, "outcome_ba": o_ba,
               "n_invalid": n_invalid, "valid": bool(valid),
               "position_consistent": (o_ab == o_ba) if n_invalid == 0 else None,
               "raw_ab": text_ab, "raw_ba": text_ba}
    if not valid:
        details["invalid"] = "no [[A]]/[[B]]/[[C]] verdict in either order"
    return o, details


def llm_pairwise(judge, prompt_text: str, answer_a: str, answer_b: str, *, temperature: float = 0.0,
                 max_tokens: int = 1024) -> tuple[float | None, dict]:
    """Ask `judge` (anything with complete_many or complete) which answer is better, in both orders.

    Each order's verdict gives answer_a 1 (better), 0 (worse) or 0.5 (tie, [[C]]); the outcome is the
    mean over the valid orders, so it is one of 0, 0.25, 0.5, 0.75, 1 (a judge that always picks the
    first position gives 0.5). An unparseable verdict is invalid and counted (`details["n_invalid"]`),
    never guessed; with one valid order the outcome is that order's; with none it is None.
    """
    reqs = pairwise_requests(prompt_text, answer_a, answer_b, temperature=temperature,
                             max_tokens=max_tokens)
    if hasattr(judge, "complete_many"):
        text_ab, text_ba = judge.complete_many(reqs)
    else:
        text_ab, text_ba = (judge.complete(r["messages"], temperature=r["temperature"],
                                           max_tokens=r["max_tokens"], constraint=r["constraint"]) for r in reqs)
    return pairwise_outcome(text_ab, text_ba)


def judge_both_orders(judge, items: Sequence[tuple[dict, str, str]], *, max_tokens: int,
                      temperature: float = JUDGE_TEMPERATURE) -> list[tuple[float | None, dict]]:
    """Both orders of every (prompt_row, answer_a, answer_b) go out as one batch, then are parsed."""
    reqs = []
    for row, a, b in items:
        reqs += pairwise_requests(prompt_text(row), a, b, temperature=temperature, max_tokens=max_tokens)
    texts = judge.complete_many(reqs)
    return [pairwise_outcome(texts[2 * j], texts[2 * j + 1]) for j in range(len(items))]

# ----------------------------------------------------------------------------- paper (gpt_eval.py)


def paper_template() -> str:
    """The authors' prompt, built from FastChat's `pair-v2` (the MT-Bench data package's judge_prompts.jsonl)
    with the three changes of gpt_eval.py's EVAL_PROMPT: the quotes around "[[A]]", "[[B]]", "[[C]]" in the
    system prompt removed; `[User Question]` replaced by `[Instruction]`; the system prompt, a blank line,
    the template, one final newline. Placeholders: {question}, {answer_a}, {answer_b}."""
    pair = load_judge_prompts()["pair-v2"]
    system = pair["system_prompt"]
    for label in "ABC":
        quoted = f'"[[{label}]]"'
        if quoted not in system:
            raise ValueError(f"FastChat's pair-v2 system prompt has no {quoted}: not the prompt gpt_eval.py edited")
        system = system.replace(quoted, f"[[{label}]]")
    if "[User Question]" not in pair["prompt_template"]:
        raise ValueError("FastChat's pair-v2 template has no '[User Question]': not the prompt gpt_eval.py edited")
    return system + "\n\n" + pair["prompt_template"].replace("[User Question]", "[Instruction]") + "\n"


def paper_message(instruction: str, answer_a: str, answer_b: str, template: str | None = None) -> str:
    """The one user message the authors sent (no system message)."""
    template = paper_template() if template is None else template
    return template.format(question=instruction, answer_a=answer_a, answer_b=answer_b)


def paper_verdict(text: str | None) -> str | None:
    """gpt_eval.py: EVAL_PATTERN.search(response).group(1), the FIRST [[A]]/[[B]]/[[C]]; None if there is none."""
    m = _VERDICT.search(text) if isinstance(text, str) else None
    return m.group(1) if m else None


def paper_swaps(n: int, seed: int = PAPER_SEED) -> list[int]:
    """One random.Random(seed).randint(0, 1) per prompt, in dataset order (1: answer B is shown as A)."""
    rng = random.Random(seed)
    return [rng.randint(0, 1) for _ in range(n)]


def paper_outcome(text: str | None, swap: int) -> tuple[float | None, dict]:
    """Outcome for answer_a from one verdict; swap=1 means answer_b was shown as assistant A."""
    shown = paper_verdict(text)
    if shown is None:
        return None, {"swap": swap, "verdict": None, "raw": text, "valid": False,
                      "invalid": "no [[A]]/[[B]]/[[C]] in the judgment: the prompt is skipped (gpt_eval.py)"}
    # gpt_eval.py maps a swapped verdict back: A <-> B, C stays a tie
    verdict = {"A": "B", "B": "A", "C": "C"}[shown] if swap else shown
    return _SHOWN_FIRST[verdict], {"swap": swap, "verdict_shown": shown, "verdict": verdict, "raw": text,
                                   "valid": True}


def judge_paper(judge, items: Sequence[tuple[dict, str, str]], *, max_tokens: int,
                temperature: float = JUDGE_TEMPERATURE, seed: int = PAPER_SEED) -> list[tuple[float | None, dict]]:
    """The authors' protocol over `items` in DATASET order (the order decides each prompt's draw)."""
    template = paper_template()
    swaps = paper_swaps(len(items), seed)
    reqs = []
    for (row, a, b), swap in zip(items, swaps):
        first, second = (b, a) if swap else (a, b)
        reqs.append({"messages": [{"role": "user", "content": paper_message(prompt_text(row), first, second,
                                                                            template)}],
                     "temperature": temperature, "max_tokens": max_tokens, "constraint": VERDICTS})
    texts = judge.complete_many(reqs)
    return [paper_outcome(t, s) for t, s in zip(texts, swaps)]


JUDGES = {"both_orders": judge_both_orders, "paper": judge_paper}


def judge_items(protocol: str, judge, items, *, max_tokens: int):
    if protocol not in JUDGES:
        raise ValueError(f"table1.protocol {protocol!r}: expected one of {list(PROTOCOLS)}")
    return JUDGES[protocol](judge, items, max_tokens=max_tokens)

# ----------------------------------------------------------------------------- variance of the two protocols


def protocol_variance(order_outcomes: Sequence[tuple[float, float]], seed: int = PAPER_SEED) -> dict:
    """Both protocols on one set of both-order judgments, in percent.

    `order_outcomes`: per prompt (outcome for A with A shown first, outcome for A with A shown second), each
    0, 0.5 or 1; prompts lacking a valid verdict in either order are left out by the caller. Returns

      both_orders        mean over prompts of the two orders' mean, and `both_orders_se`, the standard error
                         of that mean over prompts (sample sd / sqrt n);
      paper_expected     the paper protocol's expected value over its order draw (equal to both_orders);
      paper_draw_sd      the sd of the paper estimate caused by the order draw alone, given these judgments:
                         sqrt(sum_i ((o_i1 - o_i2) / 2)^2) / n;
      paper_se           the standard error of a one-order-per-prompt estimate over prompts and draws:
                         sqrt(v / n), v the variance of a single-order outcome (each prompt's two orders
                         weighted 1/2, ddof 1); by the law of total variance v >= the both-orders variance;
      paper_seed         the value the paper protocol gives with random.Random(seed)'s draws, and n.
    """
    pairs = [(float(a), float(b)) for a, b in order_outcomes]
    n = len(pairs)
    if n < 2:
        raise ValueError(f"protocol_variance: need at least 2 prompts with both orders valid, got {n}")
    means = [(a + b) / 2 for a, b in pairs]
    m = sum(means) / n
    var_both = sum((x - m) ** 2 for x in means) / (n - 1)
    # single-order outcome: a mixture of the two orders with weight 1/2 each (law of total variance)
    var_single = (sum(((a - m) ** 2 + (b - m) ** 2) / 2 for a, b in pairs)) / (n - 1)
    draw_var = sum(((a - b) / 2) ** 2 for a, b in pairs) / n ** 2
    swaps = paper_swaps(n, seed)
    seeded = sum(b if s else a for (a, b), s in zip(pairs, swaps)) / n
    return {"n": n, "both_orders": 100 * m, "both_orders_se": 100 * math.sqrt(var_both / n),
            "paper_expected": 100 * m, "paper_draw_sd": 100 * math.sqrt(draw_var),
            "paper_se": 100 * math.sqrt(var_single / n), "paper_seed": 100 * seeded}


def read_order_outcomes(path) -> tuple[list[tuple[float, float]], int]:
    """(per-prompt (outcome A shown first, outcome A shown second), rows left out) from one both-order
    judgment file: ours (`outcome_ab`, `outcome_ba`, from table1.protocol both_orders) or FastChat's pair
    mode (`g1_winner` with model_1 shown first, `g2_winner` with model_2 shown first; model_1 is A).
    A row without a valid verdict in both orders is left out and counted."""
    winner = {"model_1": 1.0, "model_2": 0.0, "tie": 0.5}
    out, left_out = [], 0
    for lineno, row in read_json_objects(path):
        if "outcome_ab" in row:
            first, second = row["outcome_ab"], row["outcome_ba"]
        elif "g1_winner" in row:
            first, second = winner.get(row["g1_winner"]), winner.get(row["g2_winner"])
        else:
            raise ValueError(f"{path}, line {lineno}: neither our both-orders row (outcome_ab, outcome_ba) "
                             "nor FastChat's pair row (g1_winner, g2_winner)")
        if first is None or second is None:
            left_out += 1
            continue
        out.append((float(first), float(second)))
    return out, left_out


def variance_report(*, judgments: list[str], seed: int = PAPER_SEED) -> list[dict]:
    """`python -m eval table1-variance`: protocol_variance of each both-order judgment file, printed as JSON."""
    rows = []
    for path in judgments:
        pairs, left_out = read_order_outcomes(path)
        rows.append({"file": str(path), "left_out": left_out, **protocol_variance(pairs, seed)})
        print(json.dumps(rows[-1]))
    return rows
