"""rpo/locks.py: when a Snakemake lock is a dead run's, and the advice that names the --unlock command.
(The real kill -9 of Snakemake is in tests/test_workflow_faults.py.)

Run: pytest tests/test_locks.py -q      (seconds)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess

from rpo import locks


def lock_dir(tmp_path, *owners):
    d = tmp_path / ".snakemake" / "locks"
    d.mkdir(parents=True)
    (d / "0.input.lock").write_text("results/data/train.jsonl\n")
    for i, o in enumerate(owners):
        (d / f"rpo-owner-{i}.json").write_text(json.dumps(o))
    return d


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()  # reaped: the pid names no process now
    return p.pid


def test_process_start_of_live_and_dead_processes():
    assert locks.process_start(os.getpid()) is not None
    assert locks.process_start(dead_pid()) is None


def test_dead_owner_gives_the_unlock_command(tmp_path):
    pid = dead_pid()
    d = lock_dir(tmp_path, {"pid": pid, "host": socket.gethostname(), "start": "12345"})
    msg = locks.stale_lock_message(["--cores", "all", "results/table1.csv"], d)
    assert f"pid {pid} on {socket.gethostname()}" in msg
    assert "\n    snakemake --unlock --cores all results/table1.csv\n" in msg


def test_reused_pid_counts_as_dead(tmp_path):
    # our own pid, but the record's start time is another process's: the owner died, the pid was reused
    d = lock_dir(tmp_path, {"pid": os.getpid(), "host": socket.gethostname(), "start": "1"})
    assert locks.stale_lock_message([], d) is not None


def test_live_unknown_or_absent_owners_are_not_called_stale(tmp_path):
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": locks.process_start(os.getpid())}
    dead = {"pid": dead_pid(), "host": socket.gethostname(), "start": "1"}
    assert locks.stale_lock_message([], lock_dir(tmp_path / "a", me)) is None  # alive
    assert locks.stale_lock_message([], lock_dir(tmp_path / "b", me, dead)) is None  # one of two alive
    assert locks.stale_lock_message([], lock_dir(tmp_path / "c", {**dead, "host": "elsewhere"})) is None
    assert locks.stale_lock_message([], lock_dir(tmp_path / "d")) is None  # killed before it wrote a record
    empty = tmp_path / "e" / "locks"
    empty.mkdir(parents=True)
    (empty / "rpo-owner-1.json").write_text(json.dumps(dead))
    assert locks.stale_lock_message([], empty) is None  # no lock at all


def test_write_owner_records_this_process(tmp_path):
    path = locks.write_owner(tmp_path / "locks")
    rec = json.loads(path.read_text())
    assert rec == {"pid": os.getpid(), "host": socket.gethostname(), "start": locks.process_start(os.getpid())}
    assert not locks.is_dead(rec)
