"""FastChat's conversation templates for MT-Bench answers (benchmarks.mtbench.template: fastchat), as the authors'
FastChat copy generated them (YSLIU627/Regularized-Preference-Optimization @ d0389c4, eval/FastChat_local:
fastchat/conversation.py for the templates, fastchat/model/model_adapter.py for the choice by model name,
fastchat/llm_judge/gen_model_answer.py for how a prompt is tokenized and an answer cut):

    TEMPLATES        the two templates the paper's models used, as data: `zephyr` (the beta series) and
                     `h4_gemma_zephyr` (the gemma series; gen_model_answer_gemma.py hard-codes the same one)
    template_for     the template FastChat picks for a model name: the authors registered two adapters ahead of
                     all others, "gemma" in the name -> h4_gemma_zephyr, then "beta" -> zephyr (the basename
                     is tried first); any other name must be named in benchmarks.mtbench.fastchat_template
    prompt_text      the conversation's prompt (FastChat's SeparatorStyle.CHATML get_prompt), the assistant turn
                     opened; FastChat tokenizes it with `tokenizer([prompt])`, special tokens added, so the
                     tokenizer's BOS comes first (before gemma's literal `<bos>`: two)
    stop_ids         where an answer ends: the template's stop token ids and its stop strings that are one token
    answer_text      FastChat's cut of a decoded answer: at the earliest stop string found at an index > 0, stripped

One difference remains: FastChat's generate stops only at the model's eos and cuts the text afterwards; stopping
at a one-token stop string instead gives the same text, except when that token comes first (FastChat then does
not cut at it, removes it as a special token and keeps what followed; here the answer is empty).
"""
from __future__ import annotations

import os

# conversation.py: register_conv_template(Conversation(name=..., ...)); both use SeparatorStyle.CHATML
TEMPLATES = {
    "zephyr": {"system_template": "<|system|>\n{system_message}", "system_message": "",
               "roles": ("<|user|>", "<|assistant|>"), "sep": "</s>", "stop_str": ("</s>",),
               "stop_token_ids": (2,)},
    "h4_gemma_zephyr": {"system_template": "<bos><|im_start|>system\n{system_message}",
                        "system_message": "You are an AI assistant.",
                        "roles": ("<|im_start|>user", "<|im_start|>assistant"), "sep": "<|im_end|>",
                        "stop_str": ("<|im_end|>", "<|endoftext|>"), "stop_token_ids": ()},
}
# model_adapter.py: the authors' adapters, registered first (earlier registration wins)
NAME_RULES = (("gemma", "h4_gemma_zephyr"), ("beta", "zephyr"))


def get_template(name: str) -> dict:
    if name not in TEMPLATES:
        raise ValueError(f"benchmarks.mtbench.fastchat_template: {name!r} is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def template_for(model_name: str) -> str:
    """The FastChat template of a model name (a hub id, a path, or a source such as hf:owner/name@rev)."""
    name = model_name.split(":", 1)[-1].split("@", 1)[0]
    for candidate in (os.path.basename(os.path.normpath(name)), name):  # the basename first, as FastChat
        for key, template in NAME_RULES:
            if key in candidate.lower():
                return template
    raise ValueError(f"benchmarks.mtbench.fastchat_template: no FastChat template of this package matches the model "
                     f"name {model_name!r} (the authors' adapters: 'gemma' -> h4_gemma_zephyr, 'beta' -> zephyr); "
                     f"name one of {sorted(TEMPLATES)}")


def prompt_text(template: dict, messages: list[dict]) -> str:
    """The prompt of a user/assistant conversation that ends with a user turn, the assistant turn opened.
    CHATML: the system prompt (when not empty) + sep + newline, then `role\\n{message}{sep}\\n` per message, and
    `role\\n` for the open assistant turn or an empty message (FastChat tests `if message:`)."""
    roles = {"user": template["roles"][0], "assistant": template["roles"][1]}
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a FastChat prompt ends with a user turn")
    system = template["system_template"].format(system_message=template["system_message"])
    out = "" if system == "" else system + template["sep"] + "\n"
    for m in messages:
        if m["role"] not in roles:
            raise ValueError(f"a FastChat MT-Bench conversation has user and assistant turns, not {m['role']!r}")
        out += roles[m["role"]] + "\n" + (m["content"] + template["sep"] + "\n" if m["content"] else "")
    return out + roles["assistant"] + "\n"


def stop_ids(template: dict, tok) -> set[int]:
    """The template's stop token ids, and each stop string that is one token of `tok`."""
    ids = set(template["stop_token_ids"])
    for s in template["stop_str"]:
        found = tok(s, add_special_tokens=False)["input_ids"]
        if len(found) == 1:
            ids.add(found[0])
    return ids


def answer_text(template: dict, text: str) -> str:
    """gen_model_answer.py's cut: the text before the earliest stop string found at an index > 0, stripped."""
    found = sorted(i for i in (text.find(s) for s in template["stop_str"]) if i > 0)
    return (text[:found[0]] if found else text).strip()
