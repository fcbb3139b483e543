"""Preference pairs, jsonl files and the output paths of a training stage, as the tests write them."""
from __future__ import annotations

import json
from pathlib import Path


def pair(i: int, *, chosen: str, rejected: str, prompt: str | None = None, meta: dict | None = None) -> dict:
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": prompt or f"write a short answer {i}"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "meta": meta or {}}


LOWERCASE_META = {"source": "synthetic:verifiable", "instruction_id_list": ["change_case:english_lowercase"],
                  "kwargs": [{}]}


def tiny_pairs(n: int = 8) -> list[dict]:
    """Pairs whose chosen answer follows 'lowercase only' and whose rejected one does not."""
    return [pair(i, chosen=f"hello world this is answer {i}", rejected=f"HELLO World {i}",
                 prompt=f"write a short answer in lowercase letters only {i}", meta=LOWERCASE_META)
            for i in range(n)]


def run_paths(run_dir) -> dict:
    """The output paths a training stage is told (as its Snakemake rule tells it): model, metrics, summary."""
    d = Path(run_dir)
    return {"out_dir": d / "model", "metrics_path": d / "metrics.jsonl", "summary_path": d / "train_summary.json"}


def write_jsonl(rows, path):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def lowercase_prompts(n):
    """n held-out prompts that ask for lowercase (LOWERCASE_META's instruction)."""
    return [{"id": f"q{i}", "messages": [{"role": "user", "content": f"write a short answer in lowercase {i}"}],
             "meta": LOWERCASE_META} for i in range(n)]


# A small synthetic:verifiable data config (its samples drawn one prompt at a time)
SYNTHETIC = {"source": "synthetic:verifiable", "synthetic": {
    "n_train_prompts": 60, "n_test_prompts": 8, "responses_per_prompt": 2, "max_new_tokens": 40,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "batch_size": 1, "label_noise": 0.0, "prompts_file": None,
    "threads": 1}}
