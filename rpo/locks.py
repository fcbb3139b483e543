"""Stale Snakemake locks of killed runs (used by workflow/rules/locks.smk).

Snakemake locks the working directory (`.snakemake/locks/<n>.{input,output}.lock`) after it has read the
Snakefile and built the DAG, and removes the lock when it exits, unless it is killed (kill -9, the
out-of-memory killer, a lost session): then every later run stops with a LockException until
`snakemake --unlock`. The lock files name only paths, not who holds them, so:
  - once Snakemake holds the lock (its `onstart` hook), `write_owner` leaves an owner record beside them,
    `rpo-owner-<pid>.json` = {pid, host, process start time}; Snakemake reads only the numbered `*.lock`
    files and deletes the whole folder on a normal exit, record included;
  - at start-up, before Snakemake tries to lock, `stale_lock_message` calls a lock stale when every
    owner record names a process of this host that no longer exists, and gives the exact command that
    clears it. Nothing is unlocked automatically: the jobs of a killed Snakemake may still be running.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
from pathlib import Path

LOCK_DIR = Path(".snakemake") / "locks"  # relative to Snakemake's working directory
PROC = Path("/proc")


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, field 22 of /proc/<pid>/stat), or None
    when it is gone, a zombie, or there is no /proc (then no lock is ever called stale). With the pid it
    tells a live owner from an unrelated process that reuses the pid."""
    try:
        fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()  # field 3 onwards
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited and only awaits its parent


def write_owner(lock_dir: Path = LOCK_DIR) -> Path:
    """Record this process as the holder of the lock in `lock_dir`."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    path = lock_dir / f"rpo-owner-{pid}.json"
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "start": process_start(pid)}) + "\n")
    return path


def _owners(lock_dir: Path) -> list[dict] | None:
    owners = []
    for p in sorted(lock_dir.glob("rpo-owner-*.json")):
        try:
            owners.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            return None  # unreadable: say nothing, Snakemake's own message applies
    return owners


def is_dead(owner: dict) -> bool:
    """True only when the owner ran on this host and its process is gone (or its pid was reused)."""
    return owner.get("host") == socket.gethostname() and process_start(owner["pid"]) != owner.get("start")


def stale_lock_message(argv: list[str], lock_dir: Path = LOCK_DIR) -> str | None:
    """Advice for a lock held only by dead runs, naming the `--unlock` form of the command `argv`
    (Snakemake's own arguments); None when there is no lock or an owner is alive or unknown."""
    if not any(lock_dir.glob("*.lock")):
        return None
    owners = _owners(lock_dir)
    if not owners or not all(is_dead(o) for o in owners):
        return None
    runs = ", ".join(f"pid {o['pid']} on {o['host']}" for o in owners)
    unlock = shlex.join(["snakemake", "--unlock", *argv])
    return (f"rpo: {lock_dir}/ holds the lock of a Snakemake run that is no longer running ({runs}: killed, "
            "e.g. by kill -9 or the out-of-memory killer), so Snakemake will refuse to start (LockException).\n"
            "  Nothing finished is lost. Check that none of its jobs still runs (ps -ef | grep 'python -m'), "
            f"then clear the lock and run the same command again:\n    {unlock}\n")
