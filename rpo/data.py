"""Preference data: one normalised JSONL schema, its validation, and the three sources.

Normalised row (one JSON object per line of `train.jsonl` / `test.jsonl`):

    {"id": str, "prompt": [{"role": "user", "content": str}, ...],
     "chosen": [{"role": "assistant", "content": str}], "rejected": [{"role": "assistant", ...}],
     "meta": {...}}

Sources (config `data.source`):
    synthetic:verifiable   offline default: IFEval prompts, responses sampled from the base model, gold
                           score from lm-eval's IFEval verifiers, chosen/rejected by gold (rpo.verifiable)
    hf:<dataset id>        a hub dataset; `splits` names its splits (e.g. train_prefs / test_prefs)
    file                   local .jsonl / .parquet files; `splits` maps train/test to their paths
Hub and file rows may hold `chosen`/`rejected` either as full conversations that start with the prompt
(UltraFeedback's layout) or as a response string / list of messages next to a `prompt` column. When the
conversations are whole and a `prompt` column holds a string too, that string is kept as meta.dataset_prompt.

Every row is validated; a bad row fails the run with its file/split, row number and field, unless the
config says `on_invalid: drop`, in which case each dropped row is counted by reason in the summary.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

from rpo import io

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A preference row or file that does not match the normalised schema."""


