"""Tests for eval.arenahard (data, judge prompts, judging) on the offline v2.0 data; each version's verdicts
and score are tested in tests/test_arenahard_protocol.py.

Run:  cd /work/main && PYTHONPATH=. /work/venv/bin/python -m pytest tests/test_arenahard.py -q -p no:cacheprovider

Each expected number is worked out by hand in a comment beside it.
"""

import json

import pytest

from eval.arenahard import data as ah
from eval.arenahard import judge as ahj
from eval.arenahard import protocol as ap

BASE = "o3-mini-2025-01-31"


def _row(uid, g1, g2, *, model="rpo", baseline=BASE, category="hard_prompt", key="uid"):
    """One upstream judgment row; g1/g2 are the stored verdicts (None = failed game)."""
    games = [None if g == "NULL" else {"score": g, "judgment": f"... [[{g}]]", "user_prompt": "..."}
             for g in (g1, g2)]
    return {key: uid, "category": category, "judge": "judge-x", "model": model, "baseline": baseline,
            "games": games}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- judge prompts


def test_game_requests_put_baseline_first_then_swap():
    q = {"uid": "u1", "category": "hard_prompt", "prompt": "What is 2+2?"}
    g1, g2 = ahj.game_requests(q, "MODEL SAYS 4", "BASELINE SAYS 4")
    for g in (g1, g2):
        assert g["temperature"] == 0.0 and g["max_tokens"] == 16000  # upstream v2.0 judge config
        assert g["messages"][0] == {"role": "system", "content": ahj.SYSTEM_PROMPT}
        assert "[[A>>B]]" in ahj.SYSTEM_PROMPT and "[[B>>A]]" in ahj.SYSTEM_PROMPT
    u1, u2 = g1["messages"][1]["content"], g2["messages"][1]["content"]
    assert u1.startswith("<|User Prompt|>\nWhat is 2+2?\n\n<|The Start of Assistant A's Answer|>\nBASELINE SAYS 4\n")
    assert "<|The Start of Assistant B's Answer|>\nMODEL SAYS 4\n<|The End of Assistant B's Answer|>" in u1
    assert "Assistant A's Answer|>\nMODEL SAYS 4\n" in u2 and "Assistant B's Answer|>\nBASELINE SAYS 4\n" in u2
    cw = ahj.judge_messages({"category": "creative_writing", "prompt": "p"}, "a", "b")
    assert cw[0]["content"] == ahj.CREATIVE_WRITING_SYSTEM_PROMPT
    assert "generating your own answer" in ahj.SYSTEM_PROMPT
    assert "generating your own answer" not in ahj.CREATIVE_WRITING_SYSTEM_PROMPT


# ---------------------------------------------------------------- data


def test_offline_v2_questions_and_baselines():
    qs, baselines = ah.load_benchmark("v2.0")
    assert len(qs) == 750
    cats = {}
    for q in qs:
        cats[q["category"]] = cats.get(q["category"], 0) + 1
    assert cats == {"hard_prompt": 500, "creative_writing": 250}
    assert set(baselines) == {"o3-mini-2025-01-31", "gemini-2.0-flash-001"}
    for q in qs:
        assert q["uid"] in baselines[ah.baseline_for(q["category"])]
    hp, b = ah.load_benchmark("v2.0", categories=["hard_prompt"])
    assert len(hp) == 500 and set(b) == {"o3-mini-2025-01-31"}


@pytest.mark.parametrize("lines, match", [
    (['{"uid": "a", "category": "hard_prompt", "prompt": "x"}', '{"uid": "a", "category": "hard_prompt", "prompt": "y"}'],
     r"q.jsonl, line 2: duplicate question id 'a' \(first on line 1\)"),
    (['{"uid": "a", "category": "hard_prompt"}'], r"q.jsonl, line 1: question 'a' has no prompt text"),
    (['{"uid": "a", "prompt": "x"}'], r"line 1: question 'a' has no category"),
    (['{"uid": "a", "category": "c", "prompt": "x"}', '[1, 2]'], r"line 2: expected a JSON object"),
])
def test_question_file_errors(tmp_path, lines, match):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        ah.load_questions(p)


def test_answer_file_errors_and_v01_schema(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"uid": "a", "model": "m", "messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl, line 1: no answer text for 'a'"):
        ah.load_answers(p)
    old = {"question_id": "a", "model_id": "gpt-4-0314", "choices": [{"index": 0, "turns": [{"content": "hi"}]}]}
    p.write_text(json.dumps(old) + "\n" + json.dumps(dict(old, model_id="other", question_id="b")) + "\n")
    with pytest.raises(ValueError, match=r"line 2: model 'other' differs"):
        ah.load_answers(p)
    p.write_text(json.dumps(old) + "\n")
    assert ah.load_answers(p) == ("gpt-4-0314", {"a": "hi"})


