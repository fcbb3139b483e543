"""The vLLM backend (eval/vllm_backend.py) behind every generation stage, checked on CPU against the HF
backend with a fake `vllm` in sys.modules (tests/helpers/fake_vllm.py: the real tiny model decoded by its
own loop, every engine, prompt and parameter recorded). Checked: the engine gets the prompt tokens the
tokenizer's chat template gives (what the HF path feeds its model), each benchmark's decoding settings
(MT-Bench's per-category temperatures, max_tokens), a LoRA adapter unmerged, one engine per job; the answer
files equal the HF path's byte for byte where both decode greedily, and have its keys, order and types
everywhere. Real vLLM needs a CUDA GPU; without the package, asking for it is a clear error.

Run: pytest -q tests/test_vllm_backend.py      (about 45 s on 2 shared CPU cores; one Snakemake dry run)
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers.data import tiny_pairs, write_jsonl
from helpers.models import make_adapter
from helpers import fake_vllm

from eval import generation, vllm_backend
from eval.alpacaeval.stages import generate_alpacaeval
from eval.arenahard.stages import generate_arenahard
from eval.mtbench import answers as mtbench_answers, data as mtbench
from eval.mtbench.stages import generate_mtbench
from eval.table1 import generate_table1_answers, select_prompts
from rpo.models import load_tokenizer

PROMPTS = [{"id": p["id"], "messages": p["prompt"], "meta": {}} for p in tiny_pairs(4)]
TABLE1 = {"n_prompts": None, "max_new_tokens": 8, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "batch_size": 1,
          "seed": 0, "protocol": "both_orders"}
QUESTIONS = [  # one greedy category and two sampled ones (FastChat's temperature_config)
    {"question_id": 7, "category": "math", "turns": ["hello world two plus two", "now times three"]},
    {"question_id": 3, "category": "writing", "turns": ["write a short answer", "make it lowercase"]},
    {"question_id": 5, "category": "stem", "turns": ["the quick brown fox", "no commas here please"]},
]
TEMPERATURE = {7: 0.0, 3: 0.7, 5: 0.1}  # math, writing, stem


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture
def fake(monkeypatch):
    return fake_vllm.install(monkeypatch)


def template_ids(tok, messages) -> list[int]:
    """The chat template rendered as text (the assistant turn opened), then tokenized as it stands."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def shape(x):
    """A JSON value's structure: keys in order, list lengths, leaf types."""
    if isinstance(x, dict):
        return [(k, shape(v)) for k, v in x.items()]
    if isinstance(x, list):
        return [shape(v) for v in x]
    return type(x).__name__


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# Table 1
# ---------------------------------------------------------------------------------------------------

def test_table1_answers_through_vllm_equal_the_hf_file(tiny_model_dir, adapter, fake, tmp_path):
    prompts = write_jsonl(PROMPTS, tmp_path / "prompts.jsonl")
    tok = load_tokenizer(tiny_model_dir)
    stop = sorted({tok.eos_token_id, tok.pad_token_id})
    texts = {}
    for name, policy in (("ref", None), ("dpo", str(adapter))):
        kw = dict(TABLE1, model_name=name, ref_dir=str(tiny_model_dir), policy_dir=policy, prompts_path=str(prompts))
        hf, vl = tmp_path / f"hf_{name}.jsonl", tmp_path / f"vllm_{name}.jsonl"
        generate_table1_answers(**kw, out=str(hf))
        fake.LLM.instances.clear()
        generate_table1_answers(**kw, backend="vllm", vllm_dtype="float32", out=str(vl))
        assert vl.read_bytes() == hf.read_bytes()
        assert not vl.with_name(vl.name + ".partial").exists()  # written once, at the end
        texts[name] = [r["responses"] for r in read_jsonl(vl)]

        (engine,) = fake.LLM.instances  # one engine for the job
        (call,) = engine.calls          # every prompt in one call
        assert engine.kwargs["model"] == engine.kwargs["tokenizer"] == str(tiny_model_dir)  # the reference
        assert engine.kwargs["dtype"] == "float32"
        assert [p["prompt_token_ids"] for p in call["prompts"]] == [template_ids(tok, p["messages"]) for p in PROMPTS]
        for sp in call["params"]:  # greedy, 8 new tokens, the HF sampler's stop tokens and no other
            assert (sp.n, sp.temperature, sp.max_tokens, sp.stop_token_ids, sp.ignore_eos) == (1, 0.0, 8, stop, True)
        assert len({sp.seed for sp in call["params"]}) == len(PROMPTS)  # a seed of its own per request
        if policy is None:
            assert call["lora_request"] is None and engine.kwargs["enable_lora"] is False
        else:  # unmerged: the engine holds the reference, the adapter rides with the request
            assert engine.kwargs["enable_lora"] is True and engine.kwargs["max_lora_rank"] == 8  # r=4, vLLM's min 8
            assert call["lora_request"].lora_path == str(adapter.resolve())
    assert texts["dpo"] != texts["ref"]  # the adapter acts, so the engine applied it
    assert any(t[0] for t in texts["dpo"])  # text to compare (the tiny Ref answers newlines, stripped to "")


