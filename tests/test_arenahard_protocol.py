"""Arena-Hard's verdicts, judgment attempts and score per version (eval/arenahard/protocol.py), against
arena-hard-auto's own rules: v0.1 (gen_judgment.get_score, show_result.get_battles_from_row, utils_math's
seeded Bradley-Terry bootstrap) and v2.0 (gen_judgment.get_score, show_result.load_judgments/print_leaderboard).

Run:  pytest -q tests/test_arenahard_protocol.py        (a few seconds)

Expected numbers are worked out by hand in comments; the bootstrap intervals are recomputed here by an
independent transcription of upstream's pandas / scikit-learn code (`_official_v01`, `_official_v2`).
"""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from eval.arenahard import protocol as ap

BASE = "o3-mini-2025-01-31"
# upstream passes penalty=None, which scikit-learn >= 1.8 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*penalty.*:FutureWarning")


def _row(uid, g1, g2, *, model="rpo", baseline=BASE, category="hard_prompt"):
    games = [None if g == "NULL" else {"score": g, "judgment": "...", "user_prompt": "..."} for g in (g1, g2)]
    return {"uid": uid, "question_id": uid, "category": category, "judge": "j", "model": model,
            "baseline": baseline, "games": games}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize("text, v01, v2", [
    ("My final verdict is: [[A>>B]]", "A>>B", "A>>B"),
    ("verdict [[a>b]]", None, "A>B"),                        # v0.1 does not upper-case
    ("single brackets only: [B>>A]", None, "B>>A"),          # v0.1 has no single-bracket pattern
    ("first [[A>B]] then [[B>A]]", None, "B>A"),             # conflicting: v0.1 none, v2.0 the last
    ("so [[A>B]] ... again [[A>B]]", "A>B", "A>B"),          # one distinct label
    ("verdict [[B<A]]", "B<A", "B<A"),                       # stored as written (v0.1 then weighs it 0)
    ("[[A>B]] and later a stray [B>A]", "A>B", "A>B"),       # v2.0: the double-bracket pattern decides first
    ("verdict [[A>>>B]]", "A>>>B", "A>>>B"),                 # stored; no version scores it
    ("no label at all", None, None),
    (None, None, None),
])
def test_parse_verdict_per_version(text, v01, v2):
    assert ap.parse_verdict(text, "v0.1") == v01
    assert ap.parse_verdict(text, "v2.0") == v2


class Scripted:
    """complete_many: the next answer of each request's script, keyed by the first user message."""

    def __init__(self, scripts):
        self.scripts, self.requests = {k: list(v) for k, v in scripts.items()}, []

    def complete_many(self, reqs):
        self.requests.append(reqs)
        return [self.scripts[r["messages"][1]["content"]].pop(0) for r in reqs]


def _req(name):
    return {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": name}],
            "temperature": 0.0, "max_tokens": 4096}


def test_v01_makes_a_second_attempt_only_without_a_label():
    j = Scripted({"g1": ["thinking...", "[[B>A]]"],        # no label: asked to continue, then B>A
                  "g2": ["[[A>B]] or [[B>A]]"],             # conflicting: no verdict, no second attempt
                  "g3": ["[[a>b]]", "still nothing"]})      # lower case is no label in v0.1: asked again
    out = ap.judge_games(j, [_req("g1"), _req("g2"), _req("g3")], "v0.1")
    assert out == [("\nthinking...\n[[B>A]]", "B>A"), ("\n[[A>B]] or [[B>A]]", None),
                   ("\n[[a>b]]\nstill nothing", None)]
    assert [len(batch) for batch in j.requests] == [3, 2]  # the second round asks g1 and g3 only
    follow = j.requests[1][0]
    assert follow["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "g1"},
                                  {"role": "assistant", "content": "thinking..."},
                                  {"role": "user", "content": ap.FOLLOW_UP}]
    assert follow["max_tokens"] == 4096


def test_v2_makes_one_attempt():
    j = Scripted({"g1": ["thinking..."], "g2": ["[[a>b]]"]})
    assert ap.judge_games(j, [_req("g1"), _req("g2")], "v2.0") == [("thinking...", None), ("[[a>b]]", "A>B")]
    assert len(j.requests) == 1


