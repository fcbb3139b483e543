"""Tests for eval/alpacaeval/ (data, metrics, judge): offline data, alpaca_eval annotation through a local fake
judge, metrics.

Run:  cd /work/main && PYTHONPATH=. /work/venv/bin/python -m pytest tests/test_alpacaeval.py -q -p no:cacheprovider

The annotation test drives alpaca_eval's own PairwiseAnnotator end to end (config files, client config,
OpenAI client, logprob parsing, output-order randomisation) against an OpenAI-compatible server started
in the test on 127.0.0.1. Each expected number is worked out by hand in a comment beside it.
"""

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("alpaca_eval")

from eval.alpacaeval import data as ae  # noqa: E402
from eval.alpacaeval import metrics as am  # noqa: E402
from eval.alpacaeval import judge as aej  # noqa: E402

KEY_ENV = "RPO_TEST_JUDGE_KEY"
KEY = "sk-test-not-a-real-key-7f3a"


# ---------------------------------------------------------------- data


def test_eval_set_is_the_805_gpt4_turbo_references():
    rows = ae.load_eval_set()
    assert len(rows) == 805
    assert {r["generator"] for r in rows} == {"gpt4_1106_preview"}
    assert set(rows[0]) == {"instruction", "output", "generator", "dataset"}
    assert len({r["instruction"] for r in rows}) == 805


def test_model_outputs_format_and_validation(tmp_path):
    ev = ae.load_eval_set()[:3]
    gens = [{"id": f"alpaca_eval/{i}", "responses": [f"answer {i}"]} for i in (2, 0, 1)]  # any order
    out = ae.make_model_outputs(ev, gens, "rpo-135m")
    assert [o["output"] for o in out] == ["answer 0", "answer 1", "answer 2"]  # back in eval-set order
    assert out[0] == {"instruction": ev[0]["instruction"], "output": "answer 0", "generator": "rpo-135m",
                      "dataset": ev[0]["dataset"]}
    p = ae.write_model_outputs(out, tmp_path / "model_outputs.json")
    assert json.loads(p.read_text()) == out  # alpaca_eval's format: a JSON list of those objects
    assert ae.read_model_outputs(p) == out
    with pytest.raises(ValueError, match="2 answers for 3"):
        ae.make_model_outputs(ev, ["a", "b"], "m")
    with pytest.raises(ValueError, match="no generation for 1"):
        ae.make_model_outputs(ev, gens[:2], "m")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "output": 3, "generator": "g", "dataset": "d"}]))
    with pytest.raises(ValueError, match=r"bad.json, item 0: 'output' must be a string"):
        ae.load_eval_set(bad)


# ---------------------------------------------------------------- fake OpenAI-compatible judge

_OUT = re.compile(r'"model_identifier": "(m|M)",\s*"output": """(.*?)"""', re.S)
_P = re.compile(r"<p=([0-9.]+)>")


class _Judge(BaseHTTPRequestHandler):
    """Answers alpaca_eval_clf prompts with top logprobs for "m" and "M".

    A model output carries "<p=x>": the judge prefers it with probability x, whichever position
    ("m" = first shown, "M" = second) alpaca_eval's random switch put it in.
    """

    auth_seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).auth_seen.append(self.headers.get("Authorization"))
        text = "\n".join(m["content"] for m in body["messages"])
        outs = dict(_OUT.findall(text))
        pm = None
        for ident, out in outs.items():
            hit = _P.search(out)
            if hit:
                x = float(hit.group(1))
                pm = x if ident == "m" else 1.0 - x
        assert pm is not None and body["logprobs"] and body["max_tokens"] == 1
        top = [{"token": "m", "logprob": math.log(pm), "bytes": None},
               {"token": "M", "logprob": math.log(1.0 - pm), "bytes": None}]
        resp = {"id": "cmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "m" if pm >= 0.5 else "M"},
                             "logprobs": {"content": [dict(top[0] if pm >= 0.5 else top[1], top_logprobs=top)]}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}}
        data = json.dumps(resp).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_server():
    _Judge.auth_seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _tiny_set():
    return [{"instruction": f"Name a colour, please ({i}).", "output": f"Reference answer {i}.",
             "generator": "gpt4_1106_preview", "dataset": "helpful_base"} for i in range(4)]


