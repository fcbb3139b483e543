"""Training stages: SFT (imitation of the chosen responses), reference log-probs, and preference
optimisation (DPO, RPO, the related losses of rpo.losses).

    python -m rpo train-sft        --args '<json of train_sft's keyword arguments>'
    python -m rpo reference-logps  --args '<json>'
    python -m rpo train-preference --args '<json>'

Both training stages run rpo.loop.run_loop (AdamW, the transformers warmup schedules, gradient
accumulation up to the global batch, LoRA (peft) or full fine-tuning, on one process, data parallel, or
FSDP2-sharded: rpo.distributed). Preference training reads the reference log-probs from the cache
written once by `reference_logps`, so a LoRA policy never needs a second model in memory and every method
and every eta reuses the same reference forwards. With LoRA on the top layers only, that pass also writes the
input of the first LoRA layer (rpo.trunk), and every policy forward starts there.

Interruption: sharded checkpoints (rpo.checkpoint) every `checkpoint_every` optimizer steps, bound to
the identity of the run (its config, world size, the content of the model it starts from, its data and
tokenisation, and for preference training the reference log-probs): a re-run of the same run resumes at
the step after the last checkpoint; a checkpoint of any other run is discarded, never resumed.
The final save gathers the trained weights on every rank and rank 0 writes one safetensors model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from rpo import checkpoint, io, losses
from rpo import distributed as dist_
from rpo import trunk as trunk_
from rpo.batching import Truncation, collate, fit, flex_attention_problem, summed_logps
from rpo.chat_format import check_format, pair_ids
from rpo.config import hyperparameters
from rpo.data import read_pairs
from rpo.loop import SNAPSHOTS, run_loop, snapshot_steps
from rpo.models import load_model, load_tokenizer, torch_dtype

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def tokenize_pairs(tok, rows, *, max_length: int, max_prompt_length: int,
                   chat_format: str = "model") -> tuple[list[dict], dict]:
    """Token ids of every pair under `chat_format` (rpo.chat_format: the model's template or the authors'
    recipe), with the truncation rule of rpo.batching applied and counted."""
    check_format(chat_format)
    counter = Truncation()
    out = []
    for r in rows:
        try:
            p, c, j = pair_ids(tok, r["prompt"], r["chosen"], r["rejected"], chat_format)
        except ValueError as e:
            raise ValueError(f"pair {r['id']!r}: {e}") from None
        p, (c, j) = fit(p, [c, j], max_length, max_prompt_length, counter)
        out.append({"id": r["id"], "prompt": p, "chosen": c, "rejected": j})
    summary = {"pairs": len(out), "chat_format": chat_format, **counter.as_dict()}
    if counter.pairs:
        log.warning("truncated to max_length=%d / max_prompt_length=%d: %d pairs (%d prompts, %d responses)",
                    max_length, max_prompt_length, counter.pairs, counter.prompt, counter.response)
    return out, summary


def fingerprint(items: list[dict]) -> str:
    """Hash of the exact token ids, so a cache made under another tokenisation is never reused."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["id"], it["prompt"], it["chosen"], it["rejected"]]).encode())
    return h.hexdigest()


def pair_batch(items: list[dict], pad_id: int) -> dict:
    """Chosen and rejected sequences of a micro-batch in ONE forward: [chosen_1..B, rejected_1..B]."""
    seqs = [(it["prompt"], it["chosen"]) for it in items] + [(it["prompt"], it["rejected"]) for it in items]
    return collate(seqs, pad_id)


# ---------------------------------------------------------------------------------------------------
# Reference log-probs (computed once, cached as a file)
# ---------------------------------------------------------------------------------------------------