def test_judge_settings_are_each_versions_defaults():
    # arena-hard-auto config/judge_config.yaml (v0.1) and config/arena-hard-v2.0.yaml
    assert ap.JUDGE_SETTINGS["v0.1"] == {"temperature": 0.0, "max_tokens": 4096, "attempts": 2}
    assert ap.JUDGE_SETTINGS["v2.0"] == {"temperature": 0.0, "max_tokens": 16000, "attempts": 1}


# ---------------------------------------------------------------- score

HAND = [
    _row("q1", "B>A", "A>B"),     # model better in both games
    _row("q2", "NULL", "A>>B"),   # game 1 failed; game 2: the model (A) strongly better
    _row("q3", "A=B", "B<A"),     # tie; then B<A (= A>B, the model better)
    _row("q4", "A>>B", "B>A"),    # baseline strongly better, then baseline better
]
# v0.1 battles, per row game 1 then game 2 (1 = model wins, .5 tie):
#   q1: [1] [1]; q2: (null: weight 0) [1, 1, 1]; q3: [.5] (B<A: weight 0); q4: [0, 0, 0] [0]
#   -> 10 battles, sum 5.5 -> 55.0 %; 2 invalid games, no question without a valid game
V01_BATTLES = [1, 1, 1, 1, 1, 0.5, 0, 0, 0, 0]
# v2.0 battles, per row game 2 then 1 - game 1; q2 dropped (null game):
#   q1: [1] [1]; q3: [1] (B<A) [.5]; q4: [0] [0, 0, 0] -> 8 battles, sum 3.5 (43.75 % on the full data)
V2_BATTLES = [1, 1, 1, 0.5, 0, 0, 0, 0]


def _official_v01(battle_outcomes):
    """utils_math.compute_mle_elo + get_bootstrap_result + get_win_rate_column for baseline vs model,
    with show_result's battles (model_a = baseline, model_b = the model) and np.random.seed(42)."""
    from sklearn.linear_model import LogisticRegression
    winner = {1: "model_b", 0: "model_a", 0.5: "tie"}
    battles = pd.DataFrame({"model_a": BASE, "model_b": "rpo", "winner": [winner[o] for o in battle_outcomes]})

    def mle_elo(df):
        models = pd.Series([0, 1], index=[BASE, "rpo"])
        df = pd.concat([df, df], ignore_index=True)
        n = len(df)
        X = np.zeros([n, 2])
        X[np.arange(n), models[df["model_a"]]] = math.log(10)
        X[np.arange(n), models[df["model_b"]]] = -math.log(10)
        Y = np.zeros(n)
        Y[(df["winner"] == "model_a").to_numpy()] = 1.0
        tie = (df["winner"] == "tie").to_numpy().copy()
        tie[len(tie) // 2:] = False
        Y[tie] = 1.0
        lr = LogisticRegression(fit_intercept=False, penalty=None, tol=1e-8).fit(X, Y)
        elo = 400 * lr.coef_[0] + 1000
        return elo[1] - elo[0]  # the model's rating above the baseline's (anchored at 1000)

    def win_rate(d):
        return 100 / (1 + 10 ** (-d / 400))

    score = win_rate(mle_elo(battles))
    np.random.seed(42)
    boot = [mle_elo(battles.sample(frac=1.0, replace=True)) for _ in range(100)]
    return score, win_rate(np.percentile(boot, 2.5)), win_rate(np.percentile(boot, 97.5))


def _official_v2(battle_outcomes, seed):
    """show_result.print_leaderboard's bootstrap with the global RNG seeded (the official leaves it unseeded)."""
    battles = pd.DataFrame({"model": "rpo", "scores": battle_outcomes})
    np.random.seed(seed)
    boots = pd.concat([battles.groupby("model").sample(frac=1.0, replace=True).groupby("model").mean()
                       for _ in range(100)])
    boots["scores"] = boots["scores"].astype(float)
    return (100 * boots["scores"].mean(), 100 * boots["scores"].quantile(0.05),
            100 * boots["scores"].quantile(0.95))


def test_v01_keeps_the_valid_game_and_weighs_other_spellings_zero(tmp_path):
    r = ap.score(_write(tmp_path / "rpo.jsonl", HAND), BASE, version="v0.1")
    assert r["score"] == pytest.approx(55.0)  # 5.5 / 10, see V01_BATTLES
    assert (r["n"], r["n_battles"], r["n_invalid"], r["n_excluded"], r["ci"]) == (4, 10, 2, 0, 0.95)
    score, lo, hi = _official_v01(V01_BATTLES)
    assert round(score, 2) == 55.0  # the official's get_win_rate_column rounds to 2 decimals
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(lo, abs=1e-4), pytest.approx(hi, abs=1e-4))


