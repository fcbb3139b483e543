"""Training configs and runs the tests share: a tiny LoRA config (test_train's), and a DPO run on tiny pairs that
keeps snapshots (the overoptimization study's training)."""
from __future__ import annotations

from helpers.data import run_paths, tiny_pairs, write_jsonl

from rpo import train

# test_train's tiny LoRA config
TRAIN_CFG = {"finetuning": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": None,
                                            "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
             "learning_rate": 5e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "epochs": 6, "max_steps": None,
             "micro_batch_size": 4, "global_batch_size": 8, "max_length": 64, "max_prompt_length": 32,
             "weight_decay": 0.0, "max_grad_norm": 10.0, "precision": "float32", "checkpoint_every": 2,
             "seed": 0, "threads": 1}

# The study's runs: snapshots every 2 optimizer steps
SNAPSHOT_CFG = {"finetuning": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "top_layers": None,
                                               "target_modules": ["q_proj", "v_proj"]},
                "learning_rate": 5e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "epochs": 5, "max_steps": None,
                "micro_batch_size": 4, "global_batch_size": 8, "max_length": 64, "max_prompt_length": 32,
                "weight_decay": 0.0, "max_grad_norm": 10.0, "precision": "float32", "checkpoint_every": 2,
                "snapshot_every": 2, "seed": 0, "threads": 1}


def train_with_snapshots(tiny_model_dir, tmp_path, cfg=SNAPSHOT_CFG):
    pairs = write_jsonl(tiny_pairs(8), tmp_path / "train.jsonl")
    cache = tmp_path / "ref.pt"
    train.reference_logps(tiny_model_dir, pairs, cache, max_length=64, max_prompt_length=32, batch_size=4)
    summary = train.train_preference(ref_dir=tiny_model_dir, pairs_path=pairs, reference_cache=cache,
                                     **run_paths(tmp_path / "run"), ckpt_dir=tmp_path / "ckpt", cfg=cfg,
                                     method={"loss": "dpo", "beta": 0.5}, snapshots_path=tmp_path / "snaps")
    return summary, pairs
