"""The one OpenAI-compatible client of every LLM judge (Table 1, MT-Bench, AlpacaEval, Arena-Hard).

`OpenAIClient` posts chat completions to `{base_url}/chat/completions` with bounded retries (429, 5xx,
timeouts, and 200 answers that are not JSON or hold no usable choice), exponential backoff with jitter
and Retry-After, at most `max_concurrency` requests in flight, and every completion cached on disk as
soon as it returns (eval.judging.cache). The API key is read per request from the environment variable
the config names (`api_key_env`); it is never stored on the client, cached, logged or put in an error
message (`redact` removes it from any text an endpoint echoes back).

A request may carry `"constraint"`: the protocol's verdict strings (eval.judging.constraint). A client
built with `constrain=True` sends them in its server's field (`constrain_request`), keys the cache on them
and refuses an answer outside them; any other client drops them, so its requests and keys are as before.

Its constructor takes every setting explicitly: the defaults live in the config schema and reach the
client through eval.judging.judges.get_judge (eval.judging.config.resolve_judge).
"""
from __future__ import annotations

import concurrent.futures as cf
import email.utils
import ipaddress
import logging
import os
import random
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from eval.judging.cache import JudgeCache, cache_key
from eval.judging.constraint import REQUEST_FIELDS, request_fields

log = logging.getLogger(__name__)

# What a request without its own sampling parameters is sent with (and cached under).
REQUEST_DEFAULTS = {"temperature": 0.0, "max_tokens": 1024}


class JudgeError(RuntimeError):
    """A judge request failed; the message names the endpoint and never contains the API key."""


class JudgeAuthError(JudgeError):
    """401/403, or the configured key variable is unset: not retried."""


class JudgeNotFoundError(JudgeError):
    """404: wrong model name or base URL; not retried."""


class JudgeUnreachableError(JudgeError):
    """The endpoint refused or dropped every connection attempt."""


class JudgeRetriesExhausted(JudgeError):
    """429 / 5xx / timeouts / malformed answers persisted through every retry."""


class JudgeConstraintError(JudgeError):
    """A constrained request was answered with text outside its verdicts: the server ignored the field."""


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


def split_request(req) -> tuple[list[dict], dict, int]:
    """A complete_many item as (messages, sampling parameters, attempt).

    An item is a list of messages or {"messages": [...], temperature, max_tokens, ...[, "attempt": k]
    [, "constraint": [verdicts]]}; `attempt` (not sent) makes a re-ask of the same request its own call
    and cache entry; `constraint` stays in the parameters for the client to apply or drop (`_constrained`).
    """
    if isinstance(req, dict):
        req = dict(req)
        try:
            messages = req.pop("messages")
        except KeyError:
            raise ValueError("complete_many: a request dict needs 'messages'") from None
        attempt = int(req.pop("attempt", 0))
        return messages, {**REQUEST_DEFAULTS, **req}, attempt
    return list(req), dict(REQUEST_DEFAULTS), 0


