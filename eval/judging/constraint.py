"""Constrained verdicts (`judge.constrain: true`): the judge's answer is forced to be one of the protocol's
verdict strings, so a small open judge cannot fumble the format.

Each protocol names its verdicts next to its parser, and its requests carry them as `"constraint"`:

    Table 1 pairwise (eval.pairwise_judge.VERDICTS)     [[A]]  [[B]]  [[C]]
    MT-Bench single rating (eval.mtbench.judge.RATINGS) [[1]] ... [[10]]
    Arena-Hard (eval.arenahard.judge.LABELS)            [[A>>B]]  [[A>B]]  [[A=B]]  [[B>A]]  [[B>>A]]

(AlpacaEval's annotator reads the log-probabilities of its first token, which a grammar would distort:
its requests carry no constraint and are never constrained.) The client (eval.judging.client) sends the
constraint only when the judge is configured with `constrain: true`, in the request field of its server
(`constrain_request`):

    grammar             a GBNF grammar, `root ::= "[[A]]" | "[[B]]" | "[[C]]"`: llama-cpp-python's server
                        (`python -m llama_cpp.server`, the llamacpp kind; its chat request's `grammar` field,
                        llama_cpp/server/types.py) and llama.cpp's own llama-server
    structured_outputs  vLLM >= 0.10.2: `"structured_outputs": {"choice": [...]}`
    guided_choice       vLLM < 0.12 (removed in 0.12.0): `"guided_choice": [...]`

The answer is then the verdict alone, with no explanation before it: the prompt is unchanged and the
judge reasons with no text of its own, so a constrained judge is another protocol (its label says
`(constrained)`, and its calls have their own cache keys). An answer outside the verdicts means the
server ignored the field (vLLM ignores fields it does not know, with HTTP 200): the client raises
JudgeConstraintError rather than score it.

Never for the official GPT-4 protocols (`is_official_gpt4`): MT-Bench, AlpacaEval 2.0 and Arena-Hard
were judged by GPT-4 writing its reasoning first, and OpenAI's API has no such field.
"""
from __future__ import annotations

import json
from urllib.parse import urlsplit

REQUEST_FIELDS = ("grammar", "structured_outputs", "guided_choice")
OPENAI_HOSTS = ("api.openai.com",)


def gbnf_choice(choices) -> str:
    """A GBNF grammar whose language is exactly `choices` (each a literal; JSON escaping is GBNF's)."""
    choices = [str(c) for c in choices]
    if not choices or any(not c for c in choices):
        raise ValueError(f"a constraint needs non-empty verdict strings, got {choices!r}")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def request_fields(choices, how: str) -> dict:
    """The request body's fields that force the answer to be one of `choices`, for server kind `how`."""
    choices = [str(c) for c in choices]
    if how == "grammar":
        return {"grammar": gbnf_choice(choices)}
    if how == "structured_outputs":
        return {"structured_outputs": {"choice": choices}}
    if how == "guided_choice":
        return {"guided_choice": choices}
    raise ValueError(f"constrain_request {how!r}: expected one of {list(REQUEST_FIELDS)}")


def is_official_gpt4(cfg: dict) -> bool:
    """The rule that refuses `constrain: true`: an `openai` judge whose base_url's host is OpenAI's API
    (api.openai.com, whatever the model), or whose model name contains `gpt-4` in any case (GPT-4,
    GPT-4-turbo, GPT-4o, behind any host: an Azure deployment or a proxy named after it)."""
    if cfg.get("kind") != "openai":
        return False
    host = (urlsplit(cfg.get("base_url") or "").hostname or "").lower()
    return host in OPENAI_HOSTS or "gpt-4" in str(cfg.get("model", "")).lower()


def check_constrain(cfg: dict, where: str = "judge") -> None:
    """ValueError when a judge block asks for `constrain: true` on an official OpenAI GPT-4 judge."""
    if cfg.get("constrain") and is_official_gpt4(cfg):
        raise ValueError(
            f"{where}.constrain: true is refused for {cfg.get('model')!r} at {cfg.get('base_url')!r}: the "
            "official GPT-4 protocols (MT-Bench, AlpacaEval 2.0, Arena-Hard, the paper's Table 1) let the judge "
            "write its reasoning before the verdict, and OpenAI's API has no grammar field. Constrained "
            "verdicts are for open judges (llamacpp, or a vLLM / llama.cpp server behind kind openai); "
            "set constrain: false, or judge_validity.constrain: [false] (the rule: base_url host api.openai.com, "
            "or a model name containing 'gpt-4')")
