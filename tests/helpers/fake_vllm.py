"""A stand-in for the `vllm` package on a machine without CUDA: `LLM`, `SamplingParams`,
`vllm.lora.request.LoRARequest` and RequestOutput-like results, put into sys.modules by `install`.

    fake = install(monkeypatch)      # `import vllm` now gives this module's classes
    ...                              # fake.LLM.instances: every engine built, with .kwargs and .calls

The engine runs the real model on CPU with its own plain decoding loop (no KV cache, one prompt at a
time, nothing shared with rpo.sampling): greedy at temperature 0, else softmax(logits / T) over the top_k
drawn from a generator seeded with the request's seed. It stops as vLLM stops: at max_tokens
(finish_reason 'length'), at a stop_token_id, or at the tokenizer's eos unless ignore_eos
(finish_reason 'stop', the stop token kept in token_ids). A LoRARequest's adapter is applied unmerged
(peft) on a separate copy of the base model, and only when the engine was built with enable_lora, as
vLLM refuses it otherwise. Every engine records its constructor kwargs and every generate call
(prompts, sampling params, LoRA request), so tests can check what vLLM would have been given.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from types import SimpleNamespace

import torch

SAMPLING_FIELDS = {"n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 16, "seed": None,
                   "stop_token_ids": None, "ignore_eos": False}


class SamplingParams:
    """The fields vLLM's SamplingParams takes that the backend may use; any other keyword is a TypeError."""

    def __init__(self, **kw):
        unknown = set(kw) - set(SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"fake SamplingParams: unexpected keyword arguments {sorted(unknown)}")
        self.__dict__.update({**SAMPLING_FIELDS, **kw})
        if self.temperature == 0 and self.n != 1:
            raise ValueError("n must be 1 when using greedy sampling")  # as vLLM's _verify_greedy_sampling


class LoRARequest:
    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class LLM:
    instances: list = []

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto", seed: int = 0,
                 enable_lora: bool = False, max_lora_rank: int = 16, max_loras: int = 1):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.kwargs = {"model": model, "tokenizer": tokenizer, "dtype": dtype, "seed": seed,
                       "enable_lora": enable_lora, "max_lora_rank": max_lora_rank, "max_loras": max_loras}
        self.calls: list[dict] = []
        self.model_dir = model
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.eos = AutoTokenizer.from_pretrained(tokenizer or model).eos_token_id
        self._lora_models: dict[str, torch.nn.Module] = {}
        LLM.instances.append(self)

    def _model_for(self, lora):
        if lora is None:
            return self.model
        if not self.kwargs["enable_lora"]:
            raise ValueError("LoRA is not enabled: build the LLM with enable_lora=True")
        if lora.lora_path not in self._lora_models:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM
            base = AutoModelForCausalLM.from_pretrained(self.model_dir)
            self._lora_models[lora.lora_path] = PeftModel.from_pretrained(base, lora.lora_path).eval()
        return self._lora_models[lora.lora_path]

    def generate(self, prompts, sampling_params, *, lora_request=None, use_tqdm=True):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        self.calls.append({"prompts": prompts, "params": params, "lora_request": lora_request})
        model = self._model_for(lora_request)
        return [SimpleNamespace(prompt_token_ids=list(p["prompt_token_ids"]),
                                outputs=[self._complete(model, p["prompt_token_ids"], sp) for _ in range(sp.n)])
                for p, sp in zip(prompts, params)]

    @torch.inference_mode()
    def _complete(self, model, prompt_ids, sp):
        stop = set(sp.stop_token_ids or ()) | (set() if sp.ignore_eos else {self.eos})
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else 0)
        ids, out = list(prompt_ids), []
        while True:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            if sp.temperature == 0:
                nxt = int(logits.argmax())
            else:
                k = logits.numel() if sp.top_k <= 0 else sp.top_k
                vals, idx = torch.topk(logits / sp.temperature, k)
                nxt = int(idx[torch.multinomial(torch.softmax(vals, -1), 1, generator=gen)])
            ids.append(nxt)
            out.append(nxt)
            if nxt in stop:
                reason = "stop"
                break
            if len(out) >= sp.max_tokens:
                reason = "length"
                break
        return SimpleNamespace(text=f"<fake detokenizer text {len(out)}>", token_ids=out, finish_reason=reason)


def install(monkeypatch) -> types.ModuleType:
    """Put the fake `vllm`, `vllm.lora` and `vllm.lora.request` modules into sys.modules (undone by
    monkeypatch at the end of the test); returns the `vllm` module, its engine list empty."""
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # importlib.util.find_spec finds it
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    lora.request = request
    vllm.lora = lora
    for name, mod in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, mod)
    LLM.instances = []
    return vllm
