"""Which questions of a benchmark a run asks (benchmarks.<name>.n_questions and subset): AlpacaEval's and
Arena-Hard's."""
from __future__ import annotations

SUBSETS = ("first", "shortest")


def select(rows: list, n: int | None, subset: str, size) -> list:
    """The first n rows, or (subset "shortest") the n whose judge prompt will be shortest.

    "shortest" exists for the CPU quickstart: a judge's cost there is its prompt, dominated by the
    reference or baseline answer, so the cheapest questions to judge are those with the shortest ones.
    A deterministic choice, named in the config; the paper configs use every question.
    """
    if subset not in SUBSETS:
        raise ValueError(f"benchmark subset {subset!r}: expected 'first' or 'shortest'")
    if n is None:
        return rows
    if subset == "shortest":
        order = sorted(range(len(rows)), key=lambda i: (size(rows[i]), i))[:n]
        return [rows[i] for i in sorted(order)]
    return rows[:n]
