"""Tests for rpo/data.py: the normalised preference schema, its validation, and the 'file' source.

Run:
    cd /work/main && /work/venv/bin/python -m pytest tests/test_data.py -q -p no:cacheprovider

No model, no network: every file is written to pytest's tmp_path. Expected values are written
out by hand from the normalised schema described in rpo/data.py's docstring.
"""

import json

import pytest

from rpo.data import (
    DataError,
    from_columns,
    load_source_splits,
    read_pairs,
    read_records,
    stable_id,
    validate_row,
    write_jsonl,
)

DEFAULT_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": None}


def user(text):
    return {"role": "user", "content": text}


def asst(text):
    return {"role": "assistant", "content": text}


def good_row(rid="r1", chosen="good answer", rejected="bad answer", **extra):
    return {"id": rid, "prompt": [user("question?")], "chosen": [asst(chosen)],
            "rejected": [asst(rejected)], **extra}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------------
# validate_row
# ---------------------------------------------------------------------------------------------------

def test_validate_row_good_row_is_normalised():
    raw = {"id": "x7", "prompt": "What is 2+2?", "chosen": "4", "rejected": "5",
           "meta": {"k": 1},
           "extra_column": "dropped by normalisation"}
    out = validate_row(raw, "here")
    # Strings become one-message lists with the role the field must end with.
    assert out == {
        "id": "x7",
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
        "meta": {"k": 1},
    }


def test_validate_row_drops_extra_message_keys_and_defaults_meta():
    raw = good_row()
    raw["chosen"] = [{"role": "assistant", "content": "good answer", "weight": 3}]
    out = validate_row(raw, "here")
    assert out["chosen"] == [asst("good answer")]  # only role/content survive
    assert out["meta"] == {}  # missing meta -> empty object


def test_validate_row_missing_chosen_names_field_and_where():
    raw = good_row()
    del raw["chosen"]
    with pytest.raises(DataError) as ei:
        validate_row(raw, "somefile.jsonl:12")
    msg = str(ei.value)
    assert "somefile.jsonl:12" in msg
    assert "'chosen'" in msg


def test_validate_row_none_field_counts_as_missing():
    with pytest.raises(DataError, match=r"where: missing field 'rejected'"):
        validate_row({**good_row(), "rejected": None}, "where")


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_validate_row_whitespace_response_is_an_error(field):
    raw = good_row(**{field: "   \n\t "})
    with pytest.raises(DataError) as ei:
        validate_row(raw, "W")
    assert f"field '{field}' is an empty response" in str(ei.value)
    assert str(ei.value).startswith("W:")


def test_validate_row_identical_chosen_and_rejected():
    with pytest.raises(DataError, match="identical"):
        validate_row(good_row(chosen="same", rejected="same"), "W")


def test_validate_row_wrong_role_names_field():
    raw = good_row()
    raw["chosen"] = [{"role": "bot", "content": "hi"}]
    with pytest.raises(DataError) as ei:
        validate_row(raw, "W")
    assert "field 'chosen'[0].role is 'bot'" in str(ei.value)


def test_validate_row_prompt_must_end_with_user():
    raw = good_row()
    raw["prompt"] = [user("q"), asst("a")]
    with pytest.raises(DataError) as ei:
        validate_row(raw, "W")
    # "field 'prompt' must end with a 'user' message, ends with 'assistant'"
    assert "field 'prompt' must end with a 'user' message" in str(ei.value)
    assert "ends with 'assistant'" in str(ei.value)


def test_validate_row_chosen_must_end_with_assistant():
    raw = good_row()
    raw["chosen"] = [asst("a"), user("q")]
    with pytest.raises(DataError, match="field 'chosen' must end with a 'assistant' message"):
        validate_row(raw, "W")


@pytest.mark.parametrize("bad", [{"role": "user", "content": "q"}, 42, []])
def test_validate_row_prompt_not_a_list(bad):
    raw = good_row()
    raw["prompt"] = bad
    with pytest.raises(DataError) as ei:
        validate_row(raw, "W")
    assert "field 'prompt' must be a non-empty list" in str(ei.value)


@pytest.mark.parametrize("msg", [{"role": "user"}, {"role": "user", "text": "q"}, "just a string"])
def test_validate_row_message_without_role_and_content(msg):
    # {"role", "text"} once slipped past the check and raised KeyError instead of DataError.
    raw = good_row()
    raw["prompt"] = [msg]
    with pytest.raises(DataError, match=r"field 'prompt'\[0\] must be an object with 'role' and 'content'"):
        validate_row(raw, "W")


