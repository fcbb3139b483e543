"""Tests for eval.arenahard on hand-made judgment files and the offline v2.0 data.

Run:  cd /work/main && PYTHONPATH=. /work/venv/bin/python -m pytest tests/test_arenahard.py -q -p no:cacheprovider

Each expected number is worked out by hand in a comment beside it.
"""

import json
import math

import numpy as np
import pytest

from eval import arenahard as ah
from eval import arenahard_judge as ahj

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


# ---------------------------------------------------------------- verdict parsing


@pytest.mark.parametrize("text, label", [
    ("My final verdict is: [[A>>B]]", "A>>B"),
    ("My final verdict is: [[A>B]]", "A>B"),
    ("My final verdict is tie: [[A=B]]", "A=B"),
    ("My final verdict is: [[B>A]]", "B>A"),
    ("My final verdict is: [[B>>A]]", "B>>A"),
    ("verdict [[a>b]]", "A>B"),                      # upper-cased first, as upstream
    ("verdict [[B<A]]", "A>B"),                      # upstream's other spellings map to the same verdict
    ("verdict [[A<<B]]", "B>>A"),
    ("verdict [[B=A]]", "A=B"),
    ("so [[A>B]] ... again [[A>B]]", "A>B"),         # the same label twice is one verdict
    ("single brackets only: [B>>A]", "B>>A"),        # upstream's fallback pattern
    ("[[A>B]] and later a stray [B>A]", "A>B"),      # the double-bracket pattern decides first
])
def test_parse_verdict_labels(text, label):
    assert ah.parse_verdict(text) == label


@pytest.mark.parametrize("text, reason", [
    ("A is better than B, no label at all", "no_label"),
    ("", "no_label"),
    (None, "no_label"),
    ("first [[A>B]] then [[B>A]]", "conflicting"),   # several different labels: invalid, never guessed
    ("1. [[A>>B]] 2. [[A>B]] 3. [[A=B]] 4. [[B>A]] 5. [[B>>A]]", "conflicting"),  # prompt echoed
    ("verdict [[A>>>B]]", "unknown_label"),
    ("verdict [[AB]]", "unknown_label"),
])
def test_parse_verdict_invalid(text, reason):
    assert ah.parse_verdict(text) is None
    assert ah.parse_verdict_detail(text) == (None, reason)


def test_model_outcomes_weights_and_sides():
    # game 1 baseline is A: B>>A = model strongly better -> [1, 1, 1]; game 2 model is A: A>B -> [1]
    assert ah.model_outcomes("B>>A", "A>B") == [1.0, 1.0, 1.0, 1.0]
    # game 1 A>>B (baseline strongly better) -> [0, 0, 0]; game 2 A=B -> [0.5]; game 2's come first
    assert ah.model_outcomes("A>>B", "A=B") == [0.5, 0.0, 0.0, 0.0]
    assert ah.model_outcomes("A>>B", "B>>A", weight=1) == [0.0, 0.0]


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


# ---------------------------------------------------------------- score


def test_score_all_strong_wins_is_max_with_a_degenerate_ci(tmp_path):
    # every question: game 1 (baseline as A) B>>A and game 2 (model as A) A>>B -> 6 battles of 1
    p = _write(tmp_path / "rpo.jsonl", [_row(f"q{i}", "B>>A", "A>>B") for i in range(5)])
    r = ah.score(p, BASE)
    assert r["score"] == 100.0 and r["ci_low"] == 100.0 and r["ci_high"] == 100.0
    assert (r["n"], r["n_battles"], r["n_invalid"]) == (5, 30, 0)
    # the mirror image: baseline always strongly better -> 0
    p0 = _write(tmp_path / "rpo0.jsonl", [_row(f"q{i}", "A>>B", "B>>A") for i in range(5)])
    assert ah.score(p0, BASE)["score"] == 0.0


HAND_TABLE = [
    _row("q1", "B>>A", "A>B"),   # model: [1,1,1] + [1]        -> 4 battles, sum 4
    _row("q2", "A>B", "B>A"),    # model: [0] + [0]            -> 2 battles, sum 0
    _row("q3", "A=B", "A=B"),    # model: [.5] + [.5]          -> 2 battles, sum 1
    _row("q4", "A>>B", "A>>B"),  # model: [0,0,0] + [1,1,1]    -> 6 battles, sum 3
    _row("q5", "NULL", "A>B"),   # game 1 failed: 1 invalid, question dropped whole (upstream)
    _row("q6", None, "junk"),    # no verdict + unknown label: 2 invalid, question dropped
]
# kept: 4 questions, 14 battles, sum 8 -> 8 / 14 = 57.142857 %


