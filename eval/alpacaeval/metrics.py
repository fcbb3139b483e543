"""AlpacaEval 2.0's metrics on alpaca_eval annotations: the win rate, its interval, the length-controlled win rate.

`win_rate` is alpaca_eval's `metrics.get_winrate` (value and standard error in percent;
preferences in [1, 2], 1.5 a draw, missing ones dropped and counted); its interval is a seeded percentile
bootstrap over the instructions' preferences (benchmarks.bootstrap), which stays inside [0, 100] (the
normal interval value +- 1.96 SE does not at small n; the SE is kept in the score's log line).
`lc_win_rate` is alpaca_eval's length-controlled GLM (`get_length_controlled_winrate`). Called as we call
it (no `baseline`, no saved weights) it needs one precomputed file, `df_gamed.csv` of the HF dataset
tatsu-lab/alpaca_eval (its `instruction_difficulty.csv` only serves `predict_winrate` against another
baseline). `benchmarks.alpacaeval.lc_win_rate: required` fetches it once through the hub cache
(`check_lc_available` at the run's start-up, so a run that cannot produce LC stops before any job);
`if_available` uses a copy in `precomputed_dir` or the hub cache and otherwise reports NaN with the
reason: never another number in its place. Note that the GLM regularises towards "gamed" baselines that
GPT-4-turbo annotated, so an LC value from another judge is only approximately on the official scale.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from eval.alpacaeval.data import REFERENCE_GENERATOR, load_eval_set
from eval.results_table import make_row

HUB_REPO = "tatsu-lab/alpaca_eval"
# what get_length_controlled_winrate(baseline=None, save_weights_dir=None) downloads (glm_winrate._get_featurized_data)
GLM_FILES = ("df_gamed.csv",)


def _records(annotations) -> list[dict]:
    """A list of annotation dicts from a list or a DataFrame (alpaca_eval accepts both)."""
    if hasattr(annotations, "to_dict") and hasattr(annotations, "columns"):
        return annotations.to_dict(orient="records")
    return [dict(a) for a in annotations]


def _preferences(annotations) -> list[float]:
    rows = list(annotations)
    if not rows:
        raise ValueError("no annotations")
    prefs = []
    for i, r in enumerate(rows):
        if "preference" not in r:
            raise ValueError(f"annotation {i} has no 'preference'")
        p = r["preference"]
        p = math.nan if p is None else p
        if isinstance(p, bool) or not isinstance(p, (int, float)) and not hasattr(p, "item"):
            raise ValueError(f"annotation {i}: preference {p!r} is not a number")
        p = float(p)
        # 0 is alpaca_eval's old encoding of a draw; NaN a missing annotation.
        if not (math.isnan(p) or p == 0.0 or 1.0 <= p <= 2.0):
            raise ValueError(f"annotation {i}: preference {p} outside [1, 2] (1 = reference, 2 = model, 1.5 = draw)")
        prefs.append(p)
    return prefs


def _check_one_pair(annotations: Sequence[dict]) -> None:
    for col in ("generator_1", "generator_2"):
        vals = {r[col] for r in annotations if col in r}
        if len(vals) > 1:
            raise ValueError(f"annotations mix several {col} values {sorted(map(str, vals))}")


def _bootstrap_interval(values: Sequence[float], *, n_boot: int, seed: int, ci: float) -> tuple[float, float]:
    """Seeded percentile bootstrap of the mean of `values` (each in [0, 100]), so the bounds stay in [0, 100]."""
    if n_boot < 1 or not 0.0 < ci < 1.0:
        raise ValueError(f"bootstrap: need n >= 1 and 0 < ci < 1, got n={n_boot}, ci={ci}")
    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    boot = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    lo, hi = np.quantile(boot, [(1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0])
    return float(lo), float(hi)


def win_rate(annotations, *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """AlpacaEval win rate of the model (output_2) over the reference, through alpaca_eval's metric.

    Returns {"value", "standard_error" (percent, alpaca_eval's), "ci_low", "ci_high" (percent, the seeded
    percentile bootstrap over instructions), "n" (annotations counted), "n_missing", "n_wins",
    "n_wins_base", "n_draws", "discrete_win_rate"}.
    """
    from alpaca_eval.metrics import get_winrate
    annotations = _records(annotations)
    prefs = _preferences(annotations)
    _check_one_pair(annotations)
    n_missing = sum(math.isnan(p) for p in prefs)
    if n_missing == len(prefs):
        return {"value": math.nan, "standard_error": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0,
                "n_missing": n_missing, "n_wins": 0, "n_wins_base": 0, "n_draws": 0, "discrete_win_rate": math.nan}
    m = get_winrate([{"preference": p} for p in prefs])
    # alpaca_eval's per-instruction value: (preference - 1) in [0, 1], the old draw encoding 0 read as 1.5
    values = [100.0 * ((1.5 if p == 0.0 else p) - 1.0) for p in prefs if not math.isnan(p)]
    lo, hi = _bootstrap_interval(values, n_boot=n_boot, seed=seed, ci=ci)
    return {"value": float(m["win_rate"]), "standard_error": float(m["standard_error"]), "ci_low": lo,
            "ci_high": hi, "n": int(m["n_total"]), "n_missing": n_missing, "n_wins": int(m["n_wins"]),
            "n_wins_base": int(m["n_wins_base"]), "n_draws": int(m["n_draws"]),
            "discrete_win_rate": float(m["discrete_win_rate"])}


def locate_glm_files(precomputed_dir=None, *, fetch: bool = False) -> tuple[dict[str, str] | None, str]:
    """({filename: local path} or None, reason) for the GLM's precomputed files.

    `precomputed_dir` when given; otherwise the Hugging Face hub cache, and with `fetch` a download into
    that cache (huggingface_hub; with HF_HUB_OFFLINE=1 only the cache is read).
    """
    if precomputed_dir is not None:
        d = Path(precomputed_dir)
        missing = [f for f in GLM_FILES if not (d / f).is_file()]
        if missing:
            return None, f"{d} lacks {', '.join(missing)}"
        return {f: str(d / f) for f in GLM_FILES}, ""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError as e:
        return None, f"cannot look in the Hugging Face cache ({e})"
    found, missing = {}, []
    for f in GLM_FILES:
        p = try_to_load_from_cache(repo_id=HUB_REPO, filename=f, repo_type="dataset")
        if not (isinstance(p, str) and Path(p).is_file()) and fetch:
            try:
                p = hf_hub_download(repo_id=HUB_REPO, filename=f, repo_type="dataset")
            except Exception as e:  # offline, hub down, no such file: say why
                missing.append(f"{f} ({type(e).__name__}: {str(e)[:200]})")
                continue
        if isinstance(p, str) and Path(p).is_file():
            found[f] = p
        else:
            missing.append(f)
    if missing:
        how = "could not be fetched" if fetch else "is not in the local Hugging Face cache (not fetched: lc_win_rate is if_available)"
        return None, (f"alpaca_eval's length-controlled GLM needs {', '.join(missing)} from the HF dataset "
                      f"{HUB_REPO}, which {how}; set benchmarks.alpacaeval.precomputed_dir to a directory "
                      "holding df_gamed.csv, or fill the hub cache "
                      f"(huggingface-cli download {HUB_REPO} df_gamed.csv --repo-type dataset)")
    return found, ""


def check_lc_available(cfg: dict) -> None:
    """Start-up check of a run (workflow/rules/common.smk): benchmarks.alpacaeval with lc_win_rate: required
    must be able to compute LC, so a run that cannot says so before any job, not after hours."""
    if not cfg.get("enabled", True) or cfg.get("lc_win_rate") != "required":
        return
    files, reason = locate_glm_files(cfg.get("precomputed_dir"), fetch=True)
    if files is None:
        raise ValueError(f"config benchmarks.alpacaeval.lc_win_rate is 'required' but the LC win rate cannot be "
                         f"computed: {reason}. Or set lc_win_rate: if_available (the LC cell then stays empty "
                         "with this reason)")


@contextlib.contextmanager
def _glm_reads_local(files: Mapping[str, str]):
    """Make alpaca_eval's GLM read `files` instead of calling the hub (restored afterwards)."""
    from alpaca_eval.metrics import glm_winrate

    def local(*, filename, **_):
        if filename not in files:
            raise FileNotFoundError(f"alpaca_eval GLM asked for {filename!r}, which is not available locally")
        return files[filename]

    saved = glm_winrate.hf_hub_download
    glm_winrate.hf_hub_download = local
    try:
        yield
    finally:
        glm_winrate.hf_hub_download = saved