@torch.inference_mode()
def reference_logps(model_dir, pairs_path, out_path, *, max_length: int, max_prompt_length: int,
                    batch_size: int = 8, dtype: str = "float32", attention: str | None = None,
                    top_layers: int = 0, trunk_path=None, chat_format: str = "model") -> dict:
    """Summed response log-probs of the reference model for every pair, tokenised under `chat_format`
    (data.chat_format); `attention` as training.attention.
    With `top_layers` (rpo.trunk.top_layers_of the training config), also the input of the first LoRA layer
    for every token, to `trunk_path` (rpo.trunk)."""
    if bool(top_layers) != (trunk_path is not None):
        raise ValueError(f"reference_logps: top_layers > 0 and trunk_path go together "
                         f"(top_layers={top_layers}, trunk_path={trunk_path})")
    tok = load_tokenizer(model_dir)
    items, summary = tokenize_pairs(tok, read_pairs(pairs_path), max_length=max_length,
                                    max_prompt_length=max_prompt_length, chat_format=chat_format)
    device = _device()
    # flex_attention where it cannot train is refused here too: the run that needs this cache would fail
    # (and torch 2.13's CPU inductor fails to compile flex once both batch and length vary)
    check_attention({"attention": attention}, device)
    check_precision(dtype, device)
    model = load_model(model_dir, dtype=dtype, device=device, attention=attention).eval()
    layer = trunk_.depth(model.config.num_hidden_layers, top_layers) if top_layers else None
    chosen, rejected, n_c, n_r = [], [], [], []
    with (trunk_.write(trunk_path) if layer else contextlib.nullcontext()) as add_trunk:
        for s in tqdm(range(0, len(items), batch_size), desc="reference log-probs", unit="batch"):
            chunk = items[s:s + batch_size]
            batch = {k: v.to(device) for k, v in pair_batch(chunk, tok.pad_token_id).items()}
            grab = trunk_.Trunk(layer) if layer else None
            with _autocast(device, dtype):
                lp, n = summed_logps(model, batch, trunk=grab)
            for states in (trunk_.split(grab.captured, chunk) if grab else []):
                add_trunk(states)
            b = len(chunk)
            chosen.append(lp[:b].float().cpu()); rejected.append(lp[b:].float().cpu())
            n_c.append(n[:b].cpu()); n_r.append(n[b:].cpu())
    cache = {"ids": [it["id"] for it in items], "fingerprint": fingerprint(items),
             "chosen_logps": torch.cat(chosen), "rejected_logps": torch.cat(rejected),
             "chosen_lengths": torch.cat(n_c), "rejected_lengths": torch.cat(n_r),
             "model_dir": str(model_dir), "tokenization": summary,
             "trunk": trunk_.entry(layer, model.config.hidden_size, items) if layer else None}
    with io.atomic_open(out_path, "wb") as f:
        torch.save(cache, f)
    return summary


# ---------------------------------------------------------------------------------------------------
# Model set-up
# ---------------------------------------------------------------------------------------------------

def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# CPU instruction sets with bf16 dot products (x86's /proc/cpuinfo "flags", Arm's "Features"); without one,
# torch emulates bf16 matmuls (docs/speed.md, "bf16 on the CPU")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bf16 dot-product instructions (CPU_BF16_FLAGS); None where `cpuinfo` is unreadable
    or lists no flags (no claim either way)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    lines = [ln.split(":", 1)[1] for ln in text.splitlines() if ln.startswith(("flags", "Features")) and ":" in ln]
    if not lines:
        return None
    return any(f in CPU_BF16_FLAGS for ln in lines for f in ln.split())


def check_precision(dtype: str, device) -> bool:
    """Warn (once per stage) when bf16 would be emulated on this CPU; True when it warned."""
    if dtype == "bfloat16" and torch.device(device).type == "cpu" and cpu_has_native_bf16() is False:
        log.warning("precision: bfloat16 on a CPU without %s: torch emulates bf16 matmuls, many times slower "
                    "than float32 (`python -m benchmarks.cpu_bf16 --matmul` measures it); use float32 here",
                    " or ".join(CPU_BF16_FLAGS))
        return True
    return False


def _autocast(device, dtype: str, *, sharded: bool = False):
    """bf16 autocast over fp32 weights when `dtype` is bfloat16 (on CPU too); a sharded model casts its
    parameters itself (FSDP2's mixed-precision policy), so it runs without autocast."""
    device = torch.device(device).type
    if dtype == "bfloat16" and not sharded:
        return torch.autocast(device, dtype=torch.bfloat16)
    return torch.autocast(device, enabled=False)


def prepare_model(model_dir, cfg: dict, device):
    """The model to train, fp32 (master weights): the whole model, or LoRA adapters on it."""
    model = load_model(model_dir, dtype="float32", device=device, attention=cfg.get("attention"))
    model.config.use_cache = False
    if cfg["finetuning"] == "full":
        model.train()
        return model
    from peft import LoraConfig, get_peft_model
    lora = cfg["lora"]
    # LoRA's A matrices are drawn from the global RNG: seed it so that the start does not depend on what
    # ran before in the process (and every rank of a distributed run starts from the same adapter).
    torch.manual_seed(cfg["seed"])
    n_layers = model.config.num_hidden_layers
    layers = None
    if lora.get("top_layers"):
        # LoRA on the top k layers only: backward then stops at layer n-k, the cheap setting that lets
        # the offline quickstart train on 2 CPU cores (a documented deviation, off in the paper configs).
        layers = list(range(max(0, n_layers - lora["top_layers"]), n_layers))
    model = get_peft_model(model, LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], layers_to_transform=layers, task_type="CAUSAL_LM"))
    model.train()
    return model


