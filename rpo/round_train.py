"""Training of one online round (issue 27): the loss trains on the round's selection (rpo.rounds), starting from
the previous round's policy, against the reference the method names.

    python -m rpo train-round --args '<json of train_round's keyword arguments>'

What a round's loss sees, by the kind of data its selection gives (rpo.losses.online.ONLINE_DATA):
    pairs   chosen/rejected rows (best_worst, tournament): any pair loss of rpo.losses (iterative DPO and RPO,
            IPO, ...) and INPO, MPO; log π_ref (the initial model, or with rounds.reference "previous" the
            previous round's policy: iterative DPO's two settings) and log π_t (the previous round's policy) of
            both responses, and for MPO of a reference sample, computed here once before training;
    kept    kept completions (top_k): SuperHF, whose KL term needs the reference's full next-token
            distributions at every step (the adapter switched off, or the reference model);
    groups  every sample of a prompt with its score (all): REINFORCE-LOO, with π_t as the behaviour policy.
The frozen trunk (rpo.trunk): with LoRA on the top layers only, the reference pass here also keeps the input of
the first LoRA layer for every token (in memory: a round's data is small), and every training forward starts
there. After training, rounds.extrapolation (APO's α, rpo.apo) turns the trained policy π̂ into the round's policy;
π̂ itself is kept in the model's `proximal/` directory, which the next round's extrapolation reads.

Interruption: the checkpoints of rpo.loop, bound to the round's identity (config, method, round, the models it
starts from, its tokenised data and the log-probs computed here).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rpo import apo, checkpoint, io, losses
from rpo import distributed as dist_
from rpo import trunk as trunk_
from rpo.batching import Truncation, collate, fit, summed_logps
from rpo.chat_format import check_format, pair_ids
from rpo.config import hyperparameters
from rpo.losses import online as ol
from rpo.loop import run_loop
from rpo.models import load_model, load_tokenizer
from rpo.train import (_autocast, _fingerprint_on_main, _run_cfg, attention_of, check_attention,
                       check_precision, prepare_model, save_trained)

PROXIMAL = "proximal"  # APO: the trained policy π̂ inside the round's model directory


def data_kind(loss: str) -> str:
    """pairs, kept or groups: what loss `loss` trains on (every loss outside ONLINE_DATA is a pair loss)."""
    return ol.ONLINE_DATA.get(loss, "pairs")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def sequence_ids(tok, prompt: list[dict], responses: list[str], chat_format: str) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids and each response's, as a pair's are tokenised (rpo.chat_format)."""
    out, p = [], None
    for r in responses:
        msg = [{"role": "assistant", "content": r}]
        p_r, ids, _ = pair_ids(tok, prompt, msg, msg, chat_format)
        if p is not None and p_r != p:
            raise ValueError("a prompt tokenised two ways")
        p = p_r
        out.append(ids)
    return p, out


def tokenize_rows(tok, rows: list[dict], *, kind: str, max_length: int, max_prompt_length: int,
                  chat_format: str = "model", reference_sample: bool = False) -> tuple[list[dict], dict]:
    """Token ids of a round's selected rows: {"id", "prompt", "seqs", "scores"}; for pairs seqs = [chosen,
    rejected] (+ the reference sample with `reference_sample`), for kept [the completion], for groups the K
    samples. The truncation rule of rpo.batching.fit applies to all of a row's sequences together, counted."""
    check_format(chat_format)
    counter, items = Truncation(), []
    for n, r in enumerate(rows, 1):
        responses = list(r["responses"])
        want = {"pairs": 2, "kept": 1}.get(kind)
        if want is not None and len(responses) != want:
            raise ValueError(f"selected row {n} ({r.get('id')!r}): {len(responses)} responses, a {kind} row has {want}")
        if kind == "groups" and len(responses) < 2:
            raise ValueError(f"selected row {n} ({r.get('id')!r}): a group needs at least 2 samples")
        if reference_sample:
            if "reference_response" not in r:
                raise ValueError(f"selected row {n} ({r.get('id')!r}): no reference_response (MPO's regularisation "
                                 "sample); the label_round job takes it from the round's reference samples")
            responses.append(r["reference_response"])
        p, seqs = sequence_ids(tok, r["prompt"], responses, chat_format)
        p, seqs = fit(p, seqs, max_length, max_prompt_length, counter)
        items.append({"id": r["id"], "prompt": p, "seqs": seqs, "scores": [float(s) for s in r["scores"]]})
    if kind == "groups" and len({len(it["seqs"]) for it in items}) > 1:
        raise ValueError("groups of different sizes in one round: every prompt must have samples_per_prompt samples")
    return items, {"rows": len(items), "kind": kind, "chat_format": chat_format, **counter.as_dict()}