def test_missing_baseline_answer_names_the_file(tmp_path):
    (tmp_path / "o3-mini-2025-01-31.jsonl").write_text(json.dumps(
        {"uid": "a", "model": "o3-mini-2025-01-31", "messages": [{"role": "assistant", "content": {"answer": "x"}}]}) + "\n")
    qs = [{"uid": "a", "category": "hard_prompt", "prompt": "p"}, {"uid": "b", "category": "hard_prompt", "prompt": "p"}]
    with pytest.raises(ValueError, match=r"o3-mini-2025-01-31.jsonl: no answer to question 'b'"):
        ah.load_baseline_answers(qs, tmp_path)


def test_v01_comes_from_the_hub_only_when_asked(tmp_path, monkeypatch):
    import huggingface_hub
    calls = []
    q = tmp_path / "question.jsonl"
    a = tmp_path / "gpt-4-0314.jsonl"
    q.write_text("".join(json.dumps({"question_id": f"id{i}", "category": "arena-hard-v0.1", "cluster": "c",
                                     "turns": [{"content": f"prompt {i}"}]}) + "\n" for i in range(500)))
    a.write_text("".join(json.dumps({"question_id": f"id{i}", "model_id": "gpt-4-0314",
                                     "choices": [{"index": 0, "turns": [{"content": f"ans {i}"}]}]}) + "\n"
                         for i in range(500)))

    def fake_download(*, repo_id, filename, repo_type, revision=None, cache_dir=None):
        calls.append((repo_id, filename, repo_type))
        return str(q if filename.endswith("question.jsonl") else a)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ah.load_benchmark("v2.0")
    assert calls == []  # the offline default never touches the hub
    qs, b = ah.load_benchmark("v0.1")
    assert calls == [("lmarena-ai/arena-hard-auto", "data/arena-hard-v0.1/question.jsonl", "dataset"),
                     ("lmarena-ai/arena-hard-auto", "data/arena-hard-v0.1/model_answer/gpt-4-0314.jsonl", "dataset")]
    assert len(qs) == 500 and qs[0] == {"uid": "id0", "category": "arena-hard-v0.1", "subcategory": None,
                                        "prompt": "prompt 0"}
    assert b["gpt-4-0314"]["id7"] == "ans 7" and ah.baseline_for("arena-hard-v0.1") == "gpt-4-0314"
    with pytest.raises(ValueError, match="expected one of"):
        ah.load_benchmark("v3")


# ---------------------------------------------------------------- judging end to end


class _FakeJudge:
    """Strongly prefers whichever side shows the model's answer ("MODEL"); garbage for uid q2's game 2."""

    def __init__(self):
        self.requests = []

    def complete_many(self, requests):
        self.requests += requests
        out = []
        for r in requests:
            user = r["messages"][1]["content"]
            a = user.split("<|The Start of Assistant A's Answer|>\n")[1].split("\n<|The End")[0]
            if "q2?" in user and a.startswith("MODEL"):
                out.append("I cannot decide: [[A>B]] or maybe [[B>A]]")
            else:
                out.append("Verdict: [[A>>B]]" if a.startswith("MODEL") else "Verdict: [[B>>A]]")
        return out


def test_judge_answers_writes_upstream_rows(tmp_path):
    qs = [{"uid": f"q{i}", "category": "hard_prompt", "prompt": f"q{i}?"} for i in range(4)]
    model = {q["uid"]: f"MODEL answer {q['uid']}" for q in qs}
    base = {BASE: {q["uid"]: f"base answer {q['uid']}" for q in qs}}
    judge = _FakeJudge()
    out = ahj.judge_answers(qs, model, base, judge, tmp_path / "judge-x" / "rpo.jsonl", model="rpo",
                           judge_name="judge-x")
    assert len(judge.requests) == 8  # 4 questions x 2 games
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["uid"] for r in rows] == ["q0", "q1", "q2", "q3"]
    r0 = rows[0]
    assert r0["question_id"] == "q0" and r0["baseline"] == BASE and r0["judge"] == "judge-x"
    assert [g["score"] for g in r0["games"]] == ["B>>A", "A>>B"]  # game 1 baseline is A, game 2 swapped
    assert r0["games"][0]["prompt"][0]["content"] == ahj.SYSTEM_PROMPT
    assert rows[2]["games"][1]["score"] == "B>A"  # v2.0 keeps the last of conflicting labels
    r = ap.score(out, BASE, version="v2.0")
    # q0, q1, q3: 2 strong wins each -> 18 battles of 1; q2: game 2 B>A (model is A) [0], game 1 B>>A [1, 1, 1]
    assert (r["n"], r["n_invalid"], r["n_excluded"], r["n_battles"]) == (4, 0, 0, 22)
    assert r["score"] == pytest.approx(100 * 21 / 22, abs=3)  # the mean of 100 bootstrap means of 21/22


