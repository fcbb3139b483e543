"""Proxy reward models and their ensembles (Coste et al., "Reward Model Ensembles Help Mitigate
Overoptimization", ICLR 2024; code: tlc4418/llm_optimization).

    python -m rpo train-reward-model --args '<json>'   (one member: train_reward_model)
    python -m rpo score-candidates   --args '<json>'   (every member's score of sampled responses: rpo.candidates)

A member is the base/SFT model with a scalar head (transformers' AutoModelForSequenceClassification,
num_labels 1) whose score is read at the LAST token of prompt + response (Open-Assistant's `pooling: last`,
which Coste et al.'s trainer inherits). It is trained on preference pairs with Open-Assistant's RMLoss
(their `configs/config_rm.yaml`: `loss_fn: RMLoss`, `score_l2_reg: 0.001`), per pair

    -log sigmoid(s_w - s_l) + l2 * 1/2 * (s_w^2 + s_l^2),

the Bradley-Terry loss plus a magnitude penalty that pins the scores' free offset near 0. The members of
an ensemble share data and every setting but the seed, which draws the head's initial weights, the LoRA
initialisation and the order of the data.

Ensemble objectives over the k members' scores R_1..R_k of one response (Coste et al. Sec. 3):
    mean   (1/k) sum_i R_i
    wco    min_i R_i                                    (worst-case optimisation)
    uwo    mean - lambda * (1/k) sum_i (R_i - mean)^2   (uncertainty-weighted; the POPULATION variance, as
                                                         their best-of-n code's np.var; their PPO code's
                                                         torch.var is the sample variance)
The scores are aggregated raw, as their code does (no standardisation of the members).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OBJECTIVES = ("mean", "wco", "uwo")


# ---------------------------------------------------------------------------------------------------
# Loss and ensemble objectives (pure)
# ---------------------------------------------------------------------------------------------------

def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, l2: float = 0.001) -> torch.Tensor:
    """Per-pair reward-model loss, shape [B]: -log sigmoid(s_w - s_l) + l2 * (s_w^2 + s_l^2) / 2
    (Open-Assistant's RMLoss on a ranking of two; `l2` is its beta, 0.001 in Coste et al.)."""
    if chosen.shape != rejected.shape:
        raise ValueError(f"reward_loss: chosen scores {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")
    if not l2 >= 0:
        raise ValueError(f"reward_loss: l2 must be >= 0, got {l2!r}")
    return -F.logsigmoid(chosen - rejected) + l2 * 0.5 * (chosen ** 2 + rejected ** 2)


def ensemble_objective(scores, objective: str, *, lam: float = 0.5) -> np.ndarray:
    """Aggregate member scores `scores` ([k members, ...]) over the members (axis 0) by `objective`
    (OBJECTIVES; module docstring); `lam` is UWO's lambda (0.5 in Coste et al.'s best-of-n)."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError("ensemble_objective: no member scores (expected an array [members, ...])")
    if objective == "mean":
        return arr.mean(axis=0)
    if objective == "wco":
        return arr.min(axis=0)
    if objective == "uwo":
        return arr.mean(axis=0) - lam * arr.var(axis=0, ddof=0)
    raise ValueError(f"ensemble objective {objective!r}: expected one of {OBJECTIVES}")


# ---------------------------------------------------------------------------------------------------
# The model: a scalar head on the last token
# ---------------------------------------------------------------------------------------------------

# written beside every member: how to load it and what its score means
CARD = "reward_model.json"


class LastTokenReward(torch.nn.Module):
    """The reward of each sequence of a batch: the sequence-classification model's score head on the final
    hidden state of its LAST token, `last` (one flat index per sequence into the batch's [rows x width]
    positions: reward_inputs). The position is given, not found from pad ids as transformers' pooling does
    (where pad = eos, as for SmolLM2, a response that ends in eos would be scored one token early), so the
    rows may also be packed (several sequences of one prompt in a row). Training runs through this module,
    so DDP and FSDP2 see its forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # AutoModelForSequenceClassification, or peft's wrapper of it

    def inner(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids, attention_mask, last, position_ids=None):
        inner = self.inner()
        hidden = inner.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids).last_hidden_state
        return inner.score(hidden.reshape(-1, hidden.shape[-1])[last]).squeeze(-1).float()

    def gradient_checkpointing_enable(self, **kw):  # rpo.loop calls it on the model it trains
        self.model.gradient_checkpointing_enable(**kw)


