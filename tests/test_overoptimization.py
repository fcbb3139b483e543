"""The overoptimization study (issue 12): snapshots during training, the KL estimator against closed forms,
the per-snapshot measurements, the hierarchical bootstrap and the tidy rows on hand-made cases, and the
study's DAG on the tiny config end to end."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data import lowercase_prompts, run_paths, tiny_pairs, write_jsonl
from helpers.training import SNAPSHOT_CFG, train_with_snapshots

from eval import overoptimization as ov
from eval.bootstrap import hierarchical_bootstrap
from rpo import loop, overopt, train
from rpo.config import expand_grid, resolve_study
from rpo.models import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# The KL estimator
# ---------------------------------------------------------------------------------------------------

def _constant_head(model, bias: torch.Tensor):
    """Make every next-token distribution softmax(bias), whatever the context: a zero-weight LM head with a
    bias (a biased head takes rpo.batching's plain log-softmax path)."""
    h, v = model.config.hidden_size, model.config.vocab_size
    head = torch.nn.Linear(h, v, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(bias)
    model.lm_head = head
    model.config.tie_word_embeddings = False
    return model.eval()


def test_kl_of_a_model_against_itself_is_zero(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    tok = load_tokenizer(tiny_model_dir)
    # an untrained LoRA adapter (B = 0): the policy is the reference, so every sample's log-ratio is 0, up to
    # the float rounding between the sampler's cached decode (log π) and the reference's full forward pass
    policy = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"])).eval()
    rows = overopt.kl_samples(policy, overopt.Reference(), tok, lowercase_prompts(5), n=3, max_new_tokens=8, seed=0,
                              batch_size=4)
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(5)]
    assert max(abs(v) for r in rows for v in r["values"]) < 1e-4
    assert all(len(r["values"]) == 3 and all(1 <= n <= 9 for n in r["n_tokens"]) for r in rows)


def test_kl_estimate_matches_the_closed_form_of_a_known_logit_shift(tiny_model_dir):
    """Reference: uniform over the V tokens at every position. Policy: softmax(s) at every position. Each
    token then adds KL_tok = Σ p log(p V), and a sequence stops at a stop token (EOS/pad, probability q) or
    after T tokens, so by Wald's identity E[Σ_t log p/u] = KL_tok Σ_{i=1..T} (1-q)^(i-1)."""
    tok = load_tokenizer(tiny_model_dir)
    v = load_model(tiny_model_dir).config.vocab_size
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(v, generator=gen) * 1.5
    stops = sorted({tok.eos_token_id, tok.pad_token_id})
    s[stops] = -20.0
    s[stops[0]] = math.log(0.25 / 0.75 * torch.exp(s).sum().item())  # stop probability 0.25
    policy = _constant_head(load_model(tiny_model_dir), s)
    ref = overopt.Reference(_constant_head(load_model(tiny_model_dir), torch.zeros(v)))
    p = torch.softmax(s.double(), 0)
    q = float(p[stops].sum())
    kl_tok = float((p * torch.log(p * v)).sum())
    t = 6
    expected = kl_tok * sum((1 - q) ** (i - 1) for i in range(1, t + 1))
    rows = overopt.kl_samples(policy, ref, tok, lowercase_prompts(60), n=8, max_new_tokens=t, seed=1, batch_size=30)
    vals = np.array([x for r in rows for x in r["values"]])
    se = vals.std(ddof=1) / math.sqrt(vals.size)
    assert abs(vals.mean() - expected) < 4 * se, (vals.mean(), expected, se)
    assert q == pytest.approx(0.25, abs=1e-6)
    # and each sample's value is exactly its tokens' log-ratio: the lengths say which tokens were scored
    lens = np.array([n for r in rows for n in r["n_tokens"]])
    assert lens.min() >= 1 and lens.max() <= t
    assert np.mean(lens) == pytest.approx(sum((1 - q) ** (i - 1) for i in range(1, t + 1)), rel=0.1)


def test_decode_scores_exactly_the_sampled_tokens(tiny_model_dir):
    """The tokens kl_samples scores are the sampled ones, stop token included: log π − log π_ref computed
    here by hand from the full log-softmax of both constant-head models."""
    tok = load_tokenizer(tiny_model_dir)
    v = load_model(tiny_model_dir).config.vocab_size
    s = torch.randn(v, generator=torch.Generator().manual_seed(3))
    policy = _constant_head(load_model(tiny_model_dir), s)
    d = overopt.decode(policy, tok, lowercase_prompts(3), n=2, max_new_tokens=5, temperature=1.0, seed=4, batch_size=3)
    logp = torch.log_softmax(s.double(), 0)
    seqs = [(r["prompt_ids"], ids) for r in d for ids in r["response_ids"]]
    got = overopt._logps(policy, seqs, tok.pad_token_id, batch_size=4)
    want = torch.tensor([float(sum(logp[t] for t in ids)) for _, ids in seqs])
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-4)
    # the sampler's own log π of the same tokens (what kl_samples uses) is the same sum
    sampled = torch.tensor([x for r in d for x in r["logps"]], dtype=torch.float64)
    torch.testing.assert_close(sampled, want.double(), rtol=1e-5, atol=1e-4)
    stop = {tok.eos_token_id, tok.pad_token_id}
    for r in d:
        for ids, fin in zip(r["response_ids"], r["finished"]):
            assert (ids[-1] in stop) == fin and not any(t in stop for t in ids[:-1])


def test_pair_logps_run_each_prompt_once_and_equal_separate_passes(tiny_model_dir, tmp_path, monkeypatch):
    """A pair's chosen and rejected sequences share one packed row (the prompt once), and the log-probs equal
    those of each sequence scored on its own."""
    from rpo import batching
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir).eval()
    items, _ = train.tokenize_pairs(tok, tiny_pairs(5), max_length=64, max_prompt_length=32)
    packed = []
    real = batching._share_prompts
    monkeypatch.setattr(batching, "_share_prompts", lambda *a, **k: packed.append(real(*a, **k)) or packed[-1])
    got = overopt.pair_logps(model, tok, items, batch_size=4)
    assert packed and all(p is not None for p in packed)  # every batch went through the shared-prompt rows
    monkeypatch.setattr(batching, "_share_prompts", lambda *a, **k: None)
    for side in ("chosen", "rejected"):
        alone = torch.cat([overopt._logps(model, [(it["prompt"], it[side])], tok.pad_token_id, 1) for it in items])
        torch.testing.assert_close(got[side], alone, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Snapshots in training, and their measurements
# ---------------------------------------------------------------------------------------------------

def test_training_keeps_snapshots_every_k_steps_and_the_last(tiny_model_dir, tmp_path):
    summary, pairs = train_with_snapshots(tiny_model_dir, tmp_path)
    assert loop.snapshot_steps(tmp_path / "snaps") == [2, 4, 5] == summary["snapshot_steps"]
    from safetensors.torch import load_file
    last = load_file(tmp_path / "snaps" / "step-000005" / "adapter_model.safetensors")
    final = load_file(tmp_path / "run" / "model" / "adapter_model.safetensors")
    first = load_file(tmp_path / "snaps" / "step-000002" / "adapter_model.safetensors")
    assert last.keys() == final.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert any(not torch.equal(first[k], final[k]) for k in final)
    assert not (tmp_path / "ckpt").exists()  # moved out, then the checkpoints cleared

    # measured: step 0 is the reference; later steps move the chosen log-ratio and the margins
    prompts = write_jsonl(lowercase_prompts(4), tmp_path / "prompts.jsonl")
    overopt.reference_answers(ref_dir=tiny_model_dir, prompts_path=prompts, out=tmp_path / "ref_answers.jsonl",
                              max_new_tokens=6, batch_size=4)
    from benchmarks.study_eval import timed
    original = overopt.decode
    with timed() as seconds:
        n = overopt.evaluate_snapshots(ref_dir=tiny_model_dir, snapshots=tmp_path / "snaps", prompts_path=prompts,
                                       pairs_path=pairs, ref_answers=tmp_path / "ref_answers.jsonl",
                                       out=tmp_path / "eval.jsonl", beta=0.5, max_length=64, max_prompt_length=32,
                                       kl_samples_per_prompt=2, max_new_tokens=6, batch_size=4, seed=0)
    assert n == 3
    # one decode per snapshot serves the greedy answers and the KL samples; the reference's pairs once per job
    assert {k: len(v) for k, v in seconds.items()} == {"decode": 3, "kl_values": 3, "pair_logps": 4, "gold_scores": 3}
    assert overopt.decode is original  # benchmarks.study_eval's timing wrappers are gone after the block
    recs = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in recs})
    assert steps == [0, 2, 4, 5]
    pair5 = [r for r in recs if r["step"] == 5 and r["kind"] == "pair"]
    assert len(pair5) == 8 and all(r["margin"] == pytest.approx(0.5 * (r["logratio_chosen"] - r["logratio_rejected"]))
                                   for r in pair5)
    # trained on exactly these pairs with DPO: the implicit reward ranks (nearly) all of them right
    assert np.mean([r["correct"] for r in pair5]) >= 0.75
    kl5 = [x for r in recs if r["step"] == 5 and r["kind"] == "kl" for x in r["values"]]
    assert len(kl5) == 8 and any(x != 0 for x in kl5)