def test_judge_answers_through_the_judge_client_key_from_env(tmp_path, monkeypatch):
    """The one judge client (eval.judging.client) sends the key from the environment and the version's
    decoding settings; a re-run is answered by the judge cache."""
    from helpers.fake_openai import FakeOpenAIServer

    from eval.judging.judges import JudgeAuthError, get_judge
    q = {"uid": "u", "category": "hard_prompt", "prompt": "p"}
    with FakeOpenAIServer() as server:
        cfg = {"kind": "openai", "base_url": server.url, "model": "judge-x", "api_key_env": "RPO_TEST_AH_KEY",
               "cache_dir": str(tmp_path / "cache"), "max_retries": 0}
        monkeypatch.delenv("RPO_TEST_AH_KEY", raising=False)
        with pytest.raises(JudgeAuthError, match="RPO_TEST_AH_KEY"):
            get_judge(cfg)
        monkeypatch.setenv("RPO_TEST_AH_KEY", "sk-ah-test")
        for _ in range(2):
            ahj.judge_answers([q], {"u": "m"}, {BASE: {"u": "b"}}, get_judge(cfg), tmp_path / "j.jsonl",
                             model="rpo", judge_name="openai:judge-x")
        assert server.n == 2  # two games, asked once: the re-run came from the cache
        assert {h["Authorization"] for h in server.headers} == {"Bearer sk-ah-test"}
        assert [(r["temperature"], r["max_tokens"]) for r in server.requests] == [(0.0, 16000)] * 2
    rows = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert [g["score"] for g in rows[0]["games"]] == ["A>B", "A>B"]


class _Undecided:
    """Answers game 1 without a label first, then (continued) with one; game 2 at once."""

    def __init__(self):
        self.requests = []

    def complete_many(self, requests):
        self.requests.append(requests)
        out = []
        for r in requests:
            continued = r["messages"][-1]["content"] == ap.FOLLOW_UP
            game1 = "<|The Start of Assistant A's Answer|>\nbase" in r["messages"][1]["content"]
            out.append("so: [[B>A]]" if continued else ("Hmm, hard to say." if game1 else "[[A>B]]"))
        return out


def test_judgment_attempts_continue_the_conversation_as_upstream_v01(tmp_path):
    """arena-hard-auto v0.1 (number_of_judgment_attempts: 2): a judgment without a label is continued with
    the judge's own text and "continue your judgment ..."; the game's judgment is both texts."""
    q = {"uid": "u", "category": "hard_prompt", "prompt": "p"}
    judge = _Undecided()
    out = ahj.judge_answers([q], {"u": "model"}, {BASE: {"u": "base"}}, judge, tmp_path / "j.jsonl",
                            model="rpo", judge_name="j", version="v0.1")
    row = json.loads(out.read_text())
    assert [len(batch) for batch in judge.requests] == [2, 1]  # both games, then game 1 continued
    cont = judge.requests[1][0]["messages"]
    assert [m["role"] for m in cont] == ["system", "user", "assistant", "user"]
    assert cont[2]["content"] == "Hmm, hard to say." and cont[3]["content"] == ap.FOLLOW_UP
    g1, g2 = row["games"]
    # upstream v0.1 keeps `judgment += "\n" + new_judgment`
    assert g1["judgment"] == "\nHmm, hard to say.\nso: [[B>A]]" and g1["score"] == "B>A"
    assert g2["judgment"] == "\n[[A>B]]" and g2["score"] == "A>B"
    # v2.0 asks once: the unlabelled game stays without a verdict
    judge = _Undecided()
    out = ahj.judge_answers([q], {"u": "model"}, {BASE: {"u": "base"}}, judge, tmp_path / "j1.jsonl",
                            model="rpo", judge_name="j")
    assert json.loads(out.read_text())["games"][0]["score"] is None
    assert [len(batch) for batch in judge.requests] == [2]