def test_score_hand_table(tmp_path):
    p = _write(tmp_path / "rpo.jsonl", HAND_TABLE)
    r = ah.score(p, BASE)
    assert r["score"] == pytest.approx(800 / 14)
    assert (r["n"], r["n_questions"], r["n_battles"], r["n_invalid"], r["n_excluded"]) == (4, 6, 14, 3, 2)
    assert r["model"] == "rpo" and r["baseline"] == BASE
    assert r["ci_low"] < r["score"] < r["ci_high"]


def test_score_equals_the_bradley_terry_fit_vs_the_baseline(tmp_path):
    # Upstream v2.0 fits BT by minimising binary cross-entropy with logits on the battles (ties as 0.5),
    # model coefficient +1 and baseline -1 in the design; with one model that is one logit theta.
    from scipy.optimize import minimize_scalar
    y = np.array([1, 1, 1, 1] + [0, 0] + [.5, .5] + [1, 1, 1, 0, 0, 0], dtype=float)  # HAND_TABLE battles

    def bce(theta):
        return float(np.sum(np.logaddexp(0, theta) - y * theta))

    theta = minimize_scalar(bce, bounds=(-10, 10), method="bounded", options={"xatol": 1e-10}).x
    p = _write(tmp_path / "rpo.jsonl", HAND_TABLE)
    assert ah.score(p, BASE)["score"] == pytest.approx(100 / (1 + math.exp(-theta)), abs=1e-5)


def test_score_ci_is_deterministic_under_the_seed(tmp_path):
    p = _write(tmp_path / "rpo.jsonl", HAND_TABLE)
    a, b = ah.score(p, BASE), ah.score(p, BASE)
    assert a == b  # same seed (default 0), same 100 rounds -> identical numbers
    # file order does not matter either: rows are sorted by question id before resampling
    q = _write(tmp_path / "rev.jsonl", HAND_TABLE[::-1])
    assert ah.score(q, BASE) == dict(a)
    c = ah.score(p, BASE, seed=1)
    assert c["score"] == a["score"] and (c["ci_low"], c["ci_high"]) != (a["ci_low"], a["ci_high"])
    narrow = ah.score(p, BASE, ci=0.90)  # upstream v2.0's 5th/95th percentile band
    assert a["ci_low"] <= narrow["ci_low"] <= narrow["ci_high"] <= a["ci_high"]


def test_score_reads_v01_rows_and_other_label_spellings(tmp_path):
    rows = [_row("q1", "B<<A", "B<A", key="question_id", baseline=None, category="arena-hard-v0.1")]
    del rows[0]["baseline"]
    p = _write(tmp_path / "v01.jsonl", rows)
    # B<<A = A>>B (baseline strongly better) -> [0,0,0]; game 2 B<A = A>B (model better) -> [1]: 1/4 = 25 %
    assert ah.score(p, "gpt-4-0314")["score"] == pytest.approx(25.0)


def test_score_category_filter(tmp_path):
    rows = [_row("h1", "B>A", "A>B"),  # hard_prompt: model wins both -> 100
            _row("c1", "A>B", "B>A", category="creative_writing", baseline="gemini-2.0-flash-001")]
    p = _write(tmp_path / "rpo.jsonl", rows)
    assert ah.score(p, BASE, category="hard_prompt")["score"] == 100.0
    assert ah.score(p, "gemini-2.0-flash-001", category="creative_writing")["score"] == 0.0
    with pytest.raises(ValueError, match="judged against baseline 'gemini-2.0-flash-001'"):
        ah.score(p, BASE)  # mixing categories mixes baselines


def test_score_all_invalid_is_nan_and_counted(tmp_path):
    p = _write(tmp_path / "rpo.jsonl", [_row("q1", None, None), _row("q2", "NULL", "A>B")])
    r = ah.score(p, BASE)
    assert math.isnan(r["score"]) and r["n"] == 0 and r["n_invalid"] == 3 and r["n_excluded"] == 2


