"""`snakemake --lint` on the workflow with the default config: no lint but one.

The one left is "Specify a conda environment or container for each rule": every rule runs `python -m rpo`
or `python -m eval` of this package, so the environment of every rule is the package's own install
(`pip install -e .`, or environment.yml); a per-rule conda environment would have to install this
package from its checkout, which Snakemake's conda integration cannot do.

Run: pytest tests/test_lint.py -q     (about 10 s)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflow  # every test here starts Snakemake

REPO = Path(__file__).resolve().parents[1]
ALLOWED = "Specify a conda environment or container for each rule."


def test_snakemake_lint_reports_only_the_conda_recommendation(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--lint", "-n", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "config.yaml")]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert "Lints for" in out, out[-3000:]  # the linter ran (it always names the conda lint)
    titles = re.findall(r"^    \* (.+?):?$", out, re.M)
    assert set(titles) == {ALLOWED}, sorted(set(titles))