def test_v2_drops_the_question_and_reports_the_bootstrap_mean(tmp_path):
    r = ap.score(_write(tmp_path / "rpo.jsonl", HAND), BASE, version="v2.0", seed=7)
    assert (r["n"], r["n_battles"], r["n_invalid"], r["n_excluded"], r["ci"]) == (3, 8, 1, 1, 0.90)
    score, lo, hi = _official_v2(V2_BATTLES, seed=7)
    assert (r["score"], r["ci_low"], r["ci_high"]) == (pytest.approx(score, abs=1e-9),
                                                        pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))
    assert r["score"] != pytest.approx(43.75, abs=1e-9)  # the bootstrap mean, not the full-data mean
    assert abs(r["score"] - 43.75) < 5 and r["ci_low"] < r["score"] < r["ci_high"]


def test_v01_score_is_the_logistic_fit_with_strong_verdicts_and_ties(tmp_path):
    rows = [_row("a", "B>>A", "A=B"), _row("b", "A>B", "B>>A"), _row("c", "A=B", "A=B")]
    # game 1 then game 2: a: [1, 1, 1] [.5]; b: [0] [0, 0, 0]; c: [.5] [.5] -> 10 battles, sum 4.5 -> 45 %
    r = ap.score(_write(tmp_path / "rpo.jsonl", rows), BASE, version="v0.1")
    assert r["score"] == pytest.approx(45.0)
    assert round(_official_v01([1, 1, 1, 0.5, 0, 0, 0, 0, 0.5, 0.5])[0], 2) == 45.0


def test_all_strong_wins_and_all_invalid(tmp_path):
    wins = _write(tmp_path / "w.jsonl", [_row(f"q{i}", "B>>A", "A>>B") for i in range(3)])
    for version in ("v0.1", "v2.0"):
        r = ap.score(wins, BASE, version=version)
        assert r["score"] == pytest.approx(100.0) and r["ci_low"] == pytest.approx(100.0)
    bad = _write(tmp_path / "b.jsonl", [_row("q1", None, "A>B<"), _row("q2", "NULL", "B<<A")])
    r = ap.score(bad, BASE, version="v0.1")  # nothing v0.1 scores: no battles
    assert math.isnan(r["score"]) and (r["n"], r["n_invalid"], r["n_excluded"]) == (0, 4, 2)
    r = ap.score(bad, BASE, version="v2.0")  # v2.0 scores B<<A but q2's game 1 is null
    assert math.isnan(r["score"]) and (r["n_invalid"], r["n_excluded"]) == (3, 2)


def test_file_order_is_the_officials_battle_order(tmp_path):
    # Both versions resample battles in file order, as upstream does, so a reordered file may change the
    # interval but never the full-data v0.1 score.
    a = ap.score(_write(tmp_path / "a.jsonl", HAND), BASE, version="v0.1")
    b = ap.score(_write(tmp_path / "b.jsonl", HAND[::-1]), BASE, version="v0.1")
    assert a["score"] == b["score"] and a == ap.score(tmp_path / "a.jsonl", BASE, version="v0.1")


def test_errors_name_file_and_line(tmp_path):
    p = tmp_path / "rpo.jsonl"
    p.write_text('{"uid": "q1", "model": "rpo", "games": [null, null]}\n{not json\n')
    with pytest.raises(ValueError, match=r"rpo.jsonl, line 2: not valid JSON"):
        ap.score(p, BASE, version="v2.0")
    with pytest.raises(ValueError, match="expected one of"):
        ap.score(p, BASE, version="v3")


