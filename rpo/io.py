"""Small file I/O shared by every stage: one atomic write, one JSONL writer, one JSONL reader.

    atomic_open(path)      write to a temp file beside `path`, then os.replace: a killed job never leaves
                           a half-written output for Snakemake (or the next stage) to trust
    atomic_dir(path)       the same for a directory (a saved model)
    write_text / write_json / write_jsonl    the common cases of atomic_open
    read_jsonl(path)       rows of a JSONL file; bad UTF-8 or bad JSON names the file and the line

The temp file is created with os.open(..., 0o666), so the kernel applies the process's umask and the
output gets the permissions any other new file would get (tempfile.mkstemp makes 0600 files, which
other users on a shared machine cannot read).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path


class JSONLError(ValueError):
    """A JSONL file that is not UTF-8 or holds a line that is not JSON; the message names file and line."""


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", *, fsync: bool = False, encoding: str | None = "utf-8",
                newline: str | None = None):
    """Yield a file handle whose contents replace `path` only when the block finishes without error.

    fsync=True also flushes the file and its directory to disk before returning (for outputs that must
    survive a power loss, not only a killed process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory: os.replace is then a rename on one file system, atomic for readers.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask
    binary = "b" in mode
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else encoding,
                       newline=None if binary else newline) as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a fresh temp directory beside `path` that replaces `path` (a model directory, say) only when
    the block finishes without error; a killed job leaves the previous `path` or none, never a half one."""
    import shutil
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text: str, *, fsync: bool = False) -> None:
    with atomic_open(path, fsync=fsync) as fh:
        fh.write(text)


def write_json(path, obj, *, indent: int | None = 2, fsync: bool = False, **dumps_kw) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, **dumps_kw) + "\n", fsync=fsync)


def jsonl_line(row) -> str:
    """One JSONL line (with its newline); non-ASCII text stays readable."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(rows, path, *, fsync: bool = False) -> None:
    """Write `rows` as JSONL to `path` atomically."""
    with atomic_open(path, fsync=fsync) as fh:
        for row in rows:
            fh.write(jsonl_line(row))


def read_jsonl_numbered(path, *, allow_cut_tail: bool = False) -> list[tuple[int, object]]:
    """(1-based line number, value) of every non-blank line.

    allow_cut_tail=True accepts a last line without its newline that is not JSON (an append cut by a
    kill) and leaves it out; anywhere else a bad line is a JSONLError naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if allow_cut_tail and not raw.endswith(b"\n"):
                    break  # a multi-byte character cut by the kill
                raise JSONLError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line: "
                                 f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                if allow_cut_tail and not raw.endswith(b"\n"):
                    break
                raise JSONLError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    return rows


def read_jsonl(path, *, allow_cut_tail: bool = False) -> list:
    """The values of a JSONL file, in order (see read_jsonl_numbered)."""
    return [v for _, v in read_jsonl_numbered(path, allow_cut_tail=allow_cut_tail)]


def read_json_objects(path) -> list[tuple[int, dict]]:
    """(1-based line number, object) of every non-blank line of a JSONL file whose lines must be JSON
    objects; anything else is a ValueError naming the file and the line."""
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            out.append((lineno, row))
    return out
