"""lm-evaluation-harness's model for generation.backend llamacpp (eval/harness.py hands it to simple_evaluate):
the harness's generation tasks (generate_until requests, such as ifeval) answered by rpo.llamacpp's engine.

What is the harness's own HF model's (lm_eval/models/huggingface.py, HFLM), so that a task's prompts and texts
are the same: the chat template applied by the tokenizer to the harness's chat history (apply_chat_template),
the context's tokens (no special tokens added unless HFLM would: has_bos_prefix), the generation settings
(normalize_gen_kwargs: greedy unless do_sample, max_gen_toks), the stop strings (the request's `until` plus the
eos text) cut from the decoded text (postprocess_generated_text). The tokens are generated as every other
stage's are: rpo.sampling.next_tokens on llama.cpp's logits, stopping at the tokenizer's eos and pad ids.
Log-likelihood requests (multiple-choice tasks) are not served: such a task fails naming this backend.
"""
from __future__ import annotations

import json
import logging

import torch
from lm_eval.api.model import LM
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)

from rpo.llamacpp import engine_for
from rpo.models import load_tokenizer
from rpo.sampling import derived_seed, stop_token_ids

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k")


class LlamaCppLM(LM):
    """One DAG model (reference, or reference + policy) as an lm-eval LM; its tokenizer is the reference's."""

    def __init__(self, *, ref_dir: str, policy_dir: str | None, gguf: dict, batch_size: int,
                 max_gen_toks: int = 256, seed: int = 0):
        super().__init__()
        self.tokenizer = load_tokenizer(ref_dir)
        self.engine = engine_for(ref_dir=ref_dir, policy_dir=policy_dir, gguf=gguf)
        self.batch_size, self.max_gen_toks, self.seed = int(batch_size), int(max_gen_toks), int(seed)
        self.stop_ids = stop_token_ids(self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def loglikelihood(self, requests):
        raise NotImplementedError("lm_eval with generation.backend llamacpp serves generation tasks only "
                                  "(generate_until, e.g. ifeval); this task asks for log-likelihoods: use "
                                  "generation.backend hf, or drop the task from lm_eval.tasks")

    def loglikelihood_rolling(self, requests):
        self.loglikelihood(requests)

    def _encode(self, context: str) -> list[int]:
        """HFLM.tok_batch_encode's tokens of one context (no padding: llama.cpp takes each as it is)."""
        special = {"add_special_tokens": False} if has_bos_prefix(context, self.tokenizer.bos_token) else {}
        return self.tokenizer(context, **special)["input_ids"]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one decoding setting per group, as HFLM groups by gen_kwargs
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tokenizer.decode(self.tokenizer.eos_token_id, skip_special_tokens=False)
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            do_sample = kwargs.pop("do_sample", False)
            sampling = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
            if kwargs:
                raise ValueError(f"lm_eval with generation.backend llamacpp: generation settings {sorted(kwargs)} "
                                 "are not supported (temperature, top_p, top_k, until, max_gen_toks, do_sample are)")
            temperature = float(sampling.get("temperature", 1.0)) if do_sample else 0.0
            encoded = {i: self._encode(requests[i].args[0]) for i in idx}
            order = sorted(idx, key=lambda i: len(encoded[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                gen = torch.Generator().manual_seed(derived_seed(self.seed, requests[batch[0]].args[0]))
                tokens = self.engine.sample_ids(
                    [encoded[i] for i in batch], max_new_tokens=max_gen_toks, temperature=temperature,
                    top_p=float(sampling.get("top_p", 1.0)), top_k=int(sampling.get("top_k", 0) or 0),
                    stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_token_id, generator=gen)
                for i, seq in zip(batch, tokens.tolist()):
                    cut = next((k for k, t in enumerate(seq) if t in self.stop_ids), len(seq))
                    text = postprocess_generated_text(self.tokenizer.decode(seq[:cut], skip_special_tokens=True),
                                                      stop=until, think_end_token=None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