def items_fingerprint(items: list[dict]) -> str:
    import hashlib
    import json
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["id"], it["prompt"], it["seqs"], it["scores"]]).encode())
    return h.hexdigest()


def _seqs(items: list[dict]) -> list[tuple[list[int], list[int]]]:
    return [(it["prompt"], s) for it in items for s in it["seqs"]]


def _states_batch(items: list[dict], width: int) -> torch.Tensor:
    """The trunk states of the items' sequences in collate's layout [sequences, width, hidden]."""
    states = [s for it in items for s in it["states"]]
    out = torch.zeros(len(states), width, states[0].shape[-1])
    for i, s in enumerate(states):
        out[i, :s.shape[0]] = s
    return out


@torch.no_grad()
def logps_pass(model, items: list[dict], pad_id: int, device, *, batch_size: int, precision: str,
               layer: int | None = None) -> list[list[float]]:
    """Each item's sequences' summed response log-probs under `model`; with `layer`, also keep the input of that
    layer for every token of every sequence in item["states"] (the trunk)."""
    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        seqs = _seqs(chunk)
        batch = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
        grab = trunk_.Trunk(layer) if layer is not None else None
        with _autocast(device, precision):
            lp, _ = summed_logps(model, batch, trunk=grab)
        lp = lp.float().cpu().tolist()
        at = 0
        for it in chunk:
            k = len(it["seqs"])
            out.append(lp[at:at + k])
            if grab is not None:
                it["states"] = [grab.captured[at + j, :len(it["prompt"]) + len(seq)].float().cpu().clone()
                                for j, seq in enumerate(it["seqs"])]
            at += k
    return out


# ---------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------

def _policy_logps(model, micro, pad_id, device, precision, layer, share_prompts=True):
    seqs = _seqs(micro)
    batch = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}
    start = trunk_.Trunk(layer, _states_batch(micro, batch["input_ids"].shape[1]).to(device)) if layer is not None else None
    with _autocast(device, precision):
        lp, n = summed_logps(model, batch, share_prompts=share_prompts, trunk=start)
    return lp.float(), n


def _tensor(values, device):
    return torch.tensor(values, dtype=torch.float32, device=device)


