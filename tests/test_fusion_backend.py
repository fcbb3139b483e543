"""The `fusion` generation backend (eval/fusion.py) on tiny random models the test builds: a large model, a small
one and experts (LoRA adapters on the small one), as a fused model directory (make_fused_model).

- greedy decoding through the backend equals a naive step-by-step reference (one prompt at a time, no KV cache,
  every part re-run on the whole sequence, the search written as the paper's algorithm in float64) token for token;
- alpha 0 is the HF backend on the large model, and alpha 1 with the large model equal to the small one is the HF
  backend on the expert, greedy and sampled (top-k, top-p, the same seeds and stop tokens);
- a resumable answer file is bound to every part's weights and to alpha;
- MT-Bench's two turns and lm-eval's model (generation and log-likelihood) through the same fused model;
- make_fused_model's checks.

Run: pytest tests/test_fusion_backend.py -q      (about 30 s on 2 shared CPU cores)
"""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from helpers.models import build_tiny_model
from scipy.special import softmax as np_softmax
from scipy.stats import entropy

from eval import fusion, generation
from rpo import sampling

PROMPTS = [{"id": f"q{i}", "messages": [{"role": "user", "content": text}]} for i, text in enumerate([
    "write a short answer in lowercase letters only", "hello world this is a tiny corpus",
    "The quick brown fox jumps over the lazy dog", "Answer with at least three words"])]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine two threads per tiny matmul spin
    against each other (measured: the module took 173 s with 2 threads, 24 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_adapter(model_dir, out, seed: int, scale: int = 64):
    """A LoRA adapter with non-zero weights (an "expert" tuned from `model_dir`), saved as training saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=4, lora_alpha=scale, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def sharpen(model_dir, factor: float):
    """Scale the final norm's weight, so the logits: a random model's next-token distributions are nearly uniform,
    where the dynamic search always lands on α = 1 (KL(P̃‖P) = KL(Q_t‖Q) when P and Q are uniform); peaked ones
    make it move."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fusion_parts")
    large = sharpen(build_tiny_model(tmp / "large", seed=0), 12.0)
    small = sharpen(build_tiny_model(tmp / "small", seed=1), 6.0)
    return {"tmp": tmp, "large": str(large), "small": str(small),
            "expert1": str(make_adapter(small, tmp / "expert1", seed=5)),
            "expert2": str(make_adapter(small, tmp / "expert2", seed=6))}


def fused_dir(parts, name, *, alpha="dynamic", large="large", small="small", experts=("expert1",), out=None):
    def d(role):
        if role in ("large", "small"):
            return {"ref_dir": parts[role], "policy_dir": None}
        return {"ref_dir": parts["small"], "policy_dir": parts[role]}
    out = out or parts["tmp"] / "fused" / name
    return str(fusion.make_fused_model(
        name=name, parts={"large": large, "small": small, "experts": list(experts)}, alpha=alpha,
        alpha_grid={"max": 2.0, "step": 0.1}, vocab_check="exact",
        dirs={"large": d(large), "small": d(small), "experts": [d(e) for e in experts]}, out=out))


def answer(model_dir, out, *, backend="fusion", policy_dir=None, temperature=0.0, top_k=0, top_p=1.0, seed=0,
           prompts=PROMPTS, max_new_tokens=8):
    return generation.answer_prompts(backend=backend, ref_dir=model_dir, policy_dir=policy_dir, prompts=prompts,
                                     out=out, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=top_k, batch_size=3, seed=seed, model_name="m", desc="test")


# ---------------------------------------------------------------------------------------------------
# The naive reference: the paper's algorithm, literally, one prompt at a time
# ---------------------------------------------------------------------------------------------------