# ---------------------------------------------------------------- the judging function's defaults


class _Chat(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body["max_tokens"])
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "[[A=B]]"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_judge_arenahard_uses_the_versions_max_tokens_and_scores_it(tmp_path):
    from eval.arenahard import stages as arenahard_stages
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        qs, _ = arenahard_stages._questions("v2.0", 1, "hard_prompt")
        answers = tmp_path / "answers.jsonl"
        answers.write_text(json.dumps({"id": qs[0]["uid"], "responses": ["an answer"]}) + "\n")
        judge = {"kind": "openai", "base_url": f"http://127.0.0.1:{srv.server_address[1]}/v1", "model": "fake",
                 "api_key_env": None, "max_retries": 0, "cache_dir": str(tmp_path / "cache")}
        out = tmp_path / "judgment.jsonl"
        arenahard_stages.judge_arenahard(model_name="rpo", answers=str(answers), out=str(out), judge=judge,
                                   calls_out=str(tmp_path / "calls.json"),
                                   version="v2.0", category="hard_prompt", n_questions=1, judge_max_tokens=None)
        assert _Chat.seen == [16000, 16000]  # null -> v2.0's own max_tokens, both games
        arenahard_stages.score_arenahard(model_name="rpo", judgments=str(out), out=str(tmp_path / "s.json"),
                                   judge_label="openai:fake", version="v2.0", category="hard_prompt",
                                   bootstrap={"n": 1000, "seed": 0, "ci": 0.95})
        (row,) = json.loads((tmp_path / "s.json").read_text())
        assert row["value"] == 50.0 and row["n"] == 1  # two ties -> 50 in every round
    finally:
        srv.shutdown()
        srv.server_close()


class _V01Chat(BaseHTTPRequestHandler):
    """First attempt: no label; after v0.1's follow-up turn: [[B>A]] (game 1, the baseline as A: model better)
    or [[A>B]] (game 2, the model as A)."""
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(body)
        msgs = body["messages"]
        if len(msgs) == 2:
            text = "Let me think about it."
        else:
            text = "[[B>A]]" if "BASELINE" in msgs[1]["content"].split("Assistant A's Answer|>\n")[1][:8] else "[[A>B]]"
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_v01_judging_through_an_openai_judge_continues_and_scores(tmp_path):
    from eval.arenahard import judge as arenahard_judge
    from eval.judging.judges import get_judge
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _V01Chat)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        qs = [{"uid": "u1", "category": "arena-hard-v0.1", "prompt": "What is 2+2?"}]
        judge = get_judge({"kind": "openai", "base_url": f"http://127.0.0.1:{srv.server_address[1]}/v1",
                           "model": "fake", "max_retries": 0, "cache_dir": str(tmp_path / "cache")})
        out = arenahard_judge.judge_answers(qs, {"u1": "MODEL says 4"}, {"gpt-4-0314": {"u1": "BASELINE says 4"}},
                                            judge, tmp_path / "rpo.jsonl", model="rpo", judge_name="openai:fake",
                                            max_tokens=ap.JUDGE_SETTINGS["v0.1"]["max_tokens"], version="v0.1")
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        # each game: a first answer without a label, then the follow-up turn and a labelled answer
        assert [g["score"] for g in row["games"]] == ["B>A", "A>B"]
        assert row["games"][0]["judgment"] == "\nLet me think about it.\n[[B>A]]"
        assert len(_V01Chat.seen) == 4 and all(r["max_tokens"] == 4096 for r in _V01Chat.seen)
        follow = [r for r in _V01Chat.seen if len(r["messages"]) == 4]
        assert len(follow) == 2 and all(r["messages"][3] == {"role": "user", "content": ap.FOLLOW_UP} for r in follow)
        r = ap.score(out, "gpt-4-0314", version="v0.1")
        # game 1 B>A (model better than the baseline shown as A) [1]; game 2 A>B (model as A) [1] -> 100
        assert (r["score"], r["n"], r["n_battles"]) == (100.0, 1, 2)
    finally:
        srv.shutdown()
        srv.server_close()