def check_attention(cfg: dict, device) -> None:
    """training.attention flex_attention trains only where torch's FlexAttention has a backward (not on
    CPU in torch 2.13): say so before loading anything (training and the reference pass), never fall
    back to another kernel."""
    if cfg.get("attention") == "flex_attention":
        problem = flex_attention_problem(device, backward=True)
        if problem:
            raise ValueError(f"training.attention: flex_attention cannot train on {device} ({problem}); "
                             "choose sdpa or eager")


def attention_of(model) -> str | None:
    """The attention implementation the model actually runs (the train summary records it)."""
    return getattr(dist_.unwrap(model).config, "_attn_implementation", None)


def _load_device(world):
    # A model to shard is loaded on the CPU: fully_shard moves each layer to the GPU as it shards it, so
    # no rank ever holds the whole model on its GPU.
    return "cpu" if world.sharding == "full" else world.device


def _run_cfg(cfg: dict) -> dict:
    """The training config as far as it decides the result (the checkpoint identity): thread counts and
    the accumulation split do not change a step's gradient (the world size is bound separately)."""
    return {k: v for k, v in cfg.items()
            if k not in ("threads", "world_size", "gradient_accumulation_steps", "save_precision")}


def _fingerprint_on_main(model_dir, world) -> str:
    # Hashing a 7B checkpoint takes seconds; one rank does it and tells the others.
    return dist_.broadcast(checkpoint.model_fingerprint(model_dir) if world.main else None, world)


def _load_trainable(model, state: dict) -> None:
    """Put gathered trainable weights into an unsharded copy of the model; every key must fit."""
    res = model.load_state_dict(state, strict=False)
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = [k for k in res.missing_keys if k not in frozen and k not in dict(model.named_buffers())]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {list(res.unexpected_keys)[:5]}")


def save_dtype(cfg: dict) -> str:
    """The dtype a whole model (full fine-tuning, or LoRA merged) is saved in: `save_precision`, where
    `auto` is the training precision (a bf16 run's 7B policy: about 14.5 GB instead of fp32's 29 GB)."""
    choice = cfg.get("save_precision", "auto")
    return cfg["precision"] if choice == "auto" else choice


def save_trained(model, world, tok, out_dir, *, start_dir, cfg: dict, merge: bool) -> dict | None:
    """Write the trained model to `out_dir` (safetensors): the LoRA adapter (fp32, small; its
    base_model_name_or_path made portable: rpo.models.portable_base), the adapter merged into the model
    (`merge`), or the whole fine-tuned model, the last two in save_dtype(cfg). Every rank calls this;
    rank 0 returns what was saved (`saved_summary`), the others None.

    A sharded model is gathered on every rank (rank 0 receives the full weights on its CPU), then rank 0
    puts them into a fresh unsharded copy built from `start_dir` and writes it, while the other ranks
    wait at the barrier: no collective runs on one rank alone.
    """
    state = dist_.trainable_state(model, world)
    saved = None
    if world.main:
        inner = dist_.unwrap(model)
        if dist_.is_sharded(inner):
            inner = prepare_model(start_dir, cfg, "cpu")
            _load_trainable(inner, state)
        saved = _save_model(inner, tok, Path(out_dir), merge=merge, start_dir=start_dir, dtype=save_dtype(cfg))
    dist_.barrier(world)
    return saved


