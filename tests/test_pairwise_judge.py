"""Table 1's pairwise LLM judging (eval/pairwise_judge.py, eval/table1.py): the both-orders protocol and the
authors' protocol (`table1.protocol: paper`, their eval/test_split_eval/gpt_eval.py), and the variance of both.

Run:  pytest -q tests/test_pairwise_judge.py        (a few seconds; no model, no network beyond 127.0.0.1)

The fake judge is an OpenAI-compatible HTTP server on 127.0.0.1 that the test starts and stops. Each
expected number is worked out by hand in a comment beside it.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval import pairwise_judge as pj
from eval.table1 import calls_markdown, judge_pair, make_table1, select_prompts

# --------------------------------------------------------------------------------------------------
# the authors' prompt, draws and verdicts


def test_paper_message_is_the_authors_prompt_byte_for_byte():
    # issue 10's check of gpt_eval.py's EVAL_PROMPT filled with these three strings
    msg = pj.paper_message("What is 2+2?", "4", "5")
    assert len(msg) == 1107
    assert hashlib.sha256(msg.encode()).hexdigest() == "af2cbf543c4552fd706ff359dd9608e41dd0a9a67c79b6dd0e804fbf8f8023f6"
    assert msg.endswith("[The End of Assistant B's Answer]\n") and "[Instruction]\nWhat is 2+2?" in msg
    assert '"[[A]]"' not in msg and "[[A]] if assistant A is better" in msg


def test_paper_swaps_are_the_authors_draws():
    # gpt_eval.py: random.seed(0) at import, then random.randint(0, 1) once per prompt
    random.seed(0)
    authors = [random.randint(0, 1) for _ in range(200)]
    assert pj.paper_swaps(200) == authors
    assert pj.paper_swaps(12) == [1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1]  # Python's Mersenne Twister, seed 0


@pytest.mark.parametrize("text, verdict", [
    ("so [[B]]", "B"),
    ("[[B]] first, then [[A]]", "B"),      # the FIRST match (search), not "all markers agree"
    ("[[C]]", "C"),
    ("[[a]] [A] A", None),                 # only the exact double-bracket capitals count
    (None, None),                          # no text: gpt_eval.py's except: continue
])
def test_paper_verdict_is_the_first_match(text, verdict):
    assert pj.paper_verdict(text) == verdict


class ScriptedJudge:
    """complete_many over a function of the request; records every request."""

    def __init__(self, answer):
        self.answer, self.requests = answer, []

    def complete_many(self, reqs):
        self.requests += reqs
        return [self.answer(r) for r in reqs]


def _items(n):
    return [({"id": f"p{i}", "messages": [{"role": "user", "content": f"q{i}"}]}, f"a{i}", f"b{i}")
            for i in range(n)]


def test_judge_paper_shows_one_order_per_prompt_from_the_draws():
    # A judge that always answers [[A]] (pure position bias): the outcome for answer a is 1 where a was
    # shown first (swap 0) and 0 where it was shown second (swap 1). Draws for 5 prompts: 1 1 0 1 1.
    j = ScriptedJudge(lambda r: "[[A]]")
    res = pj.judge_paper(j, _items(5), max_tokens=77)
    assert [o for o, _ in res] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert [d["swap"] for _, d in res] == [1, 1, 0, 1, 1]
    assert len(j.requests) == 5  # one call per prompt
    for i, (r, swap) in enumerate(zip(j.requests, [1, 1, 0, 1, 1])):
        assert [m["role"] for m in r["messages"]] == ["user"] and r["max_tokens"] == 77
        first, second = (f"b{i}", f"a{i}") if swap else (f"a{i}", f"b{i}")
        assert r["messages"][0]["content"] == pj.paper_message(f"q{i}", first, second)


def test_judge_paper_a_failed_judgment_still_uses_its_draw():
    # Prompt 1 gets no verdict: skipped (None), and prompt 2 still gets the THIRD draw (0), so answer a2
    # is shown first; a judge preferring the "a" answers then gives 1 for prompts 0, 2, 3, 4.
    def prefers_a(r):
        text = r["messages"][0]["content"]
        if "q1" in text:
            return "I cannot tell."
        shown_a = re.search(r"Assistant A's Answer\]\n(.*?)\n", text).group(1)
        return "[[A]]" if shown_a.startswith("a") else "[[B]]"
    j = ScriptedJudge(prefers_a)
    res = pj.judge_paper(j, _items(5), max_tokens=16)
    assert [o for o, _ in res] == [1.0, None, 1.0, 1.0, 1.0]
    assert res[1][1]["valid"] is False and "skipped" in res[1][1]["invalid"]
    assert j.requests[2]["messages"][0]["content"].index("a2") < j.requests[2]["messages"][0]["content"].index("b2")


def test_select_prompts_paper_takes_the_first_rows_in_dataset_order():
    prompts = [{"id": f"id{i}", "messages": []} for i in range(10)]
    assert [p["id"] for p in select_prompts(prompts, 3, "paper")] == ["id0", "id1", "id2"]
    by_hash = sorted(prompts, key=lambda p: hashlib.sha1(p["id"].encode()).hexdigest())[:3]
    assert select_prompts(prompts, 3, "both_orders") == by_hash
    with pytest.raises(ValueError, match="table1.protocol"):
        select_prompts(prompts, 3, "one_order")

# --------------------------------------------------------------------------------------------------
# both orders (moved here from tests/test_judges.py with the functions)


class TwoTexts:
    """Returns the given texts in order: first the A/B order (answer_a shown first), then B/A."""

    def __init__(self, *texts):
        self.texts, self.requests = list(texts), []

    def complete_many(self, reqs):
        self.requests += reqs
        return [self.texts.pop(0) for _ in reqs]


@pytest.mark.parametrize("ab, ba, expected, n_invalid", [
    ("Assistant A is better. [[A]]", "[[B]]", 1.0, 0),   # answer_a wins in both orders
    ("[[B]]", "[[A]]", 0.0, 0),                           # answer_b wins in both orders
    ("[[A]]", "[[A]]", 0.5, 0),                           # always the first position: bias cancels to 0.5
    ("[[C]]", "[[C]]", 0.5, 0),                           # tie in both orders
    ("[[A]]", "[[C]]", 0.75, 0),                          # win + tie, averaged
    ("[[C]]", "[[A]]", 0.25, 0),                          # tie + loss (answer_b shown first wins)
    ("[[A]]", "I cannot decide.", 1.0, 1),                # one order unparseable: the other decides, counted
    ("[[A]] no wait [[B]]", "[[B]]", 1.0, 1),             # conflicting markers are invalid, not guessed
    ("[[a]]", "[A]", None, 2),                            # strict: lower case / single brackets are invalid
    ("", "A", None, 2),                                   # nothing at all
    ("Verdict: [[B]]. Again: [[B]]", "[[A]]", 0.0, 0),    # the same marker repeated is fine
])
def test_llm_pairwise_outcomes(ab, ba, expected, n_invalid):
    j = TwoTexts(ab, ba)
    o, details = pj.llm_pairwise(j, "What is 2+2?", "four", "five")
    assert o == expected
    assert details["n_invalid"] == n_invalid
    assert details["valid"] is (expected is not None)
    if expected is None:
        assert "invalid" in details
    # The second request shows the answers swapped.
    u1, u2 = (r["messages"][-1]["content"] for r in j.requests)
    assert u1.index("four") < u1.index("five") and u2.index("five") < u2.index("four")
    assert "What is 2+2?" in u1 and "[[C]]" in j.requests[0]["messages"][0]["content"]


def test_parse_verdict():
    assert pj.parse_verdict("blah\n[[C]]") == "C"
    assert pj.parse_verdict("[[ A ]]") is None and pj.parse_verdict(None) is None

# --------------------------------------------------------------------------------------------------
# the variance of both protocols on one set of both-order judgments


def test_protocol_variance_hand_computed():
    # per prompt (outcome for A shown first, shown second): (1,1) (0,1) (.5,.5) (1,0)
    # means 1 .5 .5 .5 -> m = .625; var over prompts (ddof 1) = (.375^2 + 3 * .125^2) / 3 = .0625
    #   both_orders_se = sqrt(.0625 / 4) = .125
    # single-order variance: per prompt ((a-m)^2 + (b-m)^2) / 2 = .140625, .265625, .015625, .265625;
    #   sum .6875 / 3 = .2291667 -> paper_se = sqrt(.2291667 / 4) = .2393570
    # draw-only variance: sum ((a-b)/2)^2 / n^2 = (0 + .25 + 0 + .25) / 16 = .03125 -> sd .1767767
    # the seeded draw (1 1 0 1) takes b, b, a, b = 1, 1, .5, 0 -> .625
    r = pj.protocol_variance([(1, 1), (0, 1), (0.5, 0.5), (1, 0)])
    assert r["n"] == 4
    assert r["both_orders"] == pytest.approx(62.5) and r["paper_expected"] == pytest.approx(62.5)
    assert r["both_orders_se"] == pytest.approx(12.5)
    assert r["paper_se"] == pytest.approx(23.93570, abs=1e-4)
    assert r["paper_draw_sd"] == pytest.approx(17.67767, abs=1e-4)
    assert r["paper_seed"] == pytest.approx(62.5)


def test_variance_report_reads_ours_and_fastchat_pair_rows(tmp_path, capsys):
    ours = tmp_path / "ours.jsonl"
    ours.write_text("".join(json.dumps(r) + "\n" for r in [
        {"outcome_ab": 1.0, "outcome_ba": 1.0}, {"outcome_ab": 0.0, "outcome_ba": 1.0},
        {"outcome_ab": 0.5, "outcome_ba": 0.5}, {"outcome_ab": 1.0, "outcome_ba": 0.0},
        {"outcome_ab": None, "outcome_ba": 1.0}]))  # one order invalid: left out
    fastchat = tmp_path / "gpt-4_pair.jsonl"
    # FastChat pair mode: g1 shows model_1 first, g2 shows model_2 first; winners are model names.
    # The same four prompts as above for model_1: (1,1) (0,1) (.5,.5) (1,0); "error" is left out.
    fastchat.write_text("".join(json.dumps(r) + "\n" for r in [
        {"g1_winner": "model_1", "g2_winner": "model_1"}, {"g1_winner": "model_2", "g2_winner": "model_1"},
        {"g1_winner": "tie", "g2_winner": "tie"}, {"g1_winner": "model_1", "g2_winner": "model_2"},
        {"g1_winner": "error", "g2_winner": "model_1"}]))
    rows = pj.variance_report(judgments=[str(ours), str(fastchat)])
    for r in rows:
        assert r["left_out"] == 1 and r["n"] == 4 and r["both_orders_se"] == pytest.approx(12.5)
    assert len(capsys.readouterr().out.strip().splitlines()) == 2

# --------------------------------------------------------------------------------------------------
# Table 1 end to end through an OpenAI-compatible judge on 127.0.0.1


def _completion(text):
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


class FakeJudgeServer:
    """Answers every chat completion with `answer(request_json)`; records the requests."""

    def __init__(self, answer):
        self.requests, lock = [], threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    fake.requests.append(body)
                data = json.dumps(_completion(answer(body))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def prefers_good(req):
    """The fake judge prefers the answer that says "good"; a prompt saying "skip" gets no verdict."""
    text = req["messages"][-1]["content"]
    if "skip" in text:
        return "no verdict"
    a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", text, re.S).group(1)
    b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", text, re.S).group(1)
    return "[[C]]" if ("good" in a) == ("good" in b) else "[[A]]" if "good" in a else "[[B]]"


@pytest.fixture
def judge_server():
    s = FakeJudgeServer(prefers_good)
    yield s
    s.close()


def _write_pair(tmp_path, questions, answers):
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": q}], "meta": {}}
               for i, q in enumerate(questions)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    paths = {}
    for m, texts in answers.items():
        paths[m] = tmp_path / f"{m}.jsonl"
        paths[m].write_text("".join(json.dumps({"id": p["id"], "responses": [t]}) + "\n"
                                    for p, t in zip(prompts, texts)))
    return paths


def _table(tmp_path, judgments):
    make_table1(judgments=[str(judgments)], out_csv=str(tmp_path / "t.csv"), out_md=str(tmp_path / "t.md"),
                metrics={}, figure=str(tmp_path / "f.png"), raw_figure=str(tmp_path / "f_raw.png"), labels={},
                pair_order=[["m1", "m2"]],
                bootstrap={"n": 50, "seed": 0, "ci": 0.95})
    return {(r["model_a"], r["model_b"]): r for r in csv.DictReader((tmp_path / "t.csv").open())}


def _judge_cfg(server, tmp_path):
    return {"kind": "openai", "base_url": server.url, "model": "fake-model", "max_retries": 0,
            "cache_dir": str(tmp_path / "cache"), "api_key_env": None}


def test_table1_paper_protocol_through_an_openai_judge(judge_server, tmp_path):
    questions = ["say hi", "skip this one", "say bye", "tie", "last"]
    paths = _write_pair(tmp_path, questions, {"m1": ["good hi", "good x", "meh bye", "good a", "good z"],
                                              "m2": ["meh hi", "meh x", "good bye", "good b", "meh z"]})
    judge_pair(model_a="m1", model_b="m2", answers_a=str(paths["m1"]), answers_b=str(paths["m2"]),
               prompts_path=str(tmp_path / "prompts.jsonl"), judge=_judge_cfg(judge_server, tmp_path),
               out=str(tmp_path / "j.jsonl"), calls_out=str(tmp_path / "calls.json"), protocol="paper",
               judge_max_tokens=99)
    rows = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    # draws 1 1 0 1 1 (seed 0), in dataset order p0..p4:
    # p0 swap: A shows m2 "meh hi", B m1 "good hi" -> [[B]] -> mapped back A: m1 wins      -> 1
    # p1 "skip": no verdict -> skipped                                                    -> None
    # p2 no swap: A m1 "meh bye", B m2 "good bye" -> [[B]]                                -> 0
    # p3 both "good" -> [[C]]                                                             -> 0.5
    # p4 swap: A m2 "meh z", B m1 "good z" -> [[B]] -> m1                                 -> 1
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert [r["outcome"] for r in rows] == [1.0, None, 0.0, 0.5, 1.0]
    assert [r["swap"] for r in rows] == [1, 1, 0, 1, 1]
    assert all(r["protocol"] == "paper" and r["judge"] == "openai:fake-model" for r in rows)
    # the real path ran: one call per prompt, one user message, the authors' text, our max_tokens
    assert len(judge_server.requests) == 5
    assert all(r["model"] == "fake-model" and r["max_tokens"] == 99 and len(r["messages"]) == 1
               and r["messages"][0]["role"] == "user" for r in judge_server.requests)
    shown = [("meh hi", "good hi"), ("meh x", "good x"), ("meh bye", "good bye"), ("good b", "good a"),
             ("meh z", "good z")]  # (assistant A, assistant B) per prompt after the draw
    # the calls go out concurrently, so compare them as a set
    assert sorted(r["messages"][0]["content"] for r in judge_server.requests) == \
        sorted(pj.paper_message(q, x, y) for q, (x, y) in zip(questions, shown))
    t = _table(tmp_path, tmp_path / "j.jsonl")
    # (1 + 0 + 0.5 + 1) / 4 = 62.5 %, n = 4 (the skipped prompt is not counted)
    assert float(t[("m1", "m2")]["value"]) == 62.5 and t[("m1", "m2")]["n"] == "4"
    assert "Judging protocol: paper" in (tmp_path / "t.md").read_text()


def test_table1_both_orders_through_an_openai_judge(judge_server, tmp_path):
    paths = _write_pair(tmp_path, ["say hi", "skip this one", "say bye"],
                        {"m1": ["good hi", "good x", "meh bye"], "m2": ["meh hi", "meh x", "good bye"]})
    cfg = _judge_cfg(judge_server, tmp_path)
    args = dict(model_a="m1", model_b="m2", answers_a=str(paths["m1"]), answers_b=str(paths["m2"]),
                prompts_path=str(tmp_path / "prompts.jsonl"), judge=cfg, protocol="both_orders")
    judge_pair(out=str(tmp_path / "j.jsonl"), calls_out=str(tmp_path / "c.json"), **args)
    rows = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    # p0: m1 good in both orders -> 1; p1: invalid in both orders -> None; p2: m2 good -> 0
    assert [r["outcome"] for r in rows] == [1.0, None, 0.0]
    assert len(judge_server.requests) == 6  # 3 prompts x 2 orders
    assert all([m["role"] for m in r["messages"]] == ["system", "user"] for r in judge_server.requests)
    assert all(r["judge"] == "openai:fake-model" and r["protocol"] == "both_orders" for r in rows)
    t = _table(tmp_path, tmp_path / "j.jsonl")
    # the invalid prompt is left out: (1 + 0) / 2 = 50 %, n = 2
    assert float(t[("m1", "m2")]["value"]) == 50.0 and t[("m1", "m2")]["n"] == "2"
    judge_pair(out=str(tmp_path / "j2.jsonl"), calls_out=str(tmp_path / "c2.json"), **args)
    assert len(judge_server.requests) == 6  # a re-run is served from the judge cache
    calls = json.loads((tmp_path / "c2.json").read_text())
    assert (calls["items"], calls["distinct_requests"], calls["completions_received"], calls["cache_hits"]) == \
        (6, 6, 0, 6)


@pytest.mark.parametrize("reuse", [True, False])
def test_identical_requests_are_reused_or_asked_per_item(judge_server, tmp_path, reuse):
    # p0: both models answer "good same" -> its two orders are one identical request; p1: both answers empty
    paths = _write_pair(tmp_path, ["say hi", "say bye", "say more"],
                        {"m1": ["good same", "", "good a"], "m2": ["good same", "", "meh b"]})
    cfg = {**_judge_cfg(judge_server, tmp_path), "reuse_identical": reuse}
    args = dict(model_a="m1", model_b="m2", answers_a=str(paths["m1"]), answers_b=str(paths["m2"]),
                prompts_path=str(tmp_path / "prompts.jsonl"), judge=cfg, protocol="both_orders")
    judge_pair(out=str(tmp_path / "j.jsonl"), calls_out=str(tmp_path / "c.json"), **args)
    calls = json.loads((tmp_path / "c.json").read_text())
    # 3 prompts x 2 orders = 6 requests; p0's and p1's two orders are identical requests
    expected_distinct = 4 if reuse else 6
    assert len(judge_server.requests) == expected_distinct
    assert (calls["items"], calls["distinct_requests"], calls["reused_identical"], calls["completions_received"]) == \
        (6, expected_distinct, 6 - expected_distinct, expected_distinct)
    assert calls["reuse_identical"] is reuse and calls["judged"] == 3 and calls["unit"] == "prompts"
    assert calls["empty_answers"] == {"m1": 1, "m2": 1, "both": 1}
    # a re-run of the job (the same output) asks nothing again, per item too
    judge_pair(out=str(tmp_path / "j.jsonl"), calls_out=str(tmp_path / "c2.json"), **args)
    assert len(judge_server.requests) == expected_distinct
    assert json.loads((tmp_path / "c2.json").read_text())["cache_hits"] == expected_distinct
    md = calls_markdown([calls], {"m1": "One"})
    assert "| table1 | One vs m2 | openai:fake-model | 3 prompts | 6 | %d | %d | One 1, m2 1, both 1 |" % (
        expected_distinct, 6 - expected_distinct) in md


# --------------------------------------------------------------------------------------------------
# table1.prompt: the question the models are asked is the one the judge sees


class RecordingJudge:
    """A judge that answers [[A]] and keeps every request (stands in for get_judge's client)."""

    name = "openai:gpt-4"

    def __init__(self):
        self.requests = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def complete_many(self, reqs):
        self.requests += reqs
        return ["[[A]]"] * len(reqs)


@pytest.mark.parametrize("mode,question", [
    ("dataset_prompt", "the dataset's own prompt"),         # gen_eval.py (beta): dataset['prompt']
    ("first_message", "you are a helpful assistant"),       # gen_eval_gemma.py: chosen[0]["content"], any role
    ("first_user_message", "first question"),
    ("history", "system: you are a helpful assistant\n\nuser: first question\n\nassistant: an answer\n\n"
                "user: second question"),                   # our default: every turn, as 'role: content' lines
])
def test_the_judge_sees_the_question_the_models_were_asked(tmp_path, monkeypatch, mode, question):
    import eval.table1 as t1
    conv = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"}, {"role": "user", "content": "second question"}]
    prompts = [{"id": "p0", "messages": conv, "meta": {"dataset_prompt": "the dataset's own prompt"}}]
    asked = t1.question_prompts(prompts, mode)[0]["messages"]
    assert asked == (conv if mode == "history" else [{"role": "user", "content": question}])
    judge = RecordingJudge()
    monkeypatch.setattr(t1, "get_judge", lambda cfg, scope=None: judge)
    paths = {}
    for name, text in (("a", "answer A"), ("b", "answer B")):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text(json.dumps({"id": "p0", "responses": [text]}) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps(prompts[0]) + "\n")
    judge_pair(model_a="rpo", model_b="dpo", answers_a=str(paths["a"]), answers_b=str(paths["b"]),
               prompts_path=str(tmp_path / "prompts.jsonl"), judge={"kind": "openai", "model": "gpt-4"},
               out=str(tmp_path / "j.jsonl"), calls_out=str(tmp_path / "c.json"), protocol="paper", prompt=mode)
    (req,) = judge.requests
    assert f"[Instruction]\n{question}\n\n[The Start of Assistant A's Answer]" in req["messages"][0]["content"]


def test_a_dataset_prompt_the_row_lacks_is_an_error():
    from eval.table1 import question_prompts
    with pytest.raises(ValueError, match="prompt 'p0': table1.prompt is dataset_prompt, but the row has no dataset"):
        question_prompts([{"id": "p0", "messages": [{"role": "user", "content": "q"}], "meta": {}}], "dataset_prompt")
    with pytest.raises(ValueError, match="table1.prompt 'nope'"):
        question_prompts([{"id": "p0", "messages": [{"role": "user", "content": "q"}]}], "nope")