def naive_greedy(models, tok, messages, *, max_new_tokens, alpha, grid):
    """models: (large, small, expert_1..T) as transformers models. Each step re-runs every model on the whole
    sequence (no cache, no batch, no padding); α per step by the Adaptive Logits-Arithmetic loop (strict `<`)."""
    from transformers import AutoTokenizer  # noqa: F401  (tok is one)
    ids = sampling.encode_prompt(tok, messages)
    stop = sampling.stop_token_ids(tok)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + out])
            m = [mod(input_ids=x).logits[0, -1].double().numpy() for mod in models]
            m_large, m_small, m_exp = m[0], m[1], m[2:]
            if alpha == "dynamic":
                p, q = np_softmax(m_large), np_softmax(m_small)
                best, best_alpha = np.inf, [0.0] * len(m_exp)
                for t in range(len(m_exp)):
                    for g in grid:
                        a = [g if s == t else 0.0 for s in range(len(m_exp))]
                        p_tilde = np_softmax(m_large + sum(ai * (e - m_small) for ai, e in zip(a, m_exp)))
                        loss = sum((entropy(p_tilde, p) - entropy(np_softmax(e), q)) ** 2
                                   + (entropy(p, p_tilde) - entropy(q, np_softmax(e))) ** 2 for e in m_exp)
                        if loss < best:
                            best, best_alpha = loss, a
                a = best_alpha
            else:
                a = [alpha] * len(m_exp)
            fused = m_large + sum(ai * (e - m_small) for ai, e in zip(a, m_exp))
            nxt = int(np.argmax(fused))
            out.append(nxt)
            if nxt in stop:
                break
    return out


def hf_models(parts, *names):
    from rpo.models import load_policy
    out = []
    for n in names:
        if n in ("large", "small"):
            out.append(load_policy(parts[n], parts[n]).eval())
        else:
            out.append(load_policy(parts["small"], parts[n]).eval())
    return out


@pytest.mark.parametrize("experts,alpha", [(("expert1",), "dynamic"), (("expert1", "expert2"), "dynamic"),
                                           (("expert1",), 1.0)])
def test_greedy_equals_the_naive_reference(parts, tmp_path, experts, alpha):
    d = fused_dir(parts, f"g{len(experts)}{alpha}", alpha=alpha, experts=experts)
    tok, model = fusion.load_fused(d, record_alpha=True)
    naive_models = hf_models(parts, "large", "small", *experts)
    want = [naive_greedy(naive_models, tok, p["messages"], max_new_tokens=8, alpha=alpha, grid=model.grid)
            for p in PROMPTS]
    # the batched sampler with the KV caches, on the fused model directly: token ids
    ids = [sampling.encode_row(tok, p) for p in PROMPTS]
    tok.padding_side = "left"
    input_ids, attn = sampling.left_pad(ids, tok.pad_token_id)
    new = sampling.sample(model, input_ids, attn, max_new_tokens=8, stop_ids=sampling.stop_token_ids(tok),
                          pad_id=tok.pad_token_id)
    for j, w in enumerate(want):
        assert new[j, :len(w)].tolist() == w, (j, new[j].tolist(), w)
    if alpha == "dynamic":  # the search ran and moved: some steps chose a non-zero alpha, not always the same one
        chosen = torch.cat(model.alpha_trace)
        assert chosen.shape[-1] == len(experts) and len({tuple(r) for r in chosen.tolist()}) > 1
        assert ((chosen != 0).sum(-1) <= 1).all()  # one expert at a time
    # the answer stage's backend: the same answers as text
    rows = answer(d, tmp_path / "answers.jsonl")
    for r, w in zip(rows, want):
        text, n = sampling.decode_answer(tok, w, sampling.stop_token_ids(tok))
        assert (r["responses"][0], r["n_tokens"][0]) == (text, n)
    # and the fused answers are not the large model's alone (the experts changed something)
    plain = answer(parts["large"], tmp_path / "plain.jsonl", backend="hf")
    assert [r["responses"] for r in rows] != [r["responses"] for r in plain]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.9, 20, 0.9), (1.0, 0, 1.0)])
def test_alpha_zero_is_the_large_model_on_the_hf_backend(parts, tmp_path, temperature, top_k, top_p):
    d = fused_dir(parts, "a0", alpha=0.0)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=7, max_new_tokens=10)
    fused = answer(d, tmp_path / "fused.jsonl", **kw)
    plain = answer(parts["large"], tmp_path / "plain.jsonl", backend="hf", **kw)
    assert [(r["responses"], r["n_tokens"], r["finished"]) for r in fused] == \
           [(r["responses"], r["n_tokens"], r["finished"]) for r in plain]
    if temperature:  # sampled: the seeds matter (another seed, other answers)
        other = answer(d, tmp_path / "other.jsonl", **{**kw, "seed": 8})
        assert [r["responses"] for r in other] != [r["responses"] for r in fused]