def test_a_resumed_run_keeps_its_earlier_snapshots_and_a_fresh_one_drops_foreign_ones(tmp_path):
    snaps = tmp_path / loop.SNAPSHOTS
    for step in (2, 4, 6):
        (snaps / f"step-{step:06d}").mkdir(parents=True)
    (snaps / ".step-000008.123.tmp").mkdir()
    loop._truncate_snapshots(snaps, 4)  # resuming from the checkpoint of step 4
    assert loop.snapshot_steps(snaps) == [2, 4] and len(list(snaps.iterdir())) == 2
    loop._truncate_snapshots(snaps, 0)  # a fresh start
    assert loop.snapshot_steps(snaps) == []


def test_snapshot_every_without_a_snapshot_path_is_refused(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tiny_pairs(4), tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match="snapshot_every > 0 and snapshots_path go together"):
        train.train_preference(ref_dir=tiny_model_dir, pairs_path=pairs, reference_cache=tmp_path / "x.pt",
                               **run_paths(tmp_path / "run"), ckpt_dir=tmp_path / "ckpt", cfg=SNAPSHOT_CFG,
                               method={"loss": "dpo", "beta": 0.1})


# ---------------------------------------------------------------------------------------------------
# Statistics on hand-made cases
# ---------------------------------------------------------------------------------------------------