def _choice_problem(data) -> str | None:
    """Why a 200 body is not a usable chat completion (None when it is)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        return "no choices"
    choice = choices[0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        return "a choice without a message"
    if not isinstance(choice["message"].get("content"), str):
        return f"a message without text content (finish_reason={choice.get('finish_reason')!r})"
    return None


class OpenAIClient:
    """Chat completions from an OpenAI-compatible endpoint, cached and retried.

    Identical requests (same model, messages, sampling parameters, attempt) are one call by default: the
    second is answered from the first's cached completion, within a job and across jobs. With
    `reuse_identical=False` every request is its own call, as the authors' scripts call the judge once per
    judged item: the key then also holds `scope` (the judging job) and the request's occurrence among
    identical requests of this client, so a re-run in the same order still finds each one in the cache.

    `accounting()` says what this client was asked and did: items asked, distinct requests, completions
    received from the endpoint, answers from the cache, HTTP requests sent (retries included).
    """

    kind = "openai"
    RETRY_STATUSES = frozenset({408, 409, 425, 429})

    def __init__(self, base_url: str | None, model: str, api_key_env: str | None, *, max_concurrency: int,
                 max_retries: int, timeout_s: float, cache_dir: str | os.PathLike | None,
                 backoff_base_s: float, backoff_max_s: float, constrain: bool,
                 constrain_request: str, reuse_identical: bool = True, scope: str | None = None):
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
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if constrain_request not in REQUEST_FIELDS:
            raise ValueError(f"constrain_request {constrain_request!r}: expected one of {list(REQUEST_FIELDS)}")
        self.constrain = bool(constrain)
        self.constrain_request = constrain_request
        self.reuse_identical = bool(reuse_identical)
        self.scope = scope
        self.n_calls = 0
        self.n_cache_hits = 0
        self.n_items = 0
        self.n_received = 0
        self._keys_asked: set[str] = set()
        self._occurrences: dict[str, int] = {}
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
                self._cache = JudgeCache(self.cache_dir, self.model)
            return self._cache

    def _api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeAuthError(f"the judge's API key variable ${self.api_key_env} is not set or empty "
                                 f"(set it in the environment: export {self.api_key_env}=...)")
        return key

    def redact(self, text: str) -> str:
        """`text` with the API key's value replaced by the variable's name."""
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

    def _send(self, url: str, payload: dict):
        """One HTTP attempt: (parsed body or None, reason to retry or None). Raises what is final."""
        import httpx
        key = self._api_key()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        with self._lock:
            self.n_calls += 1
        try:
            resp = self._http().post(url, json=payload, headers=headers)
        except httpx.ConnectError as e:
            return None, ("connect", f"connection failed ({type(e).__name__}: {e})", None)
        except httpx.TimeoutException as e:
            return None, ("other", f"timed out after {self.timeout_s:g} s ({type(e).__name__})", None)
        except httpx.TransportError as e:
            return None, ("other", f"transport error ({type(e).__name__}: {e})", None)
        status = resp.status_code
        body = self.redact(resp.text[:300])
        if status == 200:
            try:
                data = resp.json()
            except ValueError:
                return None, ("other", f"HTTP 200 with a body that is not JSON: {body!r}", None)
            problem = _choice_problem(data)
            if problem:
                return None, ("other", f"HTTP 200 with {problem}: {body!r}", None)
            return data, None
        if status in (401, 403):
            hint = (f"check the key in ${self.api_key_env}" if self.api_key_env else
                    "no API key is configured: set api_key_env to the NAME of the variable holding it")
            raise JudgeAuthError(f"judge endpoint {url} rejected the request with HTTP {status}: {hint} "
                                 f"(response: {body!r})")
        if status == 404:
            raise JudgeNotFoundError(f"model or URL not found: model {self.model!r} at {url} "
                                     f"(HTTP 404: {body!r})")
        if status in self.RETRY_STATUSES or status >= 500:
            return None, ("other", f"HTTP {status} ({body!r})", _retry_after_s(resp.headers.get("retry-after")))
        raise JudgeError(f"judge endpoint {url} rejected the request with HTTP {status} (not retried): {body!r}")

    def _post(self, payload: dict) -> dict:
        """POST one chat completion with retries; the parsed body of a usable 200 answer."""
        url = self.url
        attempts = self.max_retries + 1
        last, only_connect_errors = "no attempt", True
        for attempt in range(1, attempts + 1):
            data, retry = self._send(url, payload)
            if retry is None:
                return data
            what, last, retry_after = retry
            only_connect_errors = only_connect_errors and what == "connect"
            if attempt < attempts:
                delay = self._backoff(attempt, retry_after)
                log.warning("judge %s: attempt %d/%d: %s; retrying in %.2f s", url, attempt, attempts,
                            self.redact(last), delay)
                if delay > 0:
                    time.sleep(delay)
        if only_connect_errors:
            raise JudgeUnreachableError(self.redact(
                f"judge endpoint {self.base_url} is not reachable: {attempts} attempts to {url} failed "
                f"(last: {last})"))
        raise JudgeRetriesExhausted(self.redact(
            f"judge request to {url} failed after {attempts} attempts (max_retries={self.max_retries}); "
            f"last: {last}"))

    def _constrained(self, params: dict) -> tuple[dict, dict, list[str] | None]:
        """(the parameters the cache key holds, the parameters sent, the allowed answers or None).

        Unconstrained (the client's `constrain` off, or a request without verdicts) both are the request's
        parameters without `constraint`, so keys stay those of earlier runs; constrained, the key holds
        the verdicts (a constrained and an unconstrained verdict are different calls) and the body holds
        them in the server's field."""
        params = dict(params)
        choices = params.pop("constraint", None)
        if not self.constrain or not choices:
            return params, params, None
        choices = [str(c) for c in choices]
        return ({**params, "constraint": {"choice": choices}},
                {**params, **request_fields(choices, self.constrain_request)}, choices)

    def probe(self, timeout_s: float = 10.0) -> str | None:
        """Why this judge cannot be used, or None: one cheap request before a run (eval.preflight).

        GET `{base_url}/models` (OpenAI, vLLM and llama.cpp servers answer it; no tokens are billed) with
        the key, sent to this base URL only (redirects are not followed): unreachable, a rejected key, or
        a listed set of models without this one is a problem. An endpoint without `/models` (404 or 405)
        is asked one chat completion of max_tokens 1 instead. Not retried and not cached."""
        import httpx
        try:
            key = self._api_key()
        except JudgeAuthError as e:
            return str(e)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            with httpx.Client(timeout=httpx.Timeout(timeout_s), trust_env=not _is_loopback(self.base_url),
                              follow_redirects=False) as http:
                resp = http.get(f"{self.base_url}/models", headers=headers)
                if resp.status_code in (404, 405):
                    resp = http.post(self.url, headers=headers, json={
                        "model": self.model, "max_tokens": 1, "temperature": 0.0,
                        "messages": [{"role": "user", "content": "Say OK."}]})
        except httpx.HTTPError as e:
            return self.redact(f"{self.base_url} is not reachable ({type(e).__name__}: {e})")
        body = self.redact(resp.text[:200])
        if resp.status_code in (401, 403):
            hint = (f"check the key in ${self.api_key_env}" if self.api_key_env else
                    "no API key is configured: set api_key_env to the NAME of the variable holding it")
            return f"{resp.request.url} rejected the request with HTTP {resp.status_code}: {hint} ({body!r})"
        if resp.status_code != 200:
            return f"{resp.request.url} answered HTTP {resp.status_code} ({body!r})"
        if resp.request.url.path.endswith("/models"):
            try:
                served = [m.get("id") for m in resp.json().get("data", []) if isinstance(m, dict)]
            except (ValueError, AttributeError):
                return f"{resp.request.url} answered 200 with a body that is not a model list ({body!r})"
            if served and self.model not in served:
                shown = ", ".join(map(str, served[:10])) + (" ..." if len(served) > 10 else "")
                return f"{self.base_url} does not serve the model {self.model!r} (it lists: {shown})"
        return None

    def _key(self, messages: list[dict], params: dict, attempt: int, item: str | None = None) -> str:
        return cache_key(self.model, messages, self._constrained(params)[0], attempt, item)

    def _item(self, messages: list[dict], params: dict, attempt: int) -> str | None:
        """None when identical requests share one call; else this request's own identity: the client's
        scope and its occurrence among the identical requests it was asked so far."""
        if self.reuse_identical:
            return None
        base = self._key(messages, params, attempt)
        with self._lock:
            k = self._occurrences.get(base, 0)
            self._occurrences[base] = k + 1
        return f"{self.scope or ''}#{k}"

    def accounting(self) -> dict:
        """What this client was asked and did (module docstring of OpenAIClient)."""
        with self._lock:
            return {"reuse_identical": self.reuse_identical, "items": self.n_items,
                    "distinct_requests": len(self._keys_asked), "reused_identical": self.n_items - len(self._keys_asked),
                    "completions_received": self.n_received, "cache_hits": self.n_cache_hits,
                    "http_requests": self.n_calls}

    # ---- public API
    def complete_record(self, messages: list[dict], params: dict, attempt: int = 0, item: str | None = None) -> dict:
        """The cache record of one chat completion ({"response", "finish_reason", "usage"[, "logprobs"]}),
        from the cache when the same request (and attempt, and item) was answered before."""
        keyed, sent, choices = self._constrained(params)
        key = cache_key(self.model, messages, keyed, attempt, item)
        cache = self.cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                with self._lock:
                    self.n_cache_hits += 1
                return hit
        data = self._post({"model": self.model, "messages": messages, **sent})
        choice = data["choices"][0]
        if choices is not None and choice["message"]["content"] not in choices:
            # never cached: a re-run with the right constrain_request must ask again
            raise JudgeConstraintError(self.redact(
                f"judge {self.model!r} at {self.url} answered a constrained request ({self.constrain_request}) "
                f"with {choice['message']['content'][:200]!r} (finish_reason={choice.get('finish_reason')!r}), "
                f"none of {choices}: the server ignored the field, or max_tokens cut the verdict. "
                "constrain_request: structured_outputs is vLLM >= 0.10.2's, guided_choice vLLM < 0.12's, "
                "grammar a llama.cpp server's"))
        rec = {"model": self.model, "response": choice["message"]["content"],
               "finish_reason": choice.get("finish_reason"), "usage": data.get("usage")}
        if choice.get("logprobs") is not None:  # AlpacaEval's annotator reads them
            rec["logprobs"] = choice["logprobs"]
        if attempt:
            rec["attempt"] = attempt
        with self._lock:
            self.n_received += 1
        if cache is not None:
            cache.put(key, rec)
        return rec

    def complete(self, messages: list[dict], **params) -> str:
        """Text of one chat completion; `attempt=k` (k > 0) re-asks it as a new call."""
        return self.complete_records([{"messages": messages, **params}])[0]["response"]

    def complete_many(self, requests: list) -> list[str]:
        """Texts of complete() over many requests (see split_request), results in order."""
        return [r["response"] for r in self.complete_records(requests)]

    def complete_records(self, requests: list) -> list[dict]:
        """complete_record() over many requests with at most `max_concurrency` in flight.

        Identical requests are sent once. Every answer is cached when it returns, so if the batch fails
        or is interrupted only the calls in flight are lost: the first error cancels the queued calls,
        waits for the running ones, and is raised.
        """
        norm = [(*split_request(r),) for r in requests]
        if not norm:
            return []
        norm = [(m, p, a, self._item(m, p, a)) for m, p, a in norm]
        keys = [self._key(m, p, a, item) for m, p, a, item in norm]
        with self._lock:
            self.n_items += len(keys)
            self._keys_asked.update(keys)
        unique: dict[str, int] = {}
        for i, k in enumerate(keys):
            unique.setdefault(k, i)
        results: dict[str, dict] = {}
        workers = min(self.max_concurrency, len(unique))
        if workers == 1:
            for k, i in unique.items():
                results[k] = self.complete_record(*norm[i])
            return [results[k] for k in keys]
        abort = threading.Event()  # set by the first failure: queued calls then never go out

        def task(messages, params, attempt, item):
            if abort.is_set():
                raise cf.CancelledError()
            try:
                return self.complete_record(messages, params, attempt, item)
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
