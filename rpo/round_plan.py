"""The plan of the online rounds (issue 27): which runs have rounds, each round's settings, its prompt slice and
what its jobs need, from a validated config (workflow/rules/rounds.smk reads it; the schema's `$defs/rounds` holds
every default).

Two kinds of runs:
- methods of `methods` (and an enabled `method_zoo`) that carry `rounds`: trained from Table 1's Ref on the
  training prompts of `data`, answered and judged in Table 1 like any method (their last round's policy), and
  replicated per `seeds` as every method is (<method>-seed<s>);
- the online study's `online.methods`, once per `online.seeds` (online-<method>-seed<s>), from the base model
  (or Ref, online.reference) on IFEval prompts of their own, every round measured on held-out prompts.
"""
from __future__ import annotations

from rpo import losses
from rpo.config import hyperparameters
from rpo.losses import online as ol
from rpo.rounds import SELECTIONS

# keys of `rounds` that hold for every round; the others may be changed per round (rounds.per_round)
RUN_KEYS = ("n", "per_round", "reference", "extrapolation")
SELECTION_KIND = {"best_worst": "pairs", "tournament": "pairs", "top_k": "kept", "all": "groups"}
STUDY_PREFIX = "online-"


def online_methods(methods: dict) -> dict:
    """The methods of a `methods` mapping that have rounds."""
    return {name: m for name, m in methods.items() if m.get("rounds")}


def round_settings(method: dict, r: int) -> dict:
    """Round r's settings (1-based): the method's `rounds` without n and per_round, with per_round[r] on top
    (its `sampling` merged key by key)."""
    rounds = method["rounds"]
    if not 1 <= r <= rounds["n"]:
        raise ValueError(f"round {r}: the method has rounds 1..{rounds['n']}")
    base = {k: v for k, v in rounds.items() if k not in ("n", "per_round")}
    over = (rounds.get("per_round") or {}).get(str(r), {})
    out = {**base, **{k: v for k, v in over.items() if k != "sampling"}}
    out["sampling"] = {**base.get("sampling", {}), **over.get("sampling", {})}
    return out


def slice_start(method: dict, r: int) -> int:
    """Where round r's prompts start in the pool: after every earlier round's prompts (disjoint slices)."""
    return sum(round_settings(method, k)["prompts_per_round"] for k in range(1, r))


def round_method(name: str, method: dict, r: int) -> dict:
    """The method as round r's training sees it: its loss and hyperparameters, `rounds` = round r's settings
    (so n, and the other rounds' overrides, are not part of round r's parameters)."""
    return {"name": name, **{k: v for k, v in method.items() if k != "rounds"}, "rounds": round_settings(method, r)}


def check_rounds(method: dict, where: str) -> None:
    """A method with rounds is consistent: its loss trains on what its selection gives, and the settings its
    loss relies on hold in every round. Errors name `where` and the key."""
    loss = method["loss"]
    rounds = method["rounds"]
    if "sampling" in method:
        raise ValueError(f"{where}.sampling: RSO's rejection sampling draws one fixed set of pairs from Ref; a method "
                         "with rounds samples its own in every round (rounds.sampling)")
    want = ol.ONLINE_DATA.get(loss, "pairs")
    for r in range(1, rounds["n"] + 1):
        s = round_settings(method, r)
        at = f"{where}.rounds" + (f".per_round.{r}" if str(r) in (rounds.get("per_round") or {}) else "")
        if s["selection"] not in SELECTIONS:
            raise ValueError(f"{at}.selection: {s['selection']!r}, expected one of {list(SELECTIONS)}")
        got = SELECTION_KIND[s["selection"]]
        if got != want:
            fits = [k for k, v in SELECTION_KIND.items() if v == want]
            raise ValueError(f"{at}.selection: {s['selection']!r} gives {got}, but loss {loss!r} trains on {want} "
                             f"(selection {' or '.join(fits)})")
        k = s["samples_per_prompt"]
        if s["selection"] == "tournament" and k & (k - 1):
            raise ValueError(f"{at}.samples_per_prompt: {k}; the tournament needs a power of two (INPO: 8)")
        if s["selection"] == "top_k" and s["keep"] > k:
            raise ValueError(f"{at}.keep: {s['keep']} > samples_per_prompt {k}")
        if want == "groups":
            sm = s["sampling"]
            if (sm["temperature"], sm["top_p"], sm["top_k"]) != (1.0, 1.0, 0):
                raise ValueError(f"{at}.sampling: REINFORCE needs samples of the policy itself (temperature 1, "
                                 f"top_p 1, top_k 0), got {sm['temperature']}, {sm['top_p']}, {sm['top_k']}")
    if loss in ol.ONLINE_LOSSES and rounds["reference"] != "initial":
        raise ValueError(f"{where}.rounds.reference: {loss!r} has its own use of the previous policy; it needs "
                         "reference 'initial' (the previous-policy reference is iterative DPO's setting)")
    if rounds["extrapolation"] and (want != "pairs" or loss in ol.ONLINE_LOSSES or rounds["reference"] != "previous"):
        raise ValueError(f"{where}.rounds.extrapolation: APO's momentum extrapolates proximal steps of iterative "
                         "DPO-style pair losses against the previous policy (Algorithm 1): it needs a pair loss of "
                         "rpo.losses and rounds.reference 'previous'")


def check_no_rounds(method: dict, where: str) -> None:
    """An online loss needs a round's data: refused for a method without rounds."""
    if method["loss"] in ol.ONLINE_LOSSES and not method.get("rounds"):
        raise ValueError(f"{where}.loss: {method['loss']!r} trains on a round's own samples; give the method "
                         "`rounds` (docs/online.md)")


def check_methods(methods: dict, where: str) -> None:
    for name, m in methods.items():
        if m.get("rounds"):
            check_rounds(m, f"{where}.{name}")
        else:
            check_no_rounds(m, f"{where}.{name}")


def check_study(config: dict) -> None:
    online = config.get("online") or {}
    for name, m in (online.get("methods") or {}).items():
        where = f"online.methods.{name}"
        if not m.get("rounds"):
            raise ValueError(f"{where}: the online study's methods need `rounds`")
        losses.get_loss(m["loss"])
        losses.check_hyperparameters(m["loss"], hyperparameters(m), where=where)
        check_rounds(m, where)


def main_runs(config: dict, seeds: list[int]) -> dict[str, dict]:
    """Table 1's runs with rounds: run name -> {"method", "seed", "study": False} (the first seed keeps the name)."""
    out = {}
    for name in sorted(online_methods(config["methods"])):
        for i, s in enumerate(seeds):
            out[name if i == 0 else f"{name}-seed{s}"] = {"method": name, "seed": int(s), "study": False}
    return out


def study_runs(config: dict) -> dict[str, dict]:
    """The online study's runs: online-<method>-seed<s> -> {"method", "seed", "study": True}."""
    online = config.get("online") or {}
    return {f"{STUDY_PREFIX}{name}-seed{s}": {"method": name, "seed": int(s), "study": True}
            for name in sorted(online.get("methods") or {}) for s in online.get("seeds") or []}
