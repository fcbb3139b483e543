"""The local llama.cpp judge server: `python -m llama_cpp.server` on a free loopback port, always stopped.

The server dies with the process that started it, whatever kills that process: besides the stop on
exit, on an exception and at interpreter exit, the child asks the kernel for SIGKILL when its parent
dies (Linux `prctl(PR_SET_PDEATHSIG)`, set between fork and exec), so an out-of-memory kill or a
`kill -9` of the judging job leaves no server behind. The kernel sends that signal when the *thread*
that forked the child ends, so the fork happens on the main thread or on a spawner thread that lives
as long as the process.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class LlamaCppServerError(RuntimeError):
    """llama_cpp.server did not start (the message carries its stderr tail)."""


def _die_with_parent(parent_pid: int):
    """preexec_fn: SIGKILL this child when its parent dies (Linux); exit if the parent is gone already.

    libc is loaded here, in the parent: between fork and exec the child must not look anything up
    (ctypes.util.find_library runs programs and takes locks another thread of the parent may have held
    at the fork, a deadlock); it only makes the one prctl call."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    prctl = libc.prctl

    def set_pdeathsig():
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(70)
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os._exit(71)
    return set_pdeathsig


class _Spawner:
    """A daemon thread that forks children for other threads and lives until the process exits, so
    PR_SET_PDEATHSIG (tied to the forking thread) fires only when the process itself dies."""

    _lock = threading.Lock()
    _queue: queue.Queue | None = None

    @classmethod
    def popen(cls, cmd, **kw) -> subprocess.Popen:
        if threading.current_thread() is threading.main_thread():
            return subprocess.Popen(cmd, **kw)
        with cls._lock:
            if cls._queue is None:
                cls._queue = queue.Queue()
                threading.Thread(target=cls._serve, args=(cls._queue,), daemon=True,
                                 name="llama-server-spawner").start()
        done: queue.Queue = queue.Queue(maxsize=1)
        cls._queue.put((cmd, kw, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    @staticmethod
    def _serve(requests: queue.Queue) -> None:
        while True:
            cmd, kw, done = requests.get()
            try:
                done.put((True, subprocess.Popen(cmd, **kw)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.put((False, e))


def popen_dying_with_parent(cmd: list[str], **kw) -> subprocess.Popen:
    """subprocess.Popen whose child is killed when this process dies (where the kernel offers it)."""
    if sys.platform.startswith("linux"):
        kw["preexec_fn"] = _die_with_parent(os.getpid())
    else:
        log.warning("no parent-death signal on %s: a killed judge job may leave its llama.cpp server "
                    "running", sys.platform)
    return _Spawner.popen(cmd, **kw)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaCppServer:
    """`with LlamaCppServer(path) as base_url:` runs `python -m llama_cpp.server` on a free loopback port.

    Waits until GET {base_url}/models answers (the model is loaded by then); a server that exits or
    does not answer within `startup_timeout_s` raises LlamaCppServerError with its stderr tail. The
    process is always stopped on exit, on an exception and at interpreter exit (SIGTERM, then SIGKILL
    after `stop_timeout_s`), and killed by the kernel if this process dies first. The OpenAI-compatible base_url is f"http://127.0.0.1:{port}/v1"; the
    model is served under its file stem.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int, n_threads: int,
                 chat_format: str | None, startup_timeout_s: float, stop_timeout_s: float = 10.0,
                 extra_args: list[str] | None = None):
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
            self.proc = popen_dying_with_parent(self.command(self.port), stdin=subprocess.DEVNULL,
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