def lc_win_rate(annotations, *, eval_set: Sequence[dict] | None = None, precomputed_dir=None,
                glm_name: str = "length_controlled_v1", fetch: bool = False) -> dict:
    """Length-controlled win rate through alpaca_eval's GLM, or NaN with the reason it is unavailable.

    The GLM indexes instructions by their position in the eval set (default: the 805 of AlpacaEval 2.0),
    so every eval-set instruction must be annotated exactly once. Returns {"value", "standard_error",
    "n", "win_rate"} or {"value": nan, "standard_error": nan, "unavailable": reason}.
    """
    import pandas as pd
    files, reason = locate_glm_files(precomputed_dir, fetch=fetch)
    if files is None:
        return {"value": math.nan, "standard_error": math.nan, "unavailable": reason}
    annotations = _records(annotations)
    _preferences(annotations)
    _check_one_pair(annotations)
    for col in ("instruction", "output_1", "output_2", "generator_1", "generator_2"):
        if any(col not in r for r in annotations):
            raise ValueError(f"the length-controlled GLM needs '{col}' in every annotation (alpaca_eval's format)")
    eval_set = load_eval_set() if eval_set is None else list(eval_set)
    pos = {r["instruction"]: i for i, r in enumerate(eval_set)}
    seen = {}
    for r in annotations:
        if r["instruction"] not in pos:
            raise ValueError(f"annotated instruction not in the eval set: {r['instruction'][:80]!r}")
        seen[r["instruction"]] = seen.get(r["instruction"], 0) + 1
    dup = [s for s, c in seen.items() if c > 1]
    if dup:
        raise ValueError(f"the GLM needs each of the {len(pos)} eval-set instructions annotated once: "
                         f"{len(dup)} duplicated")
    if len(seen) != len(pos):  # a subset (benchmarks.alpacaeval.n_questions): LC is not defined on it
        return {"value": math.nan, "standard_error": math.nan,
                "unavailable": f"the GLM needs all {len(pos)} instructions, {len(seen)} were answered"}
    df = pd.DataFrame(annotations)
    df.index = [pos[s] for s in df["instruction"]]  # alpaca_eval reads the eval-set position from the index
    df = df.sort_index()
    df["preference"] = [math.nan if p is None else float(p) for p in df["preference"]]
    from alpaca_eval.metrics import get_length_controlled_winrate
    with _glm_reads_local(files):
        m = get_length_controlled_winrate(df, glm_name=glm_name, save_weights_dir=None,
                                          is_add_glm_preference_inplace=False)
    return {"value": float(m["length_controlled_winrate"]), "standard_error": float(m["lc_standard_error"]),
            "n": int(m["n_total"]), "win_rate": float(m["win_rate"])}


def table_rows(model: str, wr: dict, lc: dict | None, *, judge: str,
               baseline: str = REFERENCE_GENERATOR) -> list[dict]:
    """eval.results_table rows (alpacaeval_wr with its bootstrap interval, alpacaeval_lc); LC is NaN when unavailable."""
    rows = [make_row(model_a=model, model_b=baseline, metric="alpacaeval_wr", value=wr["value"], n=wr["n"],
                     ci_low=wr["ci_low"], ci_high=wr["ci_high"], judge=judge,
                     note=f"0/{wr['n_missing']} preferences parsable" if math.isnan(wr["value"]) else None)]
    if lc is not None:
        rows.append(make_row(model_a=model, model_b=baseline, metric="alpacaeval_lc", value=lc["value"],
                             n=lc.get("n", 0), judge=judge, note=_lc_note(lc)))
    return rows


def _lc_note(lc: dict) -> str | None:
    """The LC cell's short reason (the log has the whole): the GLM's file missing, or too few instructions."""
    why = lc.get("unavailable")
    if not why:
        return None
    if "df_gamed.csv" in why:
        return "needs alpaca_eval's df_gamed.csv"
    return why.replace("the GLM ", "")
