"""A checkpoint resumes only the run it belongs to: after an interruption, a change of an upstream input
(the reference model, the data, the base model) discards it with a log line, and the re-run equals a
clean run on the new input. Also: a checkpoint cut mid-write is never loaded.

Run: pytest tests/test_checkpoints.py -q      (about half a minute on 2 CPU cores)

The interruption is an exception raised before an optimizer step (the checkpoint of the step before is
on disk, as after a kill -9; tests/test_distributed.py kills real processes with SIGKILL).
"""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from helpers.data import run_paths, tiny_pairs, write_jsonl
from helpers.models import build_tiny_model
from safetensors.torch import load_file

from rpo import train
from helpers.training import TRAIN_CFG as CFG

CFG = {**CFG, "epochs": 4, "global_batch_size": 4, "micro_batch_size": 2, "checkpoint_every": 2}
METHOD = {"name": "rpo", "loss": "rpo", "beta": 0.5, "eta": 0.5}


class Interrupt(Exception):
    pass


def interrupt_at(k):
    def hook(step, model):
        if step == k:
            raise Interrupt
    return hook


def sft(base, pairs, out, ckpt, cfg=CFG, hook=None):
    return train.train_sft(base_dir=base, pairs_path=pairs, **run_paths(out), ckpt_dir=ckpt, cfg=cfg,
                           grad_hook=hook)


def prefs(ref, pairs, cache, out, ckpt, hook=None):
    return train.train_preference(ref_dir=ref, pairs_path=pairs, reference_cache=cache, **run_paths(out),
                                  ckpt_dir=ckpt, cfg=CFG, method=METHOD, grad_hook=hook)


def same_weights(a, b):
    wa = load_file(next(a.glob("*.safetensors")))
    wb = load_file(next(b.glob("*.safetensors")))
    assert wa.keys() == wb.keys()
    return all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture()
def base(tmp_path, tiny_model_dir):
    return shutil.copytree(tiny_model_dir, tmp_path / "base")


def test_changed_data_discards_the_sft_checkpoint(base, tmp_path, caplog):
    pairs = write_jsonl(tiny_pairs(8), tmp_path / "train.jsonl")
    with pytest.raises(Interrupt):
        sft(base, pairs, tmp_path / "sft", tmp_path / "ck", hook=interrupt_at(5))
    assert (tmp_path / "ck" / "step-000004").is_dir()
    rows = tiny_pairs(8)
    rows[0]["chosen"][0]["content"] = "an edited chosen answer"
    write_jsonl(rows, pairs)  # the data file edited in place
    with caplog.at_level(logging.WARNING, logger="rpo.checkpoint"):
        summary = sft(base, pairs, tmp_path / "sft", tmp_path / "ck")
    assert summary["resumed_from_step"] == 0
    assert "belong to another run (changed: data)" in caplog.text
    sft(base, pairs, tmp_path / "clean", tmp_path / "ck-clean")
    assert same_weights(tmp_path / "sft" / "model", tmp_path / "clean" / "model")


def test_changed_base_model_discards_the_sft_checkpoint(base, tmp_path, caplog):
    pairs = write_jsonl(tiny_pairs(8), tmp_path / "train.jsonl")
    with pytest.raises(Interrupt):
        sft(base, pairs, tmp_path / "sft", tmp_path / "ck", hook=interrupt_at(5))
    shutil.rmtree(base)
    build_tiny_model(base, seed=1)  # another base model at the same path (same tokenizer)
    with caplog.at_level(logging.WARNING, logger="rpo.checkpoint"):
        summary = sft(base, pairs, tmp_path / "sft", tmp_path / "ck")
    assert summary["resumed_from_step"] == 0
    assert "changed: base_model" in caplog.text
    sft(base, pairs, tmp_path / "clean", tmp_path / "ck-clean")
    assert same_weights(tmp_path / "sft" / "model", tmp_path / "clean" / "model")


def test_changed_reference_model_discards_the_preference_checkpoint(base, tmp_path, caplog):
    pairs = write_jsonl(tiny_pairs(8), tmp_path / "train.jsonl")
    ref, cache = tmp_path / "ref", tmp_path / "ref.pt"

    def make_reference(lr):  # SFT with this learning rate, then its cached log-probs (as the DAG does)
        sft(base, pairs, ref, tmp_path / f"ck-sft-{lr}", cfg={**CFG, "learning_rate": lr, "epochs": 1})
        train.reference_logps(ref / "model", pairs, cache, max_length=CFG["max_length"],
                              max_prompt_length=CFG["max_prompt_length"], batch_size=4)

    make_reference(1e-2)
    with pytest.raises(Interrupt):
        prefs(ref / "model", pairs, cache, tmp_path / "rpo", tmp_path / "ck", hook=interrupt_at(5))
    assert (tmp_path / "ck" / "step-000004").is_dir()
    make_reference(3e-2)  # the SFT learning rate changed, so the reference model did
    with caplog.at_level(logging.WARNING, logger="rpo.checkpoint"):
        summary = prefs(ref / "model", pairs, cache, tmp_path / "rpo", tmp_path / "ck")
    assert summary["resumed_from_step"] == 0
    assert "changed: reference_logps, reference_model" in caplog.text
    prefs(ref / "model", pairs, cache, tmp_path / "clean", tmp_path / "ck-clean")
    assert same_weights(tmp_path / "rpo" / "model", tmp_path / "clean" / "model")


def test_unchanged_run_resumes_and_a_cut_checkpoint_is_never_loaded(base, tmp_path, caplog):
    pairs = write_jsonl(tiny_pairs(8), tmp_path / "train.jsonl")
    with pytest.raises(Interrupt):
        sft(base, pairs, tmp_path / "sft", tmp_path / "ck", hook=interrupt_at(5))
    # a kill while step 6's checkpoint was being written leaves its .tmp directory
    (tmp_path / "ck" / "step-000006.tmp").mkdir()
    (tmp_path / "ck" / "step-000006.tmp" / "__0_0.distcp").write_bytes(b"cut")
    with caplog.at_level(logging.INFO, logger="rpo.checkpoint"):
        summary = sft(base, pairs, tmp_path / "sft", tmp_path / "ck")
    assert summary["resumed_from_step"] == 4
    assert "a checkpoint cut before it was complete" in caplog.text
    sft(base, pairs, tmp_path / "clean", tmp_path / "ck-clean")
    assert same_weights(tmp_path / "sft" / "model", tmp_path / "clean" / "model")  # bitwise
