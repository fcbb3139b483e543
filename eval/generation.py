"""The answer backends behind the config's `generation.backend`, for every stage that generates answers
(Table 1, MT-Bench, AlpacaEval, Arena-Hard), so that one setting switches them all:

    hf     rpo.sampling.generate_answers: the batched transformers sampler, LoRA merged in memory, resumable
           from `<out>.partial` (the default; runs on CPU)
    vllm   eval.vllm_backend: one vLLM engine per job, LoRA served unmerged, the same prompt tokens, stop
           tokens and file format, written atomically at the end (pip install '.[vllm]', a CUDA GPU)
    llamacpp  rpo.sampling.generate_answers on an rpo.llamacpp.Engine: llama.cpp's forward passes on the
           models' GGUF files (workflow/rules/gguf.smk writes them; LoRA applied unmerged), the hf
           backend's prompt tokens, stop tokens, seeded next-token choice, batches and resumable files (CPU)
"""
from __future__ import annotations

BACKENDS = ("hf", "vllm", "llamacpp")
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}  # AlpacaEval's and Arena-Hard's answers


def check_backend(backend: str, vllm_dtype: str | None, gguf: dict | None = None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"generation.backend: unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "vllm" and vllm_dtype is None:
        raise ValueError("generation.backend vllm: no vllm_dtype given (the config's generation.vllm_dtype)")
    if backend == "llamacpp" and not (gguf or {}).get("model"):
        raise ValueError("generation.backend llamacpp: no GGUF of the reference model given (gguf.model: the "
                         "export rules' output, workflow/rules/gguf.smk)")


def load_sampler(backend: str, ref_dir: str, policy_dir: str | None, gguf: dict | None = None):
    """(tokenizer, sampler) of the hf backend (a transformers model) or of llamacpp (an rpo.llamacpp.Engine);
    rpo.sampling.generate_answers takes either."""
    if backend == "llamacpp":
        from rpo.llamacpp import engine_for
        from rpo.models import load_tokenizer
        return load_tokenizer(ref_dir), engine_for(ref_dir=ref_dir, policy_dir=policy_dir, gguf=gguf)
    return load_hf(ref_dir, policy_dir)


def load_hf(ref_dir: str, policy_dir: str | None):
    """(tokenizer, model) of the HF backend: the reference's tokenizer; the policy, a LoRA adapter merged."""
    import torch

    from rpo.models import load_policy, load_tokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_tokenizer(ref_dir), load_policy(ref_dir, policy_dir or ref_dir, device=device).eval()


def vllm_engine(ref_dir: str, policy_dir: str | None, *, seed: int, vllm_dtype: str):
    from eval.vllm_backend import Engine
    return Engine(ref_dir=ref_dir, policy_dir=policy_dir, seed=seed, dtype=vllm_dtype)


def answer_prompts(*, backend: str, ref_dir: str, policy_dir: str | None, prompts: list[dict], out,
                   max_new_tokens: int, temperature: float, top_p: float, top_k: int, batch_size: int, seed: int,
                   model_name: str, desc: str, vllm_dtype: str | None = None, gguf: dict | None = None) -> list[dict]:
    """One model's answers to `prompts` ([{"id", "messages"}]) in rpo.sampling's answer file `out`; `gguf`:
    the llamacpp backend's files ({"model": the reference's GGUF, "policy": the policy's, if any})."""
    check_backend(backend, vllm_dtype, gguf)
    if backend == "vllm":
        engine = vllm_engine(ref_dir, policy_dir, seed=seed, vllm_dtype=vllm_dtype)
        return engine.write_answers(prompts, out, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, seed=seed, model_name=model_name)
    from rpo.sampling import generate_answers
    tok, model = load_sampler(backend, ref_dir, policy_dir, gguf)
    return generate_answers(model, tok, prompts, out, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed, model_name=model_name,
                            desc=desc)