def _judge(url, cache_dir, **kw):
    from eval.judging.judges import get_judge
    return get_judge({"kind": "openai", "base_url": url, "model": "local/judge-7b", "api_key_env": KEY_ENV,
                      "max_concurrency": 2, "max_retries": 1, "cache_dir": str(cache_dir), **kw})


def test_annotate_with_alpaca_eval_through_our_endpoint(tmp_path, judge_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    ref = _tiny_set()
    probs = [0.8, 0.6, 0.3, 0.9]  # the judge's probability that the model's output is better
    model = ae.make_model_outputs(ref, [f"Model answer {i} <p={p}>" for i, p in enumerate(probs)], "rpo-test")
    judge = _judge(judge_server, tmp_path / "cache")
    anns = aej.annotate(model, judge, tmp_path / "annotators", reference=ref)
    cfg = next((tmp_path / "annotators").glob("*/configs.yaml"))
    assert judge.n_calls == 4  # alpaca_eval's calls went through our judge client

    # alpaca_eval's annotation format, in reference order, reference = output_1, model = output_2
    assert [a["instruction"] for a in anns] == [r["instruction"] for r in ref]
    assert {a["generator_1"] for a in anns} == {"gpt4_1106_preview"} and {a["generator_2"] for a in anns} == {"rpo-test"}
    assert {a["annotator"] for a in anns} == {"weighted_alpaca_eval_gpt4_turbo__local_judge-7b"}
    # weighted annotator: preference = 2 - P(first shown); after alpaca_eval undoes its random switch
    # that is 1 + P(model better) whichever side the model was shown on -> 1.8, 1.6, 1.3, 1.9
    assert [a["preference"] for a in anns] == pytest.approx([1.8, 1.6, 1.3, 1.9])

    # the key went over the wire from the env var, and is nowhere on disk
    assert _Judge.auth_seen and set(_Judge.auth_seen) == {f"Bearer {KEY}"}
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(errors="ignore"), f
    assert "CachedJudgeClient" in (cfg.parent / "client_configs.yaml").read_text()

    # win rate = mean(pref - 1) = (0.8 + 0.6 + 0.3 + 0.9) / 4 = 0.65 -> 65.0 %
    wr = am.win_rate(anns)
    assert wr["value"] == pytest.approx(65.0)
    # SE = sd([.8,.6,.3,.9], ddof=1) / sqrt(4) * 100 = 0.2646 / 2 * 100 = 13.23
    assert wr["standard_error"] == pytest.approx(np.std([0.8, 0.6, 0.3, 0.9], ddof=1) / 2 * 100)
    assert wr["n"] == 4 and wr["n_wins"] == 3 and wr["n_wins_base"] == 1  # 1.3 < 1.5: the reference wins

    # annotations.json round trip; a rerun in a new judge (a new process in real life) is served by our
    # judge cache, the only one (alpaca_eval keeps no annotation cache of its own here): no new requests
    p = ae.write_annotations(anns, tmp_path / "annotations.json")
    assert am.win_rate(ae.read_annotations(p))["value"] == pytest.approx(65.0)
    n_calls = len(_Judge.auth_seen)
    assert not list((tmp_path / "annotators").rglob("annotations_seed*.json"))
    again = aej.annotate(model, _judge(judge_server, tmp_path / "cache"), tmp_path / "annotators", reference=ref)
    assert len(_Judge.auth_seen) == n_calls
    assert [a["preference"] for a in again] == pytest.approx([1.8, 1.6, 1.3, 1.9])


def test_client_config_only_names_a_live_judge():
    with pytest.raises(RuntimeError, match="not live"):
        aej.CachedJudgeClient(judge="no-such-judge")


def test_annotate_requires_outputs_for_every_reference_instruction(tmp_path):
    ref = _tiny_set()
    model = ae.make_model_outputs(ref, ["a"] * 4, "m")[:3]
    with pytest.raises(ValueError, match="cover 3 of 4"):
        aej.annotate(model, None, tmp_path / "unused", reference=ref)


# ---------------------------------------------------------------- win rate (alpaca_eval's metric)


def test_win_rate_hand_made_preferences():
    # preferences: 2 = model wins, 1 = reference wins, 1.5 = draw
    anns = [{"preference": p} for p in (2, 2, 1, 1.5)]
    wr = am.win_rate(anns)
    # pref - 1 = [1, 1, 0, 0.5]; mean = 2.5 / 4 = 0.625 -> 62.5 %
    assert wr["value"] == pytest.approx(62.5)
    # deviations from .625: .375, .375, -.625, -.125; squares sum = .140625*2 + .390625 + .015625 = .6875
    # sd = sqrt(.6875 / 3) = .47871; SE = .47871 / 2 = .239357 -> 23.9357 %
    assert wr["standard_error"] == pytest.approx(23.9357, abs=1e-3)
    assert (wr["n"], wr["n_wins"], wr["n_wins_base"], wr["n_draws"], wr["n_missing"]) == (4, 2, 1, 1, 0)
    # discrete: same here (all preferences are 1, 1.5 or 2)
    assert wr["discrete_win_rate"] == pytest.approx(62.5)


def test_win_rate_matches_alpaca_eval_pairwise_to_winrate_and_drops_missing():
    from alpaca_eval.metrics import pairwise_to_winrate
    prefs = [1.9, 1.2, 1.5, 2.0, 1.0, 1.75]
    ours = am.win_rate([{"preference": p} for p in prefs])
    theirs = pairwise_to_winrate(prefs)
    assert ours["value"] == pytest.approx(float(theirs["win_rate"]))
    assert ours["standard_error"] == pytest.approx(float(theirs["standard_error"]))
    assert am.win_rate(pd.DataFrame({"preference": prefs})) == ours  # a DataFrame works as well
    # a missing annotation (None/NaN) is dropped and counted: mean(pref-1) over [2, 1] = 0.5 -> 50 %
    wr = am.win_rate([{"preference": 2}, {"preference": None}, {"preference": 1.0}, {"preference": float("nan")}])
    assert wr["value"] == pytest.approx(50.0) and wr["n"] == 2 and wr["n_missing"] == 2


def test_win_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        am.win_rate([{"preference": 3}])
    with pytest.raises(ValueError, match="no 'preference'"):
        am.win_rate([{"pref": 1}])
    with pytest.raises(ValueError, match="generator_2"):
        am.win_rate([{"preference": 1, "generator_2": "a"}, {"preference": 2, "generator_2": "b"}])


# ---------------------------------------------------------------- length-controlled win rate


def test_lc_unavailable_offline_is_nan_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    anns = [{"preference": 2.0}] * 3
    lc = am.lc_win_rate(anns, precomputed_dir=tmp_path)  # an empty directory
    assert math.isnan(lc["value"]) and math.isnan(lc["standard_error"])
    assert "df_gamed.csv" in lc["unavailable"]  # the one file get_length_controlled_winrate needs here
    # nothing given: looks in the HF cache only (no download); this machine has no copy
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr("alpaca_eval.constants.DEFAULT_CACHE_DIR", str(tmp_path / "empty_cache"))
    lc = am.lc_win_rate(anns)
    assert math.isnan(lc["value"]) and "tatsu-lab/alpaca_eval" in lc["unavailable"]
    assert set(lc) == {"value", "standard_error", "unavailable"}  # no stand-in number
    rows = am.table_rows("m", am.win_rate(anns), lc, judge="j")
    assert math.isnan(rows[1]["value"]) and rows[1]["metric"] == "alpacaeval_lc"
    assert rows[1]["note"] == "needs alpaca_eval's df_gamed.csv"  # Table 2's cell says why it has no number


def test_lc_runs_alpaca_eval_glm_on_local_precomputed_files(tmp_path):
    """Plumbing only: synthetic precomputed files (not the real ones) let alpaca_eval's GLM run offline."""
    n = 30
    rng = np.random.default_rng(0)
    diff = rng.normal(size=n)
    pd.Series(diff, name="instruction_difficulty").to_csv(tmp_path / "instruction_difficulty.csv")
    gamed = []
    for model, sign in (("gamed_long", 1.0), ("gamed_short", -1.0)):  # first model's rows carry labels 0..n-1
        for i in range(n):
            gamed.append({"model": model, "index": i, "preference": float(rng.uniform()),
                          "instruction_difficulty": diff[i], "not_gamed_baseline": False,
                          "std_delta_len": sign * float(rng.uniform(0.5, 1.5))})
    pd.DataFrame(gamed).to_csv(tmp_path / "df_gamed.csv", index=False)
    ev = [{"instruction": f"q{i}", "output": "r" * (50 + i), "generator": "ref", "dataset": "d"} for i in range(n)]
    anns = [{"instruction": f"q{i}", "output_1": "r" * (50 + i), "output_2": "m" * (20 + 7 * (i % 9)),
             "generator_1": "ref", "generator_2": "model", "preference": 1.0 + float(rng.uniform())}
            for i in range(n)][::-1]  # any order: positions come from the eval set
    lc = am.lc_win_rate(anns, eval_set=ev, precomputed_dir=tmp_path)
    assert "unavailable" not in lc and 0.0 < lc["value"] < 100.0 and lc["n"] == n
    assert lc["win_rate"] == pytest.approx(am.win_rate(anns)["value"])
    # a subset of the eval set (n_questions): LC is not defined on it; no number, the reason instead
    sub = am.lc_win_rate(anns[1:], eval_set=ev, precomputed_dir=tmp_path)
    assert math.isnan(sub["value"]) and sub["unavailable"] == f"the GLM needs all {n} instructions, {n - 1} were answered"
    (lc_row,) = am.table_rows("m", am.win_rate(anns), sub, judge="j")[1:]
    assert lc_row["note"] == f"needs all {n} instructions, {n - 1} were answered"
    with pytest.raises(ValueError, match="1 duplicated"):
        am.lc_win_rate(anns + anns[:1], eval_set=ev, precomputed_dir=tmp_path)


def test_win_rate_interval_stays_inside_0_100():
    # issue 15: 12.5 at n = 4 gave [-12.0, 37.0] as value +- 1.96 SE. Per-instruction values (p - 1) x 100:
    # 50, 0, 0, 0. A bootstrap mean of 4 draws is 0, 12.5, 25, 37.5 or 50; P(0) = (3/4)^4 = 0.32 > 0.025, so
    # the 2.5th percentile is 0; P(50) = (1/4)^4 = 0.004 < 0.025 <= P(>= 37.5) = 0.051, so the 97.5th is 37.5.
    wr = am.win_rate([{"preference": p} for p in (1.5, 1.0, 1.0, 1.0)], n_boot=1000, seed=0, ci=0.95)
    assert wr["value"] == pytest.approx(12.5) and wr["standard_error"] == pytest.approx(12.5)  # sd 25 / sqrt 4
    assert (wr["ci_low"], wr["ci_high"]) == (0.0, 37.5)
    rows = am.table_rows("rpo", wr, {"value": float("nan"), "unavailable": "offline"}, judge="j")
    assert rows[0]["metric"] == "alpacaeval_wr" and (rows[0]["ci_low"], rows[0]["ci_high"]) == (0.0, 37.5)
    assert math.isnan(rows[1]["value"]) and rows[1]["note"] == "offline"
    same = am.win_rate([{"preference": 2.0}] * 3)  # every value 100: a degenerate interval at 100
    assert (same["ci_low"], same["ci_high"]) == (100.0, 100.0)


def test_lc_required_is_fetched_through_the_hub_cache_or_stops(tmp_path, monkeypatch):
    """check_lc_available (the run's start-up check) and locate_glm_files on a hub cache written here."""
    import huggingface_hub.constants
    from helpers.hub import hub_repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"lc_win_rate is 'required'.*df_gamed.csv.*tatsu-lab/alpaca_eval"):
        am.check_lc_available({"enabled": True, "lc_win_rate": "required", "precomputed_dir": None})
    am.check_lc_available({"enabled": True, "lc_win_rate": "if_available", "precomputed_dir": None})  # no check
    snap = hub_repo(cache, "dataset", "tatsu-lab/alpaca_eval")
    (snap / "df_gamed.csv").write_text("model,index\n")
    am.check_lc_available({"enabled": True, "lc_win_rate": "required", "precomputed_dir": None})
    files, reason = am.locate_glm_files(fetch=True)
    assert reason == "" and files == {"df_gamed.csv": str(snap / "df_gamed.csv")}