def test_validate_row_content_must_be_string():
    raw = good_row()
    raw["rejected"] = [{"role": "assistant", "content": 3}]
    with pytest.raises(DataError, match=r"field 'rejected'\[0\].content must be a string"):
        validate_row(raw, "W")


def test_validate_row_meta_must_be_object():
    with pytest.raises(DataError, match="field 'meta' must be an object"):
        validate_row(good_row(meta="not a dict"), "W")


@pytest.mark.parametrize("rid", [7, ""])
def test_validate_row_id_must_be_nonempty_string(rid):
    with pytest.raises(DataError, match="field 'id' must be a non-empty string"):
        validate_row(good_row(rid=rid), "W")


def test_validate_row_non_object():
    with pytest.raises(DataError, match="W: expected a JSON object, got list"):
        validate_row([1, 2], "W")


# ---------------------------------------------------------------------------------------------------
# read_records / read_pairs / write_jsonl
# ---------------------------------------------------------------------------------------------------

def test_read_pairs_bad_json_line_names_path_and_line(tmp_path):
    p = write_lines(tmp_path / "pairs.jsonl", [json.dumps(good_row("a")), "{not json", json.dumps(good_row("c"))])
    with pytest.raises(DataError) as ei:
        read_pairs(p)
    assert f"{p}:2" in str(ei.value)  # the broken line is line 2
    assert "not valid JSON" in str(ei.value)


def test_read_pairs_missing_chosen_at_line_3(tmp_path):
    bad = good_row("c")
    del bad["chosen"]
    p = write_lines(tmp_path / "pairs.jsonl", [json.dumps(good_row("a")), json.dumps(good_row("b")), json.dumps(bad)])
    with pytest.raises(DataError) as ei:
        read_pairs(p)
    assert f"{p}:3" in str(ei.value)
    assert "'chosen'" in str(ei.value)


def test_read_pairs_line_numbers_count_blank_lines(tmp_path):
    # Line 1 good, line 2 blank, line 3 bad: the error must say line 3, not record 2.
    bad = good_row("c")
    del bad["chosen"]
    p = write_lines(tmp_path / "pairs.jsonl", [json.dumps(good_row("a")), "", json.dumps(bad)])
    with pytest.raises(DataError) as ei:
        read_pairs(p)
    assert f"{p}:3:" in str(ei.value)


def test_read_pairs_good_file(tmp_path):
    p = write_lines(tmp_path / "pairs.jsonl", [json.dumps(good_row("a")), "", json.dumps(good_row("b"))])
    rows = read_pairs(p)
    assert [r["id"] for r in rows] == ["a", "b"]  # blank line skipped
    assert rows[0]["meta"] == {}


def test_read_records_rejects_other_suffix_and_missing_file(tmp_path):
    p = tmp_path / "pairs.csv"
    p.write_text("a,b\n")
    with pytest.raises(DataError, match="expected a .jsonl or .parquet file"):
        read_records(p)
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "nope.jsonl")


def test_write_jsonl_round_trip(tmp_path):
    rows = [validate_row(good_row("a", chosen="é ünïcode ✓"), "x"),
            validate_row(good_row("b", meta={"score": 0.5, "tags": ["t"]}), "x")]
    out = tmp_path / "sub" / "dir" / "pairs.jsonl"  # parent dirs are created
    write_jsonl(rows, out)
    assert read_pairs(out) == rows
    assert read_records(out) == rows
    assert len(out.read_text().splitlines()) == 2  # one object per line
    assert not (out.parent / "pairs.jsonl.tmp").exists()  # temp file replaced atomically
    assert "é ünïcode ✓" in out.read_text(encoding="utf-8")  # ensure_ascii=False


# ---------------------------------------------------------------------------------------------------
# from_columns
# ---------------------------------------------------------------------------------------------------

def test_from_columns_ultrafeedback_layout():
    raw = {"prompt": "Tell me a joke ",  # the dataset's own string, which need not equal the first turn
           "prompt_id": "pid-1",
           "chosen": [user("Tell me a joke"), asst("A good joke")],
           "rejected": [user("Tell me a joke"), asst("A bad joke")]}
    row = from_columns(raw, {**DEFAULT_COLUMNS, "id": "prompt_id"}, "W")
    assert row["id"] == "pid-1"
    assert row["prompt"] == [user("Tell me a joke")]  # the conversations carry the prompt
    assert row["chosen"] == [asst("A good joke")]
    assert row["rejected"] == [asst("A bad joke")]
    # the string is kept for Table 1 (table1.prompt dataset_prompt: the authors' gen_eval.py asks it)
    assert row["meta"] == {"dataset_prompt": "Tell me a joke "}
    # and it validates as a normalised row, meta included
    assert validate_row(row, "W")["meta"] == {"dataset_prompt": "Tell me a joke "}