def test_hierarchical_bootstrap_hand_made():
    # no spread within a seed, seed means 0 and 1: a replicate's mean is 0, 0.5 or 1 with probabilities
    # 1/4, 1/2, 1/4, so the 95% interval is [0, 1] and the value the mean of the seed means
    value, lo, hi = hierarchical_bootstrap([[0.0, 0.0, 0.0], [1.0, 1.0]], n_boot=4000, seed=0, ci=0.95)
    assert (value, lo, hi) == (0.5, 0.0, 1.0)
    value, lo, hi = hierarchical_bootstrap([[0.0, 0.0, 0.0], [1.0, 1.0]], n_boot=4000, seed=0, ci=0.4)
    assert (lo, hi) == (0.5, 0.5)  # the central 40% of {0: 1/4, 0.5: 1/2, 1: 1/4}
    # identical seeds: only the items vary, and the interval is that of the items' bootstrap
    h = hierarchical_bootstrap([[0.0, 1.0] * 10] * 3, n_boot=4000, seed=1, ci=0.95)
    assert h[0] == 0.5 and 0.3 < h[1] < 0.45 and 0.55 < h[2] < 0.7
    with pytest.raises(ValueError, match="at least one value"):
        hierarchical_bootstrap([[1.0], []], n_boot=10, seed=0, ci=0.9)


def _records(seed_shift: float):
    recs = []
    for i, (g, ref_win) in enumerate([(1.0, 1.0), (0.5, 0.5), (0.0, 0.0), (1.0, 1.0)]):
        recs.append({"step": 3, "kind": "kl", "id": f"q{i}", "values": [1.0 + seed_shift, 3.0 + seed_shift]})
        recs.append({"step": 3, "kind": "gold", "id": f"q{i}", "gold": g, "win": ref_win})
    for i, m in enumerate([0.2, -0.1, 0.0]):
        recs.append({"step": 3, "kind": "pair", "id": f"p{i}", "logratio_chosen": 1.0, "logratio_rejected": 0.5,
                     "margin": m, "correct": 1.0 if m > 0 else 0.0 if m < 0 else 0.5})
    return recs