def _seq_cls(model_dir, *, dtype: str, device, attention: str | None, pad_token_id: int):
    from transformers import AutoModelForSequenceClassification

    from rpo.models import resolve_model_dir, torch_dtype
    kw = {"attn_implementation": attention} if attention else {}
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_dir(model_dir), num_labels=1,
                                                               dtype=torch_dtype(dtype), **kw)
    model.config.pad_token_id = pad_token_id  # transformers' own pooling (for users of the saved model)
    model.config.use_cache = False
    return model.to(device)


def prepare_reward_model(base_dir, cfg: dict, device, *, pad_token_id: int) -> LastTokenReward:
    """A member to train (fp32 master weights): the base with a freshly initialised head, whole (full
    fine-tuning) or with LoRA adapters (the head always trains: peft's modules_to_save). The head and the
    LoRA matrices are drawn from the global RNG, seeded here with cfg["seed"], the member's seed."""
    torch.manual_seed(cfg["seed"])
    model = _seq_cls(base_dir, dtype="float32", device=device, attention=cfg.get("attention"),
                     pad_token_id=pad_token_id)
    if cfg["finetuning"] == "lora":
        from peft import LoraConfig, get_peft_model
        lora = cfg["lora"]
        n = model.config.num_hidden_layers
        layers = list(range(max(0, n - lora["top_layers"]), n)) if lora.get("top_layers") else None
        # task_type SEQ_CLS: peft trains and saves the score head in full beside the adapters
        model = get_peft_model(model, LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"],
            layers_to_transform=layers, task_type="SEQ_CLS"))
    model.train()
    return LastTokenReward(model)


def load_reward_model(model_dir, *, base_dir=None, device="cpu", dtype: str = "float32") -> LastTokenReward:
    """A trained member for scoring: a LoRA member is its base (`base_dir`, default the one its card names)
    with the adapter merged in; a fully fine-tuned member is its own model."""
    import json
    from pathlib import Path

    from rpo.models import load_tokenizer
    model_dir = Path(model_dir)
    card = json.loads((model_dir / CARD).read_text())
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel
        base_dir = base_dir or card["base_model"]
        pad = load_tokenizer(base_dir).pad_token_id
        base = _seq_cls(base_dir, dtype=dtype, device=device, attention=None, pad_token_id=pad)
        model = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    else:
        model = _seq_cls(model_dir, dtype=dtype, device=device, attention=None,
                         pad_token_id=load_tokenizer(model_dir).pad_token_id)
    return LastTokenReward(model).eval()


def same(hidden):
    """rpo.trunk's map between a batch's [sequences, width, hidden] layout and the rows the model runs, when
    they are the same rows."""
    return hidden


def reward_inputs(seqs: list[tuple[list[int], list[int]]], pad_id: int, *, attention: str | None,
                  device="cpu") -> tuple[dict, tuple]:
    """The model inputs of (prompt ids, response ids) sequences and the maps of rpo.trunk between their
    [sequences, width, hidden] layout (rpo.batching.collate's) and the rows the model runs. Sequences of one
    prompt share a row, the prompt once (rpo.batching._share_prompts, under sdpa or eager attention: each
    response attends to the prompt and to itself only, at the positions it has alone), so a prompt's tokens
    run once for all its responses; else one right-padded row per sequence. "last": each sequence's last
    token as a flat index into the rows' positions."""
    from rpo.batching import _share_prompts, collate
    from rpo.trunk import packed_maps
    batch = collate(seqs, pad_id)
    ids, attn, lab = batch["input_ids"], batch["attention_mask"], batch["labels_mask"]
    end = attn.sum(dim=1) - 1
    packed = _share_prompts(ids, lab, attention if attention in ("sdpa", "eager") else None, 0, attn)
    if packed is None:
        inputs = {"input_ids": ids, "attention_mask": attn, "position_ids": None,
                  "last": torch.arange(len(seqs)) * ids.shape[1] + end}
        maps = (same, same)
    else:
        inputs = {"input_ids": packed["input_ids"], "attention_mask": packed["attention_mask"],
                  "position_ids": packed["position_ids"], "last": packed["where"][torch.arange(len(seqs)), end]}
        maps = packed_maps(packed)
    return {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}, maps


