"""Imports go one way (issue 24): rpo/ never imports eval/; the answer backends know no benchmark; the results
table imports no benchmark; no cycle among eval/'s modules at module level; an import inside a function only
where it keeps a heavy dependency (torch, vLLM, lm-eval, alpaca_eval, llama.cpp, the hub, ...) out of a module
that does not always need it; and each benchmark of eval/registry.py is one package, one rule file, one entry.

The imports are read with Python's ast from the source files (nothing is imported), except the last test, which
imports what the workflow imports while it is parsed, in a fresh interpreter, and checks that torch is not
among them.

Run: pytest tests/test_layering.py -q     (a few seconds)
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

from eval import registry

ROOT = Path(__file__).resolve().parent.parent

# The answer backends behind `generation.backend` and the fused models (eval/generation.py): they decode prompts
# that a benchmark or Table 1 hands them, and never know which benchmark asked.
BACKENDS = ("eval.generation", "eval.vllm_backend", "eval.lm_eval_llamacpp", "eval.fusion", "eval.fusion_harness")
BENCHMARK_PACKAGES = tuple(f"eval.{name}" for name in registry.NAMES)
# Packages whose import is heavy (seconds, or a GPU stack) or optional (an extra): an import of one of them, or
# of a module of ours that imports one at module level, may sit inside the function that needs it.
HEAVY = {"torch", "transformers", "vllm", "lm_eval", "alpaca_eval", "llama_cpp", "peft", "datasets",
         "huggingface_hub", "matplotlib", "pandas", "sklearn", "scipy", "openai", "httpx", "safetensors", "gguf",
         "jsonschema", "pyarrow", "nltk", "langdetect", "snakemake_interface_executor_plugins"}
# `python -m eval` imports a command's module when that command runs (most import torch or matplotlib)
DISPATCHERS = {"eval.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(p): p for d in ("eval", "rpo") for p in sorted((ROOT / d).rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules an import statement names: `from a.b import c` names a.b.c when that is one of our modules."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert node.level == 0, f"{FILES[module]}:{node.lineno}: a relative import (this package writes them absolute)"
    source = node.module
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in FILES else source for a in node.names]


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) of every import of one of our modules."""
    out = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(child, True)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                if not (isinstance(child, ast.ImportFrom) and child.module == "__future__"):
                    out.extend((name, child.lineno, in_function) for name in _imported(child, module))
            else:
                walk(child, in_function)

    walk(ast.parse(FILES[module].read_text(encoding="utf-8")), False)
    return out


IMPORTS = {m: _imports(m) for m in FILES}


def _module_level(module: str) -> set[str]:
    """What importing `module` runs: its module-level imports, and the packages above each (their __init__)."""
    out = set()
    for name, _, in_function in IMPORTS[module]:
        if in_function:
            continue
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out - {module}


