"""APO's extrapolation step (He, Yuan, Gu 2024, "Accelerated Preference Optimization for Large Language Model
Alignment", arXiv 2410.06293, Algorithm 1): after round t's proximal step (iterative DPO against the previous
policy π_t, which trains π̂_{t+1}), the next policy is

    π_{t+1}(y|x) ∝ π̂_{t+1}(y|x) · (π̂_{t+1}(y|x) / π̂_t(y|x))^α

(Nesterov's momentum with weight α; π̂_1 = π_1 = π_ref; α = 0 is iterative DPO). On a policy that is a softmax
of its parameters (a table of logits) this is the parameter update θ_{t+1} = θ̂_{t+1} + α(θ̂_{t+1} − θ̂_t) exactly
(the normaliser absorbs the constants). A network's log-probabilities are not linear in its weights, so for a
language model the same update is applied to the weights, as the parameter-space form of the same momentum:
- full fine-tuning: every weight, W_{t+1} = Ŵ_{t+1} + α(Ŵ_{t+1} − Ŵ_t) (extrapolate_full);
- LoRA: the effective weights W_0 + ΔW, so ΔW_{t+1} = (1 + α)ΔŴ_{t+1} − αΔŴ_t, written exactly as one LoRA
  adapter by stacking the two (rank r_{t+1} + r_t; extrapolate_lora). Extrapolating the A and B factors
  separately would not be this update (B·A is not linear in (A, B)).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def extrapolate(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """θ̂_new + α(θ̂_new − θ̂_old) for every tensor of two state dicts with the same keys and shapes; α = 0
    returns `new`'s tensors themselves (iterative DPO's iterates, bit for bit)."""
    if set(new) != set(old):
        raise ValueError(f"extrapolate: the two states differ in keys: {sorted(set(new) ^ set(old))[:5]}")
    if alpha == 0:
        return dict(new)
    out = {}
    for k, v in new.items():
        if v.shape != old[k].shape:
            raise ValueError(f"extrapolate: {k} has shape {tuple(v.shape)} and {tuple(old[k].shape)}")
        out[k] = v + alpha * (v - old[k].to(v.dtype))
    return out


def _scaling(cfg: dict) -> float:
    r, a = cfg["r"], cfg["lora_alpha"]
    return a / math.sqrt(r) if cfg.get("use_rslora") else a / r


def _read_adapter(d) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file
    d = Path(d)
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{d}: an adapter with a per-module rank_pattern/alpha_pattern cannot be extrapolated here")
    return cfg, load_file(str(d / ADAPTER_WEIGHTS))


def _modules(state: dict[str, torch.Tensor], where) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """LoRA module prefix -> (A [r, in], B [out, r])."""
    out: dict[str, dict] = {}
    for k, v in state.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.weight"
            if k.endswith(tag):
                out.setdefault(k[: -len(tag)], {})[part] = v
                break
        else:
            raise ValueError(f"{where}: weight {k!r} is not a LoRA A/B matrix (modules_to_save are not supported)")
    bad = [m for m, p in out.items() if set(p) != {"lora_A", "lora_B"}]
    if bad:
        raise ValueError(f"{where}: LoRA module(s) without both A and B: {bad[:3]}")
    return {m: (p["lora_A"], p["lora_B"]) for m, p in out.items()}


def lora_delta(adapter_dir) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA module of an adapter: scaling · B @ A (what the adapter adds to each weight)."""
    cfg, state = _read_adapter(adapter_dir)
    s = _scaling(cfg)
    return {m: s * (b.double() @ a.double()) for m, (a, b) in _modules(state, adapter_dir).items()}


def extrapolate_lora(new_dir, old_dir, alpha: float, out_dir) -> dict:
    """Write into `out_dir` (created if missing; the caller makes it atomic) the adapter with
    ΔW = (1 + α)ΔŴ_new − αΔŴ_old (module docstring); `old_dir` None is the reference itself (ΔŴ = 0: the new
    adapter with B scaled by 1 + α). α = 0 copies `new_dir`'s adapter. Returns what was written."""
    from safetensors.torch import save_file
    new_cfg, new_state = _read_adapter(new_dir)
    new_mods = _modules(new_state, new_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(out_dir) as tmp:
        for f in Path(new_dir).iterdir():  # tokenizer and config files travel with the adapter
            if f.is_file() and f.name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                shutil.copy2(f, Path(tmp) / f.name)
        if alpha == 0 or old_dir is None:
            cfg, state = dict(new_cfg), {}
            for m, (a, b) in new_mods.items():
                state[f"{m}.lora_A.weight"] = a.contiguous()
                state[f"{m}.lora_B.weight"] = ((1.0 + alpha) * b).contiguous()
        else:
            old_cfg, old_state = _read_adapter(old_dir)
            old_mods = _modules(old_state, old_dir)
            if set(old_mods) != set(new_mods):
                raise ValueError(f"extrapolate_lora: {new_dir} and {old_dir} adapt different modules: "
                                 f"{sorted(set(old_mods) ^ set(new_mods))[:3]}")
            s_new, s_old = _scaling(new_cfg), _scaling(old_cfg)
            rank = new_cfg["r"] + old_cfg["r"]
            # scaling 1 (lora_alpha = r, no rsLoRA) and each factor's own scaling folded into its B block
            cfg = {**new_cfg, "r": rank, "lora_alpha": rank, "use_rslora": False}
            state = {}
            for m, (a_new, b_new) in new_mods.items():
                a_old, b_old = old_mods[m]
                state[f"{m}.lora_A.weight"] = torch.cat([a_new, a_old.to(a_new.dtype)], dim=0).contiguous()
                state[f"{m}.lora_B.weight"] = torch.cat([(1.0 + alpha) * s_new * b_new,
                                                         -alpha * s_old * b_old.to(b_new.dtype)], dim=1).contiguous()
        save_file(state, str(Path(tmp) / ADAPTER_WEIGHTS))
        (Path(tmp) / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return {"kind": "lora", "rank": cfg["r"], "modules": len(new_mods), "alpha": alpha}


def extrapolate_full(new_dir, old_dir, alpha: float, out_dir) -> dict:
    """Write into `out_dir` (created if missing; the caller makes it atomic) the fully fine-tuned model
    Ŵ_new + α(Ŵ_new − Ŵ_old), tensor by tensor, in the new model's dtype (`old_dir`: the previous round's
    proximal model, or the reference for round 1)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rpo.models import resolve_model_dir
    new_dir, old_dir = resolve_model_dir(new_dir), resolve_model_dir(old_dir)
    old_files = sorted(old_dir.glob("*.safetensors"))
    old_index = {}
    for f in old_files:
        with safe_open(str(f), framework="pt") as st:
            old_index.update({k: f for k in st.keys()})
    n = 0
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext(out_dir) as tmp:
        for f in new_dir.iterdir():
            if not f.is_file():
                continue
            if f.suffix != ".safetensors":
                shutil.copy2(f, Path(tmp) / f.name)
                continue
            out, meta = {}, None
            with safe_open(str(f), framework="pt") as st:
                meta = st.metadata()
                for k in st.keys():
                    if k not in old_index:
                        raise ValueError(f"extrapolate_full: {k} of {f} is not in {old_dir}")
                    with safe_open(str(old_index[k]), framework="pt") as so:
                        old = so.get_tensor(k)
                    new = st.get_tensor(k)
                    out[k] = (new.float() + alpha * (new.float() - old.float())).to(new.dtype).contiguous()
                    n += 1
            save_file(out, str(Path(tmp) / f.name), metadata=meta)
    return {"kind": "full", "tensors": n, "alpha": alpha}