def attention_of(model: LastTokenReward) -> str | None:
    return getattr(model.inner().config, "_attn_implementation", None)


@torch.inference_mode()
def score_sequences(model: LastTokenReward, seqs: list[tuple[list[int], list[int]]], pad_id: int, *,
                    batch_size: int) -> torch.Tensor:
    """The reward of each (prompt ids, response ids) sequence, batched in length order."""
    device = next(model.parameters()).device
    out = torch.zeros(len(seqs))
    for idx in _batches(seqs, batch_size):
        b, _ = reward_inputs([seqs[i] for i in idx], pad_id, attention=attention_of(model), device=device)
        out[idx] = model(**b).cpu()
    return out


def _batches(seqs, batch_size: int) -> list[list[int]]:
    """Batches of sequence indices: by prompt, then length, so a prompt's sequences share batches (and rows)."""
    order = sorted(range(len(seqs)), key=lambda i: (tuple(seqs[i][0]), len(seqs[i][1])))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def pair_accuracy(model: LastTokenReward, items: list[dict], pad_id: int, *, batch_size: int) -> dict:
    """How a member ranks tokenised pairs: accuracy (ties half), mean margin s_w - s_l, the pairs' count."""
    seqs = [(it["prompt"], it[side]) for it in items for side in ("chosen", "rejected")]
    s = score_sequences(model, seqs, pad_id, batch_size=batch_size)
    margin = s[0::2] - s[1::2]
    acc = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return {"pairs": len(items), "accuracy": float(acc), "mean_margin": float(margin.mean())}


# ---------------------------------------------------------------------------------------------------
# Training one member with rpo.loop
# ---------------------------------------------------------------------------------------------------

