"""Disk size of what training saves for the paper's two 7B models: the whole model in fp32 and bf16
(training.save_precision) and a LoRA adapter (fp32) at r 16 and r 64 on every linear layer (the schema's default
target modules). Parameters are counted on the meta device from the models' public configs (no weights, no hub).

    python -m benchmarks.saved_sizes          (seconds; writes benchmarks/results/saved_sizes.json)
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import RESULTS, print_table, write_json

# Public config.json values of the paper's reference models (HuggingFaceH4/mistral-7b-sft-beta: Mistral-7B-v0.1;
# HuggingFaceH4/zephyr-7b-gemma-sft-v0.1: gemma-7b).
CONFIGS = {
    "mistral-7b-sft-beta": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                            tie_word_embeddings=False)),
    "zephyr-7b-gemma-sft": ("gemma", dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                                          num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                                          vocab_size=256000, tie_word_embeddings=True)),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GB = 1e9


def model_of(kind: str, dims: dict):
    from transformers import GemmaConfig, GemmaForCausalLM, MistralConfig, MistralForCausalLM
    cfg_cls, model_cls = (MistralConfig, MistralForCausalLM) if kind == "mistral" else (GemmaConfig, GemmaForCausalLM)
    with torch.device("meta"):
        return model_cls(cfg_cls(**dims))


def sizes(name: str) -> dict:
    kind, dims = CONFIGS[name]
    model = model_of(kind, dims)
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once, as saved
    lora_per_r = sum(m.in_features + m.out_features for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS)
    return {"model": name, "parameters": params, "fp32_GB": round(4 * params / GB, 1),
            "bf16_GB": round(2 * params / GB, 1), "lora_r16_fp32_MB": round(4 * 16 * lora_per_r / 1e6),
            "lora_r64_fp32_MB": round(4 * 64 * lora_per_r / 1e6)}


def main(argv=None) -> list[dict]:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    rows = [sizes(name) for name in CONFIGS]
    print_table(rows, list(rows[0]))
    write_json(RESULTS / "saved_sizes.json", {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