def _messages(value, field: str, where: str, *, last_role: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": last_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of chat messages "
                        f"or a string, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise DataError(f"{where}: field '{field}'[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field '{field}'[{i}].role is {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: field '{field}'[{i}].content must be a string")
    if value[-1]["role"] != last_role:
        raise DataError(f"{where}: field '{field}' must end with a '{last_role}' message, "
                        f"ends with '{value[-1]['role']}'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def validate_row(row, where: str) -> dict:
    """Return the row in normalised form, or raise DataError naming `where` and the field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("id", "prompt", "chosen", "rejected"):
        if field not in row or row[field] is None:
            raise DataError(f"{where}: missing field '{field}' (expected id, prompt, chosen, rejected)")
    if not isinstance(row["id"], str) or not row["id"]:
        raise DataError(f"{where}: field 'id' must be a non-empty string")
    prompt = _messages(row["prompt"], "prompt", where, last_role="user")
    if not prompt[-1]["content"].strip():
        raise DataError(f"{where}: field 'prompt' is empty (its last user message has no text)")
    chosen = _messages(row["chosen"], "chosen", where, last_role="assistant")
    rejected = _messages(row["rejected"], "rejected", where, last_role="assistant")
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: field '{field}' is an empty response")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a preference pair needs two "
                        "different responses")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object")
    return {"id": row["id"], "prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}


def stable_id(prompt, chosen, rejected) -> str:
    blob = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def from_columns(raw: dict, columns: dict, where: str) -> dict:
    """Map one hub/file record to the normalised schema (before validation)."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [f"'{columns[k]}' (for {k})" for k in ("chosen", "rejected") if columns[k] not in raw]
    if missing:
        raise DataError(f"{where}: missing column {', '.join(missing)}; available: {sorted(raw)}")
    chosen, rejected = raw[columns["chosen"]], raw[columns["rejected"]]
    prompt = raw.get(columns["prompt"])
    if isinstance(chosen, list) and len(chosen) > 1:
        # UltraFeedback layout: full conversations; the prompt is every turn before the last.
        prompt_msgs = chosen[:-1]
        if isinstance(rejected, list) and len(rejected) > 1:
            if rejected[:-1] != prompt_msgs:
                raise DataError(f"{where}: 'chosen' and 'rejected' conversations differ before their "
                                "last turn, so they do not share one prompt")
            rejected = rejected[-1:]
        chosen, prompt = chosen[-1:], prompt_msgs
    if prompt is None:
        raise DataError(f"{where}: missing column '{columns['prompt']}' (for prompt)")
    rid = raw.get(columns.get("id") or "", None)
    # A normalised file's own `meta` (e.g. the gold judge's instructions) travels with the row.
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    raw_prompt = raw.get(columns["prompt"])
    if isinstance(raw_prompt, str) and prompt is not raw_prompt:
        # the dataset's own prompt string beside a conversation (UltraFeedback's `prompt`): what the authors'
        # gen_eval.py asks the model for Table 1 (table1.prompt: dataset_prompt)
        meta = {**meta, "dataset_prompt": raw_prompt}
    row = {"id": str(rid) if rid not in (None, "") else "", "prompt": prompt, "chosen": chosen,
           "rejected": rejected, "meta": meta}
    if not row["id"]:
        row["id"] = stable_id(prompt, chosen, rejected)
    return row


def normalise(records, columns: dict, where: str, *, on_invalid: str, counts: dict,
              check=None) -> list[dict]:
    """Validated rows; `check(row)` -> a problem or None is a further requirement that no
    `on_invalid: drop` excuses (a config that cannot use this data, e.g. the gold judge's meta)."""
    out, seen = [], set()
    for i, raw in enumerate(records):
        loc = f"{where} row {i}"
        try:
            row = validate_row(from_columns(raw, columns, loc), loc)
            if row["id"] in seen:
                raise DataError(f"{loc}: duplicate id {row['id']!r}")
        except DataError as e:
            if on_invalid != "drop":
                raise
            reason = str(e).split(": ", 1)[-1]
            counts[reason] = counts.get(reason, 0) + 1
            continue
        problem = check(row) if check else None
        if problem:
            raise DataError(f"{loc} (id {row['id']!r}): {problem}")
        seen.add(row["id"])
        out.append(row)
    return out


def read_records(path: str | Path) -> list[dict]:
    """Read a .jsonl or .parquet file into a list of dicts; a bad JSON line names its line number."""
    return [r for _, r in _numbered_records(path)]


def _numbered_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs: blank .jsonl lines are skipped but still counted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".parquet":
        # pyarrow's to_pylist gives plain lists/dicts (pandas would give numpy arrays for list columns).
        import pyarrow.parquet as pq
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected a .jsonl or .parquet file")
    try:
        return io.read_jsonl_numbered(path)
    except io.JSONLError as e:
        raise DataError(str(e)) from None


def read_pairs(path: str | Path) -> list[dict]:
    """Read and validate a normalised preference file."""
    return [validate_row(r, f"{path}:{n}") for n, r in _numbered_records(path)]


write_jsonl = io.write_jsonl  # kept for callers outside rpo (eval.table1); new code uses rpo.io


def prompts_of(rows: list[dict]) -> list[dict]:
    """Held-out prompts for Table 1 and the benchmarks: {id, messages, meta}."""
    return [{"id": r["id"], "messages": r["prompt"], "meta": r.get("meta", {})} for r in rows]


# ---------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------

def load_hub_split(source: str, split: str):
    """One split of a hub dataset `hf:<owner>/<name>[@<revision>]`, and the commit it resolved to.

    The repository is resolved through the hub cache (`snapshot_download`, which with HF_HUB_OFFLINE=1
    uses the cached snapshot and fails clearly when there is none) and then read from that local
    snapshot, so one code path serves online runs, offline runs on a pre-filled cache, and the tests.
    (`datasets.load_dataset("<owner>/<name>")` itself cannot resolve a repository offline.)
    """
    import datasets
    from huggingface_hub import snapshot_download
    repo, _, revision = source[len("hf:"):].partition("@")
    try:
        path = snapshot_download(repo_id=repo, repo_type="dataset", revision=revision or None)
    except Exception as e:  # offline without a cached snapshot, unknown repo, no network
        raise DataError(f"config data.source {source!r}: cannot resolve the hub dataset ({type(e).__name__}: "
                        f"{e}); with HF_HUB_OFFLINE=1 it must be in the hub cache "
                        f"(huggingface-cli download {repo} --repo-type dataset)") from None
    try:
        # The snapshot folder is named by the commit: the exact revision, recorded in the summary.
        return datasets.load_dataset(path, split=split), Path(path).name
    except ValueError as e:
        raise DataError(f"config data.splits: {source!r} has no split {split!r} ({e})") from None


def gold_meta_problem(row: dict) -> str | None:
    """Why the gold judge (IFEval verifiers) cannot score answers to this test row, or None."""
    from rpo import verifiable
    meta = row.get("meta") or {}
    if "instruction_id_list" not in meta or "kwargs" not in meta:
        return ("table1.judge is gold, which scores answers with the verifiable instructions in the row's "
                "'meta' ('instruction_id_list' and 'kwargs'); this row has none (only synthetic:verifiable "
                "data carries them: use an LLM judge for other data)")
    problem = verifiable.row_problem(meta)
    return f"table1.judge is gold, but the row's meta cannot be gold-scored: {problem}" if problem else None


def load_source_splits(cfg: dict, *, gold_test: bool = False) -> tuple[dict[str, list[dict]], dict]:
    """hf:/file sources: the train and test splits, normalised, and a summary.

    gold_test=True (Table 1 judged by the gold scorer) also requires every test row to carry the
    gold judge's instructions (`gold_meta_problem`)."""
    source, splits = cfg["source"], cfg["splits"]
    columns = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id",
               **(cfg.get("columns") or {})}
    on_invalid = cfg.get("on_invalid", "error")
    out, summary = {}, {"source": source}
    for split in ("train", "test"):
        if split not in splits:
            raise DataError(f"config data.splits: missing key '{split}'")
        if source.startswith("hf:"):
            records, summary["revision"] = load_hub_split(source, splits[split])
            where = f"{source} split '{splits[split]}'"
        elif source == "file":
            records = read_records(splits[split])
            where = str(splits[split])
        else:
            raise DataError(f"config data.source: unknown source {source!r}; expected "
                            "'synthetic:verifiable', 'hf:<dataset id>' or 'file'")
        limit = cfg.get(f"max_{split}")
        counts: dict[str, int] = {}
        check = gold_meta_problem if gold_test and split == "test" else None
        rows = normalise(records, columns, where, on_invalid=on_invalid, counts=counts, check=check)
        if limit is not None and len(rows) > limit:
            # A deterministic subset, not the head: hub splits are often sorted by source.
            rows = sorted(rows, key=lambda r: hashlib.sha1(r["id"].encode()).hexdigest())[:limit]
        out[split] = rows
        summary[split] = {"rows_read": len(records), "rows_kept": len(rows), "dropped": counts}
        if counts:
            log.warning("%s: dropped %d invalid rows (on_invalid: drop): %s", where, sum(counts.values()), counts)
    return out, summary


def build_synthetic(model, tok, cfg: dict, seed: int, samples_path: str | Path) -> tuple[dict, dict]:
    """synthetic:verifiable: sample responses from the base model, score with the gold, pair them."""
    from rpo.sampling import generate_answers
    from rpo import verifiable

    syn = cfg["synthetic"]
    rows = verifiable.load_prompts(syn.get("prompts_file"))
    train_rows, test_rows, summary = verifiable.select_prompts(
        rows, n_train=syn["n_train_prompts"], n_test=syn["n_test_prompts"], seed=seed)
    all_rows = {f"ifeval-{r['key']}": r for r in train_rows + test_rows}
    prompts = [{"id": k, "messages": [{"role": "user", "content": r["prompt"]}]} for k, r in all_rows.items()]
    answers = generate_answers(
        model, tok, prompts, samples_path, max_new_tokens=syn["max_new_tokens"],
        temperature=syn["temperature"], top_p=syn["top_p"], top_k=syn["top_k"],
        batch_size=syn["batch_size"], seed=seed, num_return_sequences=syn["responses_per_prompt"],
        desc="sample responses")
    by_id = {a["id"]: a for a in answers}
    rng = random.Random(seed)
    out = {}
    for split, split_rows in (("train", train_rows), ("test", test_rows)):
        pairs, ties, flipped, unfinished = [], 0, 0, 0
        for r in split_rows:
            a = by_id[f"ifeval-{r['key']}"]
            scores = [verifiable.gold_score(resp, r)["score"] for resp in a["responses"]]
            unfinished += sum(not f for f in a["finished"])
            pair = verifiable.make_pair(r, a["responses"], scores, label_noise=syn["label_noise"], rng=rng)
            if pair is None:
                ties += 1  # best and worst response have the same gold score: no preference
                continue
            flipped += pair["meta"]["label_flipped"]
            pairs.append(validate_row(pair, f"synthetic pair {pair['id']}"))
        out[split] = pairs
        summary[f"{split}_pairs"] = len(pairs)
        summary[f"{split}_dropped_ties"] = ties
        summary[f"{split}_label_flipped"] = flipped
        summary[f"{split}_responses_cut_at_max_new_tokens"] = unfinished
        log.info("%s: %d prompts -> %d pairs (%d dropped as gold ties, %d labels flipped)",
                 split, len(split_rows), len(pairs), ties, flipped)
    # Table 1 is judged on every held-out prompt, tied or not, with the gold meta to score answers.
    summary["test_prompts"] = len(test_rows)
    test_prompts = [{"id": f"ifeval-{r['key']}", "messages": [{"role": "user", "content": r["prompt"]}],
                     "meta": {"source": verifiable.SOURCE, "key": r["key"],
                              "instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]}}
                    for r in test_rows]
    return {**out, "test_prompts": test_prompts}, summary
