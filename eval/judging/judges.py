"""Judges: one interface for every way of deciding which of two answers is better.

Three kinds, one interface (`Judge.compare(prompt_row, answer_a, answer_b) -> (outcome, details)`):

`gold`      the exact verifiable scorer of the synthetic:verifiable data (rpo.verifiable): it scores each
            answer against the prompt's IFEval instructions and compares the scores (ties count half).
`openai`    an LLM judge behind any OpenAI-compatible endpoint (`OpenAIJudge`, on the one client of
            eval.judging.client: retries, the API key from the environment, every call cached on disk by
            eval.judging.cache as soon as it returns).
`llamacpp`  the same client pointed at a local `llama_cpp.server` that the judge starts on a free
            loopback port and always stops (eval.judging.llamacpp_server, `LlamaCppJudge`).

Both LLM kinds take `constrain: true` (verdicts forced by a grammar or vLLM's structured outputs,
eval.judging.constraint), refused for an official OpenAI GPT-4 judge.

LLM judges answer chat completions (`complete`, `complete_many`); the Table-1 pairwise protocols that
ask them (both orders, or the authors' one order per prompt) live in eval.pairwise_judge.

`get_judge(cfg)` builds a judge from its config block; the defaults of every key, and which kind takes
which key, live in the config schema only (eval.judging.config.resolve_judge fills them). Every judge is
named by eval.judging.config.judge_label. The llamacpp judge is a context manager (`with get_judge(cfg) as
judge:` starts and stops the server); used without one it starts the server on its first request and
stops it at `close()` or at exit.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from eval.judging.cache import JudgeCache, cache_key  # noqa: F401  (re-exported)
from eval.judging.client import (JudgeAuthError, JudgeConstraintError, JudgeError,  # noqa: F401
                                JudgeNotFoundError, JudgeRetriesExhausted, JudgeUnreachableError, OpenAIClient)
from eval.judging.config import GOLD_LABEL, judge_label, resolve_judge
from eval.judging.llamacpp_server import LlamaCppServer, LlamaCppServerError, free_loopback_port  # noqa: F401
from eval.pairwise import outcome
from rpo import verifiable
from rpo.io import write_json
from rpo.models import find_packaged_gguf

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
    """An LLM judge behind an OpenAI-compatible endpoint: the one client (eval.judging.client), named by
    judge_label; the protocols of eval.pairwise_judge and the benchmarks ask it."""

    def __init__(self, base_url: str | None, model: str, api_key_env: str | None, *, name: str | None = None,
                 **client):
        super().__init__(base_url, model, api_key_env, **client)
        self.name = name or judge_label({"kind": self.kind, "model": model})


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
        # llama-cpp-python's server takes a GBNF grammar in the chat request (eval.judging.constraint)
        super().__init__(None, self.server.model_name, None, constrain_request="grammar", **kw)

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
# config


def resolve_gguf(model: str) -> Path:
    """'pypi:<module>[/<file>.gguf]' (a GGUF shipped in an installed package) or a path."""
    if model.startswith("pypi:"):
        module, _, filename = model[len("pypi:"):].partition("/")
        return find_packaged_gguf(module, filename or None)
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"llamacpp judge: model {model!r} is neither 'pypi:<module>[/<file>.gguf]' "
                                "nor an existing .gguf file")
    return path


def get_judge(cfg: dict, scope: str | None = None) -> Judge:
    """The judge of one config block ({kind: gold} or an LLM judge), its defaults from the schema.

    The block's keys are the constructors' keyword arguments, so no list of keys lives here: the
    schema says which kind takes which. `scope` names the judging job (its output file): with
    `reuse_identical: false` an item's call is its own within that job (eval.judging.client).
    """
    cfg = resolve_judge(cfg)
    if cfg["kind"] == "gold":
        return GoldJudge()
    kw = {k: v for k, v in cfg.items() if k not in ("kind", "model")}
    kw["name"] = judge_label(cfg)
    kw["scope"] = scope
    if cfg["kind"] == "openai":
        return OpenAIJudge(kw.pop("base_url"), cfg["model"], kw.pop("api_key_env"), **kw)
    return LlamaCppJudge(resolve_gguf(cfg["model"]), **kw)


# --------------------------------------------------------------------------------------------------
# what a judging job asked


def write_calls(out: str, judge: Judge, *, benchmark: str, models: list[str], judged: int, unit: str,
                empty: dict[str, int]) -> dict:
    """The judge-call record of one judging job (results/judge_calls/<benchmark>/<job>.json): how many
    `unit`s were judged, what the judge client was asked and did (OpenAIClient.accounting: requests,
    distinct ones, identical ones reused, completions received in this run, cache answers) and how many
    judged answers were empty (`empty`: model or side -> count). make_table1 shows them under the tables."""
    rec = {"benchmark": benchmark, "models": models, "judge": judge.name, "judged": judged, "unit": unit,
           "empty_answers": empty}
    rec.update(judge.accounting() if hasattr(judge, "accounting") else {"llm_calls": False})
    if any(empty.values()):
        log.warning("%s %s: judged %d %s with empty answers %s", benchmark, " vs ".join(models), judged, unit, empty)
    write_json(out, rec, sort_keys=True)
    return rec


def is_empty(answer) -> bool:
    return not str(answer or "").strip()