def pair_step(loss_name: str, hparams: dict, *, reference: str, pad_id: int, device, precision: str, layer):
    """A step of a pair loss: policy log-probs of the micro-batch's chosen, rejected (and MPO's reference
    sample) responses, against the cached reference (or previous policy) log-probs."""
    loss_fn = losses.get_loss(loss_name)
    needs_prev = loss_name in ol.NEEDS_PREVIOUS
    ref_sample = loss_name in ol.NEEDS_REFERENCE_SAMPLES

    def step_fn(model, micro, step_items):
        lp, n = _policy_logps(model, micro, pad_id, device, precision, layer)
        k = len(micro[0]["seqs"])
        lp, n = lp.view(len(micro), k), n.view(len(micro), k)
        anchor = "prev" if reference == "previous" else "ref"
        args = dict(policy_chosen_logps=lp[:, 0], policy_rejected_logps=lp[:, 1],
                    reference_chosen_logps=_tensor([it[anchor][0] for it in micro], device),
                    reference_rejected_logps=_tensor([it[anchor][1] for it in micro], device),
                    chosen_lengths=n[:, 0], rejected_lengths=n[:, 1])
        if needs_prev:
            args.update(previous_chosen_logps=_tensor([it["prev"][0] for it in micro], device),
                        previous_rejected_logps=_tensor([it["prev"][1] for it in micro], device))
        if ref_sample:
            args["reference_sample_logps"] = lp[:, 2]
        per_example = loss_fn(**args, **hparams)
        n_step = len(step_items)
        d = lp.detach()
        ref_c = _tensor([it["ref"][0] for it in micro], device)
        ref_r = _tensor([it["ref"][1] for it in micro], device)

        def share(x):
            return float(x.sum()) / n_step
        m = {"loss": share(per_example.detach()), "logps/chosen": share(d[:, 0]), "logps/rejected": share(d[:, 1]),
             "logratio/chosen": share(d[:, 0] - ref_c), "logratio/rejected": share(d[:, 1] - ref_r),
             "margin": share((d[:, 0] - ref_c) - (d[:, 1] - ref_r))}
        return per_example.sum() / n_step, m
    return step_fn


def _full_logits(model, micro, pad_id, device, precision, layer):
    seqs = _seqs(micro)
    batch = {k: v.to(device) for k, v in collate(seqs, pad_id).items()}

    def same(x):
        return x
    with _autocast(device, precision):
        if layer is None:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        else:
            start = trunk_.Trunk(layer, _states_batch(micro, batch["input_ids"].shape[1]).to(device))
            with start.hooked(model, same, same):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # logits at t predict token t+1: the positions that predict the completion's tokens
    return logits[:, :-1].float(), batch["input_ids"][:, 1:], batch["labels_mask"][:, 1:]


def superhf_step(hparams: dict, *, reference_model, pad_id: int, device, precision: str, layer):
    """SuperHF's step (rpo.losses.online.superhf): the kept completions' token-mean NLL over the step plus
    kl_coef · Σ max(KL_i, 0), KL_i from the reference's full next-token distributions at each completion position
    (the LoRA adapter switched off, as SuperHF's `disable_adapter()`, or the reference model under full
    fine-tuning). SuperHF's own code takes the KL at the completion tokens' positions (one position late) and
    counts padding; here it is taken where the completion's tokens are predicted, padding excluded."""
    def step_fn(model, micro, step_items):
        logits, targets, mask = _full_logits(model, micro, pad_id, device, precision, layer)
        with torch.no_grad():
            ref_model = reference_model if reference_model is not None else model
            ctx = dist_.unwrap(model).disable_adapter() if reference_model is None else contextlib.nullcontext()
            with ctx:
                ref_logits, _, _ = _full_logits(ref_model, micro, pad_id, device, precision, layer)
        token_logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll = -(token_logps * mask).sum(dim=1)
        kl = ol.forward_kl_per_token(logits, ref_logits, mask)
        step_tokens = sum(len(it["seqs"][0]) for it in step_items)
        per_example = ol.superhf(token_nll=nll, step_tokens=step_tokens, kl_per_token=kl, **hparams)
        n_step = len(step_items)
        ref_lp = _tensor([it["ref"][0] for it in micro], device)
        m = {"loss": float(per_example.detach().sum()), "nll": float(nll.detach().sum()) / step_tokens,
             "kl": float(kl.detach().sum()) / n_step, "score": sum(it["scores"][0] for it in micro) / n_step,
             # the kept completion plays the chosen response: its log-ratio against the reference (Table 1's figure)
             "logratio/chosen": float((-nll.detach() - ref_lp).sum()) / n_step}
        return per_example.sum(), m
    return step_fn


