"""The online rounds' plan and jobs without a model (issue 27): the selections (best/worst, INPO's tournament
against a transcription of the authors' bracket, SuperHF's top-k with its ties), each round's settings and prompt
slice, the config checks, labelling with the gold labeller, and the method's model from its last round.

Run: pytest tests/test_rounds.py -q     (seconds; the gold labeller imports lm-eval once, about 3 s)
"""
from __future__ import annotations

import itertools
import json
import random

from pathlib import Path

import pytest
from helpers.data import LOWERCASE_META

from rpo import io, oracle, round_plan, rounds
from rpo.config import check_config

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------
# selections
# --------------------------------------------------------------------------

def test_best_worst_takes_the_first_best_and_worst_and_drops_ties():
    assert rounds.best_worst([0.5, 1.0, 0.0, 1.0, 0.0]) == (1, 2)
    assert rounds.best_worst([0.5, 0.5, 0.5]) is None


def authors_tournament(scores):
    """inpo_original/annotate_data/get_pref_single.py with n == 8 and use_tournament, transcribed with the gold
    preference: get_pref gives 1 / 0.5 / 0 for the first response, get_match_res keeps the first on >= 0.5, and
    the pair is skipped when the final comparison gives <= 0.5."""
    def get_pref(i, j):
        return 1.0 if scores[i] > scores[j] else 0.0 if scores[i] < scores[j] else 0.5

    def get_match_res(i, j):
        return (i, j) if get_pref(i, j) >= 0.5 else (j, i)
    win_1, lose_1 = get_match_res(0, 1)
    win_2, lose_2 = get_match_res(2, 3)
    win_3, lose_3 = get_match_res(4, 5)
    win_4, lose_4 = get_match_res(6, 7)
    win_5, _ = get_match_res(win_1, win_2)
    win_6, _ = get_match_res(win_3, win_4)
    win_id, _ = get_match_res(win_5, win_6)
    _, lose_5 = get_match_res(lose_1, lose_2)
    _, lose_6 = get_match_res(lose_3, lose_4)
    _, lose_id = get_match_res(lose_5, lose_6)
    return None if get_pref(win_id, lose_id) <= 0.5 else (win_id, lose_id)


def test_tournament_is_the_authors_bracket():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        scores = [rng.choice([0.0, 0.5, 1.0]) for _ in range(8)]  # many ties, as gold scores have
        got = rounds.tournament(lambda i, j: oracle.preference(scores[i], scores[j]), 8)
        assert got == authors_tournament(scores), scores
        checked += got is not None
    assert checked > 100  # most draws give a pair
    # by hand: round one 0>1, 2>3, 4>5, 6>7; winners 0 v 2 -> 0, 4 v 6 -> 6, 0 v 6 -> 6; losers 1 v 3 -> 3 loses,
    # 5 v 7 -> 5 loses, 3 v 5 -> 5 loses
    scores = [5, 4, 3, 2, 1, 0, 9, 8]
    assert rounds.tournament(lambda i, j: oracle.preference(scores[i], scores[j]), 8) == (6, 5)


def test_tournament_needs_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        rounds.tournament(lambda i, j: 1.0, 6)


def test_top_k_is_a_stable_sort_without_empty_completions():
    scores = [0.5, 1.0, 1.0, 0.5, 1.0]
    responses = ["a", "b", " ", "d", "e"]
    assert rounds.top_k(scores, responses, 1) == [1]  # ties: the first in sample order
    assert rounds.top_k(scores, responses, 3) == [1, 4, 0]  # the empty (whitespace) completion 2 is dropped
    assert rounds.top_k(scores, responses, 3) == rounds.top_k(scores, responses, 3)