def test_study_rows_hand_made():
    spec = {"name": "rpo-eta1", "loss": "rpo", "hparams": {"beta": 0.1, "eta": 1.0}, "label_noise": 0.2}
    runs = [{"spec": {**spec, "seed": 1}, "records": _records(0.0)},
            {"spec": {**spec, "seed": 2}, "records": _records(2.0)}]
    rows = ov.study_rows(runs, n_boot=200, seed=0, ci=0.9)
    get = {(r["seed"], r["metric"]): r for r in rows}
    assert len(rows) == 3 * len(ov.METRICS)
    assert get[(1, "kl")]["value"] == 2.0 and get[(2, "kl")]["value"] == 4.0  # per prompt (1+3)/2, (3+5)/2
    assert get[("pooled", "kl")]["value"] == 3.0 and get[("pooled", "gold_score")]["kl"] == 3.0
    assert get[(1, "kl")]["kl_se"] == 0.0 and get[("pooled", "kl")]["kl_se"] == pytest.approx(1.0)
    assert get[(1, "gold_score")]["value"] == pytest.approx(2.5 / 4)
    assert get[(1, "gold_win_rate")]["value"] == pytest.approx(100 * 2.5 / 4)
    assert get[(1, "proxy_accuracy")]["value"] == pytest.approx(100 * 1.5 / 3)  # ties half
    assert get[(1, "proxy_margin")]["value"] == pytest.approx(0.1 / 3)
    assert get[(1, "logratio_chosen")]["value"] == 1.0
    r = get[("pooled", "gold_win_rate")]
    assert (r["method"], r["loss"], r["beta"], r["knob"], r["knob_value"], r["label_noise"], r["n"]) == \
        ("rpo-eta1", "rpo", 0.1, "eta", 1.0, 0.2, 8)
    assert r["ci_low"] <= r["value"] <= r["ci_high"]
    assert r["pairs"] == "study"  # a spec without `pairs`: the study's own


def test_rso_runs_are_their_own_panel_of_the_figure(tmp_path, monkeypatch):
    # a hinge run on the study's pairs and one on an RSO family's: the same loss and beta, two panels
    base = {"loss": "hinge", "hparams": {"beta": 0.1}, "label_noise": 0.2, "seed": 1}
    runs = [{"spec": {**base, "name": "hinge", "pairs": "study"}, "records": _records(0.0)},
            {"spec": {**base, "name": "rso", "pairs": "rso"}, "records": _records(1.0)}]
    rows = ov.study_rows(runs, n_boot=50, seed=0, ci=0.9)
    assert {(r["method"], r["pairs"]) for r in rows} == {("hinge", "study"), ("rso", "rso")}
    ov.write_rows(rows, tmp_path / "s.csv")
    read = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert list(read[0]) == list(ov.COLUMNS) and {r["pairs"] for r in read} == {"study", "rso"}
    import matplotlib.figure

    from eval.figures import plot_overoptimization
    titles = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):  # the panels' titles as saved
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_title())
        return save(fig, *a, **k)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    drawn = plot_overoptimization(rows, tmp_path / "f.png")
    assert titles == ["hinge", "hinge, RSO pairs"] and set(drawn) == {"hinge", "rso"}


def test_expand_grid_names_each_combination_and_checks_the_loss():
    runs = expand_grid({"dpo": {"loss": "dpo", "beta": [0.05, 0.2]},
                        "rpo": {"loss": "rpo", "beta": [0.1], "eta": [0.5, 2.0]}})
    assert runs == {"dpo-beta0.05": {"loss": "dpo", "beta": 0.05}, "dpo-beta0.2": {"loss": "dpo", "beta": 0.2},
                    "rpo-beta0.1-eta0.5": {"loss": "rpo", "beta": 0.1, "eta": 0.5},
                    "rpo-beta0.1-eta2": {"loss": "rpo", "beta": 0.1, "eta": 2.0}}
    with pytest.raises(ValueError, match=r"overoptimization.grid.x"):
        expand_grid({"x": {"loss": "rpo", "beta": 0.1}})  # rpo needs eta
    with pytest.raises(ValueError, match="empty list"):
        expand_grid({"x": {"loss": "dpo", "beta": []}})