def test_from_columns_ultrafeedback_multiturn_prompt():
    conv = [{"role": "system", "content": "be nice"}, user("q1"), asst("a1"), user("q2")]
    raw = {"chosen": conv + [asst("good")], "rejected": conv + [asst("bad")]}
    row = from_columns(raw, DEFAULT_COLUMNS, "W")
    assert row["prompt"] == conv  # every turn before the last
    assert row["chosen"] == [asst("good")]
    assert row["rejected"] == [asst("bad")]
    assert row["meta"] == {}  # no prompt column (dpo-mix-7k's layout): no dataset prompt


def test_from_columns_conversations_with_different_prefixes():
    raw = {"chosen": [user("question A"), asst("x")], "rejected": [user("question B"), asst("y")]}
    with pytest.raises(DataError, match="W: 'chosen' and 'rejected' conversations differ"):
        from_columns(raw, DEFAULT_COLUMNS, "W")


def test_from_columns_string_columns_with_custom_names():
    cols = {"prompt": "instruction", "chosen": "good", "rejected": "bad", "id": "uid"}
    raw = {"instruction": "Say hi", "good": "Hi!", "bad": "No.", "uid": 17}
    row = validate_row(from_columns(raw, cols, "W"), "W")
    assert row == {"id": "17",  # non-string ids are stringified
                   "prompt": [user("Say hi")], "chosen": [asst("Hi!")], "rejected": [asst("No.")],
                   "meta": {}}


def test_from_columns_missing_columns_are_named():
    cols = {"prompt": "instruction", "chosen": "good", "rejected": "bad", "id": None}
    with pytest.raises(DataError) as ei:
        from_columns({"instruction": "q", "good": "a"}, cols, "W")
    assert "'bad' (for rejected)" in str(ei.value)
    with pytest.raises(DataError, match=r"missing column 'instruction' \(for prompt\)"):
        from_columns({"good": "a", "bad": "b"}, cols, "W")


def test_from_columns_non_object_record():
    with pytest.raises(DataError, match="W: expected a JSON object, got int"):
        from_columns(5, DEFAULT_COLUMNS, "W")


def test_from_columns_stable_id_when_no_id_column():
    raw = {"prompt": "p", "chosen": "c", "rejected": "r"}
    a = from_columns(dict(raw), DEFAULT_COLUMNS, "W")["id"]
    b = from_columns(dict(raw), DEFAULT_COLUMNS, "elsewhere")["id"]
    assert a == b  # deterministic: depends on the content only
    assert len(a) == 16 and all(ch in "0123456789abcdef" for ch in a)  # 16 hex chars of sha1
    assert a == stable_id("p", "c", "r")
    # a different pair gets a different id
    assert from_columns({**raw, "rejected": "r2"}, DEFAULT_COLUMNS, "W")["id"] != a
    # an empty id column falls back to the stable id as well
    assert from_columns({**raw, "id": ""}, {**DEFAULT_COLUMNS, "id": "id"}, "W")["id"] == a


# ---------------------------------------------------------------------------------------------------
# load_source_splits, source 'file'
# ---------------------------------------------------------------------------------------------------

def file_cfg(train, test, **extra):
    return {"source": "file", "splits": {"train": str(train), "test": str(test)}, **extra}


def write_parquet(path, rows):
    import pandas as pd
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_load_source_splits_jsonl_and_parquet(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(good_row(f"t{i}", chosen=f"c{i}")) for i in range(3)])
    # parquet with message-list columns (these once came back as numpy arrays and were rejected)
    test = write_parquet(tmp_path / "test.parquet", [good_row("e0"), good_row("e1", chosen="other")])
    out, summary = load_source_splits(file_cfg(train, test))
    assert [r["id"] for r in out["train"]] == ["t0", "t1", "t2"]
    assert [r["id"] for r in out["test"]] == ["e0", "e1"]
    assert out["test"][1]["chosen"] == [asst("other")]
    assert out["test"][0]["prompt"] == [user("question?")]
    assert summary == {"source": "file",
                       "train": {"rows_read": 3, "rows_kept": 3, "dropped": {}},
                       "test": {"rows_read": 2, "rows_kept": 2, "dropped": {}}}