def rloo_step(loss_name: str, hparams: dict, *, pad_id: int, device, precision: str, layer):
    """REINFORCE-LOO's step on whole groups (rpo.losses.online.rloo_kl / rloo_chi2), the previous round's policy
    as the behaviour policy; each micro-batch's share of the step's mean over prompts (the regulariser, a
    batch statistic, is taken per micro-batch, as Laidlaw et al. take it per PPO minibatch)."""
    loss_fn = losses.get_loss(loss_name)

    def step_fn(model, micro, step_items):
        lp, _ = _policy_logps(model, micro, pad_id, device, precision, layer)
        g, k = len(micro), len(micro[0]["seqs"])
        lp = lp.view(g, k)
        prev, ref = _tensor([it["prev"] for it in micro], device), _tensor([it["ref"] for it in micro], device)
        rewards = _tensor([it["scores"] for it in micro], device)
        loss = loss_fn(logps=lp, behaviour_logps=prev, reference_logps=ref, rewards=rewards, **hparams)
        frac = g / len(step_items)
        ell = lp.detach() - ref
        best = rewards.argmax(dim=1, keepdim=True)  # the first best-scored sample plays the chosen response
        m = {"loss": float(loss.detach()) * frac, "reward": float(rewards.mean()) * frac,
             "kl_est": float(ol.kl_estimate(ell.flatten())) * frac,
             "chi2_est": float(ol.chi2_estimate(ell.flatten())) * frac,
             "logratio/chosen": float(ell.gather(1, best).mean()) * frac}
        return loss * frac, m
    return step_fn


# ---------------------------------------------------------------------------------------------------
# The round
# ---------------------------------------------------------------------------------------------------

def _load_start(ref_dir, start_dir, cfg: dict, device):
    """The policy to train: a fresh LoRA on the reference (round 1), the previous round's adapter (trainable), or
    under full fine-tuning the previous round's whole model."""
    if cfg["finetuning"] == "full":
        return prepare_model(start_dir or ref_dir, cfg, device)
    if start_dir is None:
        return prepare_model(ref_dir, cfg, device)
    if not (Path(start_dir) / "adapter_config.json").is_file():
        raise ValueError(f"{start_dir}: the previous round's policy is not a LoRA adapter, but training.finetuning "
                         "is lora")
    from peft import PeftModel
    base = load_model(ref_dir, dtype="float32", device=device, attention=cfg.get("attention"))
    base.config.use_cache = False
    model = PeftModel.from_pretrained(base, start_dir, is_trainable=True)
    model.train()
    return model


