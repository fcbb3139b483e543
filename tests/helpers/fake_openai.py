"""A fake OpenAI-compatible chat-completions server on 127.0.0.1 for tests (a thread in the test process).

    with FakeOpenAIServer() as server:          # server.url = "http://127.0.0.1:<port>/v1"
        ...                                     # server.requests / server.headers: what it was sent

By default it answers like a judge of every benchmark here (`judge_answer`): Table 1's pairwise prompt
gets `[[A]]`, an MT-Bench single-answer prompt a `[[rating]]`, an Arena-Hard prompt `[[A>B]]`, and
AlpacaEval's `weighted_alpaca_eval_gpt4_turbo` request (one token, top-5 logprobs) the logprobs of "m"
and "M" in the format alpaca_eval's `logprob_parser` reads. `server.behave = f` replaces that:
`f(n, request_json, headers) -> (status, headers, body)` with n the 1-based request number; a body that
is bytes is sent as is (for malformed answers).
"""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str, *, logprobs: dict | None = None, model: str = "fake") -> dict:
    """A chat.completion body with one choice."""
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        choice["logprobs"] = logprobs
    return {"id": "fake-1", "object": "chat.completion", "created": 0, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}


def alpaca_logprobs(p_first: float) -> dict:
    """alpaca_eval's logprob request: the judge prefers the output shown first ("m") with p_first."""
    top = [{"token": "m", "logprob": math.log(p_first), "bytes": None},
           {"token": "M", "logprob": math.log(1.0 - p_first), "bytes": None}]
    best = top[0] if p_first >= 0.5 else top[1]
    return {"content": [dict(best, top_logprobs=top)]}


def kind_of(request: dict) -> str:
    """Which benchmark's judge prompt a request is: alpacaeval, arenahard, mtbench, pairwise or other."""
    text = "\n".join(m.get("content", "") for m in request.get("messages", []))
    if request.get("logprobs") and "model_identifier" in text:
        return "alpacaeval"
    if "[[A>>B]]" in text:
        return "arenahard"
    if "[[rating]]" in text:
        return "mtbench"
    if "[[A]]" in text and "[[C]]" in text:
        return "pairwise"
    return "other"


def judge_answer(request: dict) -> dict:
    """A valid judgment for each benchmark's prompt (see the module docstring); echo otherwise."""
    kind = kind_of(request)
    model = request.get("model", "fake")
    if kind == "alpacaeval":
        return completion("m", logprobs=alpaca_logprobs(0.7), model=model)
    if kind == "arenahard":
        return completion("Both are fine; A is a bit better. My final verdict is: [[A>B]]", model=model)
    if kind == "mtbench":
        return completion("The answer is adequate. Rating: [[7]]", model=model)
    if kind == "pairwise":
        return completion("Assistant A is better. [[A]]", model=model)
    return completion("echo:" + request["messages"][-1]["content"], model=model)


class FakeOpenAIServer:
    """Counts and records requests; `behave` decides each answer (default: judge_answer)."""

    def __init__(self, models=()):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.models = list(models)   # what GET /v1/models lists (none: it names no model, so any is accepted)
        self.get_status = 200        # its status (e.g. 401, or 404 for a server without the route)
        self.gets: list[tuple[str, str | None]] = []  # (path, Authorization header) of every GET
        self.answered: list[str] = []  # last-message contents that got a 200
        self.behave = lambda n, req, hdrs: (200, {}, judge_answer(req))
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_GET(self):  # GET /v1/models: what a readiness probe (and the run's preflight) asks
                with fake.lock:
                    fake.gets.append((self.path, self.headers.get("Authorization")))
                data = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})
                self._send(fake.get_status, {}, data.encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    n = len(fake.requests)
                status, hdrs, payload = fake.behave(n, body, dict(self.headers))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                if self._send(status, hdrs, data) and status == 200:
                    with fake.lock:
                        fake.answered.append(body["messages"][-1]["content"])

            def _send(self, status, hdrs, data) -> bool:
                try:
                    self.send_response(status)
                    for k, v in hdrs.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return True
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    return False

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def n(self) -> int:
        with self.lock:
            return len(self.requests)

    def kinds(self) -> dict[str, int]:
        """How many requests of each kind (kind_of) the server was sent."""
        with self.lock:
            reqs = list(self.requests)
        out: dict[str, int] = {}
        for r in reqs:
            out[kind_of(r)] = out.get(kind_of(r), 0) + 1
        return out

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