def test_resolve_study_names_a_misspelt_key():
    import yaml
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    from snakemake.utils import validate
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    validate(cfg, str(REPO / "workflow/schemas/config.schema.yaml"), set_default=True)
    study = resolve_study(cfg, schema)
    assert study["data"]["synthetic"]["n_train_prompts"] == cfg["overoptimization"]["data"]["synthetic"]["n_train_prompts"]
    assert study["data"]["synthetic"]["top_k"] == cfg["data"]["synthetic"]["top_k"]  # the rest from data
    cfg["overoptimization"]["training"] = {"epoch": 3}
    with pytest.raises(ValueError, match="overoptimization.training: .*'epoch'"):
        resolve_study(cfg, schema)


# ---------------------------------------------------------------------------------------------------
# The DAG
# ---------------------------------------------------------------------------------------------------

@pytest.mark.workflow
def test_study_eval_benchmark_runs_the_jobs_own_settings(tmp_path):
    """benchmarks.study_eval takes its settings, paths and threads from the study_evaluate job Snakemake would
    run (a dry run of the tiny config), not from defaults of its own."""
    import inspect

    from benchmarks.study_eval import job_command
    from helpers.workflow import tiny_config
    job = job_command("dpo-beta0.5", 2, tiny_config(tmp_path), tmp_path)
    s, paths = job["settings"], job["paths"]
    # the tiny config's grid entry, seed and eval block (.test/config/config.yaml)
    assert (s["beta"], s["seed"], s["kl_samples_per_prompt"], s["max_new_tokens"], s["batch_size"]) == (0.5, 2, 2, 6, 4)
    assert paths["snapshots"] == "results/overopt/runs/dpo-beta0.5/seed2/snapshots"
    assert paths["out"] == "results/overopt/runs/dpo-beta0.5/seed2/snapshot_eval.jsonl"
    inspect.signature(overopt.evaluate_snapshots).bind(**s, **paths)  # exactly the function's arguments
    assert job["threads"] >= 1


@pytest.mark.workflow
@pytest.mark.slow  # a dozen Snakemake jobs: it would take the default run past 10 minutes
def test_study_dag_end_to_end(tmp_path):
    """snakemake results/overoptimization.csv on the tiny config: 2 runs x 2 seeds, snapshots at 2 and 4."""
    from helpers.workflow import snakemake, tiny_config
    cfg = tiny_config(tmp_path)
    res = snakemake(tmp_path, cfg, target="results/overoptimization.csv")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "results/overoptimization.csv").open()))
    runs = {"dpo-beta0.5", "rpo-eta0.5"}
    assert {r["method"] for r in rows} == runs
    assert {r["seed"] for r in rows} == {"1", "2", "pooled"}
    assert {r["step"] for r in rows} == {"0", "2", "4"}
    assert len(rows) == len(runs) * 3 * 3 * len(ov.METRICS)
    for run in runs:
        for seed in (1, 2):
            d = tmp_path / f"results/overopt/runs/{run}/seed{seed}"
            assert loop.snapshot_steps(d / "snapshots") == [2, 4]
            summary = json.loads((d / "train_summary.json").read_text())
            assert summary["config"]["seed"] == seed
            assert summary["trunk"]["layer"] == 1  # .test's training: LoRA on the top layer, from the trunk
    # every training starts before any measurement (study_train's priority): no core idles at the end
    started = re.findall(r"^(?:local)?rule (study_train|study_evaluate):", res.stdout + res.stderr, re.M)
    assert started.count("study_train") == 4 and started.count("study_evaluate") == 4
    assert started.index("study_evaluate") > len(started) - 1 - started[::-1].index("study_train"), started
    # seeds differ (data order, LoRA init): their step-4 margins are not the same
    m = {r["seed"]: r["value"] for r in rows if r["method"] == "dpo-beta0.5" and r["step"] == "4"
         and r["metric"] == "proxy_margin"}
    assert m["1"] != m["2"]
    assert (tmp_path / "results/figures/overoptimization.png").read_bytes()[:4] == b"\x89PNG"
