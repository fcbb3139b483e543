"""The oracle of the online rounds: labellers, found by name (config `rounds.labeller: {kind: ...}`).

A labeller scores each sampled response to a prompt; a preference between two responses follows from the scores,
1[s > s'] + ½·1[s = s'] (design.md, "Oracle"). Offline the labeller is `gold`: the IFEval verifiers of the
synthetic data (rpo.verifiable), exact for these prompts. At scale a reward model (the reward-model stage), an
ensemble objective over several, or an LLM judge takes its place: each is one class with `kind`, `label` and
`scores(prompt, responses) -> [float]` (a pairwise judge would add `prefer(prompt, a, b) -> 1 | 0.5 | 0`, which
the tournament selection takes instead of the scores), registered with `@register("<kind>")`; the rounds never
import a labeller by name.
"""
from __future__ import annotations

from typing import Callable

LABELLERS: dict[str, Callable[..., "Labeller"]] = {}


def register(kind: str):
    def add(cls):
        if kind in LABELLERS:
            raise ValueError(f"labeller kind {kind!r} is registered twice")
        LABELLERS[kind] = cls
        return cls
    return add


class Labeller:
    kind = ""
    label = ""

    def scores(self, prompt: dict, responses: list[str]) -> list[float]:  # pragma: no cover - interface
        raise NotImplementedError


def preference(a: float, b: float) -> float:
    """The preference of a response scored `a` over one scored `b`: 1 (win), ½ (tie) or 0 (loss)."""
    return 1.0 if a > b else 0.0 if a < b else 0.5


def user_text(prompt: dict) -> str:
    turns = [m["content"] for m in prompt["messages"] if m["role"] == "user"]
    if not turns:
        raise ValueError(f"prompt {prompt.get('id')!r} has no user message")
    return turns[-1]


@register("gold")
class GoldLabeller(Labeller):
    """The gold verifier's score g(x, y) in [0, 1] (rpo.verifiable.gold_score: the mean of the strict and loose
    fractions of the prompt's instructions followed). Needs each prompt's IFEval meta."""
    kind = "gold"
    label = "gold (IFEval verifiers)"

    def scores(self, prompt: dict, responses: list[str]) -> list[float]:
        from rpo import verifiable
        meta = prompt.get("meta") or {}
        if "instruction_id_list" not in meta or "kwargs" not in meta:
            raise ValueError(f"prompt {prompt.get('id')!r}: the gold labeller needs the prompt's verifiable "
                             "instructions (meta.instruction_id_list and meta.kwargs); this prompt has none")
        text = user_text(prompt)
        return [verifiable.gold_score_for(r, text, meta)["score"] for r in responses]


def get_labeller(spec: dict) -> Labeller:
    """The labeller a `rounds.labeller` mapping names ({kind: ..., its settings})."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"rounds.labeller must be a mapping with a 'kind', got {spec!r}")
    kind = spec["kind"]
    if kind not in LABELLERS:
        raise ValueError(f"rounds.labeller.kind {kind!r}: expected one of {sorted(LABELLERS)}")
    return LABELLERS[kind](**{k: v for k, v in spec.items() if k != "kind"})