def test_select_gives_each_losss_rows():
    prompt = {"id": "q1", "messages": [{"role": "user", "content": "x"}], "meta": {"k": 1}}
    resp, scores = ["w", "x", "y", "z"], [0.0, 1.0, 0.5, 1.0]
    [pair] = rounds.select(prompt, resp, scores, "best_worst")
    assert pair["responses"] == ["x", "w"] and pair["scores"] == [1.0, 0.0] and pair["index"] == [1, 0]
    kept = rounds.select(prompt, resp, scores, "top_k", keep=2)
    assert [k["id"] for k in kept] == ["q1-k0", "q1-k1"] and [k["responses"] for k in kept] == [["x"], ["z"]]
    [group] = rounds.select(prompt, resp, scores, "all")
    assert group["responses"] == resp and group["scores"] == scores
    assert rounds.select(prompt, ["same", "same"], [1.0, 0.0], "best_worst") == []  # identical texts: no pair


# --------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------

def rounds_cfg(**over):
    """A method's `rounds` with the schema's defaults written out (the workflow fills them from the schema)."""
    base = {"n": 3, "samples_per_prompt": 4, "prompts_per_round": 5, "labeller": {"kind": "gold"},
            "selection": "best_worst", "keep": 1, "reference": "initial", "extrapolation": 0.0,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 64, "batch_size": 16},
            "per_round": {}}
    return {**base, **over}


def test_round_settings_per_round_and_slices():
    m = {"loss": "dpo", "beta": 0.1,
         "rounds": rounds_cfg(per_round={"2": {"samples_per_prompt": 8, "prompts_per_round": 7,
                                                "sampling": {"temperature": 0.7}}})}
    s1, s2 = round_plan.round_settings(m, 1), round_plan.round_settings(m, 2)
    assert s1["samples_per_prompt"] == 4 and s2["samples_per_prompt"] == 8
    assert s2["sampling"] == {**s1["sampling"], "temperature": 0.7}  # merged key by key
    assert "n" not in s1 and "per_round" not in s1
    assert [round_plan.slice_start(m, r) for r in (1, 2, 3)] == [0, 5, 12]  # disjoint: 5, then 7 prompts
    # round r's training sees round r's settings only: adding a round changes no earlier round's parameters
    more = {**m, "rounds": {**m["rounds"], "n": 4}}
    assert round_plan.round_method("idpo", m, 2) == round_plan.round_method("idpo", more, 2)
    with pytest.raises(ValueError, match="round 4: the method has rounds 1..3"):
        round_plan.round_settings(m, 4)


@pytest.mark.parametrize("method,message", [
    ({"loss": "superhf", "kl_coef": 0.3, "rounds": rounds_cfg()}, r"selection: 'best_worst' gives pairs, but loss 'superhf' trains on kept \(selection top_k\)"),
    ({"loss": "dpo", "beta": 0.1, "rounds": rounds_cfg(selection="tournament", samples_per_prompt=6)}, "tournament needs a power of two"),
    ({"loss": "rloo_kl", "kl_coef": 0.1, "rounds": rounds_cfg(selection="all", per_round={"2": {"sampling": {"temperature": 0.7}}})},
     r"rounds.per_round.2.sampling: REINFORCE needs samples of the policy itself"),
    ({"loss": "dpo", "beta": 0.1, "rounds": rounds_cfg(extrapolation=0.3)}, "needs a pair loss of rpo.losses and rounds.reference 'previous'"),
    ({"loss": "inpo", "eta": 0.1, "ratio": 0.3, "rounds": rounds_cfg(reference="previous")}, "needs reference 'initial'"),
    ({"loss": "superhf", "kl_coef": 0.3, "rounds": rounds_cfg(selection="top_k", keep=5)}, "keep: 5 > samples_per_prompt 4"),
])
def test_check_rounds_names_the_key(method, message):
    with pytest.raises(ValueError, match=message):
        round_plan.check_rounds(method, "config: methods.m")


