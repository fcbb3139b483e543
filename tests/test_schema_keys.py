"""Every config key the schema accepts is read somewhere: a key that no code names is a setting that does
nothing (issue 13). The check walks workflow/schemas/config.schema.yaml ($refs and combinators
included) and looks for each key's name among the string constants, parameter and attribute names of
rpo/ and eval/ (Python's ast) and the quoted names of the Snakefile and workflow/rules/*.smk.

Run: pytest tests/test_schema_keys.py -q     (a second)
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# Keys read under a computed name, with where.
COMPUTED = {
    ("data", "max_train"): "rpo/data.py reads cfg[f'max_{split}']",
    ("data", "max_test"): "rpo/data.py reads cfg[f'max_{split}']",
}


def schema_keys(schema: dict) -> list[tuple[str, ...]]:
    defs = schema.get("$defs", {})
    out: list[tuple[str, ...]] = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        if "$ref" in node:
            walk(defs[node["$ref"].split("/")[-1]], path)
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(key, []):
                walk(sub, path)
        for key in ("if", "then", "else"):
            walk(node.get(key), path)
        for k, v in (node.get("properties") or {}).items():
            out.append(path + (k,))
            walk(v, path + (k,))
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], path + ("*",))
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + ("[]",))

    walk(schema, ())
    return out


def names_in_code() -> set[str]:
    names: set[str] = set()
    for f in [*ROOT.glob("rpo/**/*.py"), *ROOT.glob("eval/**/*.py")]:
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                names.add(n.value)
            elif isinstance(n, ast.arg):
                names.add(n.arg)
            elif isinstance(n, ast.Attribute):
                names.add(n.attr)
            elif isinstance(n, ast.keyword) and n.arg:
                names.add(n.arg)
    for f in [ROOT / "Snakefile", *ROOT.glob("workflow/rules/*.smk")]:
        text = f.read_text()
        names |= set(re.findall(r"""["']([A-Za-z_]\w*)["']""", text)) | set(re.findall(r"\.([A-Za-z_]\w*)", text))
    return names


def test_every_schema_key_is_named_by_the_code():
    keys = schema_keys(yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text()))
    assert len(keys) > 100  # the walk reached the nested blocks
    names = names_in_code()
    unread = [".".join(k) for k in keys if k[-1] not in names and k not in COMPUTED]
    assert not unread, f"schema keys that no code reads (remove them, or read them): {unread}"


def test_the_check_finds_an_unread_key():
    # the same walk on a schema with a key nothing names
    schema = {"properties": {"data": {"$ref": "#/$defs/d"}},
              "$defs": {"d": {"properties": {"zz_never_read_anywhere": {"type": "integer"}}}}}
    keys = schema_keys(schema)
    assert keys == [("data",), ("data", "zz_never_read_anywhere")]
    assert "zz_never_read_anywhere" not in names_in_code()
