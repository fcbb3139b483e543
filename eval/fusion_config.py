"""The `fusion` block of the config (docs/fusion.md): which fused models the DAG builds, checked at start-up.

    fold_fusion_methods   fusion.methods into `methods` when fusion.enabled (as method_zoo: the experts are
                          trained like any method, e.g. from the base model with `reference: base`)
    resolve_fusion        the fused models {name: {large, small, experts, alpha, vocab_check}}, each part named
                          as a model of the DAG ("ref", "base", a method) or a model source (hf:..., a local
                          directory, pypi:...); errors name the key. Adds each fused model's Table 1 pairs.
    fused_dirs            the directories of a fused model's parts (rule make_fused_model's inputs)
    source_key            the directory name of a model source's materialised copy (rule
                          materialise_fusion_source)

Called from workflow/rules/common.smk; the rules are in workflow/rules/fusion.smk.
"""
from __future__ import annotations

import re

DAG_MODELS = ("ref", "base")  # besides the methods
# base_model.source's pattern (config.schema.yaml): pypi:<module>[/<file>.gguf], hf:<owner>/<name>[@rev], a path
SOURCE = re.compile(r"^(pypi:[A-Za-z0-9_.]+(/.+\.gguf)?|hf:[^/@\s]+/[^/@\s]+(@\S+)?|[./~].*)$")


def enabled(config: dict) -> bool:
    return bool((config.get("fusion") or {}).get("enabled"))


def fold_fusion_methods(config: dict, where: str = "config") -> None:
    """fusion.methods (the experts' trainings) into `methods` when fusion.enabled; before resolve_methods, so
    that they are checked, compared with Ref (table1.all_vs_ref) and trained as every method is."""
    if not enabled(config):
        return
    extra = config["fusion"].get("methods") or {}
    clash = sorted(set(extra) & set(config["methods"]))
    if clash:
        raise ValueError(f"{where}: fusion.methods repeats run name(s) of methods: {clash}")
    config["methods"] = {**config["methods"], **extra}


