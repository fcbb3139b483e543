"""The judge cache: every LLM judge completion on disk as soon as it returns, the only resume mechanism.

Layout: `<cache_dir>/<judge model>/<host>-<pid>.jsonl`, one shard per writing process. Several SLURM
jobs on different nodes may judge with the same model at once, and O_APPEND is not atomic across NFS
clients, so no two processes ever append to one file: each appends to its own shard and every shard is
read at load. (`<cache_dir>/<judge model>.jsonl`, the single file of earlier versions, is read too.)

One line per completion, `{"key", "model", "response", "finish_reason", "usage"[, "logprobs"]}`, keyed
by a hash of (judge model, messages, sampling parameters[, attempt]) and never by the URL or the key. A
line cut short (a kill mid-write, or another process still writing its shard) is skipped and counted;
the own shard's next record starts on a fresh line whatever state the file was left in.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
from pathlib import Path

log = logging.getLogger(__name__)


def cache_key(model: str, messages: list[dict], params: dict, attempt: int = 0, item: str | None = None) -> str:
    """sha256 of the canonical JSON of (judge model, messages, sampling parameters[, attempt][, item]).

    The URL and the key are deliberately not part of it: the same model behind another address (a
    llama.cpp server on a new port, a proxy) answers from the same cache. `attempt` > 0 is a re-ask of
    the same request (an unparsable MT-Bench rating asked again, as a re-run of FastChat would): its
    own key, so the re-ask is a real call and every attempt stays in the cache. Attempt 0 keeps the
    key of a plain request.
    """
    obj = {"model": model, "messages": messages, "params": params}
    if attempt:
        obj["attempt"] = int(attempt)
    if item is not None:  # judge.reuse_identical false: each judged item its own call (the judge client)
        obj["item"] = item
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def safe_name(model: str) -> str:
    """A judge model's name as a file or folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "judge"


def shard_name() -> str:
    """This process's shard: host and pid, so processes on any node never share a file."""
    return f"{safe_name(socket.gethostname())}-{os.getpid()}.jsonl"


class JudgeCache:
    """The completions of one judge model, loaded from every shard into a dict at start.

    `put` writes one record with a single `os.write` on an O_APPEND descriptor of this process's own
    shard as soon as a completion returns (no fsync: a crash of the machine may lose the last lines, a
    killed process loses nothing written). Appends are serialised by a lock, so worker threads may
    share one cache. `n_skipped` counts unreadable lines (cut writes) seen at load.
    """

    def __init__(self, cache_dir: str | os.PathLike, model: str):
        self.dir = Path(cache_dir) / safe_name(model)
        self.legacy = Path(cache_dir) / f"{safe_name(model)}.jsonl"
        self._lock = threading.Lock()
        self._data: dict[str, dict] = {}
        self.n_skipped = 0
        self._shard: Path | None = None  # chosen at the first put (the pid may change by then: fork)
        self._load()

    def shards(self) -> list[Path]:
        found = sorted(self.dir.glob("*.jsonl")) if self.dir.is_dir() else []
        return ([self.legacy] if self.legacy.is_file() else []) + found

    def _load(self) -> None:
        for path in self.shards():
            for line in path.read_bytes().split(b"\n"):
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
            log.warning("judge cache %s: skipped %d unreadable line(s) (a write cut short, or a shard "
                        "still being written)", self.dir, self.n_skipped)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str) -> dict | None:
        return self._data.get(key)

    def _own_shard(self) -> Path:
        name = shard_name()
        if self._shard is None or self._shard.name != name:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._shard = self.dir / name
        return self._shard

    def put(self, key: str, record: dict) -> None:
        rec = {"key": key, **record}
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            path = self._own_shard()
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # A dead process with this pid (pid reuse) may have left a cut line: start a fresh one.
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                view = memoryview(line)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            finally:
                os.close(fd)
            self._data[key] = rec
