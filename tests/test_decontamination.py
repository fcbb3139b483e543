"""HumanEval decontamination (rpo/decontamination.py, data.humaneval_decontamination) as the authors' run_rpo.py
does it (alignment-handbook/src/alignment/decontaminate.py @ d0389c4): the filter on hand-made HumanEval rows and
pairs (expected outcomes written by hand, each with its reason), and make_data with HumanEval in a hub cache the
test writes, with none (offline: if_available skips with the reason recorded, required stops).

Run: pytest -q tests/test_decontamination.py       (a few seconds)
"""
from __future__ import annotations

import json

import pytest
from helpers.data import write_jsonl
from helpers.hub import write_hub_dataset

from rpo import decontamination as dc
from rpo.data import DataError
from rpo.pipeline import make_data

# Hand-made HumanEval rows: a docstring between two triple double quotes, one between the 3rd and 4th of four, one
# in triple single quotes; solutions: a specific one, and two of upstream's generic ones (kept: never filtered).
HUMANEVAL = [
    {"task_id": "HumanEval/0", "prompt": 'def f(x):\n    """ Return the  Fibonacci\n number of x.\n    """\n',
     "canonical_solution": "    a, b = 0, 1\n    for _ in range(x):\n        a, b = b, a + b\n    return a\n"},
    {"task_id": "HumanEval/1", "prompt": 'import math\n"""module doc"""\ndef g(s):\n    """Count the vowels in s."""\n',
     "canonical_solution": "    return len(string)\n"},
    {"task_id": "HumanEval/2", "prompt": "def h(n):\n    '''Square n.'''\n", "canonical_solution": "    return n**2\n"},
    # HumanEval/28's solution: upstream's kept list reads `"return " ".join(strings)"`, i.e. "return .join(strings)"
    {"task_id": "HumanEval/28", "prompt": 'def c(strings):\n    """Concatenate strings."""\n',
     "canonical_solution": "    return ''.join(strings)\n"},
]


def test_docstrings_are_cut_as_upstream_cuts_them():
    assert dc.docstring(HUMANEVAL[0]["prompt"]) == "Return the  Fibonacci\n number of x."
    assert dc.docstring(HUMANEVAL[1]["prompt"]) == "Count the vowels in s."  # 4 quotes: the second docstring
    assert dc.docstring(HUMANEVAL[2]["prompt"]) == "Square n."
    with pytest.raises(ValueError, match="HumanEval/9: 3 triple double quotes"):
        dc.docstring('"""a"""b"""', "HumanEval/9")
    with pytest.raises(ValueError, match="no docstring"):
        dc.docstring("def k(): pass")


def test_filter_strings_keep_upstreams_generic_solutions_only():
    strings = dc.filter_strings(HUMANEVAL)
    assert strings["human_eval_docstrings"] == ["Return the  Fibonacci\n number of x.", "Count the vowels in s.",
                                                "Square n.", "Concatenate strings."]
    # "return len(string)" and "return n**2" are in upstream's kept list; "return ''.join(strings)" is not
    # (the kept entry is "return .join(strings)")
    assert strings["human_eval_solutions"] == [HUMANEVAL[0]["canonical_solution"].strip(), "return ''.join(strings)"]


def asst(t):
    return [{"role": "assistant", "content": t}]


def test_a_pair_is_removed_when_its_chosen_text_holds_a_string_case_and_spacing_aside():
    strings = dc.filter_strings(HUMANEVAL)
    rows = [
        {"id": "docstring", "chosen": asst("Sure!\n\nRETURN THE FIBONACCI number   of x.")},  # case, spaces, newlines
        {"id": "solution", "chosen": asst("```\na, b = 0, 1\nfor _ in range(x):\n  a, b = b, a + b\nreturn a\n```")},
        {"id": "join", "chosen": asst("def c(s): return ''.join(strings)")},                   # not upstream-kept
        {"id": "generic", "chosen": asst("def n(string): return len(string)")},               # upstream-kept
        {"id": "clean", "chosen": asst("The Fibonacci numbers grow fast.")},                   # part of a docstring only
    ]
    kept, removed = dc.decontaminate(rows, strings, lambda r: r["chosen"][0]["content"])
    assert removed == ["docstring", "solution", "join"]
    assert [r["id"] for r in kept] == ["generic", "clean"]
    assert dc.is_contaminated("x\n square N. y", strings) and not dc.is_contaminated("square", strings)