def train_round(*, ref_dir, selected, out_dir, metrics_path, summary_path, ckpt_dir, cfg: dict, method: dict,
                round: int, start_dir=None, previous_proximal=None, chat_format: str = "model",
                logps_batch_size: int = 8) -> dict:
    """Train round `round` of `method` (its loss, hyperparameters and `rounds` settings) on the selected rows of
    `selected`, from the previous round's policy `start_dir` (None: round 1, from the reference `ref_dir`);
    writes the round's policy to `out_dir` (with APO's extrapolation, from `previous_proximal`: the previous
    round's π̂, None in round 1), the per-step metrics and the summary; resumes from `ckpt_dir`."""
    rounds = method["rounds"]
    loss_name = method["loss"]
    kind = data_kind(loss_name)
    hparams = hyperparameters(method)
    losses.check_hyperparameters(loss_name, hparams, where=f"method {method.get('name', loss_name)}")
    alpha = float(rounds.get("extrapolation", 0.0))
    reference = rounds.get("reference", "initial")
    if cfg.get("sharding", "none") != "none":
        raise ValueError("train_round: training.sharding full is not supported for rounds yet (set sharding none)")
    if cfg.get("snapshot_every"):
        raise ValueError("train_round: a round keeps no snapshots (snapshot_every must be 0)")
    tok = load_tokenizer(ref_dir)
    items, tok_summary = tokenize_rows(tok, io.read_jsonl(selected), kind=kind, max_length=cfg["max_length"],
                                       max_prompt_length=cfg["max_prompt_length"], chat_format=chat_format,
                                       reference_sample=loss_name in ol.NEEDS_REFERENCE_SAMPLES)
    world = dist_.setup("none")
    device = world.device
    check_attention(cfg, device)
    check_precision(cfg["precision"], device)
    model = _load_start(ref_dir, start_dir, cfg, device)
    lora = cfg["finetuning"] == "lora"
    top = trunk_.top_layers_of(cfg)
    layer = trunk_.depth(dist_.unwrap(model).config.num_hidden_layers, top) if top else None
    if layer is not None:
        trunk_.check_frozen(model, layer)
    pad = tok.pad_token_id
    # the log-probs the loss needs, before any update: the reference's (adapter off, or the reference model),
    # and the previous round's policy's (the model as loaded; in round 1 the reference itself)
    model.eval()
    ref_model = None
    if lora:
        with dist_.unwrap(model).disable_adapter():
            ref_lp = logps_pass(model, items, pad, device, batch_size=logps_batch_size, precision=cfg["precision"],
                                layer=layer)
    else:
        ref_model = load_model(ref_dir, dtype="float32", device=device, attention=cfg.get("attention")).eval()
        ref_lp = logps_pass(ref_model, items, pad, device, batch_size=logps_batch_size, precision=cfg["precision"])
    needs_prev = loss_name in ol.NEEDS_PREVIOUS or reference == "previous"
    if needs_prev and start_dir is not None:
        prev_lp = logps_pass(model, items, pad, device, batch_size=logps_batch_size, precision=cfg["precision"])
    else:
        prev_lp = ref_lp  # round 1: the previous policy is the reference
    for it, r, p in zip(items, ref_lp, prev_lp):
        it["ref"], it["prev"] = r, p
    if kind != "kept":
        ref_model = None  # only SuperHF needs the reference during training
    model.train()
    if kind == "pairs":
        step_fn = pair_step(loss_name, hparams, reference=reference, pad_id=pad, device=device,
                            precision=cfg["precision"], layer=layer)
    elif kind == "kept":
        step_fn = superhf_step(hparams, reference_model=ref_model, pad_id=pad, device=device,
                               precision=cfg["precision"], layer=layer)
    else:
        step_fn = rloo_step(loss_name, hparams, pad_id=pad, device=device, precision=cfg["precision"], layer=layer)
    identity = {"stage": "round", "round": round, "config": _run_cfg(cfg), "method": method,
                "reference_model": _fingerprint_on_main(ref_dir, world),
                "start_model": _fingerprint_on_main(start_dir, world) if start_dir else None,
                "data": items_fingerprint(items),
                "logps": checkpoint.tensors_fingerprint(torch.tensor([x for r in ref_lp for x in r]),
                                                        torch.tensor([x for p in prev_lp for x in p]))}
    model, info = run_loop(model=model, items=items, step_fn=step_fn, cfg=cfg, metrics_path=metrics_path,
                           ckpt_dir=ckpt_dir, identity=identity,
                           desc=f"round {round} {method.get('name', loss_name)}", world=world)
    # an adapter names the reference as its base; a whole model counts its kept updates against its start
    save_start = ref_dir if lora else (start_dir or ref_dir)
    post = None
    if alpha:
        with io.atomic_dir(out_dir) as tmp:
            proximal = Path(tmp) / PROXIMAL
            saved = save_trained(model, world, tok, proximal, start_dir=save_start, cfg=cfg, merge=False)
            if lora:
                post = apo.extrapolate_lora(proximal, previous_proximal, alpha, tmp)
            else:
                post = apo.extrapolate_full(proximal, previous_proximal or ref_dir, alpha, tmp)
    else:
        saved = save_trained(model, world, tok, out_dir, start_dir=save_start, cfg=cfg, merge=False)
    summary = {**info, "round": round, "tokenization": tok_summary, "config": cfg, "method": method,
               "reference_model": str(ref_dir), "start_model": str(start_dir) if start_dir else None,
               "attention": attention_of(model), "saved": saved, "extrapolation": post,
               "trunk_layer": layer, "reference_logps": "previous policy" if reference == "previous" else "initial"}
    io.write_json(summary_path, summary, sort_keys=True)
    checkpoint.clear(ckpt_dir, world)
    return summary