def train_reward_model(*, base_dir, pairs_path, test_path, out_dir, metrics_path, summary_path, ckpt_dir,
                       cfg: dict, l2: float, eval_batch_size: int, reference_cache=None, trunk_path=None,
                       grad_hook=None) -> dict:
    """Train one member (seed cfg["seed"]) on the pairs of `pairs_path` with reward_loss; resumes from
    `ckpt_dir` (rpo.checkpoint: bound to the config, the base model's content, the tokenised data and
    `l2`). Writes the member to `out_dir` (module docstring; CARD says how to load it), the per-step metrics
    and a summary with its accuracy on the held-out pairs of `test_path` and on its training pairs. With
    LoRA on the top layers and the reference pass's trunk (`reference_cache`, `trunk_path`: rpo.trunk, made
    by the same base model on the same pairs), every training forward starts at the first LoRA layer."""
    import json
    from contextlib import nullcontext
    from pathlib import Path

    from rpo import checkpoint, io
    from rpo import distributed as dist_
    from rpo import trunk as trunk_
    from rpo.data import read_pairs
    from rpo.loop import run_loop
    from rpo.models import load_tokenizer, resolve_model_dir
    from rpo.train import (_autocast, _fingerprint_on_main, _load_device, _load_trainable, _run_cfg, check_attention,
                           check_precision, fingerprint, pair_batch, tokenize_pairs)
    if (reference_cache is None) != (trunk_path is None):
        raise ValueError("train_reward_model: reference_cache and trunk_path go together (the trunk's layout is "
                         "the cache's)")
    tok = load_tokenizer(base_dir)
    pad = tok.pad_token_id
    tokenize = dict(max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"])
    items, tok_summary = tokenize_pairs(tok, read_pairs(pairs_path), **tokenize)
    test_items, _ = tokenize_pairs(tok, read_pairs(test_path), **tokenize)
    world = dist_.setup(cfg.get("sharding", "none"))
    device = world.device
    check_attention(cfg, device)
    check_precision(cfg["precision"], device)
    model = prepare_reward_model(base_dir, cfg, _load_device(world), pad_token_id=pad)
    sharded = world.sharding == "full"
    reader, layer = None, None
    if trunk_path is not None:
        if sharded or cfg["finetuning"] != "lora" or not cfg["lora"].get("top_layers"):
            raise ValueError("reward_models: the trunk needs LoRA on the top layers of an unsharded model")
        cache = torch.load(reference_cache, weights_only=False)
        if cache["fingerprint"] != fingerprint(items):
            raise ValueError(f"{reference_cache}: made for another tokenisation or data than {pairs_path}; "
                             "the reward models' trunk needs the same pairs, max_length and max_prompt_length")
        layer = trunk_.depth(model.model.config.num_hidden_layers, cfg["lora"]["top_layers"])
        trunk_.check_frozen(model.model, layer)
        trunk_.check(trunk_path, cache.get("trunk"), layer=layer, hidden_size=model.model.config.hidden_size,
                     items=items, cache_path=reference_cache)
        reader = trunk_.Reader(trunk_path, items, model.model.config.hidden_size)
    skipped = [0]
    attention = attention_of(model)

    def step_fn(model, micro, step_items):
        b, n_step = len(micro), len(step_items)
        # [chosen_1..B, rejected_1..B], the layout of the trunk file's reader (rpo.train.pair_batch)
        batch, maps = reward_inputs(
            [(it["prompt"], it["chosen"]) for it in micro] + [(it["prompt"], it["rejected"]) for it in micro],
            pad, attention=attention if cfg.get("share_prompts", True) else None, device=device)
        start = trunk_.Trunk(layer, reader.batch(micro).to(device)) if reader else None
        hooked = start.hooked(dist_.unwrap(model).model, *maps) if start else nullcontext()
        with _autocast(device, cfg["precision"], sharded=sharded), hooked:
            s = model(**batch)
        skipped[0] += start.skipped if start else 0
        sc, sr = s[:b], s[b:]
        per = reward_loss(sc, sr, l2=l2)
        with torch.no_grad():
            bt = reward_loss(sc, sr, l2=0.0)
            d = sc - sr

        def share(x):  # this micro-batch's part of the global step's mean
            return float(x.detach().sum()) / n_step
        m = {"loss": share(per), "loss/bt": share(bt), "loss/l2": share(per - bt),
             "accuracy": share((d > 0).float() + 0.5 * (d == 0).float()), "margin": share(d),
             "scores/chosen": share(sc), "scores/rejected": share(sr)}
        return per.sum() / n_step, m

    identity = {"stage": "reward_model", "config": _run_cfg(cfg), "l2": l2,
                "base_model": _fingerprint_on_main(base_dir, world), "data": fingerprint(items),
                "trunk": checkpoint.tensors_fingerprint(cache["chosen_logps"]) if reader else None}
    model, info = run_loop(model=model, items=items, step_fn=step_fn, cfg=cfg, metrics_path=metrics_path,
                           ckpt_dir=ckpt_dir, identity=identity, desc=f"reward model seed {cfg['seed']}",
                           world=world, grad_hook=grad_hook)
    state = dist_.trainable_state(model, world)
    if world.main:
        inner = dist_.unwrap(model)
        if dist_.is_sharded(inner):
            inner = prepare_reward_model(base_dir, cfg, "cpu", pad_token_id=pad)
            _load_trainable(inner, state)
        inner.eval()
        evals = {"heldout": pair_accuracy(inner, test_items, pad, batch_size=eval_batch_size),
                 "train": pair_accuracy(inner, items, pad, batch_size=eval_batch_size)}
        card = {"base_model": str(resolve_model_dir(base_dir)), "num_labels": 1, "score": "the score head on the "
                "last token of prompt + response (chat template), raw (not standardised)",
                "finetuning": cfg["finetuning"], "seed": cfg["seed"], "l2": l2,
                "load": ("peft.PeftModel.from_pretrained(transformers.AutoModelForSequenceClassification"
                         ".from_pretrained(base_model, num_labels=1), dir)"
                         if cfg["finetuning"] == "lora" else
                         "transformers.AutoModelForSequenceClassification.from_pretrained(dir)")}
        with io.atomic_dir(Path(out_dir)) as tmp:
            inner.model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
        summary = {**info, **evals, "tokenization": tok_summary, "config": cfg, "l2": l2,
                   "base_model": str(base_dir), "trunk": {"layer": layer, "layer_calls_skipped": skipped[0]}
                   if reader else None}
        io.write_json(summary_path, summary, sort_keys=True)
    checkpoint.clear(ckpt_dir, world)
    dist_.barrier(world)
    return summary if world.main else {}


# ---------------------------------------------------------------------------------------------------
# Several members scoring the same sequences: their shared frozen layers run once
# ---------------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Raised at the trunk layer: the forward has given what it was run for."""


def _states_below(model: LastTokenReward, layer: int, batch: dict) -> torch.Tensor:
    """The input of decoder layer `layer` for every position of `batch`'s rows (reward_inputs); the layers
    from `layer` up do not run."""
    from rpo.trunk import decoder_layers
    box = {}

    def grab(module, args, kwargs):
        box["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        raise _Stop
    handle = decoder_layers(model.model).__getitem__(layer).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["h"]


def lora_floor(model_dir) -> int | None:
    """The lowest decoder layer a LoRA member's adapter changes (its weights' `layers.<i>.` names), or None
    for a fully fine-tuned member: below it the member is its base model."""
    import re
    from pathlib import Path

    from safetensors import safe_open
    path = Path(model_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(path, "pt") as f:
        layers = {int(m.group(1)) for k in f.keys() if (m := re.search(r"\.layers\.(\d+)\.", k))}
    if not layers:
        raise ValueError(f"{path}: no decoder layer in the adapter's weights")
    return min(layers)


@torch.inference_mode()
def score_with_members(model_dirs: list, base_dir, seqs: list[tuple[list[int], list[int]]], pad_id: int, *,
                       batch_size: int, device="cpu") -> list[torch.Tensor]:
    """Each member's reward of each sequence. LoRA members whose adapters all start at or above one layer L
    (LoRA on the top layers) share their base below it: layers 0..L-1 run once per batch (rpo.trunk.Trunk
    then starts every member's forward at L from those states) and each member runs only its own layers.
    Otherwise each member is loaded and runs whole (load_reward_model)."""
    from rpo import trunk as trunk_
    floors = [lora_floor(d) for d in model_dirs]
    if any(f is None for f in floors) or min(floors) == 0:
        return [score_sequences(load_reward_model(d, base_dir=base_dir, device=device), seqs, pad_id,
                                batch_size=batch_size) for d in model_dirs]
    from peft import PeftModel
    layer = min(floors)
    base = LastTokenReward(_seq_cls(base_dir, dtype="float32", device=device, attention=None,
                                    pad_token_id=pad_id)).eval()
    batches = []
    for idx in _batches(seqs, batch_size):
        b, _ = reward_inputs([seqs[i] for i in idx], pad_id, attention=attention_of(base), device=device)
        batches.append((idx, b, _states_below(base, layer, b)))  # in the rows' own layout
    peft_model, out = None, []
    for i, d in enumerate(model_dirs):
        name = f"m{i}"
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(base.model, d, adapter_name=name).eval()
        else:
            peft_model.load_adapter(d, adapter_name=name)
            peft_model.set_adapter(name)
            peft_model.delete_adapter(f"m{i - 1}")
        member = LastTokenReward(peft_model).eval()
        scores = torch.zeros(len(seqs))
        for idx, b, states in batches:
            start = trunk_.Trunk(layer, states)
            with start.hooked(peft_model, same, same):  # the states are already in the rows' layout
                scores[idx] = member(**b).cpu()
        out.append(scores)
    return out
