"""The frozen trunk: the hidden states below the LoRA layers, computed once, by the reference pass.

With LoRA on the top k of n layers only (training.lora.top_layers, the quickstart's CPU setting), layers
0..n-k-1 carry no adapter: they are the reference's own layers, frozen, in the policy at every step. So
the input of layer n-k, for every token of every pair, is the same in the reference pass and in every
forward of training, for every method and epoch. The reference pass already computes it; it writes it
to a float32 file (`write`), and training starts each policy forward at layer n-k from it (`Reader`, a
micro-batch at a time; `Trunk.hooked`). The frozen layers then run once per pair per reference model
instead of once per pair, epoch and method. A response's hidden states depend only on its own causal
prefix, so the value is that of the full forward up to float rounding (tests/test_trunk.py).

The file holds, pair after pair in the order of the pairs file, the prompt's states, then the chosen
response's, then the rejected response's ([tokens, hidden_size] each, row-major, float32, native byte
order). Its layout follows from the tokenised pairs, which the reference cache's fingerprint pins; the
cache's "trunk" entry records the layer, the hidden size and the number of values for the check.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from rpo import io
from rpo.distributed import unwrap
from rpo.plan import top_layers_of  # noqa: F401  (the plan's, torch-free: the workflow reads it)

DTYPE = np.float32


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a llama-family causal LM (bare, under PEFT or DDP), called as
    `layer(hidden_states, ...)` -> hidden_states by the model's forward."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != base.config.num_hidden_layers:
        raise ValueError(f"{type(base).__name__}: no model.layers of config.num_hidden_layers decoder layers; "
                         "the trunk cache needs a llama-family model (training.trunk_cache false)")
    return layers


def check_frozen(model, layer: int) -> None:
    """Below `layer` the training forward must compute what the reference pass did: no trainable parameter
    and no active dropout there."""
    layers = decoder_layers(model)
    for i, lay in enumerate(layers[:layer]):
        trainable = [n for n, p in lay.named_parameters() if p.requires_grad]
        dropout = [n for n, m in lay.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        attn = getattr(getattr(lay, "self_attn", None), "attention_dropout", 0.0) or 0.0
        if trainable or dropout or attn:
            raise ValueError(f"trunk cache: layer {i} is below the LoRA layers but has "
                             f"{'trainable ' + str(trainable[:3]) if trainable else 'dropout'}; "
                             "set training.trunk_cache false")


def depth(n_layers: int, top_layers: int) -> int:
    """The layer whose input the trunk holds: below it, no layer carries LoRA (rpo.train.prepare_model)."""
    if not 0 < top_layers < n_layers:
        raise ValueError(f"the trunk cache needs LoRA on the top 1..{n_layers - 1} of {n_layers} layers "
                         f"(training.lora.top_layers), got {top_layers}; or set training.trunk_cache false")
    return n_layers - top_layers


def _hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


class Trunk:
    """One forward's trunk: with `states` ([sequences, width, hidden], the batch's layout: rpo.batching.collate)
    the forward starts at layer `layer` from them; without, the forward is left whole and the input of that
    layer is kept in `captured`, in the same layout. `skipped` counts the layer calls not made."""

    def __init__(self, layer: int, states: torch.Tensor | None = None):
        self.layer, self.states, self.captured, self.skipped = layer, states, None, 0

    @contextlib.contextmanager
    def hooked(self, model, to_model, from_model):
        """`to_model` / `from_model` map [sequences, width, hidden] to the rows the model runs (packed or
        not: rpo.batching.summed_logps) and back."""
        layers = decoder_layers(model)
        below, at = layers[:self.layer], layers[self.layer]
        saved = [layer.__dict__.get("forward") for layer in below]
        if self.states is None:
            def grab(module, args, kwargs):
                self.captured = from_model(_hidden_of(args, kwargs).detach())
            handle = at.register_forward_pre_hook(grab, with_kwargs=True)
        else:
            start = to_model(self.states)

            def swap(module, args, kwargs):
                h = _hidden_of(args, kwargs)
                if h.shape != start.shape:
                    raise ValueError(f"trunk states of shape {tuple(start.shape)} for hidden states "
                                     f"{tuple(h.shape)} at layer {self.layer}")
                x = start.to(device=h.device, dtype=h.dtype)
                self.skipped += len(below)  # counted where the states enter: the path that ran
                return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
            for layer in below:
                layer.forward = _passthrough  # an instance attribute: nn.Module.__call__ runs it
            handle = at.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()
            for layer, forward in zip(below, saved):
                if forward is None:
                    layer.__dict__.pop("forward", None)  # back to the class's forward
                else:
                    layer.forward = forward  # one set before, e.g. by accelerate's hooks


def packed_maps(packed: dict):
    """[sequences, width, hidden] states to the packed rows of rpo.batching._share_prompts and back; a
    prompt shared by a group is written by each of its sequences, with the same value."""
    where = packed["where"]
    real = where >= 0
    rows, width = packed["input_ids"].shape

    def to_model(u):
        out = u.new_zeros(rows * width, u.shape[-1])
        out[where[real]] = u[real]
        return out.view(rows, width, -1)

    def from_model(hidden):
        u = hidden.new_zeros(*where.shape, hidden.shape[-1])
        u[real] = hidden.reshape(-1, hidden.shape[-1])[where[real]]
        return u
    return to_model, from_model


def sizes(items: list[dict]) -> list[int]:
    """Tokens of each pair in the file: prompt + chosen + rejected."""
    return [len(it["prompt"]) + len(it["chosen"]) + len(it["rejected"]) for it in items]


def split(captured: torch.Tensor, items: list[dict]) -> list[np.ndarray]:
    """Each pair's [prompt + chosen + rejected, hidden] states out of a captured [2B, width, hidden] batch
    ([chosen_1..B, rejected_1..B], rpo.train.pair_batch); the prompt from the chosen row."""
    b, out = len(items), []
    for i, it in enumerate(items):
        p, c, r = len(it["prompt"]), len(it["chosen"]), len(it["rejected"])
        out.append(torch.cat([captured[i, :p + c], captured[b + i, p:p + r]]).float().cpu().numpy())
    return out


@contextlib.contextmanager
def write(path):
    """Yield `add(states)` for each pair's states, in order; the file replaces `path` when the block
    finishes (rpo.io.atomic_open), so an interrupted pass leaves none."""
    with io.atomic_open(path, "wb") as f:
        yield lambda states: f.write(np.ascontiguousarray(states, dtype=DTYPE).tobytes())


def entry(layer: int, hidden_size: int, items: list[dict]) -> dict:
    return {"layer": layer, "hidden_size": hidden_size, "values": sum(sizes(items)) * hidden_size}


def check(path, meta: dict | None, *, layer: int, hidden_size: int, items: list[dict], cache_path) -> None:
    """The trunk file at `path` is the one this run needs: made at `layer` for these pairs."""
    if meta is None:
        raise ValueError(f"{cache_path}: made without a trunk (training.trunk_cache was off for the reference pass), "
                         f"but this run reads {path}; re-run the reference_logps rule")
    want = entry(layer, hidden_size, items)
    if {k: meta.get(k) for k in want} != want:
        raise ValueError(f"{cache_path}: its trunk {meta} is not this run's {want} "
                         "(training.lora.top_layers or the model changed); re-run the reference_logps rule")
    size = Path(path).stat().st_size
    if size != want["values"] * np.dtype(DTYPE).itemsize:
        raise ValueError(f"{path}: {size} bytes, expected {want['values']} float32 values of the trunk "
                         f"({len(items)} pairs x hidden size {hidden_size}); re-run the reference_logps rule")


class Reader:
    """Micro-batches of trunk states from the file, in the layout of rpo.train.pair_batch."""

    def __init__(self, path, items: list[dict], hidden_size: int):
        self.path, self.hidden, self.items = Path(path), hidden_size, items  # items: keeps the ids valid
        self.offset = {}
        at = 0
        for it, n in zip(items, sizes(items)):
            self.offset[id(it)] = at
            at += n * hidden_size

    def batch(self, micro: list[dict]) -> torch.Tensor:
        b, h = len(micro), self.hidden
        width = max(len(it["prompt"]) + max(len(it["chosen"]), len(it["rejected"])) for it in micro)
        out = torch.zeros(2 * b, width, h)
        with self.path.open("rb") as f:
            for i, it in enumerate(micro):
                p, c, r = len(it["prompt"]), len(it["chosen"]), len(it["rejected"])
                f.seek(self.offset[id(it)] * np.dtype(DTYPE).itemsize)
                s = torch.from_numpy(np.fromfile(f, dtype=DTYPE, count=(p + c + r) * h).reshape(p + c + r, h))
                out[i, :p + c] = s[:p + c]
                out[b + i, :p] = s[:p]
                out[b + i, p:p + r] = s[p + c:]
        return out