def test_config_refuses_an_online_loss_without_rounds():
    import yaml
    from snakemake.utils import validate
    schema = str(REPO / "workflow/schemas/config.schema.yaml")
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["methods"]["inpo"] = {"loss": "inpo", "eta": 0.1, "ratio": 0.3}
    validate(cfg, schema, set_default=True)
    with pytest.raises(ValueError, match=r"config: methods.inpo.loss: 'inpo' trains on a round's own samples"):
        check_config(cfg)
    cfg["methods"]["inpo"]["rounds"] = {"selection": "tournament"}
    validate(cfg, schema, set_default=True)
    check_config(cfg)  # with rounds (the schema's defaults filled in) it is a method like any other
    assert cfg["methods"]["inpo"]["rounds"]["n"] == 3 and cfg["methods"]["inpo"]["rounds"]["labeller"] == {"kind": "gold"}


def test_runs_of_both_kinds():
    cfg = {"methods": {"dpo": {"loss": "dpo"}, "idpo": {"loss": "dpo", "rounds": rounds_cfg()}},
           "online": {"methods": {"inpo": {}, "idpo": {}}, "seeds": [1, 2]}}
    assert round_plan.main_runs(cfg, [42, 43]) == {"idpo": {"method": "idpo", "seed": 42, "study": False},
                                                  "idpo-seed43": {"method": "idpo", "seed": 43, "study": False}}
    assert sorted(round_plan.study_runs(cfg)) == ["online-idpo-seed1", "online-idpo-seed2", "online-inpo-seed1",
                                                  "online-inpo-seed2"]


# --------------------------------------------------------------------------
# jobs without a model
# --------------------------------------------------------------------------

def _pool(tmp_path, n=4):
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"write in lowercase {i}"}], "meta": LOWERCASE_META}
            for i in range(n)]
    io.write_jsonl(rows, tmp_path / "pool.jsonl")
    return tmp_path / "pool.jsonl"


def test_round_slice_names_a_short_pool(tmp_path):
    pool = _pool(tmp_path)
    assert [p["id"] for p in rounds.round_slice(pool, 1, 2)] == ["q1", "q2"]
    with pytest.raises(ValueError, match=r"pool.jsonl: the rounds need prompts 3..4 but the pool holds 4"):
        rounds.round_slice(pool, 3, 2)


def test_label_round_scores_with_the_gold_and_selects(tmp_path):
    pool = _pool(tmp_path)
    # "hello there" follows "lowercase only" (and is English); the capitalised answers do not
    samples = [{"id": "q0", "responses": ["hello there my friend", "HELLO THERE", "Hello There", "hello there my friend"]},
               {"id": "q1", "responses": ["NO", "NOPE", "NEVER", "NO WAY"]}]
    io.write_jsonl(samples, tmp_path / "samples.jsonl")
    io.write_jsonl([{"id": "q0", "responses": ["a reference sample"]}, {"id": "q1", "responses": ["another"]}],
                   tmp_path / "ref.jsonl")
    stats = rounds.label_round(samples=tmp_path / "samples.jsonl", prompts_path=pool, labels=tmp_path / "labels.jsonl",
                               selected=tmp_path / "selected.jsonl", summary=tmp_path / "summary.json",
                               labeller={"kind": "gold"}, selection="best_worst",
                               reference_samples=tmp_path / "ref.jsonl")
    labels = io.read_jsonl(tmp_path / "labels.jsonl")
    assert labels[0]["scores"][0] == 1.0 and labels[0]["scores"][1] == 0.0 and labels[0]["labeller"].startswith("gold")
    assert labels[1]["scores"] == [0.0] * 4  # all tie: no pair from q1
    [row] = io.read_jsonl(tmp_path / "selected.jsonl")
    assert row["id"] == "q0" and row["responses"] == ["hello there my friend", "HELLO THERE"]
    assert row["reference_response"] == "a reference sample" and row["meta"] == LOWERCASE_META
    assert stats["rows"] == 1 and stats["prompts_without_rows"] == 1
    io.write_jsonl(samples[1:], tmp_path / "tied.jsonl")
    with pytest.raises(ValueError, match="kept nothing from 1 prompts"):
        rounds.label_round(samples=tmp_path / "tied.jsonl", prompts_path=pool, labels=tmp_path / "l2.jsonl",
                           selected=tmp_path / "s2.jsonl", summary=tmp_path / "x.json", labeller={"kind": "gold"},
                           selection="best_worst")