def _save_model(model, tok, out_dir: Path, *, merge: bool, start_dir, dtype: str) -> dict:
    adapter = hasattr(model, "peft_config") and not merge
    if merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    kept = None
    with io.atomic_dir(out_dir) as tmp:
        if adapter:
            model.save_pretrained(tmp, safe_serialization=True)
            _portable_adapter(Path(tmp), start_dir)
        else:
            # cast a copy: the fp32 master weights stay as they are (a snapshot is saved mid-training)
            target = torch_dtype(dtype)
            cast: dict[int, torch.Tensor] = {}  # by storage, so tied weights (embeddings, head) stay one tensor
            state = {k: cast.setdefault(v.data_ptr(), v.detach().to("cpu", target))
                     for k, v in model.state_dict().items()}
            kept = update_kept(model, state, start_dir) if target != torch.float32 else None
            model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
            if target != torch.float32:  # config.json says what the files hold
                cfg_path = Path(tmp) / "config.json"
                c = json.loads(cfg_path.read_text())
                c["dtype"] = dtype
                c.pop("torch_dtype", None)
                cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
        tok.save_pretrained(tmp)
    size = sum(f.stat().st_size for f in Path(out_dir).rglob("*.safetensors"))
    out = {"kind": "adapter" if adapter else ("merged" if merge else "full"),
           "dtype": "float32" if adapter else dtype, "bytes": size}
    if kept is not None:
        out["update_kept"] = kept
    return out


def _portable_adapter(adapter_dir: Path, start_dir) -> None:
    """adapter_config.json names its base by hub id and commit, or by absolute path (not the project-relative
    path the model was loaded from), so `PeftModel.from_pretrained` finds it from any directory."""
    from rpo.models import portable_base
    path = adapter_dir / "adapter_config.json"
    c = json.loads(path.read_text())
    c["base_model_name_or_path"], revision = portable_base(start_dir)
    if revision:
        c["revision"] = revision
    path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


def update_kept(model, saved: dict, start_dir) -> dict:
    """How much of training's update survives the cast to the saved dtype: of the weights whose fp32 master
    value differs from the start (`start_dir`'s checkpoint, read tensor by tensor), how many still differ
    from the start cast the same way. Round to nearest keeps every update of at least half a unit in the
    last place; smaller ones are lost, and this counts them."""
    from safetensors import safe_open

    from rpo.models import resolve_model_dir
    files = sorted(resolve_model_dir(start_dir).glob("*.safetensors"))
    master = model.state_dict()
    changed = kept = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name not in saved:
                    continue
                start = st.get_tensor(name)
                moved = master[name].detach().cpu().float() != start.float()
                changed += int(moved.sum())
                kept += int((moved & (saved[name] != start.to(saved[name].dtype))).sum())
    return {"weights_updated": changed, "kept_after_cast": kept,
            "fraction": (kept / changed) if changed else None}