def test_several_samples_per_prompt_share_one_prefill(parts, tmp_path):
    """num_return_sequences repeats every part's KV cache (FusedCache): α = 0 samples as the large model does."""
    from rpo.models import load_policy, load_tokenizer
    _, fused = fusion.load_fused(fused_dir(parts, "n2", alpha=0.0))
    tok = load_tokenizer(parts["large"])
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, batch_size=2, seed=1, num_return_sequences=3)
    a = sampling.generate_answers(fused, tok, PROMPTS, tmp_path / "a.jsonl", **kw)
    b = sampling.generate_answers(load_policy(parts["large"], parts["large"]).eval(), tok, PROMPTS,
                                  tmp_path / "b.jsonl", **kw)
    assert [r["responses"] for r in a] == [r["responses"] for r in b] and len(a[0]["responses"]) == 3
    assert len({tuple(r["responses"]) for r in a}) > 1 and any(len(set(r["responses"])) > 1 for r in a)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.9, 20, 0.9)])
def test_alpha_one_with_large_equal_to_small_is_the_expert(parts, tmp_path, temperature, top_k, top_p):
    d = fused_dir(parts, "a1", alpha=1.0, large="small", small="small")
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=3, max_new_tokens=10)
    fused = answer(d, tmp_path / "fused.jsonl", **kw)
    expert = answer(parts["small"], tmp_path / "expert.jsonl", backend="hf", policy_dir=parts["expert1"], **kw)
    assert [(r["responses"], r["n_tokens"]) for r in fused] == [(r["responses"], r["n_tokens"]) for r in expert]
    # one module in memory for the large and the small model: it runs once per step
    _, model = fusion.load_fused(d)
    assert model.large is model.small and len(model._distinct) == 2


def test_answer_files_are_bound_to_every_part_and_alpha(parts, tmp_path, caplog):
    d1 = fused_dir(parts, "bind1", alpha=1.0)
    out = tmp_path / "answers.jsonl"
    rows = answer(d1, out)
    tok, model = fusion.load_fused(d1)

    def partial_of(model, n):  # an interrupted run of `model`: its identity and its first n answers
        ident = sampling.generation_identity(model, tok, max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0,
                                             seed=0, num_return_sequences=1, model_name="m")
        lines = [{"partial_of": out.name, "identity": ident}, *rows[:n]]
        out.with_name(out.name + ".partial").write_text("".join(json.dumps(x) + "\n" for x in lines))

    partial_of(model, 2)
    with caplog.at_level(logging.INFO, logger="rpo.sampling"):
        again = answer(d1, out)
    assert "resuming, 2 of 4 answers already done" in caplog.text and again == rows
    # the same parts with another alpha, or another expert: the interrupted run's answers are discarded
    for name, kw in (("bind2", dict(alpha=0.5)), ("bind3", dict(alpha=1.0, experts=("expert2",))),
                     ("bind4", dict(alpha=1.0, small="large", large="small"))):
        caplog.clear()
        partial_of(model, 2)
        with caplog.at_level(logging.INFO, logger="rpo.sampling"):
            answer(fused_dir(parts, name, **kw), out)
        assert "discarding 2 answers of an interrupted run made with a different model" in caplog.text, name
    fps = {sampling.model_fingerprint(fusion.load_fused(fused_dir(parts, n, **kw))[1])
           for n, kw in (("f1", dict(alpha=1.0)), ("f2", dict(alpha=1.0)), ("f3", dict(alpha=0.5)),
                         ("f4", dict(alpha="dynamic")), ("f5", dict(alpha=1.0, experts=("expert2",))))}
    assert len(fps) == 4  # f1 == f2 (the same parts and alpha), every other one differs


def test_mtbench_two_turns_through_the_fused_model(parts, tmp_path):
    from eval.mtbench import data as mtbench
    from eval.mtbench.stages import generate_mtbench
    d = fused_dir(parts, "mt", alpha="dynamic")
    out = tmp_path / "model_answer" / "fused.jsonl"
    generate_mtbench(model_name="fused", ref_dir=d, policy_dir=None, out=str(out), n_questions=2,
                                  max_new_tokens=4, batch_size=2, seed=0, backend="fusion")
    rows = mtbench.load_answers(out)
    assert len(rows) == 2 and all(len(r["choices"][0]["turns"]) == 2 for r in rows.values())


