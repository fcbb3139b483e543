"""A Hugging Face hub cache written by hand (HF_HUB_CACHE layout), so that the hub-loading code of the paper
configs runs under HF_HUB_OFFLINE=1: <cache>/<kind>s--<owner>--<name>/{refs/main, snapshots/<commit>/...}."""
from __future__ import annotations

import shutil
from pathlib import Path

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(cache, kind: str, repo_id: str):
    root = Path(cache) / f"{kind}s--{repo_id.replace('/', '--')}"
    snap = root / "snapshots" / HUB_COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(HUB_COMMIT)
    return snap


def write_hub_model(cache, repo_id: str, model_dir):
    snap = hub_repo(cache, "model", repo_id)
    shutil.copytree(model_dir, snap, dirs_exist_ok=True)
    return snap


def write_hub_dataset(cache, repo_id: str, splits: dict[str, list[dict]]):
    """Parquet files named as the hub names them (data/<split>-00000-of-00001.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    snap = hub_repo(cache, "dataset", repo_id)
    (snap / "data").mkdir(exist_ok=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), snap / "data" / f"{split}-00000-of-00001.parquet")
    return snap


def ultrafeedback_rows(pairs: list[dict]) -> list[dict]:
    """Normalised pairs in HuggingFaceH4/ultrafeedback_binarized's layout: prompt (str), prompt_id, and
    chosen / rejected as whole conversations."""
    return [{"prompt": p["prompt"][-1]["content"], "prompt_id": f"uf-{p['id']}",
             "chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"],
             "score_chosen": 8.0, "score_rejected": 3.0} for p in pairs]
