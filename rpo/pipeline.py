"""Stage entry points that tie data sources to files under results/ (called by `python -m rpo make-data`)."""
from __future__ import annotations

import json
import logging

import torch

from rpo import data, io

log = logging.getLogger(__name__)


def make_data(*, data_cfg: dict, base_dir: str, train: str, test: str, prompts: str, summary: str,
              seed: int, samples: str | None = None, check_gold_meta: bool = False,
              humaneval_decontamination: str = "disabled", require_dataset_prompt: bool = False,
              backend: str = "hf", gguf: str | None = None) -> dict:
    """Materialise the preference data into the files the rule names: `train`, `test` (pairs), `prompts`
    (Table 1's held-out prompts), `summary` (counts; the hub revision a hub source resolved to) and, for
    the synthetic source, `samples` (every sampled response, the resumable generation cache).

    check_gold_meta=True (Table 1 judged by the gold scorer) requires every test row of a hub/file source
    to carry the verifiable instructions the gold scorer needs: checked here, not after training.
    humaneval_decontamination (data.humaneval_decontamination: if_available or required) removes the train and
    test pairs whose chosen response holds a HumanEval docstring or solution (rpo.decontamination); Table 1's
    prompts are taken before it, as the authors' scripts read the raw test split. The summary records what was
    removed, or that it was skipped and why. require_dataset_prompt (table1.prompt dataset_prompt) requires every
    held-out prompt to carry the dataset's prompt string (meta.dataset_prompt): checked here, not after training.
    backend "llamacpp" samples the synthetic source's responses on llama.cpp from `gguf`, the base model's GGUF
    (rpo.llamacpp; checked against `base_dir`'s files); "hf" with the transformers model.
    """
    if data_cfg["source"] == "synthetic:verifiable":
        if samples is None:
            raise ValueError("make_data: the synthetic source needs the `samples` path")
        from rpo.models import load_model, load_tokenizer
        tok = load_tokenizer(base_dir)
        if backend == "llamacpp":
            from rpo.llamacpp import engine_for
            model = engine_for(ref_dir=base_dir, policy_dir=None, gguf={"model": gguf})
        elif backend == "hf":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = load_model(base_dir, device=device).eval()
        else:
            raise ValueError(f"make_data: sampling backend {backend!r}; expected 'hf' or 'llamacpp'")
        # samples is the generation cache: an interrupted run resumes its sampling (same model and settings).
        splits, stats = data.build_synthetic(model, tok, data_cfg, seed, samples)
        test_prompts = splits.pop("test_prompts")
    else:
        splits, stats = data.load_source_splits(data_cfg, gold_test=check_gold_meta)
        test_prompts = data.prompts_of(splits["test"])
    if require_dataset_prompt:
        missing = [p["id"] for p in test_prompts if not isinstance((p.get("meta") or {}).get("dataset_prompt"), str)]
        if missing:
            raise data.DataError(f"data source {data_cfg['source']!r}: table1.prompt is dataset_prompt, but {len(missing)} "
                                 f"test rows have no dataset prompt string (meta.dataset_prompt, from a string "
                                 f"'{(data_cfg.get('columns') or {}).get('prompt', 'prompt')}' column beside whole "
                                 f"conversations), e.g. ids {missing[:3]}")
    if humaneval_decontamination != "disabled":
        stats["humaneval_decontamination"] = _decontaminate(splits, base_dir, humaneval_decontamination)
    for split in ("train", "test"):
        if not splits[split]:
            raise data.DataError(f"data source {data_cfg['source']!r}: the {split} split has no pairs")
    io.write_jsonl(splits["train"], train)
    io.write_jsonl(splits["test"], test)
    io.write_jsonl(test_prompts, prompts)
    io.write_json(summary, stats, sort_keys=True)
    log.info("data summary: %s", json.dumps(stats, sort_keys=True))
    return stats


def _decontaminate(splits: dict, base_dir: str, mode: str) -> dict:
    """Remove the HumanEval-contaminated pairs of both splits in place; what happened, for the summary."""
    from rpo import chat_format, decontamination
    from rpo.models import load_tokenizer
    strings, why = decontamination.humaneval_strings(mode)
    if strings is None:
        log.warning("HumanEval decontamination skipped (data.humaneval_decontamination: if_available): %s", why)
        return {"mode": mode, "applied": False, "reason": why}
    tok = load_tokenizer(base_dir)  # the chosen response as the handbook renders it: the model's template
    out = {"mode": mode, "applied": True, "source": decontamination.HUMANEVAL_SOURCE,
           "strings": {k: len(v) for k, v in strings.items()}}
    for split in ("train", "test"):
        splits[split], removed = decontamination.decontaminate(
            splits[split], strings, lambda r: chat_format.render(tok, r["chosen"]))
        out[f"{split}_removed"], out[f"{split}_removed_ids"] = len(removed), removed
        log.info("HumanEval decontamination: %d %s pairs removed", len(removed), split)
    return out