def _is_under(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _violations(modules, forbidden) -> list[str]:
    return [f"{FILES[m].relative_to(ROOT)}:{line} imports {name}" for m in modules
            for name, line, _ in IMPORTS[m] if _is_under(name, forbidden)]


def test_the_import_graph_is_read():
    # the parse sees the imports it must judge (a broken walk would find nothing and pass everything)
    assert ("eval.mtbench.data", False) in {(n, f) for n, _, f in IMPORTS["eval.mtbench.answers"]}
    assert any(n == "torch" and f for n, _, f in IMPORTS["eval.generation"])  # load_hf's import of torch
    assert "eval.registry" in _module_level("eval.results_table")


def test_rpo_never_imports_eval():
    assert _violations([m for m in FILES if _is_under(m, ["rpo"])], ["eval"]) == []


def test_backends_import_no_benchmark():
    assert set(BACKENDS) <= set(FILES)
    assert _violations(BACKENDS, BENCHMARK_PACKAGES) == []


def test_the_results_table_imports_no_benchmark():
    assert _violations(["eval.results_table"], BENCHMARK_PACKAGES) == []


def test_the_registry_imports_no_benchmark_and_nothing_of_ours():
    assert [n for n, _, _ in IMPORTS["eval.registry"] if _is_under(n, ["eval", "rpo"])] == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_eval_modules_at_module_level():
    eval_modules = [m for m in FILES if _is_under(m, ["eval"])]
    graph = {m: {n for n in _module_level(m) if n in FILES and _is_under(n, ["eval"])} for m in eval_modules}
    assert _cycles(graph) == []


def test_no_import_cycle_among_eval_modules_even_through_imports_inside_functions():
    # a cycle held apart only by an import inside a function (issue 24: results_table -> harness -> vllm_backend
    # -> mtbench -> results_table) is still a cycle; `python -m eval`'s dispatcher imports every command's module
    eval_modules = [m for m in FILES if _is_under(m, ["eval"]) and m not in DISPATCHERS]
    graph = {m: {n for n, _, _ in IMPORTS[m] if n in eval_modules} for m in eval_modules}
    assert _cycles(graph) == []


def _heavy(name: str, seen: set[str]) -> str | None:
    """The heavy package `name` imports when it is imported (itself, or through our modules), or None."""
    if name.split(".")[0] in HEAVY:
        return name
    if name not in FILES or name in seen:
        return None
    seen.add(name)
    for n in _module_level(name):
        found = _heavy(n, seen)
        if found:
            return found
    return None


def test_an_import_inside_a_function_keeps_a_heavy_dependency_out():
    light = [f"{FILES[m].relative_to(ROOT)}:{line} imports {name} inside a function; nothing heavy comes with it, "
             "so it belongs at the top of the module"
             for m in FILES if _is_under(m, ["eval"]) and m not in DISPATCHERS
             for name, line, in_function in IMPORTS[m] if in_function and not _heavy(name, set())]
    assert light == []


def test_each_benchmark_is_one_package_one_rule_file_one_entry():
    snakefile = (ROOT / "Snakefile").read_text(encoding="utf-8")
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text(encoding="utf-8"))
    bench_schema = schema["properties"]["benchmarks"]["properties"]
    assert registry.NAMES == ("mtbench", "alpacaeval", "arenahard")
    for b in registry.BENCHMARKS:
        stages = ast.parse((ROOT / "eval" / b.name / "stages.py").read_text(encoding="utf-8"))
        functions = {f.name for f in stages.body if isinstance(f, ast.FunctionDef)}
        assert {b.rule(s) for s in registry.STAGES} <= functions, b.name
        checks = ast.parse((ROOT / "eval" / b.name / "checks.py").read_text(encoding="utf-8"))
        assert {"settings_problems", "data_problems"} <= {f.name for f in checks.body if isinstance(f, ast.FunctionDef)}
        rules = (ROOT / "workflow" / "rules" / f"{b.name}.smk").read_text(encoding="utf-8")
        assert set(re.findall(r"^rule (\w+):", rules, re.M)) == {b.rule(s) for s in registry.STAGES}, b.name
        for s in registry.STAGES:
            assert f"python -m eval {b.command(s)} " in rules
        assert f'include: "workflow/rules/{b.name}.smk"' in snakefile
        assert "enabled" in bench_schema[b.name]["properties"]
    # the other rule files hold none of a benchmark's rules
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        if smk.stem not in registry.NAMES:
            names = set(re.findall(r"^rule (\w+):", smk.read_text(encoding="utf-8"), re.M))
            assert not {b.rule(s) for b in registry.BENCHMARKS for s in registry.STAGES} & names, smk.name
    assert registry.TABLE_ORDER == ("mtbench", "mtbench_turn1", "mtbench_turn2", "alpacaeval_lc", "alpacaeval_wr",
                                    "arenahard")


def test_what_the_workflow_imports_at_parse_time_needs_no_torch():
    # the Snakefile and common.smk import these while the workflow is parsed (every cluster job parses it again)
    code = ("import sys\n"
            "import eval.registry, eval.preflight, eval.judging.config, eval.mtbench.fastchat\n"
            "for b in eval.registry.BENCHMARKS:\n"
            "    b.checks()\n"
            "assert 'eval.mtbench.stages' not in sys.modules\n"
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
