"""Packed rows (prompts shared) under the three attention paths: the plain unpacked rows, the packed
rows with sdpa's 4-D mask, the packed rows with a FlexAttention BlockMask (training.attention
flex_attention). Summed log-probs and gradients must agree, and each test checks which mask the model
was given.

Run: pytest tests/test_packed_attention.py -q            (about 30 s on 2 CPU cores)
     pytest tests/test_packed_attention.py -q -m slow    (the compiled flex kernel: ~45 s the first
                                                          time on 2 cores, inductor caches it)
On CPU, torch 2.13's FlexAttention has no backward, so the gradient test skips there with torch's
reason and runs on a CUDA device.
"""
from __future__ import annotations

import json

import pytest
import torch
from helpers.data import run_paths, tiny_pairs, write_jsonl
from helpers.logps import pair_batch, plain
from helpers.training import TRAIN_CFG as CFG

import rpo.batching as batching
from rpo import train
from rpo.batching import summed_logps
from rpo.models import load_model

pytest.importorskip("torch.nn.attention.flex_attention")
from torch.nn.attention.flex_attention import BlockMask  # noqa: E402


class MaskSeen:
    """Records the type and rank of the attention mask of every forward of `model`."""

    def __init__(self, model):
        self.kinds: list[str] = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        m = kwargs.get("attention_mask")
        self.kinds.append("BlockMask" if isinstance(m, BlockMask) else f"{m.dim()}-D tensor")


def models(model_dir, device="cpu"):
    """The same weights loaded twice: sdpa (the reference and the 4-D-mask path) and flex_attention."""
    sdpa = load_model(model_dir, device=device, attention="sdpa")
    flex = load_model(model_dir, device=device, attention="flex_attention")
    assert sdpa.config._attn_implementation == "sdpa" and flex.config._attn_implementation == "flex_attention"
    return sdpa, flex