def _finish(model, world, tok, out_dir, summary_path, ckpt_dir, summary: dict, *, start_dir, cfg,
            merge: bool, snapshots_path=None) -> dict:
    saved = save_trained(model, world, tok, out_dir, start_dir=start_dir, cfg=cfg, merge=merge)
    if world.main:
        summary["saved"] = saved
        if snapshots_path is not None:
            # the snapshots grew beside the checkpoints (rpo.loop); now they are the rule's output
            snaps = Path(ckpt_dir) / SNAPSHOTS
            shutil.rmtree(snapshots_path, ignore_errors=True)
            Path(snapshots_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(snaps, snapshots_path)
            summary["snapshot_steps"] = snapshot_steps(snapshots_path)
        io.write_json(summary_path, summary, sort_keys=True)
    checkpoint.clear(ckpt_dir, world)
    dist_.barrier(world)
    return summary


# ---------------------------------------------------------------------------------------------------
# SFT: imitation of the chosen responses; the merged result is the reference model
# ---------------------------------------------------------------------------------------------------

def train_sft(*, base_dir, pairs_path, out_dir, metrics_path, summary_path, ckpt_dir, cfg: dict,
              grad_hook=None, chat_format: str = "model") -> dict:
    """SFT on the chosen responses, tokenised under `chat_format` (data.chat_format); writes the merged model
    to `out_dir`, the per-step metrics to `metrics_path` and the run's summary (steps, truncation counts, the
    resolved config) to `summary_path`; resumes from `ckpt_dir`."""
    tok = load_tokenizer(base_dir)
    items, tok_summary = tokenize_pairs(tok, read_pairs(pairs_path), max_length=cfg["max_length"],
                                        max_prompt_length=cfg["max_prompt_length"], chat_format=chat_format)
    world = dist_.setup(cfg.get("sharding", "none"))
    device = world.device
    check_attention(cfg, device)
    check_precision(cfg["precision"], device)
    model = prepare_model(base_dir, cfg, _load_device(world))
    sharded = world.sharding == "full"

    def step_fn(model, micro, step_items):
        batch = {k: v.to(device) for k, v in
                 collate([(it["prompt"], it["chosen"]) for it in micro], tok.pad_token_id).items()}
        with _autocast(device, cfg["precision"], sharded=sharded):
            lp, n = summed_logps(model, batch)
        # The token-mean NLL of the GLOBAL batch: this micro-batch's summed NLL over the step's token
        # count, so the step's gradient does not depend on the micro-batch size or the number of ranks.
        n_tokens = sum(len(it["chosen"]) for it in step_items)
        lp_sum = lp.float().sum()
        return -lp_sum / n_tokens, {"loss": -float(lp_sum.detach()) / n_tokens,
                                    "logps/chosen": float(lp_sum.detach()) / len(step_items)}

    identity = {"stage": "sft", "config": _run_cfg(cfg), "base_model": _fingerprint_on_main(base_dir, world),
                "data": fingerprint(items)}
    model, info = run_loop(model=model, items=items, step_fn=step_fn, cfg=cfg, metrics_path=metrics_path,
                           ckpt_dir=ckpt_dir, identity=identity, desc="SFT", world=world, grad_hook=grad_hook)
    summary = {**info, "tokenization": tok_summary, "config": cfg, "base_model": str(base_dir),
               "attention": attention_of(model)}
    return _finish(model, world, tok, out_dir, summary_path, ckpt_dir, summary, start_dir=base_dir, cfg=cfg,
                   merge=True)


# ---------------------------------------------------------------------------------------------------
# Preference optimisation (any loss of rpo.losses)
# ---------------------------------------------------------------------------------------------------

def _trunk_reader(model, cfg: dict, items, trunk_path, cache: dict, cache_path, sharded: bool):
    """The trunk file's reader and its layer when this run starts at the first LoRA layer; else (None, None)."""
    top = trunk_.top_layers_of(cfg)
    if bool(top) != (trunk_path is not None):
        raise ValueError(f"train_preference: training.trunk_cache with LoRA top_layers ({top}) and trunk_path "
                         f"({trunk_path}) go together")
    if not top:
        return None, None
    if sharded:
        raise ValueError("training.trunk_cache: a sharded model (training.sharding full) runs every layer; "
                         "set training.trunk_cache false")
    config = dist_.unwrap(model).config
    layer = trunk_.depth(config.num_hidden_layers, top)
    trunk_.check_frozen(model, layer)
    trunk_.check(trunk_path, cache.get("trunk"), layer=layer, hidden_size=config.hidden_size, items=items,
                 cache_path=cache_path)
    return trunk_.Reader(trunk_path, items, config.hidden_size), layer


def train_preference(*, ref_dir, pairs_path, reference_cache, out_dir, metrics_path, summary_path, ckpt_dir,
                     cfg: dict, method: dict, grad_hook=None, snapshots_path=None, trunk_path=None,
                     chat_format: str = "model") -> dict:
    """Train the policy (LoRA adapters on `ref_dir`, or the whole model) with `method`'s loss against the
    cached reference log-probs; writes the model to `out_dir`, the per-step metrics to `metrics_path`
    and the run's summary to `summary_path`; resumes from `ckpt_dir`. With cfg["snapshot_every"] > 0,
    the policy after every that many steps (and after the last) goes to `snapshots_path`/step-XXXXXX
    (an adapter, or the whole model under full fine-tuning), saved like the final model. With
    training.trunk_cache (rpo.trunk), every policy forward starts at the first LoRA layer from the reference
    pass's `trunk_path`. Pairs are tokenised under `chat_format` (data.chat_format), as the reference pass's."""
    if bool(cfg.get("snapshot_every")) != (snapshots_path is not None):
        raise ValueError("train_preference: snapshot_every > 0 and snapshots_path go together "
                         f"(snapshot_every={cfg.get('snapshot_every')}, snapshots_path={snapshots_path})")
    if method.get("rounds"):
        raise ValueError(f"method {method.get('name')!r} has rounds: it trains round by round (rpo.round_train)")
    loss_name = method["loss"]
    loss_fn = losses.get_loss(loss_name)
    hparams = hyperparameters(method)
    losses.check_hyperparameters(loss_name, hparams, where=f"method {method.get('name', loss_name)}")
    tok = load_tokenizer(ref_dir)
    items, tok_summary = tokenize_pairs(tok, read_pairs(pairs_path), max_length=cfg["max_length"],
                                        max_prompt_length=cfg["max_prompt_length"], chat_format=chat_format)
    cache = torch.load(reference_cache, weights_only=False)
    if cache["fingerprint"] != fingerprint(items):
        raise ValueError(f"{reference_cache}: reference log-probs were computed for another tokenisation "
                         f"or data ({pairs_path}); re-run the reference_logps rule")
    for i, it in enumerate(items):
        it["ref_c"], it["ref_r"] = float(cache["chosen_logps"][i]), float(cache["rejected_logps"][i])
    world = dist_.setup(cfg.get("sharding", "none"))
    device = world.device
    check_attention(cfg, device)
    check_precision(cfg["precision"], device)
    model = prepare_model(ref_dir, cfg, _load_device(world))
    sharded = world.sharding == "full"
    reader, layer = _trunk_reader(model, cfg, items, trunk_path, cache, reference_cache, sharded)
    skipped = [0]
    dpo = losses.get_loss("dpo")
    beta = hparams["beta"]
    # The loss without its SFT term (DPO for RPO, IPO for ipo+sft, the loss itself when it has none).
    pref_name = losses.preference_part(loss_name)
    pref_fn = losses.get_loss(pref_name)
    pref_hparams = {k: hparams[k] for k in losses.loss_hyperparameters(pref_name)}

    def step_fn(model, micro, step_items):
        b, n_step = len(micro), len(step_items)
        batch = {k: v.to(device) for k, v in pair_batch(micro, tok.pad_token_id).items()}
        start = trunk_.Trunk(layer, reader.batch(micro).to(device)) if reader else None
        with _autocast(device, cfg["precision"], sharded=sharded):
            lp, n = summed_logps(model, batch, share_prompts=cfg.get("share_prompts", True), trunk=start)
        skipped[0] += start.skipped if start else 0
        lp = lp.float()
        args = dict(policy_chosen_logps=lp[:b], policy_rejected_logps=lp[b:],
                    reference_chosen_logps=torch.tensor([it["ref_c"] for it in micro], device=device),
                    reference_rejected_logps=torch.tensor([it["ref_r"] for it in micro], device=device),
                    chosen_lengths=n[:b], rejected_lengths=n[b:])
        per_example = loss_fn(**args, **hparams)
        with torch.no_grad():
            dpo_part = dpo(**args, beta=beta)
            pref_part = pref_fn(**args, **pref_hparams)
            rc = losses.rewards(args["policy_chosen_logps"], args["reference_chosen_logps"], beta)
            rr = losses.rewards(args["policy_rejected_logps"], args["reference_rejected_logps"], beta)
        pe = per_example.detach()

        def share(x):  # this micro-batch's part of the global step's mean
            return float(x.sum()) / n_step
        # loss = loss/pref + loss/sft; loss/dpo is the DPO loss of the same batch, for comparing methods
        m = {"loss": share(pe), "loss/dpo": share(dpo_part), "loss/pref": share(pref_part),
             "loss/sft": share(pe - pref_part),
             "rewards/chosen": share(rc), "rewards/rejected": share(rr),
             "rewards/margins": share(rc - rr), "rewards/accuracies": share((rc > rr).float()),
             "logps/chosen": share(lp[:b].detach()), "logps/rejected": share(lp[b:].detach()),
             # The change from the reference on the same examples: batches differ in length, so the
             # raw batch mean above moves with the batch; this one moves only with training.
             "logratio/chosen": share(rc) / beta, "logratio/rejected": share(rr) / beta}
        return per_example.sum() / n_step, m

    identity = {"stage": "preference", "config": _run_cfg(cfg), "method": method,
                "reference_model": _fingerprint_on_main(ref_dir, world), "data": fingerprint(items),
                "reference_logps": checkpoint.tensors_fingerprint(cache["chosen_logps"], cache["rejected_logps"])}
    model, info = run_loop(model=model, items=items, step_fn=step_fn, cfg=cfg, metrics_path=metrics_path,
                           ckpt_dir=ckpt_dir, identity=identity, desc=f"train {method.get('name', loss_name)}",
                           world=world, grad_hook=grad_hook,
                           save_snapshot=lambda m, d: save_trained(m, world, tok, d, start_dir=ref_dir, cfg=cfg,
                                                                   merge=False))
    summary = {**info, "tokenization": tok_summary, "config": cfg, "method": method,
               "reference_model": str(ref_dir), "finetuning": cfg["finetuning"], "attention": attention_of(model),
               "trunk": {"layer": layer, "layer_calls_skipped": skipped[0]} if reader else None}
    return _finish(model, world, tok, out_dir, summary_path, ckpt_dir, summary, start_dir=ref_dir, cfg=cfg,
                   merge=False, snapshots_path=snapshots_path)
