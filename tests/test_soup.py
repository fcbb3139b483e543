"""SALSA's soup reference: the exact parameter-wise mean of SFT models, and its errors."""
from __future__ import annotations

import json

import pytest
import torch
from helpers.models import build_tiny_model

from rpo.models import load_model
from rpo.soup import average_state_dicts, make_soup


def test_soup_is_the_exact_parameter_wise_mean(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=1)
    b = build_tiny_model(tmp_path / "b", seed=2)
    out = make_soup([str(a), str(b)], str(tmp_path / "soup" / "model"))
    sa, sb, ss = (load_model(d).state_dict() for d in (a, b, out))
    assert ss.keys() == sa.keys()
    for k in ss:
        # (a + b) / 2 formed in float64, rounded once to float32
        want = ((sa[k].double() + sb[k].double()) / 2).float()
        assert torch.equal(ss[k], want), k
    assert not torch.equal(sa["model.embed_tokens.weight"], sb["model.embed_tokens.weight"])  # the seeds differ
    assert json.loads((out / "soup.json").read_text())["models"] == [str(a), str(b)]


def test_average_state_dicts_three_and_errors():
    s = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}, {"w": torch.tensor([6.0, 0.0])}]
    assert average_state_dicts(s, ["x", "y", "z"])["w"].tolist() == [3.0, 2.0]  # (1+2+6)/3, (2+4+0)/3
    with pytest.raises(ValueError, match="at least 2 models"):
        average_state_dicts(s[:1], ["x"])
    with pytest.raises(ValueError, match=r"parameter w is \(3,\) torch.float32 in y but \(2,\)"):
        average_state_dicts([s[0], {"w": torch.zeros(3)}], ["x", "y"])
    with pytest.raises(ValueError, match="y has other parameters than x"):
        average_state_dicts([s[0], {"v": torch.zeros(2)}], ["x", "y"])


@pytest.mark.slow  # SFT twice, a soup and its reference pass through Snakemake (default run: < 10 min)
@pytest.mark.workflow
def test_soup_reference_in_the_dag(tmp_path):
    """A method with `reference: soup` trains against the mean of two SFT models (seeds 1 and 7): the DAG
    trains the second SFT model, averages, caches the soup's reference log-probs, and trains on top."""
    import yaml
    from helpers.workflow import snakemake, tiny_config

    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["sft"]["train"]["seed"] = 1
    cfg["sft"]["soup_seeds"] = [1, 7]
    cfg["methods"]["rpo_soup"] = {"loss": "rpo", "beta": 0.1, "eta": 0.5, "reference": "soup"}
    path = tmp_path / "soup.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path, path, target="results/train/rpo_soup/model")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    r = tmp_path / "results"
    sa, sb, ss = (load_model(d).state_dict() for d in
                  (r / "models/sft/model", r / "models/sft_seed7/model", r / "models/soup/model"))
    for k in ss:
        assert torch.equal(ss[k], ((sa[k].double() + sb[k].double()) / 2).float()), k
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sb["model.layers.0.self_attn.q_proj.weight"])
    cache = torch.load(r / "reference/soup/train_logps.pt", weights_only=False)
    assert cache["model_dir"] == "results/models/soup/model"
    summary = json.loads((r / "train/rpo_soup/train_summary.json").read_text())
    assert summary["reference_model"] == "results/models/soup/model"
    # only what the soup method needs ran: no DPO/RPO training, no reference log-probs of the SFT model
    assert not (r / "train/dpo").exists() and not (r / "reference/ref").exists()
