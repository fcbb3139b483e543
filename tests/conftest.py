"""Shared fixtures and the two layers of the suite. The helpers themselves are in tests/helpers/ (models.py,
data.py, hub.py, training.py, workflow.py, ...); no test module imports another.

Layers: tests that start Snakemake carry the `workflow` marker (pyproject.toml), so `pytest -m "not workflow"` is
the fast unit run. Slow tests (`slow`, over a minute on 2 cores) run only when the -m expression names them
(`pytest -m slow`, `pytest -m "slow or not slow"`): deselected here rather than by an -m in addopts, which a
command line's own -m would replace.
"""
from __future__ import annotations

import pytest
from helpers.models import build_tiny_model


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.option.markexpr or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
