"""What the preflight (eval/preflight.py) asks of Arena-Hard before a run's first job."""
from __future__ import annotations

from eval.arenahard import data

RULES = ("generate_arenahard", "judge_arenahard", "score_arenahard")


def settings_problems(bench: dict, needs) -> list[str]:
    """`bench`: benchmarks.arenahard; `needs(*rules)`: whether a job of any of these rules will run."""
    if bench["enabled"] and bench["version"] == "v2.0" and not bench["category"] and needs(*RULES):
        return ["benchmarks.arenahard.category: Arena-Hard v2.0 scores each category against its own baseline "
                "(hard_prompt: o3-mini, creative_writing: gemini-2.0-flash), so it needs one; set category: "
                "hard_prompt, or version: v0.1 (the paper configs' version)"]
    return []


def data_problems(bench: dict, needs, *, online: bool, hub_offline: bool) -> list[str]:
    """Its questions and baseline answers (v0.1 from the hub: fetched into the hub cache now, on the submitting
    host, unless `hub_offline`, so that no compute node needs the network for them)."""
    if not (bench["enabled"] and needs(*RULES)):
        return []
    try:
        data.prefetch(bench["version"], fetch=not hub_offline)
    except FileNotFoundError as e:
        return [str(e) if str(e).startswith("benchmarks.arenahard") else f"benchmarks.arenahard: {e}"]
    return []