def test_lm_eval_model_loglikelihood_and_generation(parts):
    from lm_eval.api.instance import Instance

    from eval.fusion_harness import FusedHFLM
    d = fused_dir(parts, "lm", alpha="dynamic", experts=("expert1", "expert2"))
    lm = FusedHFLM(d, batch_size=2)
    tok = lm.tokenizer
    naive_models = hf_models(parts, "large", "small", "expert1", "expert2")
    ctx, cont = "hello world this is", " a tiny corpus"
    [(ll, greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
    # naive: the fused log-prob of each continuation token, the search at each position
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(ctx, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = [m(input_ids=torch.tensor([whole])).logits[0].double() for m in naive_models]
    want = 0.0
    for pos in range(n_ctx, len(whole)):
        lp, _ = fusion.fuse(logits[0][pos - 1], logits[1][pos - 1], [x[pos - 1] for x in logits[2:]], "dynamic",
                            lm.model.grid)
        want += lp[whole[pos]].item()
    assert ll == pytest.approx(want, rel=1e-5, abs=1e-5)
    # greedy generation: the naive decode of the chat-templated context, cut at the stop string
    messages = [{"role": "user", "content": "write a short answer"}]
    context = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    [text] = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["fox"], "max_gen_toks": 6,
                                                                          "do_sample": False}), 0)])
    ids = naive_greedy(naive_models, tok, messages, max_new_tokens=6, alpha="dynamic", grid=lm.model.grid)
    decoded = tok.decode([t for t in ids if t not in sampling.stop_token_ids(tok)], skip_special_tokens=True)
    assert text == decoded.split("fox")[0]
    with pytest.raises(ValueError, match="not \\['num_beams'\\]"):
        lm.generate_until([Instance("generate_until", {}, (context, {"until": ["x"], "num_beams": 2}), 0)])


def test_make_fused_model_checks(parts, tmp_path):
    from benchmarks.common import build_random_llama, tiny_tokenizer
    other = build_random_llama(tmp_path / "other", tokenizer=tiny_tokenizer(["an entirely different corpus"] * 5,
                                                                           vocab_size=300))
    bad = dict(parts, small=str(other))
    with pytest.raises(ValueError, match=r"fusion.models.v: small's tokenizer has \d+ tokens, the large model's"):
        fused_dir(bad, "v", experts=("large",))
    missing = dict(parts, expert1=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="experts\\[0\\] \\(expert1\\): no policy directory"):
        fused_dir(missing, "m")
    d = fused_dir(parts, "ok")
    spec = json.loads(open(f"{d}/fusion.json").read())
    assert spec["alpha"] == "dynamic" and spec["experts"][0]["name"] == "expert1"
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "fusion.json").write_text(json.dumps({**spec, "alpha": "fixed"}))
    with pytest.raises(ValueError, match="broken/fusion.json: alpha: 'fixed'; expected 'dynamic'"):
        fusion.load_fused(broken)
    with pytest.raises(ValueError, match="is a fused model; it takes no policy"):
        generation.load_sampler("fusion", d, parts["expert1"])


def test_run_lm_eval_with_the_fusion_backend_is_hflm_on_the_large_model_at_alpha_zero(parts, tmp_path):
    """The stage itself (simple_evaluate on the offline IFEval task): the fused model with α = 0 gives the answers
    of the harness's HF model on the large model; with the dynamic α it runs and writes the harness's files."""
    from helpers.harness import make_task, read_samples

    from eval import harness
    make_task(tmp_path)
    common = {"tasks": [{"name": "ifeval_heldout", "num_fewshot": None}], "include_path": str(tmp_path / "task"),
              "limit": 2, "batch_size": 2, "max_gen_toks": 6, "seed": 0}
    harness.run_lm_eval(model_name="large", ref_dir=parts["large"], policy_dir=None, out_dir=str(tmp_path / "hf"),
                        **common)
    harness.run_lm_eval(model_name="a0", ref_dir=fused_dir(parts, "lm0", alpha=0.0), policy_dir=None,
                        out_dir=str(tmp_path / "a0"), backend="fusion", **common)
    results = harness.run_lm_eval(model_name="dyn", ref_dir=fused_dir(parts, "lmd"), policy_dir=None,
                                  out_dir=str(tmp_path / "dyn"), backend="fusion", **common)
    hf, a0 = read_samples(tmp_path / "hf"), read_samples(tmp_path / "a0")
    assert [s["resps"] for s in a0] == [s["resps"] for s in hf] and len(hf) == 2
    assert results["rpo_model"] == "dyn" and len(read_samples(tmp_path / "dyn")) == 2
    assert harness.score_lm_eval(model_name="dyn", results_dir=str(tmp_path / "dyn"), out=str(tmp_path / "d.json"))
