"""Stage entry points that tie data sources to files under results/ (called by `python -m rpo make-data`)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from rpo import data

log = logging.getLogger(__name__)


def make_data(*, data_cfg: dict, base_dir: str, out_dir: str, seed: int) -> dict:
    """Materialise the preference data: train.jsonl, test.jsonl, prompts_test.jsonl, summary.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data_cfg["source"] == "synthetic:verifiable":
        from rpo.models import load_model, load_tokenizer
        tok = load_tokenizer(base_dir)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(base_dir, device=device).eval()
        # samples.jsonl is the generation cache: an interrupted run resumes its sampling.
        splits, summary = data.build_synthetic(model, tok, data_cfg, seed, out / "samples.jsonl")
        test_prompts = splits.pop("test_prompts")
    else:
        splits, summary = data.load_source_splits(data_cfg)
        test_prompts = data.prompts_of(splits["test"])
    for split in ("train", "test"):
        if not splits[split]:
            raise data.DataError(f"data source {data_cfg['source']!r}: the {split} split has no pairs")
    data.write_jsonl(splits["train"], out / "train.jsonl")
    data.write_jsonl(splits["test"], out / "test.jsonl")
    data.write_jsonl(test_prompts, out / "prompts_test.jsonl")
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "summary.json")
    log.info("data summary: %s", json.dumps(summary, sort_keys=True))
    return summary