def test_load_source_splits_parquet_string_columns_custom_names(tmp_path):
    rows = [{"q": f"question {i}", "yes": f"good {i}", "no": f"bad {i}"} for i in range(2)]
    train = write_parquet(tmp_path / "train.parquet", rows)
    test = write_parquet(tmp_path / "test.parquet", rows[:1])
    cols = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    out, _ = load_source_splits(file_cfg(train, test, columns=cols))
    assert out["train"][1]["prompt"] == [user("question 1")]
    assert out["train"][1]["rejected"] == [asst("bad 1")]
    assert out["train"][0]["id"] == stable_id("question 0", "good 0", "bad 0")


def test_load_source_splits_error_names_file_and_row(tmp_path):
    bad = good_row("t2")
    del bad["chosen"]
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(good_row("t0")), json.dumps(good_row("t1")), json.dumps(bad)])
    test = write_lines(tmp_path / "test.jsonl", [json.dumps(good_row("e0"))])
    for cfg in (file_cfg(train, test), file_cfg(train, test, on_invalid="error")):  # 'error' is the default
        with pytest.raises(DataError) as ei:
            load_source_splits(cfg)
        msg = str(ei.value)
        assert f"{train} row 2" in msg  # the third record, 0-based row index 2
        assert "'chosen'" in msg


def test_load_source_splits_error_in_parquet(tmp_path):
    train = write_parquet(tmp_path / "train.parquet",
                          [{"prompt": "p0", "chosen": "a", "rejected": "b"},
                           {"prompt": "p1", "chosen": "same", "rejected": "same"}])
    test = write_lines(tmp_path / "test.jsonl", [json.dumps(good_row("e0"))])
    with pytest.raises(DataError, match=rf"{train} row 1: 'chosen' and 'rejected' are identical"):
        load_source_splits(file_cfg(train, test))


def test_load_source_splits_drop_counts_every_dropped_row(tmp_path):
    no_chosen = good_row("x1")
    del no_chosen["chosen"]
    lines = [
        json.dumps(good_row("g0")),
        json.dumps(no_chosen),                                     # missing chosen
        json.dumps(good_row("x2", chosen="dup", rejected="dup")),  # identical
        json.dumps(good_row("g1", chosen="c1")),
        json.dumps(good_row("g0", chosen="other")),                # duplicate id
        json.dumps(good_row("x3", chosen="   ")),                  # empty response
        "5",                                                        # not an object
        json.dumps(good_row("g2", chosen="c2")),
    ]
    train = write_lines(tmp_path / "train.jsonl", lines)
    test = write_lines(tmp_path / "test.jsonl", [json.dumps(good_row("e0"))])
    out, summary = load_source_splits(file_cfg(train, test, on_invalid="drop"))
    assert [r["id"] for r in out["train"]] == ["g0", "g1", "g2"]
    s = summary["train"]
    assert s["rows_read"] == 8 and s["rows_kept"] == 3
    # nothing silently dropped: 8 read = 3 kept + 5 counted
    assert sum(s["dropped"].values()) == 5
    assert s["rows_read"] == s["rows_kept"] + sum(s["dropped"].values())
    assert s["dropped"] == {
        # from_columns reports the missing column before validate_row sees the row
        "missing column 'chosen' (for chosen); available: ['id', 'prompt', 'rejected']": 1,
        "'chosen' and 'rejected' are identical; a preference pair needs two different responses": 1,
        "duplicate id 'g0'": 1,
        "field 'chosen' is an empty response": 1,
        "expected a JSON object, got int": 1,
    }
    assert summary["test"] == {"rows_read": 1, "rows_kept": 1, "dropped": {}}


def test_load_source_splits_drop_aggregates_same_reason(tmp_path):
    lines = [json.dumps(good_row(f"x{i}", chosen="s", rejected="s")) for i in range(3)]
    lines.append(json.dumps(good_row("ok")))
    train = write_lines(tmp_path / "train.jsonl", lines)
    out, summary = load_source_splits(file_cfg(train, train, on_invalid="drop"))
    assert [r["id"] for r in out["train"]] == ["ok"]
    assert list(summary["train"]["dropped"].values()) == [3]  # one reason, counted 3 times


def test_load_source_splits_duplicate_id_is_an_error(tmp_path):
    train = write_lines(tmp_path / "train.jsonl",
                        [json.dumps(good_row("same")), json.dumps(good_row("same", chosen="different"))])
    test = write_lines(tmp_path / "test.jsonl", [json.dumps(good_row("e0"))])
    with pytest.raises(DataError, match=rf"{train} row 1: duplicate id 'same'"):
        load_source_splits(file_cfg(train, test))


