"""vLLM generation backend (optional: pip install '.[vllm]'; needs a CUDA GPU) for every answer the DAG
generates, Table 1's, MT-Bench's, AlpacaEval's and Arena-Hard's, when `generation.backend` is vllm
(eval/generation.py picks the backend).

    Engine                     one vLLM engine per job: built once, reused for every call of the job
                               (MT-Bench's two turns and all its categories included)
    Engine.write_answers       answers to prompts -> the HF backend's answer file (rpo.sampling.generate_answers)
    Engine.generate            answer rows, one temperature per prompt (MT-Bench's two turns and its categories:
                               eval.mtbench.answers.generate_answers_vllm)

The same as the HF backend, by construction:
* the prompts: rpo.sampling.encode_row (the tokenizer's chat template with the assistant turn opened, or the
  prompt row's text; with add_special_tokens, tokenized as vLLM tokenizes a string prompt: the BOS in front)
  makes the token ids, which go to vLLM as they are (a TokensPrompt), so vLLM never renders the template itself;
* where an answer stops: the tokenizer's eos and pad ids and the stage's stop_token_ids
  (rpo.sampling.stop_token_ids) and no other. vLLM would also stop on the eos ids of the model's
  generation_config.json, which the HF sampler does not; ignore_eos=True with exactly these ids as
  stop_token_ids makes both stop on the same tokens;
* the text: the generated ids before the first stop id, decoded by the same tokenizer
  (rpo.sampling.decode_answer), not by vLLM's incremental detokenizer; the rows (rpo.sampling.answer_row).
  Except answer_text "raw" (the authors' Table 1: gen_eval*.py keep `outputs[0].text`): vLLM's own text,
  unstripped, which the HF backend can only approach (its decode, unstripped);
* the decoding settings: the caller's temperature, top_p, top_k and max_new_tokens (MT-Bench: its
  per-category temperature for each prompt, top_k 50).
Different: the sampling RNG. Each request has its own seed, derived from the job seed and the prompt id
(rpo.sampling.derived_seed), so an answer does not depend on batching, but sampled answers are not the
HF sampler's draws, and greedy ones differ where the kernels' numerics change an argmax.
No .partial resume: the engine answers all of a call's prompts at once and the file is written
atomically at the end (rpo.io); an interrupted job starts again. A LoRA adapter is served on top of its
reference model, unmerged (LoRARequest); a fully fine-tuned policy is loaded as its own model. The
tokenizer is always the reference's, as in the HF backend.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from rpo import io, sampling
from rpo.models import load_tokenizer, resolve_model_dir

log = logging.getLogger(__name__)


def require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("generation backend 'vllm' needs the vllm package: pip install -e '.[vllm]' "
                           "(on a CUDA machine), or set backend: hf") from None


def rows_from_outputs(tok, prompts: list[dict], encoded: list[list[int]], outputs, stop_ids,
                      model_name: str, answer_text: str = "stripped") -> list[dict]:
    """The HF backend's answer rows from vLLM RequestOutputs (one per prompt, in order).

    Each completion is cut at its first stop id and decoded as the HF backend decodes (answer_text "raw":
    vLLM's own text as it stands); it is `finished` when it stopped on a stop id rather than at max_tokens
    (vLLM's finish_reason 'stop' or 'length').
    """
    sampling.check_answer_text(answer_text)
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    rows = []
    for p, ids, out in zip(prompts, encoded, outputs):
        if list(out.prompt_token_ids) != ids:
            raise ValueError(f"vLLM's output for prompt {p['id']!r} is for other prompt tokens")
        samples = []
        for c in out.outputs:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"prompt {p['id']!r}: vLLM finished with {c.finish_reason!r}, "
                                   "expected 'stop' or 'length'")
            seq = list(c.token_ids)
            text, length = sampling.decode_answer(tok, seq, stop_ids)
            if answer_text == "raw":
                text = c.text
            # vLLM keeps the stop token in token_ids; finish_reason covers a version that drops it
            samples.append((text, length, length < len(seq) or c.finish_reason == "stop"))
        rows.append(sampling.answer_row(p, model_name, samples))
    return rows


class Engine:
    """One vLLM engine for one model (a reference, a reference + LoRA adapter, or a full policy)."""

    def __init__(self, *, ref_dir: str, policy_dir: str | None, seed: int, dtype: str):
        require_vllm()
        from vllm import LLM
        from vllm.lora.request import LoRARequest


        self.tok = load_tokenizer(ref_dir)
        adapter = policy_dir is not None and (Path(policy_dir) / "adapter_config.json").is_file()
        model_dir = resolve_model_dir(ref_dir if adapter or policy_dir is None else policy_dir)
        kwargs = {}
        if adapter:
            rank = json.loads((Path(policy_dir) / "adapter_config.json").read_text())["r"]
            kwargs = {"enable_lora": True, "max_lora_rank": max(8, rank), "max_loras": 1}
        log.info("vLLM engine: %s%s, %s", model_dir, f" + LoRA {policy_dir}" if adapter else "", dtype)
        self.llm = LLM(model=str(model_dir), tokenizer=str(resolve_model_dir(ref_dir)), dtype=dtype, seed=seed,
                       **kwargs)
        self.lora = LoRARequest("policy", 1, str(Path(policy_dir).resolve())) if adapter else None

    def generate(self, prompts: list[dict], *, temperatures: list[float], max_new_tokens: int, top_p: float,
                 top_k: int, seed: int, model_name: str, add_special_tokens: bool = False, extra_stop_ids=(),
                 answer_text: str = "stripped") -> list[dict]:
        """Answer rows for `prompts` = [{"id", "messages"[, "text"]}], one call to the engine; `temperatures`: one
        per prompt (0 = greedy); the other settings as rpo.sampling.generate_answers takes them."""
        from vllm import SamplingParams

        ids = [p["id"] for p in prompts]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate prompt ids in the generation input")
        if len(temperatures) != len(prompts):
            raise ValueError(f"{len(temperatures)} temperatures for {len(prompts)} prompts")
        stop_ids = sorted(sampling.stop_token_ids(self.tok, extra_stop_ids))
        encoded = [sampling.encode_row(self.tok, p, add_special_tokens) for p in prompts]
        params = [SamplingParams(n=1, temperature=t, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 max_tokens=max_new_tokens, seed=sampling.derived_seed(seed, p["id"]),
                                 stop_token_ids=stop_ids, ignore_eos=True)
                  for p, t in zip(prompts, temperatures)]
        outputs = self.llm.generate([{"prompt_token_ids": e} for e in encoded], params, lora_request=self.lora,
                                    use_tqdm=True)
        return rows_from_outputs(self.tok, prompts, encoded, outputs, set(stop_ids), model_name, answer_text)

    def write_answers(self, prompts: list[dict], out_path, *, max_new_tokens: int, temperature: float,
                      top_p: float, top_k: int, seed: int, model_name: str, **text) -> list[dict]:
        """rpo.sampling.generate_answers's file for `prompts`, written atomically once all are answered; `text`:
        add_special_tokens, extra_stop_ids, answer_text."""
        rows = self.generate(prompts, temperatures=[temperature] * len(prompts), max_new_tokens=max_new_tokens,
                             top_p=top_p, top_k=top_k, seed=seed, model_name=model_name, **text)
        io.write_jsonl(rows, out_path)
        return rows