@pytest.mark.parametrize("content, match", [
    ('{"uid": "q1", "model": "rpo", "games": [{"score": "A>B"}]}\n', r"rpo.jsonl, line 1: 'games' must be a list of the 2"),
    ('{"uid": "q1", "model": "rpo", "games": [null, null]}\n{not json\n', r"rpo.jsonl, line 2: not valid JSON"),
    ('{"model": "rpo", "games": [null, null]}\n', r"line 1: missing question id"),
    ('{"uid": "q1", "model": "rpo", "games": [null, null]}\n\n{"uid": "q1", "model": "rpo", "games": [null, null]}\n',
     r"line 3: second judgment of 'q1'"),
])
def test_judgment_file_errors_name_file_and_line(tmp_path, content, match):
    p = tmp_path / "rpo.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        ah.score(p, BASE)


def test_score_refuses_two_models(tmp_path):
    p = _write(tmp_path / "a.jsonl", [_row("q1", "A>B", "A>B")])
    q = _write(tmp_path / "b.jsonl", [_row("q1", "A>B", "A>B", model="dpo")])
    with pytest.raises(ValueError, match="several models"):
        ah.score([p, q], BASE)


def test_table_rows(tmp_path):
    r = ah.score(_write(tmp_path / "rpo.jsonl", HAND_TABLE), BASE)
    (row,) = ah.table_rows(r, judge="judge-x")
    assert row["metric"] == "arenahard" and row["model_b"] == BASE and row["n"] == 4


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
    assert rows[2]["games"][1]["score"] is None  # conflicting labels are stored as no verdict
    r = ah.score(out, BASE)
    # q2 excluded (1 invalid game); q0, q1, q3: 6 battles of 1 each -> 100
    assert (r["score"], r["n"], r["n_invalid"], r["n_excluded"]) == (100.0, 3, 1, 1)


def test_judge_answers_through_the_judge_client_key_from_env(tmp_path, monkeypatch):
    """The one judge client (eval.judge_client) sends the key from the environment and the version's
    decoding settings; a re-run is answered by the judge cache."""
    from helpers.fake_openai import FakeOpenAIServer

    from eval.judges import JudgeAuthError, get_judge
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
            continued = r["messages"][-1]["content"] == ahj.CONTINUE
            game1 = "<|The Start of Assistant A's Answer|>\nbase" in r["messages"][1]["content"]
            out.append("so: [[B>A]]" if continued else ("Hmm, hard to say." if game1 else "[[A>B]]"))
        return out


def test_judgment_attempts_continue_the_conversation_as_upstream_v01(tmp_path):
    """arena-hard-auto v0.1 (number_of_judgment_attempts: 2): a judgment without a label is continued with
    the judge's own text and "continue your judgment ..."; the game's judgment is both texts."""
    q = {"uid": "u", "category": "hard_prompt", "prompt": "p"}
    judge = _Undecided()
    out = ahj.judge_answers([q], {"u": "model"}, {BASE: {"u": "base"}}, judge, tmp_path / "j.jsonl",
                            model="rpo", judge_name="j", attempts=2)
    row = json.loads(out.read_text())
    assert [len(batch) for batch in judge.requests] == [2, 1]  # both games, then game 1 continued
    cont = judge.requests[1][0]["messages"]
    assert [m["role"] for m in cont] == ["system", "user", "assistant", "user"]
    assert cont[2]["content"] == "Hmm, hard to say." and cont[3]["content"] == ahj.CONTINUE
    g1, g2 = row["games"]
    # upstream v0.1 keeps `judgment += "\n" + new_judgment`
    assert g1["judgment"] == "\nHmm, hard to say.\nso: [[B>A]]" and g1["score"] == "B>A"
    assert g2["judgment"] == "\n[[A>B]]" and g2["score"] == "A>B"
    # attempts=1 (v2.0's judging): the unlabelled game stays without a verdict
    judge = _Undecided()
    out = ahj.judge_answers([q], {"u": "model"}, {BASE: {"u": "base"}}, judge, tmp_path / "j1.jsonl",
                            model="rpo", judge_name="j")
    assert json.loads(out.read_text())["games"][0]["score"] is None
    assert [len(batch) for batch in judge.requests] == [2]
