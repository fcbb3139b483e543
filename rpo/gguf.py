"""Transformers Llama-architecture models as GGUF files for llama.cpp (rpo.llamacpp samples from them).

    export(model_dir, out, dtype, base_dir)     the export rule's job (python -m rpo export-gguf): one of
    write_model(model_dir, path, dtype=...)     a reference model, or a fully fine-tuned policy
    write_adapter(adapter_dir, base_dir, path)  a peft LoRA adapter, applied by llama.cpp on top of its
                                                base model's GGUF (unmerged: a few MB, not a model copy)
    source_digest(*dirs)                        sha256 of the files a GGUF is made from; written into the
                                                GGUF (key rpo.source_digest) and checked before sampling

The metadata keys and the one change to the weights follow llama.cpp's convert_hf_to_gguf.py (LlamaModel)
and convert_lora_to_gguf.py: q_proj and k_proj rows (a LoRA's lora_B rows) are permuted from transformers'
rotate-half RoPE layout back to the interleaved pairs llama.cpp's LLAMA graph rotates. Weights are f32 by
default (the HF backend's own precision, so greedy answers stay as close to it as the kernels allow); f16 and
bf16 halve the file (bf16 runs on AVX512-BF16 CPUs' dot products), q8_0 quantises to 8 bits (gguf's own
quantiser); 1-D norm weights stay f32, as llama.cpp requires. docs/measurements.md has each one's speed and
share of greedy answers identical to the HF backend's.
The vocabulary is written so that llama.cpp can load the file (a byte-level BPE tokenizer as llama.cpp's
"gpt2" type); this package never tokenizes with it: prompts go in as rpo.sampling.encode_prompt's ids.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "bf16", "q8_0")  # the weights' type in a model GGUF; 1-D tensors always f32
DIGEST_KEY = "rpo.source_digest"    # sha256 of the source files (source_digest)
ARCHITECTURES = ("LlamaForCausalLM",)
# the files a model's or an adapter's numbers come from
SOURCE_FILES = ("*.safetensors", "*.bin", "config.json", "adapter_config.json")


def source_digest(*dirs) -> str:
    """sha256 over the weight and config files (SOURCE_FILES) of `dirs`, in order (None skipped; a
    model_source.json pointer followed): each directory's file names, sizes and bytes. About 1 s per GB; files
    whose path, size, inode and times stay the same are hashed once per process."""
    from rpo.models import resolve_model_dir
    h = hashlib.sha256()
    for k, d in enumerate(dirs):
        if d is None:
            continue
        d = Path(d)
        d = d if (d / "adapter_config.json").is_file() else resolve_model_dir(d)
        files = sorted({p for pat in SOURCE_FILES for p in d.glob(pat) if p.is_file()})
        if not files:
            raise FileNotFoundError(f"{d}: no model files ({', '.join(SOURCE_FILES)}) to bind a GGUF to")
        h.update(f"{k}|{_files_digest(tuple(_version(p) for p in files))}\n".encode())
    return h.hexdigest()[:32]


def _version(p: Path) -> tuple:
    """A file's path, size, inode and times: a rewrite changes one of them (_files_digest's cache key)."""
    st = p.stat()
    return str(p.resolve()), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


@functools.lru_cache(maxsize=32)
def _files_digest(stats: tuple) -> str:
    h = hashlib.sha256()
    for path, size, *_ in stats:
        h.update(f"{Path(path).name}|{size}\n".encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q_proj / k_proj weight (or a LoRA B of one) from transformers' rotate-half order to the
    interleaved order (convert_hf_to_gguf.py LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_config(cfg, where) -> None:
    arch = (getattr(cfg, "architectures", None) or [type(cfg).__name__])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: generation.backend llamacpp writes Llama-architecture models "
                         f"({', '.join(ARCHITECTURES)}) as GGUF; this model is {arch}: use backend hf")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type')!r}")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"activation {cfg.hidden_act!r}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        problems.append("bias terms")
    if problems:
        raise ValueError(f"{where}: the GGUF writer supports plain Llama (default RoPE, SiLU, no biases); "
                         f"this model has {', '.join(problems)}: use generation.backend hf")


def _rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _tensor_name(name_map, hf_name: str, where) -> str:
    out = name_map.get_name(hf_name, try_suffixes=(".weight",))
    if out is None:
        raise ValueError(f"{where}: tensor {hf_name!r} has no llama.cpp name (gguf's LLAMA tensor map)")
    return out


def _add_vocab(w, tok, n_vocab: int, where) -> None:
    """llama.cpp's "gpt2" vocabulary of a byte-level BPE tokenizer (convert_hf_to_gguf.py get_vocab_base)."""
    import gguf
    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise ValueError(f"{where}: the GGUF writer supports byte-level BPE tokenizers (tokenizer.json with a "
                         f"BPE model and a ByteLevel decoder); this one is {model.get('type')!r}: use "
                         "generation.backend hf")
    vocab = tok.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise ValueError(f"{where}: the tokenizer has ids up to {max(vocab.values())}, the model's "
                         f"embedding {n_vocab} rows")
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    added = {a["id"] for a in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # embedding rows beyond the tokenizer (padding)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")  # llama.cpp never tokenizes text for this package
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, tid in ((w.add_bos_token_id, tok.bos_token_id), (w.add_eos_token_id, tok.eos_token_id),
                     (w.add_pad_token_id, tok.pad_token_id), (w.add_unk_token_id, tok.unk_token_id)):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _finish(w, path: Path) -> Path:
    """Write the GGUF atomically (a kill leaves no half file under the final name)."""
    tmp = path.with_name(path.name + ".tmp")
    w.path = tmp
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def write_model(model_dir, path, *, dtype: str = "f32", tokenizer_dir=None, model=None) -> Path:
    """The model of `model_dir` (a reference, or a fully fine-tuned policy) as a GGUF at `path`, bound to its
    files (source_digest). `tokenizer_dir`: where the tokenizer comes from (default: `model_dir`); `model`:
    the loaded model, if the caller has it."""
    import gguf
    import torch

    from rpo.models import load_model, load_tokenizer
    if dtype not in DTYPES:
        raise ValueError(f"generation.llamacpp_dtype: {dtype!r}; expected one of {list(DTYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = source_digest(model_dir)
    model = model if model is not None else load_model(model_dir)
    tok = load_tokenizer(tokenizer_dir or model_dir)
    cfg = model.config
    _check_config(cfg, model_dir)
    n_head, n_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, _head_dim(cfg)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(Path(model_dir).name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    n_vocab = model.get_input_embeddings().weight.shape[0]
    w.add_vocab_size(n_vocab)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    _add_vocab(w, tok, n_vocab, model_dir)
    w.add_string(DIGEST_KEY, digest)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if tied and name == "lm_head.weight":
                continue  # llama.cpp uses token_embd as the output matrix when there is no output.weight
            a = t.detach().float().cpu().numpy()
            if name.endswith("q_proj.weight"):
                a = _permute_rope(a, n_head)
            elif name.endswith("k_proj.weight"):
                a = _permute_rope(a, n_kv)
            gname = _tensor_name(name_map, name, model_dir)
            if dtype == "f32" or a.ndim == 1:
                w.add_tensor(gname, np.ascontiguousarray(a))
            elif dtype == "f16":
                w.add_tensor(gname, a.astype(np.float16))
            else:
                qtype = gguf.GGMLQuantizationType.BF16 if dtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
                block = gguf.GGML_QUANT_SIZES[qtype][0]
                if a.shape[-1] % block:
                    raise ValueError(f"{model_dir}: tensor {name!r} has rows of {a.shape[-1]} values, not a multiple of "
                                     f"{dtype}'s blocks of {block}: use generation.llamacpp_dtype f32 or f16")
                w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(a), qtype), raw_dtype=qtype)
    out = _finish(w, path)
    log.info("wrote %s (%s, %.0f MB) from %s", out, dtype, out.stat().st_size / 1e6, model_dir)
    return out


def write_adapter(adapter_dir, base_dir, path) -> Path:
    """A peft LoRA adapter as llama.cpp's LoRA GGUF (convert_lora_to_gguf.py's layout: general.type adapter,
    adapter.lora.alpha, blk.N.<tensor>.weight.lora_a / .lora_b), bound to the adapter's and its base's files.
    llama.cpp adds (alpha / r) * B A x to each adapted layer's output, as peft does."""
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from rpo.models import resolve_model_dir
    adapter_dir, path = Path(adapter_dir), Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    where = adapter_dir / "adapter_config.json"
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if acfg.get(k)]
    if acfg.get("peft_type", "LORA") != "LORA" or acfg.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{where}: llama.cpp's LoRA adapters take a plain LoRA (peft_type LORA, bias none, one "
                         f"rank and alpha); this adapter has {unsupported or acfg.get('peft_type')}: use "
                         "generation.backend hf")
    cfg = AutoConfig.from_pretrained(resolve_model_dir(base_dir))
    _check_config(cfg, base_dir)
    r = int(acfg["r"])
    # rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r
    alpha = float(acfg["lora_alpha"]) * (r ** 0.5 if acfg.get("use_rslora") else 1.0)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_string(DIGEST_KEY, source_digest(base_dir, adapter_dir))
    pairs = {}
    for name, a in weights.items():
        for side, tag in ((".lora_A.weight", "lora_a"), (".lora_B.weight", "lora_b")):
            if name.endswith(side):
                module = name[:-len(side)].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[tag] = a.astype(np.float32)
                break
        else:
            raise ValueError(f"{adapter_dir}: tensor {name!r} is not a LoRA A or B weight")
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_a", "lora_b"} or ab["lora_a"].shape[0] != r or ab["lora_b"].shape[1] != r:
            raise ValueError(f"{adapter_dir}: module {module!r} lacks a LoRA A [r, in] and B [out, r] of rank {r}")
        b = ab["lora_b"]
        if module.endswith("q_proj"):
            b = _permute_rope(b, cfg.num_attention_heads)
        elif module.endswith("k_proj"):
            b = _permute_rope(b, cfg.num_key_value_heads)
        target = _tensor_name(name_map, module + ".weight", adapter_dir)
        w.add_tensor(f"{target}.lora_a", np.ascontiguousarray(ab["lora_a"]))
        w.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b))
    out = _finish(w, path)
    log.info("wrote %s (LoRA r=%d, %d modules) from %s", out, r, len(pairs), adapter_dir)
    return out


def is_adapter(model_dir) -> bool:
    """Whether a policy directory holds a LoRA adapter (rpo.models.load_policy's rule)."""
    return model_dir is not None and (Path(model_dir) / "adapter_config.json").is_file()


def export(*, model_dir: str, out: str, dtype: str = "f32", base_dir: str | None = None) -> Path:
    """The GGUF of one model of the DAG: a LoRA adapter directory as an adapter GGUF on `base_dir` (its
    reference), anything else as a model GGUF of `dtype` (with `base_dir`'s tokenizer, as the answer
    stages use the reference's)."""
    if is_adapter(model_dir):
        if base_dir is None:
            raise ValueError(f"{model_dir}: a LoRA adapter needs its base model (base_dir) to be written as GGUF")
        return write_adapter(model_dir, base_dir, out)
    return write_model(model_dir, out, dtype=dtype, tokenizer_dir=base_dir)
