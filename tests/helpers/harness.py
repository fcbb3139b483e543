"""The offline IFEval task of the lm-evaluation-harness stage on a few held-out IFEval prompts (tests/test_harness.py,
and the backends' harness runs)."""
from __future__ import annotations

import json
from pathlib import Path

from helpers.data import write_jsonl

from eval import harness
from rpo import verifiable

# Held-out IFEval keys: 1001 and 1162 ask only for no commas, 1019 only for lowercase, 1174 for a number of
# sentences (a punkt_tab type: excluded and counted), 2245 for no commas again.
HELDOUT = ["1001", "1019", "1162", "1174", "2245"]
TRAIN_KEYS = ["1051", "1087"]


def ifeval_rows() -> dict[str, dict]:
    return {r["key"]: r for r in verifiable.load_prompts()}


def pair_row(row: dict) -> dict:
    """A preference pair on an IFEval prompt, as rpo.data writes them (the key in meta)."""
    return {"id": f"ifeval-{row['key']}", "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}],
            "meta": {"source": "synthetic:verifiable", "key": row["key"],
                     "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]}}


def write_split(tmp: Path) -> tuple[Path, Path]:
    rows = ifeval_rows()
    prompts = tmp / "prompts_test.jsonl"
    write_jsonl([{"id": f"ifeval-{k}", "messages": [{"role": "user", "content": rows[k]["prompt"]}],
                  "meta": {"key": k}} for k in HELDOUT], prompts)
    train = write_jsonl([pair_row(rows[k]) for k in TRAIN_KEYS], tmp / "train.jsonl")
    return prompts, Path(train)


def make_task(tmp: Path) -> dict:
    prompts, train = write_split(tmp)
    return harness.make_ifeval_task(prompts_test=str(prompts), train=str(train),
                                    out_yaml=str(tmp / "task/ifeval_heldout.yaml"),
                                    out_data=str(tmp / "task/ifeval_heldout.jsonl"),
                                    out_summary=str(tmp / "task/summary.json"))


def read_samples(out_dir: Path) -> list[dict]:
    (path,) = out_dir.glob("samples_ifeval_heldout_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]
