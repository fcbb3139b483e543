"""Sampling on llama.cpp (llama-cpp-python's C API): rpo.sampling's sampler with llama.cpp's forward passes.

    Engine(model_gguf, adapter_gguf, sources=...)   one model (a GGUF of rpo.gguf, plus a LoRA adapter GGUF)
    Engine.sample_ids(prompts, ...)                  rpo.sampling.sample's contract, from prompt token ids

What is the HF backend's, by construction: the prompt token ids (rpo.sampling.encode_prompt, passed to
llama.cpp as they are), the stop ids and max_new_tokens, and the whole choice of each next token, which is
rpo.sampling.next_tokens on llama.cpp's logits (greedy argmax; temperature, top-k then top-p sampling drawn
from the caller's seeded torch.Generator, row for row in the HF sampler's order, so one seed gives the same
samples), and each token's log-prob (the log-softmax of the logits). What differs: the logits themselves
(llama.cpp's CPU kernels; the GGUF's weight type), so greedy answers agree with the HF backend's on most
prompts, not necessarily all (tests/test_llamacpp.py and docs/measurements.md count how many).

A batch is decoded as llama.cpp's parallel sequences: each prompt is prefilled once and its KV cache copied
to its other responses' sequences (as rpo.sampling.sample repeats its cache), then one llama_decode per step
carries one token of every sequence, finished ones included (as the HF loop does: a batch of only some of
the sequences decodes slower in llama.cpp, measured). Each sequence has its own KV stream (kv_unified off),
so attention reads only its own tokens.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import torch

from rpo.gguf import DIGEST_KEY
from rpo.sampling import sample_step, temperature_groups

log = logging.getLogger(__name__)

GGUF_FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0"}  # general.file_type (llama_ftype) of rpo.gguf's files
_BACKEND = []


def _lib():
    """llama_cpp's ctypes module, its backend initialised once and its log limited to errors."""
    import llama_cpp
    if not _BACKEND:
        from llama_cpp._logger import set_verbose
        set_verbose(False)
        llama_cpp.llama_backend_init()
        _BACKEND.append(True)
    return llama_cpp


