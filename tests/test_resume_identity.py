"""Resumable answer files are bound to what produced them: a run killed with SIGKILL, then re-run with a
changed max_new_tokens or a changed model, keeps none of the old answers (issue 15, "half-finished
answer files"); an unchanged re-run still resumes. Covers rpo.sampling.generate_answers through the real
`python -m eval generate-table1`, MT-Bench's two-turn work folder and synthetic sampling's samples.jsonl.

Run: pytest tests/test_resume_identity.py -q      (about a minute on 2 CPU cores)
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.data import SYNTHETIC
from helpers.models import build_tiny_model

from eval.mtbench.stages import generate_mtbench
from eval.table1 import generate_table1_answers
from rpo import sampling
from rpo.models import load_model, load_tokenizer

PROMPTS = [{"id": f"q{i:03d}", "messages": [{"role": "user", "content": f"hello world {i} " * (1 + i % 4)}],
            "meta": {}} for i in range(80)]
GEN = {"model_name": "ref", "policy_dir": None, "n_prompts": None, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
       "batch_size": 1, "seed": 0}


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("other_model"), seed=1)


def _answer_lines(partial: Path) -> list[dict]:
    if not partial.is_file():
        return []
    rows = []
    for line in partial.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        if "responses" in row:
            rows.append(row)
    return rows


def kill_when(command: str, args: dict, ready, timeout: float = 180) -> None:
    """Run `python -m eval <command> --args <args>` and SIGKILL it as soon as `ready()` is true."""
    proc = subprocess.Popen([sys.executable, "-m", "eval", command, "--threads", "1", "--args", json.dumps(args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"{command} ended before it could be killed"
            assert time.monotonic() < deadline, f"{command}: not ready to be killed within {timeout} s"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def kill_during_generation(tmp: Path, model_dir: Path, out: Path, max_new_tokens: int) -> list[dict]:
    """Start the real `python -m eval generate-table1`, SIGKILL it once it has written 3 answers."""
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    args = {**GEN, "ref_dir": str(model_dir), "prompts_path": str(prompts), "out": str(out),
            "max_new_tokens": max_new_tokens}
    partial = out.with_name(out.name + ".partial")
    kill_when("generate-table1", args, lambda: len(_answer_lines(partial)) >= 3)
    assert not out.exists()
    done = _answer_lines(partial)
    assert 3 <= len(done) < len(PROMPTS)
    return done


def test_kill_then_changed_max_new_tokens_keeps_no_old_answer(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "ref.jsonl"
    old = kill_during_generation(tmp_path, tiny_model_dir, out, max_new_tokens=48)
    assert max(r["n_tokens"][0] for r in old) > 8  # the killed run's answers are longer than the new limit
    with caplog.at_level(logging.WARNING, logger="rpo.sampling"):
        generate_table1_answers(**{**GEN, "ref_dir": str(tiny_model_dir), "prompts_path": str(tmp_path / "prompts.jsonl"),
                                   "out": str(out), "max_new_tokens": 8})
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(r["n_tokens"][0] <= 8 for r in rows)
    assert re.search(r"discarding \d+ answers of an interrupted run made with a different max_new_tokens",
                     caplog.text)


@pytest.mark.slow  # a generation killed and rerun twice over (default run: < 10 min)
def test_kill_then_changed_model_keeps_no_old_answer(tiny_model_dir, other_model_dir, tmp_path, caplog):
    out = tmp_path / "ref.jsonl"
    kill_during_generation(tmp_path, tiny_model_dir, out, max_new_tokens=24)
    kw = {**GEN, "ref_dir": str(other_model_dir), "prompts_path": str(tmp_path / "prompts.jsonl"), "max_new_tokens": 24}
    with caplog.at_level(logging.WARNING, logger="rpo.sampling"):
        generate_table1_answers(**kw, out=str(out))
    assert re.search(r"made with a different model\b", caplog.text)
    generate_table1_answers(**kw, out=str(tmp_path / "fresh.jsonl"))  # the other model, uninterrupted
    assert out.read_text() == (tmp_path / "fresh.jsonl").read_text()


def test_kill_then_same_settings_resumes(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "ref.jsonl"
    done = kill_during_generation(tmp_path, tiny_model_dir, out, max_new_tokens=24)
    kw = {**GEN, "ref_dir": str(tiny_model_dir), "prompts_path": str(tmp_path / "prompts.jsonl"), "max_new_tokens": 24}
    with caplog.at_level(logging.INFO, logger="rpo.sampling"):
        generate_table1_answers(**kw, out=str(out))
    assert f"resuming, {len(done)} of {len(PROMPTS)} answers already done" in caplog.text
    assert "discarding" not in caplog.text
    generate_table1_answers(**kw, out=str(tmp_path / "fresh.jsonl"))
    assert out.read_text() == (tmp_path / "fresh.jsonl").read_text()  # greedy: resumed == uninterrupted


def test_changed_prompt_text_drops_only_that_answer(tiny_model_dir, tmp_path, caplog):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    out = tmp_path / "a.jsonl"
    prompts = [{"id": p["id"], "messages": p["messages"]} for p in PROMPTS[:4]]
    full = sampling.generate_answers(model, tok, prompts, out, max_new_tokens=5, batch_size=2)
    partial = out.with_name(out.name + ".partial")
    identity = sampling.generation_identity(model, tok, max_new_tokens=5, temperature=0.0, top_p=1.0, top_k=0,
                                            seed=0, num_return_sequences=1, model_name="")
    partial.write_text("".join(json.dumps(r) + "\n" for r in [{"identity": identity}, *full]))
    edited = [*prompts[:3], {"id": prompts[3]["id"], "messages": [{"role": "user", "content": "something else"}]}]
    with caplog.at_level(logging.INFO, logger="rpo.sampling"):
        rows = sampling.generate_answers(model, tok, edited, out, max_new_tokens=5, batch_size=2)
    assert "discarding 1 answers whose prompt changed" in caplog.text
    assert "resuming, 3 of 4" in caplog.text
    assert rows[:3] == full[:3] and rows[3]["messages"] == edited[3]["messages"]


def test_model_fingerprint_follows_the_weights(tiny_model_dir):
    import torch
    model = load_model(tiny_model_dir).eval()
    before = sampling.model_fingerprint(model)
    assert sampling.model_fingerprint(load_model(tiny_model_dir).eval()) == before  # same files, same hash
    assert sampling.model_fingerprint(load_model(tiny_model_dir, dtype="bfloat16").eval()) != before
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3  # one weight of one tensor
    assert sampling.model_fingerprint(model) != before


# --------------------------------------------------------------------------------------- MT-Bench

@pytest.mark.slow  # a generation killed and rerun twice over (default run: < 10 min)
def test_mtbench_turn_files_of_another_model_are_not_reused(tiny_model_dir, other_model_dir, tmp_path):
    """A two-turn run killed during turn 2 leaves its finished turn-1 answers in `<out>.work/`; a re-run
    with another model under the same name and settings (a retrained policy) must not build on them."""
    out = tmp_path / "model_answer" / "dpo.jsonl"
    args = {"model_name": "dpo", "ref_dir": str(tiny_model_dir), "policy_dir": None, "out": str(out),
            "n_questions": 40, "max_new_tokens": 32, "batch_size": 1, "seed": 0}
    work = out.with_name(out.name + ".work")
    kill_when("generate-mtbench", args,
              lambda: any(_answer_lines(p) for p in work.glob("turn2_*.partial")) if work.is_dir() else False)
    assert list(work.glob("turn1_*.jsonl"))  # finished turn-1 groups, the files a re-run may reuse
    generate_mtbench(**{**args, "ref_dir": str(other_model_dir)})
    fresh = tmp_path / "fresh" / "dpo.jsonl"
    generate_mtbench(**{**args, "ref_dir": str(other_model_dir), "out": str(fresh)})
    turns = [[r["choices"] for r in map(json.loads, f.read_text().splitlines())] for f in (out, fresh)]
    assert turns[0] == turns[1] and not work.exists()


# ------------------------------------------------------------------------------- synthetic sampling



def test_synthetic_samples_of_a_killed_run_with_other_settings_are_discarded(tiny_model_dir, tmp_path):
    """Kill `python -m rpo make-data` while it samples responses into samples.jsonl.partial, change
    data.synthetic.max_new_tokens, re-run: every sampled response obeys the new limit."""
    from rpo.data import build_synthetic
    out = tmp_path / "data"
    args = {"data_cfg": SYNTHETIC, "base_dir": str(tiny_model_dir), "seed": 0,
            **{k: str(out / f"{k}.jsonl") for k in ("train", "test", "prompts", "samples")},
            "summary": str(out / "summary.json")}
    partial = out / "samples.jsonl.partial"
    proc_args = [sys.executable, "-m", "rpo", "make-data", "--threads", "1", "--args", json.dumps(args)]
    proc = subprocess.Popen(proc_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while len(_answer_lines(partial)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert max(n for r in _answer_lines(partial) for n in r["n_tokens"]) > 6
    cfg = {**SYNTHETIC, "synthetic": {**SYNTHETIC["synthetic"], "max_new_tokens": 6}}
    # The re-run's sampling step (make_data's first half; a random tiny model's responses all tie, so
    # make_data itself would stop later for want of pairs).
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    build_synthetic(model, tok, cfg, 0, out / "samples.jsonl")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 68 and all(n <= 6 for r in samples for n in r["n_tokens"])
