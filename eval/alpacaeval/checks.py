"""What the preflight (eval/preflight.py) asks of AlpacaEval 2.0 before a run's first job."""
from __future__ import annotations

from eval.alpacaeval.metrics import locate_glm_files


def settings_problems(bench: dict, needs) -> list[str]:
    """`bench`: benchmarks.alpacaeval; `needs(*rules)`: whether a job of any of these rules will run."""
    if bench["enabled"] and bench["lc_win_rate"] == "required" and bench["n_questions"] is not None and needs(
            "generate_alpacaeval", "score_alpacaeval"):
        return [f"benchmarks.alpacaeval: lc_win_rate 'required' needs all 805 instructions (alpaca_eval's GLM "
                f"indexes them by position), but n_questions is {bench['n_questions']}; set n_questions: null, "
                "or lc_win_rate: if_available"]
    return []


def data_problems(bench: dict, needs, *, online: bool, hub_offline: bool) -> list[str]:
    """The LC win rate's file df_gamed.csv when lc_win_rate is 'required' (fetched into the hub cache unless
    `hub_offline`)."""
    if not (bench["enabled"] and bench["lc_win_rate"] == "required" and needs("score_alpacaeval")):
        return []
    files, reason = locate_glm_files(bench["precomputed_dir"], fetch=not hub_offline)
    if files is None:
        return [f"benchmarks.alpacaeval.lc_win_rate is 'required' but the LC win rate cannot be computed: "
                f"{reason}. Or set lc_win_rate: if_available (the LC cell then stays empty with this reason)"]
    return []