def test_load_source_splits_max_train_is_a_deterministic_subset(tmp_path):
    ids = [f"id{i:02d}" for i in range(20)]
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(good_row(i, chosen=f"c-{i}")) for i in ids])
    test = write_lines(tmp_path / "test.jsonl", [json.dumps(good_row(f"e{i}", chosen=f"c{i}")) for i in range(4)])
    cfg = file_cfg(train, test, max_train=5, max_test=None)
    out1, summary = load_source_splits(cfg)
    out2, _ = load_source_splits(cfg)
    kept = [r["id"] for r in out1["train"]]
    assert kept == [r["id"] for r in out2["train"]]  # same input, same subset
    assert len(kept) == 5 and len(set(kept)) == 5 and set(kept) <= set(ids)
    assert kept != ids[:5]  # not simply the head of the file (hash order of the ids)
    assert len(out1["test"]) == 4  # max_test None: no limit
    assert summary["train"] == {"rows_read": 20, "rows_kept": 5, "dropped": {}}
    # independent of file order: shuffle the lines, same subset
    shuffled = write_lines(tmp_path / "train_rev.jsonl",
                           [json.dumps(good_row(i, chosen=f"c-{i}")) for i in reversed(ids)])
    out3, _ = load_source_splits(file_cfg(shuffled, test, max_train=5))
    assert [r["id"] for r in out3["train"]] == kept
    # a limit above the row count keeps everything in file order
    out4, _ = load_source_splits(file_cfg(train, test, max_train=50))
    assert [r["id"] for r in out4["train"]] == ids


def test_load_source_splits_config_errors(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(good_row("a"))])
    with pytest.raises(DataError, match="config data.splits: missing key 'test'"):
        load_source_splits({"source": "file", "splits": {"train": str(train)}})
    with pytest.raises(DataError, match="unknown source 's3:x'"):
        load_source_splits({"source": "s3:x", "splits": {"train": str(train), "test": str(train)}})
    with pytest.raises(FileNotFoundError):
        load_source_splits(file_cfg(train, tmp_path / "missing.jsonl"))


# ---------------------------------------------------------------------------------------------------
# Bad input at the door (issue 15): empty prompts, non-UTF-8 bytes, test prompts the gold judge cannot score
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("prompt", ["", "   \n", [user("")]])
def test_empty_prompt_is_rejected_naming_file_and_row(tmp_path, split, prompt):
    empty = {**good_row("r1"), "prompt": prompt}
    rows = {"train": [good_row("t0"), good_row("t1")], "test": [good_row("e0"), good_row("e1")]}
    rows[split][1] = empty
    paths = {s: write_lines(tmp_path / f"{s}.jsonl", [json.dumps(r) for r in rows[s]]) for s in rows}
    with pytest.raises(DataError, match=rf"{paths[split]} row 1: field 'prompt' is empty"):
        load_source_splits(file_cfg(paths["train"], paths["test"]))


def test_non_utf8_data_file_names_file_and_line(tmp_path):
    train = tmp_path / "train.jsonl"
    # line 2 was saved as latin-1: "é" is the single byte 0xe9
    train.write_bytes(json.dumps(good_row("t0")).encode() + b"\n" + json.dumps(good_row("t1")).encode()[:-2]
                      + b', "meta": {"note": "caf\xe9"}}\n')
    test = write_lines(tmp_path / "test.jsonl", [json.dumps(good_row("e0"))])
    with pytest.raises(DataError, match=rf"{train}:2: not valid UTF-8 \(byte \d+ of the line: b'\\xe9'\)"):
        load_source_splits(file_cfg(train, test))


GOLD_META = {"source": "synthetic:verifiable", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]}


def test_gold_judge_needs_instruction_meta_on_every_test_row(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [json.dumps(good_row("t0"))])
    test = write_lines(tmp_path / "test.jsonl", [json.dumps(good_row("e0", meta=GOLD_META)),
                                                 json.dumps(good_row("e1", chosen="other"))])
    with pytest.raises(DataError, match=rf"{test} row 1 \(id 'e1'\): table1.judge is gold.*'instruction_id_list'"):
        load_source_splits(file_cfg(train, test), gold_test=True)
    out, _ = load_source_splits(file_cfg(train, test))  # an LLM judge needs no meta
    assert len(out["test"]) == 2
    # meta whose instruction the offline verifiers cannot check is caught too
    bad = {**GOLD_META, "instruction_id_list": ["no_such:instruction"]}
    write_lines(test, [json.dumps(good_row("e0", meta=bad))])
    with pytest.raises(DataError, match=r"row 0 \(id 'e0'\): table1.judge is gold, but .*no_such:instruction"):
        load_source_splits(file_cfg(train, test, on_invalid="drop"), gold_test=True)
