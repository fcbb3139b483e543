"""Judges: one interface for every way of deciding which of two answers is better.

`gold` is the exact verifiable scorer of the synthetic:verifiable data (rpo.verifiable): it scores each
answer against the prompt's IFEval instructions and compares the scores (ties count half). The LLM judges
(`openai`, `llamacpp`) implement the same interface.
"""
from __future__ import annotations

from eval.pairwise import outcome


class Judge:
    """compare(prompt_row, answer_a, answer_b) -> (outcome for a in {0, 0.5, 1}, details dict)."""

    name = "judge"

    def compare(self, prompt_row: dict, answer_a: str, answer_b: str) -> tuple[float, dict]:
        raise NotImplementedError


class GoldJudge(Judge):
    name = "gold (IFEval verifiers)"

    def compare(self, prompt_row, answer_a, answer_b):
        from rpo import verifiable
        meta = prompt_row.get("meta") or {}
        if "instruction_id_list" not in meta:
            raise ValueError(f"prompt {prompt_row.get('id')!r}: the gold judge needs verifiable "
                             "instructions in its meta (only synthetic:verifiable prompts have them)")
        text = prompt_row["messages"][-1]["content"]
        a = verifiable.gold_score_for(answer_a, text, meta)
        b = verifiable.gold_score_for(answer_b, text, meta)
        return outcome(a["score"], b["score"]), {"gold_a": a, "gold_b": b}


JUDGES = {"gold": GoldJudge}


def get_judge(cfg: dict) -> Judge:
    kind = cfg.get("kind")
    if kind not in JUDGES:
        raise ValueError(f"judge kind {kind!r}: expected one of {sorted(JUDGES)}")
    return JUDGES[kind]()
