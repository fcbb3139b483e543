"""rpo/io.py: the one atomic write (respects the umask, leaves nothing behind on error) and the JSONL
reader whose errors name the file and the line; eval/results_table.py's table writer goes through it.

Run: pytest tests/test_io.py -q      (seconds)
"""
from __future__ import annotations

import os
import stat

import pytest

from eval import results_table
from rpo import io


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        io.write_text(tmp_path / "a.txt", "x")
        assert mode(tmp_path / "a.txt") == 0o664  # 0666 & ~002
        os.umask(0o077)
        io.write_jsonl([{"a": 1}], tmp_path / "b.jsonl")
        assert mode(tmp_path / "b.jsonl") == 0o600  # 0666 & ~077
    finally:
        os.umask(old)


def test_table1_csv_is_readable_by_others(tmp_path, umask_022):
    # Issue 15: results_table.write_table used tempfile.mkstemp, so table1.csv came out 0600 whatever the umask.
    rows = [results_table.make_row(model_a="rpo", model_b="dpo", metric=results_table.WIN_RATE, value=60.0, ci_low=50.0,
                           ci_high=70.0, n=10, judge="gold")]
    path = results_table.write_table(rows, tmp_path / "results" / "table1.csv")
    assert mode(path) == 0o644
    assert results_table.read_table(path)[0]["value"] == 60.0


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    io.write_json(path, {"old": True})
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_open(path) as fh:
            fh.write('{"new": ')
            raise RuntimeError("boom")
    assert path.read_text() == '{\n  "old": true\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_fsync_write_and_unicode_round_trip(tmp_path):
    rows = [{"id": "é", "text": "naïve — ✓"}, {"id": 2}]
    io.write_jsonl(rows, tmp_path / "r.jsonl", fsync=True)
    assert io.read_jsonl(tmp_path / "r.jsonl") == rows
    assert "naïve" in (tmp_path / "r.jsonl").read_text(encoding="utf-8")  # not \u-escaped


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": "caf\xe9"}\n')  # line 3 holds a latin-1 byte
    with pytest.raises(io.JSONLError, match=r"d\.jsonl:3: not valid UTF-8 \(byte 11 of the line: b'\\xe9'\)"):
        io.read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"b": \n')
    with pytest.raises(io.JSONLError, match=r"d\.jsonl:2: not valid JSON"):
        io.read_jsonl(path)


def test_read_jsonl_cut_tail(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3, "b": "x')  # an append cut by a kill
    assert io.read_jsonl(path, allow_cut_tail=True) == [{"a": 1}, {"a": 2}]
    with pytest.raises(io.JSONLError, match=r"p\.jsonl:3"):
        io.read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"a": "\xc3')  # cut inside a two-byte character
    assert io.read_jsonl(path, allow_cut_tail=True) == [{"a": 1}]
    path.write_bytes(b'{"a": 1\n{"a": 2}\n')  # a bad line that is not the last one is still an error
    with pytest.raises(io.JSONLError, match=r"p\.jsonl:1"):
        io.read_jsonl(path, allow_cut_tail=True)
