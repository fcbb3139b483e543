"""Judges: one interface for every way of deciding which of two answers is better.

Three kinds, one interface (`Judge.compare(prompt_row, answer_a, answer_b) -> (outcome, details)`):

`gold`      the exact verifiable scorer of the synthetic:verifiable data (rpo.verifiable): it scores each
            answer against the prompt's IFEval instructions and compares the scores (ties count half).
`openai`    an LLM judge behind any OpenAI-compatible endpoint (`OpenAIJudge`, on the one client of
            eval.judge_client: retries, the API key from the environment, every call cached on disk by
            eval.judge_cache as soon as it returns).
`llamacpp`  the same client pointed at a local `llama_cpp.server` that the judge starts on a free
            loopback port and always stops (eval.llamacpp_server, `LlamaCppJudge`).

LLM judges ask the paper's Table-1 question in both orders (A/B and B/A) to cancel position bias
(`llm_pairwise`) and parse the verdict strictly (`[[A]]`, `[[B]]` or `[[C]]` for a tie; anything else is
invalid and counted, never guessed).

`get_judge(cfg)` builds a judge from its config block; the defaults of every key, and which kind takes
which key, live in the config schema only (eval.judge_config.resolve_judge fills them). Every judge is
named by eval.judge_config.judge_label. The llamacpp judge is a context manager (`with get_judge(cfg) as
judge:` starts and stops the server); used without one it starts the server on its first request and
stops it at `close()` or at exit.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from eval.judge_cache import JudgeCache, cache_key  # noqa: F401  (re-exported)
from eval.judge_client import (JudgeAuthError, JudgeError, JudgeNotFoundError,  # noqa: F401
                               JudgeRetriesExhausted, JudgeUnreachableError, OpenAIClient)
from eval.judge_config import GOLD_LABEL, judge_label, resolve_judge
from eval.llamacpp_server import LlamaCppServer, LlamaCppServerError, free_loopback_port  # noqa: F401
from eval.pairwise import outcome

log = logging.getLogger(__name__)

class Judge:
    """compare(prompt_row, answer_a, answer_b) -> (outcome for a in {0, 0.5, 1}, details dict).

    LLM judges may also return 0.25 / 0.75 (the two presentation orders disagree by half a point) or
    None (no valid verdict in either order); see `llm_pairwise`.
    """

    name = "judge"

    def compare(self, prompt_row: dict, answer_a: str, answer_b: str) -> tuple[float, dict]:
        raise NotImplementedError

    def compare_many(self, items: list[tuple[dict, str, str]]) -> list[tuple[float | None, dict]]:
        """compare() over (prompt_row, answer_a, answer_b) triples, results in order."""
        return [self.compare(*it) for it in items]

    # Every judge can be used as `with get_judge(cfg) as judge:`; only llamacpp needs it.
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        pass


class GoldJudge(Judge):
    name = GOLD_LABEL

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


# --------------------------------------------------------------------------------------------------
# LLM judges


class OpenAIJudge(OpenAIClient, Judge):
    """An LLM judge behind an OpenAI-compatible endpoint: the client plus Table 1's pairwise question.

    `temperature`, `max_tokens`: the sampling of compare() / llm_pairwise. `n_invalid_verdicts` counts
    the unparseable verdicts seen by compare().
    """

    def __init__(self, base_url: str | None, model: str, api_key_env: str | None, *, temperature: float,
                 max_tokens: int, name: str | None = None, **client):
        super().__init__(base_url, model, api_key_env, **client)
        self.judge_params = {"temperature": temperature, "max_tokens": max_tokens}
        self.name = name or judge_label({"kind": self.kind, "model": model})
        self.n_invalid_verdicts = 0

    def compare(self, prompt_row: dict, answer_a: str, answer_b: str):
        o, details = llm_pairwise(self, prompt_text(prompt_row), answer_a, answer_b, **self.judge_params)
        with self._lock:
            self.n_invalid_verdicts += details["n_invalid"]
        return o, details

    def compare_many(self, items):
        """Both orders of every item go out as one batch (bounded concurrency), then are parsed."""
        reqs = []
        for row, a, b in items:
            reqs += pairwise_requests(prompt_text(row), a, b, **self.judge_params)
        texts = self.complete_many(reqs)
        out = []
        for j in range(len(items)):
            o, details = pairwise_outcome(texts[2 * j], texts[2 * j + 1])
            with self._lock:
                self.n_invalid_verdicts += details["n_invalid"]
            out.append((o, details))
        return out


class LlamaCppJudge(OpenAIJudge):
    """OpenAIJudge pointed at a LlamaCppServer it owns; the model name is the GGUF file's stem.

    `with LlamaCppJudge(path, ...) as judge:` starts the server and always stops it. Used without
    `with`, the server starts on the first request and stops at close() or at interpreter exit.
    """

    kind = "llamacpp"

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int, n_threads: int,
                 chat_format: str | None, startup_timeout_s: float, **kw):
        self.server = LlamaCppServer(model_path, n_ctx=n_ctx, n_threads=n_threads,
                                     chat_format=chat_format, startup_timeout_s=startup_timeout_s)
        super().__init__(None, self.server.model_name, None, **kw)

    def __getstate__(self):
        state = super().__getstate__()
        state["server"] = LlamaCppServer(self.server.model_path, n_ctx=self.server.n_ctx,
                                         n_threads=self.server.n_threads,
                                         chat_format=self.server.chat_format,
                                         startup_timeout_s=self.server.startup_timeout_s)
        state["base_url"] = None
        return state

    def start(self) -> str:
        with self._lock:
            if self.server.proc is None:
                self.base_url = self.server.start()
            return self.base_url

    def _post(self, payload: dict) -> dict:
        if self.server.proc is None:
            self.start()
        return super()._post(payload)

    def __enter__(self):
        self.start()
        return self

    def close(self) -> None:
        super().close()
        self.server.__exit__(None, None, None)
        self.base_url = None


# --------------------------------------------------------------------------------------------------
# pairwise LLM judging (paper Table 1)

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
                "temperature": temperature, "max_tokens": max_tokens}
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
                                           max_tokens=r["max_tokens"]) for r in reqs)
    return pairwise_outcome(text_ab, text_ba)


# --------------------------------------------------------------------------------------------------
# config


def resolve_gguf(model: str) -> Path:
    """'pypi:<module>[/<file>.gguf]' (a GGUF shipped in an installed package) or a path."""
    if model.startswith("pypi:"):
        from rpo.models import find_packaged_gguf
        module, _, filename = model[len("pypi:"):].partition("/")
        return find_packaged_gguf(module, filename or None)
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"llamacpp judge: model {model!r} is neither 'pypi:<module>[/<file>.gguf]' "
                                "nor an existing .gguf file")
    return path


def get_judge(cfg: dict) -> Judge:
    """The judge of one config block ({kind: gold} or an LLM judge), its defaults from the schema.

    The block's keys are the constructors' keyword arguments, so no list of keys lives here: the
    schema says which kind takes which.
    """
    cfg = resolve_judge(cfg)
    if cfg["kind"] == "gold":
        return GoldJudge()
    kw = {k: v for k, v in cfg.items() if k not in ("kind", "model")}
    kw["name"] = judge_label(cfg)
    if cfg["kind"] == "openai":
        return OpenAIJudge(kw.pop("base_url"), cfg["model"], kw.pop("api_key_env"), **kw)
    return LlamaCppJudge(resolve_gguf(cfg["model"]), **kw)
