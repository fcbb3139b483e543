"""Checks of a resolved config that JSON schema cannot express (called by the Snakefile at start-up)."""
from __future__ import annotations

from pathlib import Path

import yaml

from rpo import launch, losses
from rpo.models import parse_source


HPARAM_EXCLUDE = ("loss", "name", "reference")  # method keys that are not loss hyperparameters


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_extends(config: dict, basedir, seen: tuple = ()) -> dict:
    """A config with `extends: <file>` (relative to `basedir`, the repository) is that file's config with
    this one's keys on top (paper-beta.yaml and paper-gemma.yaml extend paper-common.yaml); chains resolve."""
    parent = config.get("extends")
    if not parent:
        return config
    path = Path(basedir) / parent
    if str(path) in seen:
        raise ValueError(f"config extends: {parent!r} extends itself (through {list(seen)})")
    if not path.is_file():
        raise FileNotFoundError(f"config extends: {parent!r}: no file {path}")
    base = yaml.safe_load(path.read_text()) or {}
    if not isinstance(base, dict):
        raise ValueError(f"config extends: {path} is not a mapping of config keys")
    merged = deep_merge(resolve_extends(base, basedir, seen + (str(path),)), config)
    merged.pop("extends", None)
    return merged


def resolve_methods(config: dict, where: str = "config") -> None:
    """Fold an enabled method_zoo into `methods`, and add a (method, ref) pair to Table 1 for every method
    that has none when table1.all_vs_ref (so every method appears as a row)."""
    zoo = config.get("method_zoo") or {}
    if zoo.get("enabled"):
        clash = sorted(set(zoo.get("methods", {})) & set(config["methods"]))
        if clash:
            raise ValueError(f"{where}: method_zoo.methods repeats run name(s) of methods: {clash}")
        config["methods"] = {**config["methods"], **zoo.get("methods", {})}
    t1 = config.get("table1")
    if t1 and t1.get("all_vs_ref", True):
        have = {tuple(sorted(p)) for p in t1["pairs"]}
        t1["pairs"] = list(t1["pairs"]) + [[m, "ref"] for m in sorted(config["methods"])
                                           if tuple(sorted((m, "ref"))) not in have]


def check_config(config: dict, where: str = "config") -> None:
    """Raise ValueError naming the key when the config is inconsistent."""
    parse_source(config["base_model"]["source"])
    data = config["data"]
    if data["source"] != "synthetic:verifiable":
        for split in ("train", "test"):
            if split not in data.get("splits", {}):
                raise ValueError(f"{where}: data.splits.{split} is required for source {data['source']!r} "
                                 "(a hub split name, or a file path for source 'file')")
    for name, method in config["methods"].items():
        try:
            losses.get_loss(method["loss"])
        except ValueError as e:
            raise ValueError(f"{where}: methods.{name}.loss: {e}") from None
        losses.check_hyperparameters(method["loss"], {k: v for k, v in method.items() if k not in HPARAM_EXCLUDE},
                                     where=f"{where}: methods.{name}")
        if method.get("reference", "ref") == "soup" and not config["sft"]["enabled"]:
            raise ValueError(f"{where}: methods.{name}.reference: 'soup' averages SFT models trained here, "
                             "so it needs sft.enabled: true")
    models = {"ref", *config["methods"]}
    pairs = {"table1.pairs": config["table1"]["pairs"],
             "judge_validity.pairs": config.get("judge_validity", {}).get("pairs") or []}
    for key, listed in pairs.items():
        for i, (a, b) in enumerate(listed):
            for m in (a, b):
                if m not in models:
                    raise ValueError(f"{where}: {key}[{i}] names model {m!r}; expected one of {sorted(models)}")
            if a == b:
                raise ValueError(f"{where}: {key}[{i}] compares {a!r} with itself")
    for m in config["figures"]["logps_methods"]:
        if m not in config["methods"]:
            raise ValueError(f"{where}: figures.logps_methods names {m!r}; expected one of {sorted(config['methods'])}")
    for key in ("sft", "training"):
        t = config[key]["train"] if key == "sft" else config[key]
        if t["max_prompt_length"] >= t["max_length"]:
            raise ValueError(f"{where}: {key}: max_prompt_length must be < max_length")
        r = config.get("resources", {}).get(key, {"gpus": 0, "nodes": 1})
        try:
            launch.accumulation_steps(t["global_batch_size"], t["micro_batch_size"],
                                      launch.world_size(r["gpus"], r["nodes"]), where=f"{where}: {key}")
        except ValueError as e:
            raise ValueError(f"{e} (resources.{key}: gpus={r['gpus']}, nodes={r['nodes']})") from None
