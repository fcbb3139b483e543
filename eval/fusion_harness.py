"""A fused model (eval/fusion.py) as an lm-evaluation-harness model: run_lm_eval's `fusion` backend.

`FusedHFLM` is the harness's own HFLM around a FusedLM, so the harness's tokenization, chat template, batching,
few-shot handling and answer post-processing (the cut at the task's `until` strings) are HFLM's; two calls change:

    _model_call       the fused log-probabilities log P̃ at every position (loglikelihood tasks; the dynamic α is
                      searched per position from that position's distributions, as in decoding)
    _model_generate   rpo.sampling.sample on the fused model (generation tasks): greedy, or seeded sampling with
                      the task's temperature / top_p / top_k, stopping at the tokenizer's eos and pad ids (HFLM
                      then cuts the text at the task's stop strings, as after transformers' generate)

loglikelihood_rolling (perplexity tasks) is HFLM's, through _model_call.
"""
from __future__ import annotations

import torch
from lm_eval.models.huggingface import HFLM

from eval.fusion import load_fused
from rpo.sampling import sample, stop_token_ids

SAMPLING_KEYS = ("temperature", "do_sample", "top_p", "top_k")


class FusedHFLM(HFLM):
    def __init__(self, fused_dir: str, *, dtype: str | None = None, batch_size: int = 1, seed: int = 0,
                 max_length: int | None = None):
        tok, model = load_fused(fused_dir, None if dtype == "auto" else dtype)
        super().__init__(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size,
                         max_length=max_length)
        self.fused_dir = fused_dir
        self._generator = torch.Generator().manual_seed(seed)

    def _model_call(self, inps, attn_mask=None, labels=None):
        with torch.no_grad():
            return self.model(inps).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        attn = generation_kwargs.pop("attention_mask", None)
        if attn is None:
            attn = torch.ones_like(context)
        unknown = sorted(set(generation_kwargs) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"{self.fused_dir}: the fusion backend's sampler takes {list(SAMPLING_KEYS)}, "
                             f"not {unknown} (the task's generation_kwargs)")
        temperature = float(generation_kwargs.get("temperature") or 0.0)
        if generation_kwargs.get("do_sample") is False:
            temperature = 0.0
        new = sample(self.model, context, attn, max_new_tokens=max_length - context.shape[1], temperature=temperature,
                     top_p=float(generation_kwargs.get("top_p") or 1.0), top_k=int(generation_kwargs.get("top_k") or 0),
                     stop_ids=stop_token_ids(self.tokenizer), pad_id=self.tokenizer.pad_token_id,
                     generator=self._generator)
        return torch.cat([context.cpu(), new], dim=1)