# ---------------------------------------------------------------------------------------------------
# make_data: HumanEval from the hub cache, or not available
# ---------------------------------------------------------------------------------------------------

def pair(i, chosen, prompt="write a short answer"):
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"{prompt} {i}"}], "chosen": asst(chosen),
            "rejected": asst(f"no {i}")}


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    import huggingface_hub.constants as c  # read once at import: follow the test's cache in-process too
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def _make(tmp_path, tiny_model_dir, mode):
    train = write_jsonl([pair(0, "hello world"), pair(1, "it is: return ''.join(strings)")], tmp_path / "tr.jsonl")
    test = write_jsonl([pair(2, "Square n. done"), pair(3, "hello")], tmp_path / "te.jsonl")
    out = {k: str(tmp_path / f"{k}.jsonl") for k in ("train", "test", "prompts")}
    make_data(data_cfg={"source": "file", "splits": {"train": str(train), "test": str(test)}},
              base_dir=str(tiny_model_dir), summary=str(tmp_path / "summary.json"), seed=0,
              humaneval_decontamination=mode, **out)
    read = {k: [json.loads(line)["id"] for line in open(v)] for k, v in out.items()}
    return read, json.loads((tmp_path / "summary.json").read_text())


def test_make_data_removes_contaminated_pairs_but_keeps_table1_prompts(tmp_path, tiny_model_dir, hub_cache):
    write_hub_dataset(hub_cache, "openai/openai_humaneval", {"test": HUMANEVAL})
    read, summary = _make(tmp_path, tiny_model_dir, "required")
    assert read["train"] == ["p0"] and read["test"] == ["p3"]  # both splits filtered, as run_rpo.py
    assert read["prompts"] == ["p2", "p3"]  # Table 1 reads the raw test split (gen_eval*.py)
    h = summary["humaneval_decontamination"]
    assert (h["applied"], h["train_removed_ids"], h["test_removed_ids"]) == (True, ["p1"], ["p2"])
    assert h["strings"] == {"human_eval_docstrings": 4, "human_eval_solutions": 2}


def test_offline_without_humaneval_if_available_skips_and_says_why(tmp_path, tiny_model_dir, hub_cache, caplog):
    read, summary = _make(tmp_path, tiny_model_dir, "if_available")
    assert read["train"] == ["p0", "p1"]  # nothing removed
    h = summary["humaneval_decontamination"]
    assert h["applied"] is False and "openai/openai_humaneval" in h["reason"] and "HF_HUB_OFFLINE" in h["reason"]
    assert "HumanEval decontamination skipped" in caplog.text


def test_offline_without_humaneval_required_stops(tmp_path, tiny_model_dir, hub_cache):
    with pytest.raises(DataError, match="humaneval_decontamination is 'required' but HumanEval cannot be loaded"):
        _make(tmp_path, tiny_model_dir, "required")
    assert not (tmp_path / "train.jsonl").exists()


def test_table1_dataset_prompt_is_required_of_every_held_out_row_at_the_data_stage(tmp_path, tiny_model_dir):
    train = write_jsonl([pair(0, "hello world")], tmp_path / "tr.jsonl")
    test = write_jsonl([pair(1, "hi"), {**pair(2, "yo"), "meta": {"dataset_prompt": "write a short answer 2"}}],
                       tmp_path / "te.jsonl")
    out = {k: str(tmp_path / f"{k}.jsonl") for k in ("train", "test", "prompts")}
    with pytest.raises(DataError, match=r"table1.prompt is dataset_prompt, but 1 test rows have no dataset prompt.*'p1'"):
        make_data(data_cfg={"source": "file", "splits": {"train": str(train), "test": str(test)}},
                  base_dir=str(tiny_model_dir), summary=str(tmp_path / "s.json"), seed=0, require_dataset_prompt=True,
                  **out)
