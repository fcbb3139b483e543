# Stale locks of killed runs. Snakemake locks the working directory (.snakemake/locks/<n>.{input,output}.lock)
# after it has read this Snakefile and built the DAG, and removes the lock when it exits, unless it is
# killed (kill -9, an out-of-memory kill, a lost login session): then every later run stops with a
# LockException until `snakemake --unlock`. The lock files name only paths, not who holds them, so:
#   - onstart (which Snakemake calls once it holds the lock) leaves an owner record beside them:
#     .snakemake/locks/rpo-owner-<pid>.json = {pid, host, process start time}; Snakemake reads only the
#     numbered *.lock files and deletes the whole folder on a normal exit, record included;
#   - at start-up, before Snakemake tries to lock, a lock whose every owner record names a process of
#     this host that no longer exists is a dead run's: the user is told the exact command that clears it.
# Nothing is unlocked automatically: jobs that a killed Snakemake started may still be running.
import json
import os
import shlex
import socket
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import ExecMode

LOCK_DIR = Path(".snakemake/locks")  # the working directory is already --directory here


def process_start(pid):
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22), None if gone
    (or not Linux: then no lock is ever called stale).
    With the pid it tells a live owner from an unrelated process that reuses the pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # field 3 onwards
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited: it only awaits its parent


def lock_owners():
    owners = []
    for p in sorted(LOCK_DIR.glob("rpo-owner-*.json")):
        try:
            owners.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            return None  # unreadable: say nothing, Snakemake's own message applies
    return owners


def is_dead(owner):
    """True only when the owner ran on this host and its process is gone (or its pid was reused)."""
    return owner.get("host") == socket.gethostname() and process_start(owner["pid"]) != owner.get("start")


def stale_lock_message():
    """The advice for a lock left by dead runs only, or None (no lock, a live or unknown owner)."""
    if not any(LOCK_DIR.glob("*.lock")):
        return None
    owners = lock_owners()
    if not owners or not all(is_dead(o) for o in owners):
        return None
    runs = ", ".join(f"pid {o['pid']} on {o['host']}" for o in owners)
    unlock = shlex.join(["snakemake", "--unlock", *sys.argv[1:]])
    return (f"rpo: {LOCK_DIR}/ holds the lock of a Snakemake run that is no longer running ({runs}: killed, "
            f"e.g. by kill -9 or the out-of-memory killer), so Snakemake will refuse to start (LockException).\n"
            f"  Nothing finished is lost. Check that none of its jobs still runs (ps -ef | grep 'python -m'), "
            f"then clear the lock and run the same command again:\n    {unlock}\n")


if workflow.exec_mode == ExecMode.DEFAULT and "--unlock" not in sys.argv:  # not in jobs re-reading this file
    _stale = stale_lock_message()
    if _stale:
        print(_stale, file=sys.stderr)


onstart:
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}
    (LOCK_DIR / f"rpo-owner-{os.getpid()}.json").write_text(json.dumps(owner) + "\n")
