"""Tests for eval.arenahard (data, judge prompts, judging) on the offline v2.0 data; each version's verdicts
and score are tested in tests/test_arenahard_protocol.py.

Run:  cd /work/main && PYTHONPATH=. /work/venv/bin/python -m pytest tests/test_arenahard.py -q -p no:cacheprovider

Each expected number is worked out by hand in a comment beside it.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval import arenahard as ah
from eval import arenahard_protocol as ap

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
    g1, g2 = ah.game_requests(q, "MODEL SAYS 4", "BASELINE SAYS 4")
    for g in (g1, g2):
        assert g["temperature"] == 0.0 and g["max_tokens"] == 16000  # upstream v2.0 judge config
        assert g["messages"][0] == {"role": "system", "content": ah.SYSTEM_PROMPT}
        assert "[[A>>B]]" in ah.SYSTEM_PROMPT and "[[B>>A]]" in ah.SYSTEM_PROMPT
    u1, u2 = g1["messages"][1]["content"], g2["messages"][1]["content"]
    assert u1.startswith("<|User Prompt|>\nWhat is 2+2?\n\n<|The Start of Assistant A's Answer|>\nBASELINE SAYS 4\n")
    assert "<|The Start of Assistant B's Answer|>\nMODEL SAYS 4\n<|The End of Assistant B's Answer|>" in u1
    assert "Assistant A's Answer|>\nMODEL SAYS 4\n" in u2 and "Assistant B's Answer|>\nBASELINE SAYS 4\n" in u2
    cw = ah.judge_messages({"category": "creative_writing", "prompt": "p"}, "a", "b")
    assert cw[0]["content"] == ah.CREATIVE_WRITING_SYSTEM_PROMPT
    assert "generating your own answer" in ah.SYSTEM_PROMPT
    assert "generating your own answer" not in ah.CREATIVE_WRITING_SYSTEM_PROMPT


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


def test_judge_answers_writes_upstream_rows_and_resumes(tmp_path):
    qs = [{"uid": f"q{i}", "category": "hard_prompt", "prompt": f"q{i}?"} for i in range(4)]
    model = {q["uid"]: f"MODEL answer {q['uid']}" for q in qs}
    base = {BASE: {q["uid"]: f"base answer {q['uid']}" for q in qs}}
    judge = _FakeJudge()
    out = ah.judge_answers(qs[:2], model, base, judge, tmp_path / "judge-x" / "rpo.jsonl", model="rpo",
                           judge_name="judge-x", chunk_size=1)
    ah.judge_answers(qs, model, base, judge, out, model="rpo", judge_name="judge-x")
    assert len(judge.requests) == 8  # 4 questions x 2 games; the 2 done before were not asked again
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["uid"] for r in rows] == ["q0", "q1", "q2", "q3"]
    r0 = rows[0]
    assert r0["question_id"] == "q0" and r0["baseline"] == BASE and r0["judge"] == "judge-x"
    assert [g["score"] for g in r0["games"]] == ["B>>A", "A>>B"]  # game 1 baseline is A, game 2 swapped
    assert r0["games"][0]["prompt"][0]["content"] == ah.SYSTEM_PROMPT
    assert rows[2]["games"][1]["score"] == "B>A"  # v2.0 keeps the last of conflicting labels
    r = ap.score(out, BASE, version="v2.0")
    # q0, q1, q3: 2 strong wins each -> 18 battles of 1; q2: game 2 B>A (model is A) [0], game 1 B>>A [1, 1, 1]
    assert (r["n"], r["n_invalid"], r["n_excluded"], r["n_battles"]) == (4, 0, 0, 22)
    assert r["score"] == pytest.approx(100 * 21 / 22, abs=3)  # the mean of 100 bootstrap means of 21/22


class _Chat(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.headers.get("Authorization"), body["temperature"], body["max_tokens"]))
        data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "Final: [[A=B]]"}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_openai_compatible_judge_reads_key_from_env(monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("RPO_TEST_AH_KEY", raising=False)
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        with pytest.raises(RuntimeError, match="RPO_TEST_AH_KEY"):
            ah.OpenAICompatibleJudge(url, "judge-x", "RPO_TEST_AH_KEY")
        monkeypatch.setenv("RPO_TEST_AH_KEY", "sk-ah-test")
        j = ah.OpenAICompatibleJudge(url, "judge-x", "RPO_TEST_AH_KEY", max_workers=2)
        q = {"uid": "u", "category": "hard_prompt", "prompt": "p"}
        texts = j.complete_many(ah.game_requests(q, "m", "b"))
        assert [ap.parse_verdict(t, "v2.0") for t in texts] == ["A=B", "A=B"]
        assert _Chat.seen == [("Bearer sk-ah-test", 0.0, 16000)] * 2
    finally:
        srv.shutdown()
        srv.server_close()
