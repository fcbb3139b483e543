"""Checks of a resolved config that JSON schema cannot express (called by the Snakefile at start-up)."""
from __future__ import annotations

from pathlib import Path

import yaml

from rpo import launch, losses
from rpo.models import parse_source


# A method's keys that say what it trains on and how (its loss, run name, reference, RSO's sampling, online
# rounds); every other key is a hyperparameter of its loss. The one such rule: the config check, the trainers
# and the study's table read it through `hyperparameters`.
HPARAM_EXCLUDE = ("loss", "name", "reference", "sampling", "rounds")


def hyperparameters(method: dict) -> dict:
    """The loss hyperparameters of a method (a value of `methods`, of a study grid's runs or of online.methods)."""
    return {k: v for k, v in method.items() if k not in HPARAM_EXCLUDE}


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


def check_method(method: dict, where: str) -> None:
    """A run's loss exists and gets exactly its hyperparameters; errors name `where`."""
    try:
        losses.get_loss(method["loss"])
    except ValueError as e:
        raise ValueError(f"{where}.loss: {e}") from None
    losses.check_hyperparameters(method["loss"], hyperparameters(method), where=where)


def check_config(config: dict, where: str = "config") -> None:
    """Raise ValueError naming the key when the config is inconsistent."""
    parse_source(config["base_model"]["source"])
    data = config["data"]
    if data["source"] != "synthetic:verifiable":
        for split in ("train", "test"):
            if split not in data.get("splits", {}):
                raise ValueError(f"{where}: data.splits.{split} is required for source {data['source']!r} "
                                 "(a hub split name, or a file path for source 'file')")
    if config.get("table1", {}).get("prompt") == "dataset_prompt" and data["source"] == "synthetic:verifiable":
        raise ValueError(f"{where}: table1.prompt: dataset_prompt asks each held-out row's own prompt string, which "
                         "only a hub or file source with a string prompt column beside whole conversations has "
                         "(data.source is synthetic:verifiable)")
    for name, method in config["methods"].items():
        check_method(method, f"{where}: methods.{name}")
        if "sampling" in method and method.get("reference", "ref") != "ref":
            raise ValueError(f"{where}: methods.{name}: RSO's sampling draws its candidates from the Ref model; "
                             "reference must be ref")
        if method.get("reference", "ref") == "soup" and not config["sft"]["enabled"]:
            raise ValueError(f"{where}: methods.{name}.reference: 'soup' averages SFT models trained here, "
                             "so it needs sft.enabled: true")
    from rpo import round_plan  # methods with rounds, and the online study's (issue 27)
    round_plan.check_methods(config["methods"], f"{where}: methods")
    round_plan.check_study(config)
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


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand_grid(grid: dict, where: str = "overoptimization.grid") -> dict[str, dict]:
    """A study grid, family -> {loss, hyperparameter: value or [values]}, as runs: one per combination of the
    listed values, named <family>-<key><value>... over the listed keys (in the order written), e.g.
    {"rpo": {"loss": "rpo", "beta": [0.05, 0.2], "eta": 1.0}} -> rpo-beta0.05, rpo-beta0.2."""
    return {name: method for name, (_, method) in _grid_runs(grid, where).items()}


def grid_families(grid: dict, where: str = "overoptimization.grid") -> dict[str, str]:
    """Each run of expand_grid(grid) -> the family (the grid's key) it comes from."""
    return {name: family for name, (family, _) in _grid_runs(grid, where).items()}


def _grid_runs(grid: dict, where: str) -> dict[str, tuple[str, dict]]:
    import itertools

    runs = {}
    for family, spec in grid.items():
        swept = [k for k, v in spec.items() if isinstance(v, list)]
        for k in swept:
            if not spec[k]:
                raise ValueError(f"{where}.{family}.{k}: an empty list sweeps nothing")
        for combo in itertools.product(*(spec[k] for k in swept)):
            method = {**spec, **dict(zip(swept, combo))}
            name = "-".join([family] + [f"{k}{_fmt(v)}" for k, v in zip(swept, combo)])
            if name in runs:
                raise ValueError(f"{where}: run name {name!r} comes out twice")
            check_method(method, f"{where}.{family}")
            runs[name] = (family, method)
    return runs


def resolve_study(config: dict, schema: dict) -> dict:
    """The overoptimization study's runs and the data and training configs they use: `data` and `training`
    with the study's keys on top, each checked against its part of the config schema (`schema`, the
    loaded config.schema.yaml), so a misspelt key fails here."""
    import jsonschema

    study = config["overoptimization"]
    out = {"runs": expand_grid(study["grid"]), "families": grid_families(study["grid"])}
    for key, part in (("data", schema["properties"]["data"]), ("training", {"$ref": "#/$defs/train"})):
        merged = deep_merge(config[key], study[key])
        try:
            jsonschema.validate(merged, {"$defs": schema["$defs"], **part})
        except jsonschema.ValidationError as e:
            where = ".".join(str(p) for p in e.absolute_path)
            raise ValueError(f"overoptimization.{key}{'.' + where if where else ''}: {e.message}") from None
        out[key] = merged
    if out["training"]["max_prompt_length"] >= out["training"]["max_length"]:
        raise ValueError("overoptimization.training: max_prompt_length must be < max_length")
    # RSO runs that score their candidates with reward models: the study's own members, trained like
    # reward_models' on the study's pairs, so reward_models.training's keys go on top of the study's training
    out["reward_training"] = resolve_reward_models(config, schema, training=out["training"])
    return out


def resolve_reward_models(config: dict, schema: dict, training: dict | None = None) -> dict:
    """The reward models' training config: `training` (default: config's) with reward_models.training's keys on
    top, checked against the schema's training part (a misspelt key fails here, naming reward_models.training)."""
    import jsonschema

    merged = deep_merge(config["training"] if training is None else training, config["reward_models"]["training"])
    try:
        jsonschema.validate(merged, {"$defs": schema["$defs"], "$ref": "#/$defs/train"})
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path)
        raise ValueError(f"reward_models.training{'.' + where if where else ''}: {e.message}") from None
    if merged["max_prompt_length"] >= merged["max_length"]:
        raise ValueError("reward_models.training: max_prompt_length must be < max_length")
    return merged