def on(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def value_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    lp, n = fn()
    (lp * torch.arange(1, lp.shape[0] + 1, device=lp.device)).sum().backward()  # a weight per sequence
    return lp.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def check_logps(model_dir):
    sdpa, flex = models(model_dir)
    seen_sdpa, seen_flex = MaskSeen(sdpa), MaskSeen(flex)
    batch = pair_batch()
    with torch.no_grad():
        want, n_want = plain(sdpa, batch)
        for kw in (dict(chunk_tokens=3), dict(row_tokens=64)):  # one pair per row; all pairs in one row
            got_sdpa, _ = summed_logps(sdpa, batch, **kw)
            got_flex, n_flex = summed_logps(flex, batch, **kw)
            torch.testing.assert_close(got_flex, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_flex, got_sdpa, rtol=1e-5, atol=1e-5)
            assert n_flex.tolist() == n_want.tolist() == [2, 4, 1, 5, 1, 2]
    # the plain reference ran on the 2-D padding mask, the packed paths on their own masks
    assert seen_sdpa.kinds == ["2-D tensor", "4-D tensor", "4-D tensor"]
    assert seen_flex.kinds == ["BlockMask", "BlockMask"]


def test_flex_packed_logps_equal_plain_and_sdpa_packed_unfused(tiny_model_dir):
    # force_eager: transformers' torch.compile of flex_attention is skipped, so torch runs FlexAttention's
    # unfused reference implementation of the same BlockMask (no C++ compile: seconds on CPU)
    with torch.compiler.set_stance("force_eager"):
        check_logps(tiny_model_dir)


@pytest.mark.slow
def test_flex_packed_logps_equal_plain_and_sdpa_packed_compiled(tiny_model_dir):
    # the fused kernel as transformers runs it (torch.compile of flex_attention; inductor's C++ on CPU)
    check_logps(tiny_model_dir)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_flex_packed_gradients_equal_plain_and_sdpa_packed(tiny_model_dir, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    problem = batching.flex_attention_problem(device, backward=True)
    if problem:
        pytest.skip(f"FlexAttention cannot run a backward on {device} with torch {torch.__version__}: {problem}")
    sdpa, flex = models(tiny_model_dir, device)
    seen = MaskSeen(flex)
    for m in (sdpa, flex):
        m.train()
    batch = on(pair_batch(), device)
    want, _, g_want = value_and_grads(sdpa, lambda: plain(sdpa, batch))
    _, _, g_sdpa = value_and_grads(sdpa, lambda: summed_logps(sdpa, batch, chunk_tokens=3))
    got, _, g_flex = value_and_grads(flex, lambda: summed_logps(flex, batch, chunk_tokens=3))
    assert seen.kinds == ["BlockMask"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(g_flex) == sorted(g_want) == sorted(g_sdpa)
    for k in g_want:
        torch.testing.assert_close(g_flex[k], g_want[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g_flex[k], g_sdpa[k], rtol=1e-4, atol=1e-5)


def test_mask_mod_is_the_4d_mask(tiny_model_dir):
    # the BlockMask's mask_mod, evaluated at every (query, key), is the 4-D mask sdpa gets
    from torch.nn.attention.flex_attention import create_mask
    batch = pair_batch()
    dense = batching._share_prompts(batch["input_ids"], batch["labels_mask"], "sdpa", 64)
    block = batching._share_prompts(batch["input_ids"], batch["labels_mask"], "flex_attention", 64)
    assert isinstance(block["attention_mask"], BlockMask) and block["attention_mask"].shape == (1, 1, 26, 26)
    full = create_mask(block["attention_mask"].mask_mod, 1, 1, 26, 26, device="cpu")
    assert torch.equal(full, dense["attention_mask"])
    for k in ("input_ids", "position_ids", "target", "row", "predictor"):
        assert torch.equal(block[k], dense[k])
    # the row starts with the longest group, pair 0: prompt 5 6 7 (0-2), chosen 8 9 (3-4), rejected (5-9)
    m = dense["attention_mask"][0, 0]
    assert m[5, 2] and not m[5, 3] and m[4, 3]  # the rejected sees the prompt, not the chosen
    assert not m[10, 9]  # the next group (from position 10) sees nothing of pair 0


# ---------------------------------------------------------------------------------------------------
# The trainer: training.attention and training.share_prompts are read, and the run says what ran
# ---------------------------------------------------------------------------------------------------

def _train_seen(tiny_model_dir, tmp_path, monkeypatch, cfg, tag):
    pairs = write_jsonl([{"id": f"p{i}", "prompt": [{"role": "user", "content": f"write a short answer {i}"}],
                          "chosen": [{"role": "assistant", "content": f"hello world {i}"}],
                          "rejected": [{"role": "assistant", "content": f"HELLO {i} World"}], "meta": {}}
                         for i in range(4)], tmp_path / "train.jsonl")
    cache = tmp_path / "ref.pt"
    if not cache.exists():
        train.reference_logps(tiny_model_dir, pairs, cache, max_length=64, max_prompt_length=32, batch_size=4,
                              attention="sdpa")
    seen = []
    prepare = train.prepare_model

    def watched(*a, **k):
        model = prepare(*a, **k)
        seen.append(MaskSeen(model))
        return model
    monkeypatch.setattr(train, "prepare_model", watched)
    summary = train.train_preference(ref_dir=tiny_model_dir, pairs_path=pairs, reference_cache=cache,
                                     **run_paths(tmp_path / tag), ckpt_dir=tmp_path / f"ck-{tag}", cfg=cfg,
                                     method={"loss": "dpo", "beta": 0.5})
    metrics = [json.loads(l) for l in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics, seen[0].kinds


def test_share_prompts_off_trains_the_same_on_unpacked_rows(tiny_model_dir, tmp_path, monkeypatch):
    cfg = {**CFG, "epochs": 2, "global_batch_size": 4, "attention": "sdpa"}
    packed, m_packed, kinds_packed = _train_seen(tiny_model_dir, tmp_path, monkeypatch, cfg, "packed")
    unpacked, m_unpacked, kinds_unpacked = _train_seen(tiny_model_dir, tmp_path, monkeypatch,
                                                       {**cfg, "share_prompts": False}, "unpacked")
    assert kinds_packed == ["4-D tensor"] * 2 and kinds_unpacked == ["2-D tensor"] * 2
    assert packed["attention"] == unpacked["attention"] == "sdpa"
    for a, b in zip(m_packed, m_unpacked, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_flex_training_on_cpu_is_an_error_naming_the_key(tiny_model_dir, tmp_path):
    if batching.flex_attention_problem("cpu", backward=True) is None:
        pytest.skip(f"torch {torch.__version__} has a FlexAttention backward on CPU")
    with pytest.raises(ValueError, match=r"training.attention: flex_attention cannot train on cpu .*backward"):
        train.check_attention({**CFG, "attention": "flex_attention"}, "cpu")
    train.check_attention({**CFG, "attention": "sdpa"}, "cpu")  # the others train anywhere
    assert batching.flex_attention_problem("cpu", backward=False) is None  # a forward runs (tests above)
    # the reference pass refuses it too: the training that needs its cache could not run
    pairs = write_jsonl(tiny_pairs(2), tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match=r"training.attention: flex_attention cannot train on cpu"):
        train.reference_logps(tiny_model_dir, pairs, tmp_path / "ref.pt", max_length=64, max_prompt_length=32,
                              attention="flex_attention")
    assert not (tmp_path / "ref.pt").exists()