def test_unknown_labeller_lists_the_kinds():
    with pytest.raises(ValueError, match=r"rounds.labeller.kind 'rm': expected one of \['gold'\]"):
        oracle.get_labeller({"kind": "rm"})


def test_finish_rounds_copies_the_last_policy_and_numbers_steps_over_rounds(tmp_path):
    models, metrics, summaries = [], [], []
    for r in (1, 2):
        d = tmp_path / f"round{r}"
        (d / "model").mkdir(parents=True)
        (d / "model" / "adapter_config.json").write_text(json.dumps({"round": r}))
        io.write_jsonl([{"step": s, "loss": float(r * 10 + s)} for s in (1, 2, 3)], d / "metrics.jsonl")
        io.write_json(d / "summary.json", {"round": r})
        models.append(d / "model"); metrics.append(d / "metrics.jsonl"); summaries.append(d / "summary.json")
    out = tmp_path / "train"
    rounds.finish_rounds(models=models, metrics=metrics, summaries=summaries, out_dir=out / "model",
                         metrics_path=out / "metrics.jsonl", summary_path=out / "summary.json")
    assert json.loads((out / "model" / "adapter_config.json").read_text()) == {"round": 2}
    recs = io.read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["round"], r["round_step"]) for r in recs] == list(zip(range(1, 7), [1] * 3 + [2] * 3,
                                                                                 [1, 2, 3] * 2))
    assert [r["loss"] for r in recs] == [11.0, 12.0, 13.0, 21.0, 22.0, 23.0]
    assert json.loads((out / "summary.json").read_text())["per_round"] == [{"round": 1}, {"round": 2}]


def test_every_tournament_size_returns_a_strictly_preferred_pair():
    for k in (2, 4, 8, 16):
        for scores in itertools.islice(itertools.product([0.0, 1.0], repeat=k), 0, None, max(1, 2 ** k // 64)):
            got = rounds.tournament(lambda i, j: oracle.preference(scores[i], scores[j]), k)
            assert got is None or scores[got[0]] > scores[got[1]]
            assert (got is None) == (len(set(scores)) == 1)  # 0/1 scores: a pair whenever they are not all equal


def test_round_prompts_from_ifeval_rows_and_from_pairs(tmp_path):
    from helpers.data import tiny_pairs, write_jsonl
    summary = rounds.round_prompts(out=tmp_path / "pool.jsonl", heldout=tmp_path / "heldout.jsonl", source="ifeval",
                                   seed=1, n_train=10, n_test=4, prompts_file=str(REPO / ".test/data/ifeval_prompts.jsonl"))
    pool, held = io.read_jsonl(tmp_path / "pool.jsonl"), io.read_jsonl(tmp_path / "heldout.jsonl")
    assert (len(pool), len(held), summary["available"]) == (10, 4, 16)
    assert not {p["id"] for p in pool} & {p["id"] for p in held}  # disjoint
    assert pool[0]["meta"]["instruction_id_list"] == ["length_constraints:number_words"]
    write_jsonl(tiny_pairs(6) + [{**tiny_pairs(1)[0], "id": "again"}], tmp_path / "pairs.jsonl")  # a prompt twice
    rounds.round_prompts(out=tmp_path / "from_pairs.jsonl", source="pairs", seed=1, pairs_path=tmp_path / "pairs.jsonl")
    rows = io.read_jsonl(tmp_path / "from_pairs.jsonl")
    assert len(rows) == 6 and rows[0]["meta"] == LOWERCASE_META and rows[0]["messages"][0]["role"] == "user"