def _meta(lib, model, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def check_bound(path, recorded: str | None, expected: str) -> None:
    """Refuse a GGUF whose recorded source digest is not the one of the files it should come from."""
    if recorded != expected:
        raise RuntimeError(
            f"{path}: stale GGUF: written from source files with digest {recorded or '(none recorded)'}, but "
            f"they now hash to {expected} (the weights changed since it was written); rebuild it "
            "(Snakemake does, as the export rule's output; by hand: python -m rpo export-gguf)")


class Engine:
    """A llama.cpp model (and LoRA adapter) ready to sample; `sources`: (model sources, adapter sources), the
    directories each GGUF must have been written from (rpo.gguf.source_digest), checked on load."""

    def __init__(self, model_gguf, adapter_gguf=None, *, sources: tuple | None = None, n_threads: int | None = None):
        lib = self.lib = _lib()
        self.n_threads = n_threads or torch.get_num_threads()
        self.model = self.adapter = self.ctx = self._ctx_shape = None
        self.paths = [Path(model_gguf)] + ([Path(adapter_gguf)] if adapter_gguf else [])
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such GGUF file")
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(model_gguf).encode(), params)
        if not self.model:
            raise RuntimeError(f"{model_gguf}: llama.cpp cannot load this GGUF (its log above says why)")
        try:
            self._load(model_gguf, adapter_gguf, sources)
        except BaseException:
            self.close()
            raise

    def _load(self, model_gguf, adapter_gguf, sources) -> None:
        lib = self.lib
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.dtype = GGUF_FILE_TYPES.get(int(_meta(lib, self.model, "general.file_type") or -1), "other")
        digests = [_meta(lib, self.model, DIGEST_KEY)]
        if adapter_gguf:
            self.adapter = lib.llama_adapter_lora_init(self.model, str(adapter_gguf).encode())
            if not self.adapter:
                raise RuntimeError(f"{adapter_gguf}: llama.cpp cannot load this LoRA adapter on {model_gguf}")
            buf = ctypes.create_string_buffer(256)
            n = lib.llama_adapter_meta_val_str(self.adapter, DIGEST_KEY.encode(), buf, len(buf))
            digests.append(buf.value.decode() if n >= 0 else None)
        if sources is not None:
            from rpo.gguf import source_digest
            for path, recorded, dirs in zip(self.paths, digests, sources):
                check_bound(path, recorded, source_digest(*dirs))
        # what a resumable answer file records as its model (rpo.sampling.generation_identity)
        self.fingerprint = f"llamacpp-{self.dtype}:" + "+".join(d or "?" for d in digests)
        log.info("llama.cpp engine: %s (%s)%s, %d threads", model_gguf, self.dtype,
                 f" + LoRA adapter {adapter_gguf}" if adapter_gguf else "", self.n_threads)

    def close(self) -> None:
        lib = self.lib
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.adapter:
            lib.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _context(self, n_seq: int, seq_len: int, n_prefill: int):
        """A context holding `n_seq` sequences of up to `seq_len` tokens each (reused while it is big enough)."""
        lib = self.lib
        if self._ctx_shape and self._ctx_shape[0] >= n_seq and self._ctx_shape[1] >= seq_len:
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            return self.ctx
        if self.ctx:
            lib.llama_free(self.ctx)
        seq_len = -(-seq_len // 256) * 256  # llama.cpp pads each stream to 256 cells
        p = lib.llama_context_default_params()
        p.n_ctx = n_seq * seq_len
        p.n_seq_max = n_seq
        p.kv_unified = False  # one KV stream per sequence: a token attends to its own sequence only
        p.n_batch = p.n_ubatch = max(min(n_prefill, 2048), n_seq)
        p.n_threads = p.n_threads_batch = self.n_threads
        p.type_k = p.type_v = lib.GGML_TYPE_F32  # the HF backend's cache precision
        # flash attention off: slower on this package's CPU at 16 and 64 sequences a step (measured)
        p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.no_perf = True
        ctx = lib.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError(f"{self.paths[0]}: llama.cpp cannot make a context of {n_seq} sequences x "
                               f"{seq_len} tokens")
        if self.adapter:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            if lib.llama_set_adapters_lora(ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                raise RuntimeError(f"{self.paths[1]}: llama.cpp cannot apply the LoRA adapter")
        self.ctx, self._ctx_shape = ctx, (n_seq, seq_len)
        return ctx

    def _decode(self, batch, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants logits) entries."""
        lib = self.lib
        for i, (t, pos, seq, out) in enumerate(entries):
            batch.token[i] = t
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = out
        batch.n_tokens = len(entries)
        rc = lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"{self.paths[0]}: llama_decode failed with code {rc} on {len(entries)} tokens")

    def _logits(self, n_out: int) -> torch.Tensor:
        ptr = self.lib.llama_get_logits(self.ctx)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())

    @torch.inference_mode()
    def sample_ids(self, prompts: list[list[int]], *, max_new_tokens: int, num_return_sequences: int = 1,
                   temperature: float | list[float] = 0.0, top_p: float = 1.0, top_k: int = 0, stop_ids=(),
                   pad_id: int = 0, generator: torch.Generator | None = None, return_logps: bool = False):
        """rpo.sampling.sample for prompts given as token ids (no padding): [B * n, T] new tokens, pad after
        a stop, and with `return_logps` each token's log-prob under the model (0 after the stop)."""
        lib = self.lib
        n = num_return_sequences
        groups = temperature_groups(temperature, n, len(prompts))
        rows = len(prompts) * n
        lengths = [len(p) for p in prompts]
        n_prefill = sum(lengths)
        ctx = self._context(rows, max(lengths) + max_new_tokens, n_prefill)
        cap = lib.llama_n_batch(ctx)
        batch = lib.llama_batch_init(max(cap, rows), 0, 1)
        try:
            # prefill: every prompt into its first response's sequence, the logits of its last token only
            entries = [(t, pos, j * n, pos == len(p) - 1) for j, p in enumerate(prompts) for pos, t in enumerate(p)]
            last = []
            for s in range(0, len(entries), cap):
                chunk = entries[s:s + cap]
                self._decode(batch, chunk)
                if any(e[3] for e in chunk):
                    last.append(self._logits(sum(e[3] for e in chunk)))
            logits = torch.cat(last).repeat_interleave(n, dim=0)
            mem = lib.llama_get_memory(ctx)
            for j in range(len(prompts)):
                for k in range(1, n):
                    lib.llama_memory_seq_cp(mem, j * n, j * n + k, -1, -1)
            stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
            done = torch.zeros(rows, dtype=torch.bool)
            new, logps = [], []
            for step in range(max_new_tokens):
                # every row, finished or not, draws as in rpo.sampling.sample (the same generator stream)
                nxt, done = sample_step(logits, done, groups=groups, top_k=top_k, top_p=top_p, generator=generator,
                                        pad_id=pad_id, stop=stop, logps=logps if return_logps else None)
                new.append(nxt)
                if bool(done.all()):
                    break
                # every sequence, a finished one fed its pad token as in rpo.sampling.sample: llama.cpp
                # decodes a batch over some of its KV streams far slower than one over all of them
                self._decode(batch, [(int(t), lengths[r // n] + step, r, True) for r, t in enumerate(nxt.tolist())])
                logits = self._logits(rows)
        finally:
            lib.llama_batch_free(batch)
        tokens = torch.stack(new, dim=1)
        return (tokens, torch.stack(logps, dim=1)) if return_logps else tokens


def engine_for(*, ref_dir, policy_dir, gguf: dict, n_threads: int | None = None) -> Engine:
    """The engine of one model of the DAG: the reference (policy_dir None: gguf["model"], the reference's
    GGUF), a LoRA policy (the reference's GGUF and gguf["policy"], the adapter's) or a fully fine-tuned
    policy (gguf["policy"], its own model GGUF); each GGUF refused unless it was written from these files."""
    from rpo.gguf import is_adapter
    if policy_dir is None:
        return Engine(gguf["model"], sources=((ref_dir,),), n_threads=n_threads)
    if not gguf.get("policy"):
        raise ValueError(f"generation backend llamacpp: no GGUF of the policy {policy_dir} (gguf.policy)")
    if is_adapter(policy_dir):
        return Engine(gguf["model"], gguf["policy"], sources=((ref_dir,), (ref_dir, policy_dir)), n_threads=n_threads)
    return Engine(gguf["policy"], sources=((policy_dir,),), n_threads=n_threads)
