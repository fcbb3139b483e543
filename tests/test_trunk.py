"""The frozen trunk (rpo.trunk): with LoRA on the top layers only, the reference pass writes the input of the
first LoRA layer and training starts there. Values, gradients and training must equal the whole forward,
the file must hold what transformers' own hidden states say, and a trunk of another run is refused.

Run: pytest tests/test_trunk.py -q     (about 30 s on 2 CPU cores)
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.data import run_paths, tiny_pairs, write_jsonl
from helpers.models import build_tiny_model
from helpers.training import TRAIN_CFG as CFG

from rpo import train, trunk
from rpo.batching import summed_logps
from rpo.models import load_model, load_tokenizer

LAYERS, TOP = 4, 2  # LoRA on layers 2 and 3: the trunk is the input of layer 2
TRUNK_CFG = {**CFG, "lora": {**CFG["lora"], "top_layers": TOP}, "trunk_cache": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("trunk_model"), layers=LAYERS)


@pytest.fixture()
def pairs_file(tmp_path):
    rows = tiny_pairs(8)
    rows[5]["prompt"] = rows[4]["prompt"]  # two pairs of one prompt: one group in a packed row
    return write_jsonl(rows, tmp_path / "train.jsonl")


def items_of(model_dir, pairs_file):
    from rpo.data import read_pairs
    tok = load_tokenizer(model_dir)
    items, _ = train.tokenize_pairs(tok, read_pairs(pairs_file), max_length=64, max_prompt_length=32)
    return tok, items


class LayerCalls:
    """Counts, per decoder layer, the calls of its attention: only a layer that really runs calls it."""

    def __init__(self, model):
        self.n = [0] * LAYERS
        for i, layer in enumerate(trunk.decoder_layers(model)):
            layer.self_attn.register_forward_pre_hook(lambda *a, i=i: self.count(i))

    def count(self, i):
        self.n[i] += 1


def policy(model_dir):
    model = train.prepare_model(model_dir, TRUNK_CFG, "cpu")
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a policy that moved away from its reference
            torch.nn.init.normal_(p, std=0.2)
    return model


def value_and_grads(model, batch, share, start=None):
    model.zero_grad(set_to_none=True)
    lp, _ = summed_logps(model, batch, share_prompts=share, trunk=start)
    (lp * torch.arange(1, lp.shape[0] + 1)).sum().backward()
    return lp.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("share", [True, False], ids=["packed", "unpacked"])
def test_a_forward_from_the_trunk_equals_the_whole_forward(model_dir, pairs_file, share):
    tok, items = items_of(model_dir, pairs_file)
    model = policy(model_dir)
    calls = LayerCalls(model)
    batch = train.pair_batch(items, tok.pad_token_id)
    grab = trunk.Trunk(LAYERS - TOP)
    with torch.no_grad():
        summed_logps(model, batch, share_prompts=share, trunk=grab)
    assert grab.captured.shape[:2] == batch["input_ids"].shape
    want, want_g = value_and_grads(model, batch, share)
    assert calls.n == [2, 2, 2, 2]
    start = trunk.Trunk(LAYERS - TOP, grab.captured)
    got, got_g = value_and_grads(model, batch, share, start)
    assert calls.n == [2, 2, 3, 3] and start.skipped == LAYERS - TOP  # layers 0 and 1 did not run
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_g.keys() == want_g.keys() and len(got_g) == 2 * 4 * TOP  # A and B of 4 modules, top 2 layers
    for k in want_g:
        torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-4, atol=1e-6)
    # the states are what the forward runs on: other states, other log-probs
    other, _ = value_and_grads(model, batch, share, trunk.Trunk(LAYERS - TOP, grab.captured.flip(0)))
    assert (other - want).abs().max() > 1e-2
    assert all("forward" not in layer.__dict__ for layer in trunk.decoder_layers(model))  # hooks undone
    # a forward set on a layer before (accelerate's hooks do that) is put back, not dropped
    layer0 = trunk.decoder_layers(model)[0]
    own = layer0.forward
    layer0.forward = own
    value_and_grads(model, batch, share, trunk.Trunk(LAYERS - TOP, grab.captured))
    assert layer0.__dict__["forward"] is own


def test_the_reference_pass_writes_transformers_hidden_states(model_dir, pairs_file, tmp_path):
    tok, items = items_of(model_dir, pairs_file)
    cache, path = tmp_path / "ref.pt", tmp_path / "trunk.f32"
    train.reference_logps(model_dir, pairs_file, cache, max_length=64, max_prompt_length=32, batch_size=3,
                          top_layers=TOP, trunk_path=path)
    meta = torch.load(cache, weights_only=False)["trunk"]
    model = load_model(model_dir)
    h = model.config.hidden_size
    assert meta == {"layer": 2, "hidden_size": h, "values": sum(trunk.sizes(items)) * h}
    values = np.fromfile(path, dtype=np.float32)
    assert values.size == meta["values"]
    at = 0
    for it in items:  # independent of the packing: one unpadded sequence at a time, transformers' own outputs
        p, c, r = it["prompt"], it["chosen"], it["rejected"]
        with torch.no_grad():
            hc = model(input_ids=torch.tensor([p + c]), output_hidden_states=True).hidden_states[2][0]
            hr = model(input_ids=torch.tensor([p + r]), output_hidden_states=True).hidden_states[2][0]
        want = torch.cat([hc, hr[len(p):]])
        got = torch.from_numpy(values[at:at + want.numel()].reshape(want.shape))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        at += want.numel()
    assert at == values.size
    # the reader gives back the collated layout
    micro = [items[1], items[4], items[5]]
    states = trunk.Reader(path, items, h).batch(micro)
    batch = train.pair_batch(micro, tok.pad_token_id)
    assert states.shape == (*batch["input_ids"].shape, h)
    assert torch.equal(states[~batch["attention_mask"].bool()], torch.zeros(0, h).expand(
        int((~batch["attention_mask"].bool()).sum()), h))


def _train(model_dir, pairs_file, tmp, cfg, *, trunk_path=None, top_layers=0, tag="run"):
    cache = tmp / f"ref-{tag}.pt"
    train.reference_logps(model_dir, pairs_file, cache, max_length=64, max_prompt_length=32, batch_size=4,
                          top_layers=top_layers, trunk_path=trunk_path)
    summary = train.train_preference(ref_dir=model_dir, pairs_path=pairs_file, reference_cache=cache,
                                     **run_paths(tmp / tag), ckpt_dir=tmp / f"ckpt-{tag}", cfg=cfg,
                                     method={"loss": "rpo", "beta": 0.5, "eta": 0.2}, trunk_path=trunk_path)
    return summary, [json.loads(l) for l in (tmp / tag / "metrics.jsonl").read_text().splitlines()]


def test_training_from_the_trunk_follows_the_whole_forward(model_dir, pairs_file, tmp_path):
    cfg = {**TRUNK_CFG, "epochs": 3}
    s_full, m_full = _train(model_dir, pairs_file, tmp_path, {**cfg, "trunk_cache": False}, tag="full")
    s_trunk, m_trunk = _train(model_dir, pairs_file, tmp_path, cfg, trunk_path=tmp_path / "trunk.f32",
                              top_layers=TOP, tag="trunk")
    assert s_full["trunk"] is None
    # 3 epochs x 2 micro-batches, 2 layers skipped each
    assert s_trunk["trunk"] == {"layer": 2, "layer_calls_skipped": 3 * 2 * 2}
    assert len(m_trunk) == len(m_full) == 3
    for a, b in zip(m_full, m_trunk):
        for k in ("loss", "loss/sft", "rewards/margins", "logps/chosen"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    assert m_trunk[-1]["loss"] < m_trunk[0]["loss"]


def test_a_trunk_of_another_run_is_refused(model_dir, pairs_file, tmp_path):
    path = tmp_path / "trunk.f32"
    cache = tmp_path / "ref.pt"
    train.reference_logps(model_dir, pairs_file, cache, max_length=64, max_prompt_length=32,
                          top_layers=1, trunk_path=path)  # made for LoRA on the top layer only
    kw = dict(ref_dir=model_dir, pairs_path=pairs_file, reference_cache=cache, ckpt_dir=tmp_path / "c",
              method={"loss": "dpo", "beta": 0.1}, **run_paths(tmp_path / "o"))
    with pytest.raises(ValueError, match="is not this run's"):
        train.train_preference(cfg=TRUNK_CFG, trunk_path=path, **kw)
    with pytest.raises(ValueError, match="go together"):
        train.train_preference(cfg=TRUNK_CFG, **kw)  # trunk_cache on, no file given
    train.reference_logps(model_dir, pairs_file, cache, max_length=64, max_prompt_length=32)
    with pytest.raises(ValueError, match="made without a trunk"):
        train.train_preference(cfg=TRUNK_CFG, trunk_path=path, **kw)
    train.reference_logps(model_dir, pairs_file, cache, max_length=64, max_prompt_length=32,
                          top_layers=TOP, trunk_path=path)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="expected .* float32 values"):
        train.train_preference(cfg=TRUNK_CFG, trunk_path=path, **kw)


def test_which_configs_write_a_trunk():
    assert trunk.top_layers_of(TRUNK_CFG) == TOP
    assert trunk.top_layers_of({**TRUNK_CFG, "trunk_cache": False}) == 0
    assert trunk.top_layers_of({**TRUNK_CFG, "lora": {**TRUNK_CFG["lora"], "top_layers": None}}) == 0
    assert trunk.top_layers_of({**TRUNK_CFG, "finetuning": "full"}) == 0
    with pytest.raises(ValueError, match="top 1..3 of 4 layers"):
        trunk.depth(4, 4)
