"""SALSA's reference model (Chegini et al. 2024, arXiv 2411.01798): the weight average ("soup") of SFT models
trained independently (here: with different seeds), used as the KL reference of a preference loss.

    python -m rpo make-soup --args '{"model_dirs": [...], "out": "results/models/soup/model"}'

The soup is the exact parameter-wise mean, sum_k theta_k / K, formed in float64 and stored in the models'
dtype; the models must share an architecture (same parameter names, shapes and dtypes) and a tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from rpo import io
from rpo.models import load_model, load_tokenizer, resolve_model_dir


def average_state_dicts(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    if len(states) < 2:
        raise ValueError(f"a soup needs at least 2 models, got {len(states)}")
    first = states[0]
    for name, sd in zip(names[1:], states[1:]):
        if sd.keys() != first.keys():
            diff = sorted(set(sd) ^ set(first))[:5]
            raise ValueError(f"soup: {name} has other parameters than {names[0]} (e.g. {diff})")
        for k, v in sd.items():
            if v.shape != first[k].shape or v.dtype != first[k].dtype:
                raise ValueError(f"soup: parameter {k} is {tuple(v.shape)} {v.dtype} in {name} but "
                                 f"{tuple(first[k].shape)} {first[k].dtype} in {names[0]}")
    out = {}
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = v.clone()  # integer buffers (none in the usual LMs) are kept from the first model
            continue
        acc = torch.zeros(v.shape, dtype=torch.float64)
        for sd in states:
            acc += sd[k].to(torch.float64)
        out[k] = (acc / len(states)).to(v.dtype)
    return out


def make_soup(model_dirs: list[str], out: str) -> Path:
    out = Path(out)
    models = [load_model(d, dtype="float32") for d in model_dirs]
    names = [str(d) for d in model_dirs]
    vocab = [len(load_tokenizer(d)) for d in model_dirs]
    if len(set(vocab)) != 1:
        raise ValueError(f"soup: the models' tokenizers differ in size {dict(zip(names, vocab))}")
    soup = average_state_dicts([m.state_dict() for m in models], names)
    model = models[0]
    model.load_state_dict(soup)
    with io.atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(model_dirs[0]).save_pretrained(tmp)
        io.write_json(tmp / "soup.json", {"method": "SALSA weight average",
                                          "models": [str(resolve_model_dir(d)) for d in model_dirs]})
    return out
