"""vLLM generation backend (optional: pip install '.[vllm]'; needs a CUDA GPU).

The trained LoRA adapters are served on top of the reference model without merging (vLLM's LoRARequest);
a fully fine-tuned policy is loaded as its own model. Answers are written in exactly the format of the HF
backend (`rpo.sampling.generate_answers`): one JSON row per prompt with id, model, messages, responses,
n_tokens and finished, so every judge and scorer reads either. The HF backend stays the default and the
fallback (MT-Bench's two-turn answers always use it).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("generation backend 'vllm' needs the vllm package: pip install -e '.[vllm]' "
                           "(on a CUDA machine), or set backend: hf") from None


def rows_from_outputs(prompts: list[dict], outputs, model_name: str) -> list[dict]:
    """The HF backend's answer rows from vLLM RequestOutputs (one per prompt, in order): each completion's
    text, token count and whether it stopped on its own (finish_reason 'stop') rather than at max_tokens."""
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    rows = []
    for p, out in zip(prompts, outputs):
        rows.append({"id": p["id"], "model": model_name, "messages": p["messages"],
                     "responses": [c.text.strip() for c in out.outputs],
                     "n_tokens": [len(c.token_ids) for c in out.outputs],
                     "finished": [c.finish_reason == "stop" for c in out.outputs]})
    return rows


def generate_answers_vllm(*, ref_dir: str, policy_dir: str | None, prompts: list[dict], out_path: str | Path,
                          max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                          seed: int = 0, num_return_sequences: int = 1, model_name: str = "",
                          dtype: str = "bfloat16") -> list[dict]:
    require_vllm()
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from rpo.models import resolve_model_dir

    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{out_path}: duplicate prompt ids in the generation input")
    adapter = policy_dir is not None and (Path(policy_dir) / "adapter_config.json").is_file()
    model_dir = resolve_model_dir(ref_dir if adapter or policy_dir is None else policy_dir)
    kwargs = {}
    if adapter:
        rank = json.loads((Path(policy_dir) / "adapter_config.json").read_text())["r"]
        kwargs = {"enable_lora": True, "max_lora_rank": max(8, rank), "max_loras": 1}
    llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, **kwargs)
    params = SamplingParams(n=num_return_sequences, temperature=temperature, top_p=top_p,
                            top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens, seed=seed)
    lora = LoRARequest(model_name or "policy", 1, str(Path(policy_dir).resolve())) if adapter else None
    outputs = llm.chat([p["messages"] for p in prompts], params, lora_request=lora, use_tqdm=True)
    rows = rows_from_outputs(prompts, outputs, model_name)
    from rpo.io import write_jsonl
    write_jsonl(rows, out_path)
    return rows
