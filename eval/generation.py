"""The answer backends behind the config's `generation.backend`, for every stage that generates answers
(Table 1, MT-Bench, AlpacaEval, Arena-Hard), so that one setting switches them all:

    hf     rpo.sampling.generate_answers: the batched transformers sampler, LoRA merged in memory, resumable
           from `<out>.partial` (the default; runs on CPU)
    vllm   eval.vllm_backend: one vLLM engine per job, LoRA served unmerged, the same prompt tokens, stop
           tokens and file format, written atomically at the end (pip install '.[vllm]', a CUDA GPU)
    llamacpp  rpo.sampling.generate_answers on an rpo.llamacpp.Engine: llama.cpp's forward passes on the
           models' GGUF files (workflow/rules/gguf.smk writes them; LoRA applied unmerged), the hf
           backend's prompt tokens, stop tokens, seeded next-token choice, batches and resumable files (CPU)
    fusion eval.fusion: a fused model (ref_dir: its directory, rule make_fused_model), decoded by the hf
           backend's sampler with log P̃ = log softmax(M_L + Σ α_t (M_S,t − M_S)) as its logits (proxy tuning,
           Dynamic Logits Fusion); the model of each fused model's jobs, whatever generation.backend says

A stage's `dtype` (table1.generation.dtype, benchmarks.<name>.dtype; null: the backend's own) is the precision its
answers are computed in: vLLM's dtype (null: generation.vllm_dtype), or the HF backend's weights (null: float32);
the llamacpp backend computes in its GGUF's type (generation.llamacpp_dtype).
"""
from __future__ import annotations

from rpo.models import load_policy, load_tokenizer

BACKENDS = ("hf", "vllm", "llamacpp")  # generation.backend's values
FUSION = "fusion"  # a fused model's backend, which the DAG picks per model (workflow/rules/common.smk)


def check_backend(backend: str, vllm_dtype: str | None, gguf: dict | None = None) -> None:
    if backend == FUSION:
        return
    if backend not in BACKENDS:
        raise ValueError(f"generation.backend: unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if backend == "vllm" and vllm_dtype is None:
        raise ValueError("generation.backend vllm: no vllm_dtype given (the config's generation.vllm_dtype)")
    if backend == "llamacpp" and not (gguf or {}).get("model"):
        raise ValueError("generation.backend llamacpp: no GGUF of the reference model given (gguf.model: the "
                         "export rules' output, workflow/rules/gguf.smk)")


def load_sampler(backend: str, ref_dir: str, policy_dir: str | None, gguf: dict | None = None,
                 dtype: str | None = None):
    """(tokenizer, sampler) of the hf backend (a transformers model, in `dtype`), of llamacpp (an
    rpo.llamacpp.Engine) or of fusion (eval.fusion.load_fused: ref_dir is the fused model's directory);
    rpo.sampling.generate_answers takes each."""
    if backend == FUSION:
        if policy_dir is not None:
            raise ValueError(f"generation backend fusion: {ref_dir} is a fused model; it takes no policy ({policy_dir})")
        from eval.fusion import load_fused  # torch
        return load_fused(ref_dir, dtype)
    if backend == "llamacpp":
        from rpo.llamacpp import engine_for  # torch, llama_cpp
        return load_tokenizer(ref_dir), engine_for(ref_dir=ref_dir, policy_dir=policy_dir, gguf=gguf)
    return load_hf(ref_dir, policy_dir, dtype)


def load_hf(ref_dir: str, policy_dir: str | None, dtype: str | None = None):
    """(tokenizer, model) of the HF backend: the reference's tokenizer; the policy, a LoRA adapter merged, in
    `dtype` (None: float32)."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_policy(ref_dir, policy_dir or ref_dir, device=device, dtype=dtype or "float32")
    return load_tokenizer(ref_dir), model.eval()


def vllm_engine(ref_dir: str, policy_dir: str | None, *, seed: int, vllm_dtype: str, dtype: str | None = None):
    """The job's vLLM engine, computing in the stage's `dtype`, else generation.vllm_dtype."""
    from eval.vllm_backend import Engine  # vllm, torch
    return Engine(ref_dir=ref_dir, policy_dir=policy_dir, seed=seed, dtype=dtype or vllm_dtype)


def answer_prompts(*, backend: str, ref_dir: str, policy_dir: str | None, prompts: list[dict], out,
                   max_new_tokens: int, temperature: float, top_p: float, top_k: int, batch_size: int, seed: int,
                   model_name: str, desc: str, vllm_dtype: str | None = None, dtype: str | None = None,
                   add_special_tokens: bool = False, stop_token_ids=(), answer_text: str = "stripped",
                   gguf: dict | None = None) -> list[dict]:
    """One model's answers to `prompts` ([{"id", "messages"[, "text"]}]) in rpo.sampling's answer file `out`;
    `add_special_tokens`, `stop_token_ids`, `answer_text` as rpo.sampling describes them; `gguf`: the llamacpp
    backend's files ({"model": the reference's GGUF, "policy": the policy's, if any})."""
    check_backend(backend, vllm_dtype, gguf)
    text = {"add_special_tokens": add_special_tokens, "extra_stop_ids": tuple(stop_token_ids),
            "answer_text": answer_text}
    if backend == "vllm":
        engine = vllm_engine(ref_dir, policy_dir, seed=seed, vllm_dtype=vllm_dtype, dtype=dtype)
        return engine.write_answers(prompts, out, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k, seed=seed, model_name=model_name, **text)
    from rpo.sampling import generate_answers  # torch
    tok, model = load_sampler(backend, ref_dir, policy_dir, gguf, dtype)
    return generate_answers(model, tok, prompts, out, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed, model_name=model_name,
                            desc=desc, **text)