def source_key(source: str) -> str:
    """A model source as a directory name: results/models/fusion_sources/<key>."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_")


def part_kind(name: str, methods: dict) -> str:
    """"dag" (ref, base or a method) or "source"; anything else is an error for the caller to name."""
    if name in DAG_MODELS or name in methods:
        return "dag"
    if SOURCE.match(name):
        return "source"
    return "unknown"


def trained_from(method: dict) -> str:
    """The DAG model a method starts from and is regularised towards: its `reference` (ref, soup or base)."""
    return method.get("reference", "ref")


def _same_model(a: str, b: str, config: dict) -> bool:
    # Without an SFT stage the reference model is the base model itself.
    alias = {"ref": "base"} if not config["sft"]["enabled"] else {}
    return alias.get(a, a) == alias.get(b, b)


def resolve_fusion(config: dict, where: str = "config") -> dict[str, dict]:
    """The fused models of an enabled fusion block, each {large, small, experts, alpha, vocab_check}, checked
    against the resolved config (call it after resolve_methods and check_config); appends their Table 1 pairs
    to table1.pairs: (fused, ref) for each when table1.all_vs_ref, and fusion.pairs. Empty when disabled."""
    if not enabled(config):
        return {}
    fusion = config["fusion"]
    methods = config["methods"]
    models = fusion.get("models") or {}
    if not models:
        raise ValueError(f"{where}: fusion.enabled but fusion.models is empty; name at least one fused model")
    if len(config.get("seeds") or []) > 1:
        raise ValueError(f"{where}: fusion.enabled with several `seeds`: a fused model is built from the first seed's "
                         "runs only and its Table 1 pairs are not replicated per seed; use one seed")
    if "base" in methods:
        raise ValueError(f"{where}: a method named 'base' is ambiguous in fusion.models, where 'base' is the base "
                         "model; rename the method")
    taken = set(methods) | set(DAG_MODELS) | {"soup"}
    out = {}
    for name, spec in models.items():
        key = f"{where}: fusion.models.{name}"
        if name in taken:
            raise ValueError(f"{key}: the name is already a model of the DAG")
        experts = list(spec.get("experts") or [])
        roles = {"large": spec["large"], **({"small": spec["small"]} if experts else {}),
                 **{f"experts[{i}]": e for i, e in enumerate(experts)}}
        for role, part in roles.items():
            kind = part_kind(part, methods) if isinstance(part, str) else "unknown"
            if kind == "unknown":
                raise ValueError(f"{key}.{role}: {part!r} is neither a model of the DAG (ref, base or one of the "
                                 f"methods {sorted(methods)}) nor a model source (hf:<owner>/<name>, pypi:<module>, "
                                 "or a local directory starting with ./, / or ~)")
        if len(set(experts)) != len(experts):
            raise ValueError(f"{key}.experts: {experts} names an expert twice")
        small = spec.get("small")
        for i, e in enumerate(experts):
            if e in methods:
                start = trained_from(methods[e])
                if part_kind(small, methods) != "dag" or not _same_model(start, small, config):
                    raise ValueError(
                        f"{key}.experts[{i}]: method {e!r} was trained from {start!r} (its reference), but small is "
                        f"{small!r}: an expert's delta M_S,t − M_S must be taken against the model it was tuned from")
        out[name] = {"large": spec["large"], "small": small if experts else None, "experts": experts,
                     "alpha": spec["alpha"], "vocab_check": spec["vocab_check"]}
    pairs = config["table1"]["pairs"]
    have = {tuple(sorted(p)) for p in pairs}
    known = {"ref", *methods, *out}
    extra = [list(p) for p in fusion.get("pairs") or []]
    for i, (a, b) in enumerate(extra):
        for m in (a, b):
            if m not in known:
                raise ValueError(f"{where}: fusion.pairs[{i}] names model {m!r}; expected one of {sorted(known)}")
        if a == b:
            raise ValueError(f"{where}: fusion.pairs[{i}] compares {a!r} with itself")
    if config["table1"].get("all_vs_ref", True):
        extra = [p for p in extra] + [[m, "ref"] for m in sorted(out)
                                      if tuple(sorted((m, "ref"))) not in {tuple(sorted(p)) for p in extra}]
    for p in extra:
        if tuple(sorted(p)) not in have:
            pairs.append(p)
            have.add(tuple(sorted(p)))
    return out


def fusion_sources(fused: dict[str, dict], methods: dict) -> dict[str, str]:
    """{source_key: source} of every part that is a model source (materialised by rule
    materialise_fusion_source); two sources with one key are an error."""
    found: dict[str, str] = {}
    for spec in fused.values():
        for part in [spec["large"], *([spec["small"]] if spec["experts"] else []), *spec["experts"]]:
            if part_kind(part, methods) == "source":
                key = source_key(part)
                if found.get(key, part) != part:
                    raise ValueError(f"fusion: model sources {found[key]!r} and {part!r} share the directory name {key!r}")
                found[key] = part
    return found


def configured_sources(config: dict) -> list[tuple[str, str]]:
    """(config key, model source) of every fused model's part that is a model source, when fusion.enabled: what
    the preflight checks before any job (eval/preflight.py)."""
    if not enabled(config):
        return []
    out = []
    for name, spec in (config["fusion"].get("models") or {}).items():
        experts = spec.get("experts") or []
        roles = {"large": spec.get("large", "ref"), **({"small": spec.get("small", "base")} if experts else {}),
                 **{f"experts[{i}]": e for i, e in enumerate(experts)}}
        out += [(f"fusion.models.{name}.{role}", part) for role, part in roles.items()
                if part_kind(part, config["methods"]) == "source"]
    return out


def fused_dirs(spec: dict, methods: dict, dag_dirs, source_dir: str) -> dict:
    """The directories of a fused model's parts in the shape of its spec ({"large", "small", "experts"}, each
    {"ref_dir", "policy_dir"}): `dag_dirs(name)` for a model of the DAG (workflow/rules/common.smk's layout),
    `source_dir`/<source_key> for a model source (rule materialise_fusion_source)."""
    def one(part):
        if part_kind(part, methods) == "source":
            return {"ref_dir": f"{source_dir}/{source_key(part)}", "policy_dir": None}
        return dag_dirs(part)
    return {"large": one(spec["large"]), "small": one(spec["small"]) if spec["experts"] else None,
            "experts": [one(e) for e in spec["experts"]]}


def input_dirs(dirs: dict) -> list[str]:
    """Every directory a fused model reads (fused_dirs), once: rule make_fused_model's inputs."""
    parts = [dirs["large"], *([dirs["small"]] if dirs["small"] else []), *dirs["experts"]]
    return sorted({d for p in parts for d in (p["ref_dir"], p.get("policy_dir")) if d})