def test_table1_the_authors_way_through_vllm(tiny_model_dir, fake, tmp_path):
    """gen_eval*.py: one question per prompt (here the dataset's prompt string), the chat template's text as a
    string prompt (vLLM puts the BOS in front), extra stop ids, vLLM's own text unstripped, the configured dtype."""
    from helpers.models import with_bos_tokenizer
    model_dir = with_bos_tokenizer(tiny_model_dir, tmp_path / "bos_model")
    rows = [{**p, "meta": {"dataset_prompt": f"hello world {i}"}} for i, p in enumerate(PROMPTS)]
    prompts = write_jsonl(rows, tmp_path / "prompts.jsonl")
    tok = load_tokenizer(model_dir)
    extra = tok("hello", add_special_tokens=False)["input_ids"][-1]
    generate_table1_answers(**{**TABLE1, "protocol": "paper"}, model_name="ref", ref_dir=str(model_dir),
                            policy_dir=None, prompts_path=str(prompts), out=str(tmp_path / "a.jsonl"),
                            backend="vllm", vllm_dtype="float32", dtype="bfloat16", prompt="dataset_prompt",
                            add_special_tokens=True, stop_token_ids=[extra], answer_text="raw")
    (engine,) = fake.LLM.instances
    (call,) = engine.calls
    assert engine.kwargs["dtype"] == "bfloat16"  # the stage's dtype over generation.vllm_dtype
    for r, p in zip(rows, call["prompts"]):
        text = tok.apply_chat_template([{"role": "user", "content": r["meta"]["dataset_prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        assert p["prompt_token_ids"] == [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert {tuple(sp.stop_token_ids) for sp in call["params"]} == {tuple(sorted({tok.eos_token_id, extra}))}
    out = read_jsonl(tmp_path / "a.jsonl")
    # vLLM's own detokenized text, as it comes (the fake's stands in for it)
    assert all(r["responses"][0].startswith("<fake detokenizer text ") for r in out)
    assert [r["messages"] for r in out] == [[{"role": "user", "content": f"hello world {i}"}] for i in range(4)]


def test_rows_are_cut_at_the_stop_token_as_the_hf_backend_cuts(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    eos, words = tok.eos_token_id, tok("hello world this is", add_special_tokens=False)["input_ids"]
    prompts = [{"id": f"p{i}", "messages": [{"role": "user", "content": "x"}]} for i in range(3)]
    encoded = [[1, 2], [3], [4, 5, 6]]

    def out(ids, token_ids, reason):
        return SimpleNamespace(prompt_token_ids=ids, outputs=[SimpleNamespace(text="vLLM's own text",
                                                                              token_ids=token_ids, finish_reason=reason)])

    outputs = [out([1, 2], words + [eos], "stop"),   # stopped on eos, kept in token_ids (vLLM)
               out([3], words, "length"),            # cut at max_tokens
               out([4, 5, 6], words, "stop")]        # stopped, the stop token not in token_ids
    rows = vllm_backend.rows_from_outputs(tok, prompts, encoded, outputs, {eos}, "m")
    text = tok.decode(words, skip_special_tokens=True).strip()
    assert rows[0] == {"id": "p0", "model": "m", "messages": prompts[0]["messages"], "responses": [text],
                       "n_tokens": [len(words)], "finished": [True]}
    assert (rows[1]["n_tokens"], rows[1]["finished"]) == ([len(words)], [False])
    assert (rows[2]["n_tokens"], rows[2]["finished"]) == ([len(words)], [True])
    with pytest.raises(ValueError, match="2 outputs for 3 prompts"):
        vllm_backend.rows_from_outputs(tok, prompts, encoded, outputs[:2], {eos}, "m")
    with pytest.raises(ValueError, match="prompt 'p1' is for other prompt tokens"):
        vllm_backend.rows_from_outputs(tok, prompts, [[1, 2], [9], [4, 5, 6]], outputs, {eos}, "m")
    with pytest.raises(RuntimeError, match="prompt 'p2': vLLM finished with 'abort'"):
        vllm_backend.rows_from_outputs(tok, prompts, encoded, outputs[:2] + [out([4, 5, 6], words, "abort")],
                                       {eos}, "m")


# ---------------------------------------------------------------------------------------------------
# MT-Bench, AlpacaEval, Arena-Hard
# ---------------------------------------------------------------------------------------------------

def test_mtbench_through_vllm_two_turns_per_category_temperatures(tiny_model_dir, adapter, fake, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(mtbench, "load_questions", lambda path=None: QUESTIONS)
    kw = dict(model_name="dpo", ref_dir=str(tiny_model_dir), policy_dir=str(adapter), n_questions=None,
              max_new_tokens=6, batch_size=1, seed=1)
    generate_mtbench(**kw, out=str(tmp_path / "hf.jsonl"))
    generate_mtbench(**kw, backend="vllm", vllm_dtype="bfloat16", out=str(tmp_path / "vllm.jsonl"))
    hf, vl = read_jsonl(tmp_path / "hf.jsonl"), read_jsonl(tmp_path / "vllm.jsonl")
    tok = load_tokenizer(tiny_model_dir)

    (engine,) = fake.LLM.instances   # one engine for both turns and every category
    assert len(engine.calls) == 2    # one call per turn
    for call in engine.calls:
        assert [sp.temperature for sp in call["params"]] == [TEMPERATURE[q["question_id"]] for q in QUESTIONS]
        assert all((sp.max_tokens, sp.top_p, sp.top_k) == (6, 1.0, 50) for sp in call["params"])
        assert call["lora_request"].lora_path == str(adapter.resolve())
    answers = {r["question_id"]: r["choices"][0]["turns"] for r in vl}
    turn1, turn2 = ([p["prompt_token_ids"] for p in c["prompts"]] for c in engine.calls)
    assert turn1 == [template_ids(tok, [{"role": "user", "content": q["turns"][0]}]) for q in QUESTIONS]
    # turn 2's prompt holds the model's own first answer, the one in the file
    assert turn2 == [template_ids(tok, [{"role": "user", "content": q["turns"][0]},
                                        {"role": "assistant", "content": answers[q["question_id"]][0]},
                                        {"role": "user", "content": q["turns"][1]}]) for q in QUESTIONS]
    assert shape(vl) == shape(hf) and [r["question_id"] for r in vl] == [3, 5, 7]  # FastChat's rows, sorted
    assert all(r["answer_id"] == mtbench_answers.answer_id("dpo", r["question_id"], r["choices"][0]["turns"])
               for r in vl)
    assert vl[2]["choices"] == hf[2]["choices"]  # the greedy (math) question: the HF path's answers
    assert any(a[0] for a in answers.values())
    assert not (tmp_path / "vllm.jsonl.work").exists()


def test_alpacaeval_and_arenahard_through_vllm_equal_the_hf_files(tiny_model_dir, adapter, fake, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    kw = dict(model_name="dpo", ref_dir=str(tiny_model_dir), policy_dir=str(adapter), n_questions=2,
              subset="shortest", max_new_tokens=6, batch_size=1, seed=0, temperature=0.0, top_p=1.0)
    for b in ("hf", "vllm"):
        extra = {"backend": "vllm", "vllm_dtype": "bfloat16"} if b == "vllm" else {}
        generate_alpacaeval(**kw, **extra, out=str(tmp_path / b / "model_outputs.json"))
        generate_arenahard(**kw, **extra, version="v2.0", category="hard_prompt",
                                      out=str(tmp_path / b / "arenahard.jsonl"))
    for name in ("model_outputs.json", "model_outputs.gen.jsonl", "arenahard.jsonl"):
        assert (tmp_path / "vllm" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "vllm").iterdir()) == sorted(p.name for p in (tmp_path / "hf").iterdir())

    alpaca, arena = fake.LLM.instances  # one engine per job
    outputs = json.loads((tmp_path / "vllm" / "model_outputs.json").read_text())
    arena_rows = read_jsonl(tmp_path / "vllm" / "arenahard.jsonl")
    for engine, messages in ((alpaca, [[{"role": "user", "content": r["instruction"]}] for r in outputs]),
                             (arena, [r["messages"] for r in arena_rows])):
        (call,) = engine.calls
        assert [p["prompt_token_ids"] for p in call["prompts"]] == [template_ids(tok, m) for m in messages]
        assert all((sp.temperature, sp.max_tokens) == (0.0, 6) for sp in call["params"])
        assert call["lora_request"].lora_path == str(adapter.resolve())
    assert len(outputs) == len(arena_rows) == 2


def test_alpacaeval_and_mtbench_the_authors_way_through_vllm(tiny_model_dir, fake, tmp_path, monkeypatch):
    """AlpacaEval: the authors' prompt_template with {instruction}, a string prompt (BOS), sampled at 0.7 / 1.0;
    MT-Bench: FastChat's conversation (eval/mtbench/fastchat.py) with the BOS, its stops, the answer cut as FastChat
    cuts."""
    from helpers.models import with_bos_tokenizer

    from eval.alpacaeval import data as alpacaeval
    from eval.mtbench import fastchat
    model_dir = with_bos_tokenizer(tiny_model_dir, tmp_path / "bos_model")
    tok = load_tokenizer(model_dir)
    template = "<|system|>\n</s>\n<|user|>\n{instruction}</s>\n<|assistant|>\n"  # zephyr-7b-alpha/prompt.txt
    generate_alpacaeval(model_name="ref", ref_dir=str(model_dir), policy_dir=None, n_questions=2,
                                     subset="shortest", max_new_tokens=6, batch_size=1, seed=0, temperature=0.7,
                                     top_p=1.0, backend="vllm", vllm_dtype="bfloat16", add_special_tokens=True,
                                     prompt_template=template, out=str(tmp_path / "alpaca" / "model_outputs.json"))
    (engine,) = fake.LLM.instances
    (call,) = engine.calls
    outputs = json.loads((tmp_path / "alpaca" / "model_outputs.json").read_text())
    for p, o in zip(call["prompts"], outputs):
        text = template.replace("{instruction}", o["instruction"])
        assert p["prompt_token_ids"] == tok(text)["input_ids"] and p["prompt_token_ids"][0] == tok.bos_token_id
    assert {(sp.temperature, sp.top_p, sp.max_tokens) for sp in call["params"]} == {(0.7, 1.0, 6)}
    with pytest.raises(ValueError, match=r"prompt_template: expected the placeholder \{instruction\} once"):
        alpacaeval.generation_prompts([{"instruction": "x"}], "{instruction} and {input}")

    fake.LLM.instances.clear()
    monkeypatch.setattr(mtbench, "load_questions", lambda path=None: QUESTIONS)
    generate_mtbench(model_name="ref", ref_dir=str(model_dir), policy_dir=None, n_questions=None,
                                  max_new_tokens=6, batch_size=1, seed=1, backend="vllm", vllm_dtype="bfloat16",
                                  dtype="float16", fastchat_template="h4_gemma_zephyr", out=str(tmp_path / "mt.jsonl"))
    (engine,) = fake.LLM.instances
    assert engine.kwargs["dtype"] == "float16"
    conv = fastchat.get_template("h4_gemma_zephyr")
    turn1, turn2 = engine.calls
    for q, p in zip(QUESTIONS, turn1["prompts"]):
        text = fastchat.prompt_text(conv, [{"role": "user", "content": q["turns"][0]}])
        assert p["prompt_token_ids"] == tok(text)["input_ids"]  # the tokenizer's BOS, then the literal "<bos>" text
    answers = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(tmp_path / "mt.jsonl")}
    # the fake's text is not FastChat-cut by anything: the answers are our decode, cut and stripped
    assert all(a == fastchat.answer_text(conv, a) for turns in answers.values() for a in turns)
    for q, p in zip(QUESTIONS, turn2["prompts"]):
        text = fastchat.prompt_text(conv, [{"role": "user", "content": q["turns"][0]},
                                           {"role": "assistant", "content": answers[q["question_id"]][0]},
                                           {"role": "user", "content": q["turns"][1]}])
        assert p["prompt_token_ids"] == tok(text)["input_ids"]


# ---------------------------------------------------------------------------------------------------
# The setting, through the workflow
# ---------------------------------------------------------------------------------------------------

@pytest.mark.workflow
def test_one_setting_sends_every_generation_job_to_vllm(tiny_model_dir, fake, tmp_path, monkeypatch):
    from helpers.workflow import REPO, args_of, dry_run, jobs
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["generation"] = {"backend": "vllm", "vllm_dtype": "float16"}
    (tmp_path / "vllm.yaml").write_text(yaml.safe_dump(cfg))
    by_rule = {}
    for j in jobs(dry_run(tmp_path, tmp_path / "vllm.yaml", "profiles/default")):
        by_rule.setdefault(j["rule"], []).append(args_of(j))
    rules = ("generate_table1", "generate_mtbench", "generate_alpacaeval", "generate_arenahard")
    for rule in rules:
        assert {(a["backend"], a["vllm_dtype"]) for a in by_rule[rule]} == {("vllm", "float16")}, rule
    assert {a["backend"] for a in by_rule["run_lm_eval"]} == {"vllm"}
    # the job's own arguments reach the engine: the configured dtype and MT-Bench's max_new_tokens (48)
    monkeypatch.setattr(mtbench, "load_questions", lambda path=None: QUESTIONS)
    args = next(a for a in by_rule["generate_mtbench"] if a["model_name"] == "ref")
    generate_mtbench(**{**args, "ref_dir": str(tiny_model_dir), "out": str(tmp_path / "ref.jsonl")})
    (engine,) = fake.LLM.instances
    assert engine.kwargs["dtype"] == "float16"
    assert {sp.max_tokens for c in engine.calls for sp in c["params"]} == {cfg["benchmarks"]["mtbench"]["max_new_tokens"]}


def test_bad_backend_settings_are_errors():
    # (the default, hf, in the paper configs' dry runs: tests/test_paper_configs.py)
    with pytest.raises(ValueError, match=r"generation.backend: unknown backend 'tgi'; expected one of \['hf', 'vllm', 'llamacpp'\]"):
        generation.check_backend("tgi", None)
    with pytest.raises(ValueError, match="no vllm_dtype given"):
        generation.check_backend("vllm", None)
    with pytest.raises(ValueError, match="generation.backend llamacpp: no GGUF of the reference model"):
        generation.check_backend("llamacpp", None, {"policy": "x.gguf"})


def test_missing_vllm_is_a_clear_error(monkeypatch, tiny_model_dir, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_vllm(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(RuntimeError, match=r"pip install -e '.\[vllm\]'.*or set backend: hf"):
        vllm_backend.require_vllm()
    prompts = write_jsonl(PROMPTS, tmp_path / "prompts.jsonl")
    with pytest.raises(RuntimeError, match="needs the vllm package"):  # never a silent switch to HF
        generate_table1_answers(**TABLE1, model_name="ref", ref_dir=str(tiny_model_dir), policy_dir=None,
                                prompts_path=str(prompts), out=str(tmp_path / "a.jsonl"), backend="vllm",
                                vllm_dtype="bfloat16")
    assert not (tmp_path / "a.jsonl").exists()


def test_table1_prompt_selection_is_a_fixed_draw():
    prompts = [{"id": f"q{i}", "messages": []} for i in range(50)]
    a = select_prompts(prompts, 10)
    assert len(a) == 10 and a == select_prompts(list(reversed(prompts)), 10)  # independent of file order
    assert [p["id"] for p in a] != [f"q{i}" for i in range(10)]  # not the head of the split
    assert select_prompts(prompts, None) == prompts and select_prompts(prompts, 99) == prompts
