"""Decoding-time alignment transfer, the `fusion` generation backend: proxy tuning and Dynamic Logits Fusion.

A fused model decodes a large model with what small tuned models learned added to its logits,

    P̃(x_k | x_<k) = softmax( M_L + Σ_t α_t (M_S,t − M_S) )

(Fan et al., "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits Fusion", NeurIPS 2024,
arXiv 2406.15480, Sec. "Problem Background" eq. 2 for one expert and Sec. "Extending to the Fusion of Multiple
SLMs" for T experts; M_L, M_S and M_S,t are the next-token logits of the large model, of the small model the
experts were tuned from, and of expert t). No weight changes: only the three kinds of models' outputs meet.
P = softmax(M_L), Q = softmax(M_S), Q_t = softmax(M_S,t).

alpha a number: every α_t is that number at every step. α = 1 with one expert is proxy tuning (Liu et al.,
"Tuning Language Models by Proxy", 2024, arXiv 2401.08565: large base + (small tuned − small base)); α = 0 is
the large model itself.

alpha "dynamic": α is chosen at every decoding step for every sequence, by the search of Fan et al.'s Algorithm
"Adaptive Logits-Arithmetic" (their appendix "Pseudo Code"): over the grid α ∈ {0, 0.1, ..., 2.0} it keeps the
α with the smallest

    L(α) = Σ_t [ (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))² ]

(Sec. "Adaptive Knowledge Transfer Optimization", eq. 3, summed over the experts as in the multi-SLM section):
the fused model is moved as far from the large model as each expert moved from the small one, in both
directions of the KL. Several experts are searched as the paper's multi-task setting does (the algorithm's
comment "perform α search only for one task, for a total of T times" and Sec. "Efficiency Analysis": a single
expert transfers at each step): the candidates are α = g·e_t for every expert t and grid point g, T × 21
evaluations instead of 21^T, each scored by the objective summed over all T experts. A candidate replaces the
best only when its L is strictly smaller (the algorithm's `if L < m`), so ties go to the first candidate in
the order expert 1, ..., T and, within an expert, ascending α. (The paper's appendix proof restates the
multi-expert objective with the two KL pairings swapped; we follow eq. 3 and the algorithm, as docs/fusion.md
writes it.) The authors' repository (github.com/Facico/Dynamic-Logit-Fusion)
holds a README only ("Coming Soon", commit dc44066), so this follows the paper's text.

How it runs (docs/fusion.md): `FusedLM` is an nn.Module that answers rpo.sampling's model call (input ids,
attention mask, positions, a KV cache, logits_to_keep) with log P̃ as its logits and one KV cache per part, so
every answer stage decodes it with the HF backend's own batched sampler: the same prompts, stop tokens,
seeded top-k/top-p sampling, resumable `.partial` files. Its state dict holds every part's weights and a
`fusion_settings` buffer (α, the grid, the parts' names), so rpo.sampling.model_fingerprint, which binds a
resumable answer file to the weights that made it, binds all the models and α.

A fused model is a directory holding `fusion.json` (make_fused_model writes it; rule make_fused_model):

    {"format": "rpo-fusion/1", "name": ..., "alpha": "dynamic" | number, "alpha_grid": {"max": 2.0, "step": 0.1},
     "vocab_check": "exact" | "size",
     "large": PART, "small": PART | null, "experts": [PART, ...]}
    PART = {"name": <as configured>, "ref_dir": <model directory>, "policy_dir": <adapter or full model> | null}

loaded by `load_fused` (each part as rpo.models.load_policy loads a policy: a LoRA adapter merged into its own
copy of its base; parts that are the same (ref_dir, policy_dir) are one module, run once per step).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rpo import io
from rpo.models import load_policy, load_tokenizer, resolve_model_dir

log = logging.getLogger(__name__)

FORMAT = "rpo-fusion/1"
SPEC = "fusion.json"
DYNAMIC = "dynamic"
VOCAB_CHECKS = ("exact", "size")
# Rows x vocabulary entries fused at once: bounds the search's temporaries (a 256k vocabulary gives 256 rows).
CHUNK_ELEMENTS = 1 << 26


# ---------------------------------------------------------------------------------------------------
# The fusion math (pure functions over log-probabilities [..., V])
# ---------------------------------------------------------------------------------------------------

def grid_values(max_alpha: float = 2.0, step: float = 0.1) -> list[float]:
    """The α values the dynamic search tries: 0, step, ..., max_alpha (Fan et al.: [0, 2], step 0.1)."""
    if step <= 0 or max_alpha < 0:
        raise ValueError(f"fusion.alpha_grid: max {max_alpha} and step {step}; expected max >= 0 and step > 0")
    n = round(max_alpha / step)
    if abs(n * step - max_alpha) > 1e-9 * max(1.0, max_alpha):
        raise ValueError(f"fusion.alpha_grid: max {max_alpha} is not a multiple of step {step}")
    return [round(i * step, 12) for i in range(n + 1)]


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_x p(x) (log p(x) − log q(x)) over the last dimension, from log-probabilities; a token with
    p(x) = 0 adds nothing (also where log p is −inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def fused_logprobs(lp_large: torch.Tensor, deltas: list[torch.Tensor], alpha) -> torch.Tensor:
    """log P̃ = log_softmax(log P + Σ_t α_t d_t), d_t = log Q_t − log Q (each log-softmax differs from the
    logits by a constant per row, which the softmax removes: this is eq. 2's M_L + Σ α_t (M_S,t − M_S)).
    `alpha`: a number (every expert), or a tensor [..., T] (one α per row and expert)."""
    z = lp_large
    for t, d in enumerate(deltas):
        a = alpha if isinstance(alpha, (int, float)) else alpha[..., t:t + 1]
        z = z + a * d
    return torch.log_softmax(z, dim=-1)


def dlf_objective(lp_fused: torch.Tensor, lp_large: torch.Tensor, target_fwd: torch.Tensor,
                  target_rev: torch.Tensor) -> torch.Tensor:
    """Fan et al.'s L per row: Σ_t (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))²; the targets are [..., T]."""
    fwd = kl(lp_fused, lp_large)[..., None]
    rev = kl(lp_large, lp_fused)[..., None]
    return ((fwd - target_fwd) ** 2 + (rev - target_rev) ** 2).sum(-1)


def expert_targets(lp_small: torch.Tensor, lp_experts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """([..., T] KL(Q_t‖Q), [..., T] KL(Q‖Q_t)): how far each expert moved from the small model, both ways."""
    fwd = torch.stack([kl(lp_t, lp_small) for lp_t in lp_experts], dim=-1)
    rev = torch.stack([kl(lp_small, lp_t) for lp_t in lp_experts], dim=-1)
    return fwd, rev


def search_alpha(lp_large: torch.Tensor, lp_small: torch.Tensor, lp_experts: list[torch.Tensor],
                 grid: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the α of Fan et al.'s algorithm: ([..., T] α with one non-zero entry at most, [...] its L).
    Candidates g·e_t in the order t = 1..T, g ascending; the first minimum wins (torch.argmin's ties)."""
    deltas = [lp_t - lp_small for lp_t in lp_experts]
    target_fwd, target_rev = expert_targets(lp_small, lp_experts)
    losses = []
    for d in deltas:
        for g in grid:
            losses.append(dlf_objective(torch.log_softmax(lp_large + g * d, dim=-1), lp_large, target_fwd,
                                        target_rev))
    losses = torch.stack(losses, dim=-1)  # [..., T * G]
    best = losses.argmin(dim=-1)
    n_grid = len(grid)
    alpha = torch.zeros(*lp_large.shape[:-1], len(lp_experts), dtype=lp_large.dtype, device=lp_large.device)
    alpha.scatter_(-1, (best // n_grid)[..., None],
                   torch.tensor(grid, dtype=lp_large.dtype, device=lp_large.device)[best % n_grid][..., None])
    return alpha, losses.gather(-1, best[..., None]).squeeze(-1)


def fuse(m_large: torch.Tensor, m_small: torch.Tensor | None, m_experts: list[torch.Tensor], alpha,
         grid: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P̃ [..., V], α used [..., T]) from the parts' logits [..., V]. `alpha`: DYNAMIC (the search, per
    row) or a number. Computed in float32 at least, in chunks of rows (CHUNK_ELEMENTS) so that the search's
    temporaries stay bounded whatever the batch, sequence and vocabulary."""
    dtype = torch.promote_types(m_large.dtype, torch.float32)
    n_exp = len(m_experts)
    if n_exp and m_small is None:
        raise ValueError("fusion: experts without the small model they were tuned from")
    lead, vocab = m_large.shape[:-1], m_large.shape[-1]
    flat = [m.reshape(-1, vocab).to(dtype) for m in (m_large, *([m_small] if n_exp else []), *m_experts)]
    rows = flat[0].shape[0]
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    out, alphas = [], []
    for start in range(0, rows, step):
        chunk = [torch.log_softmax(m[start:start + step], dim=-1) for m in flat]
        lp_large = chunk[0]
        if not n_exp:
            out.append(lp_large)
            alphas.append(lp_large.new_zeros(lp_large.shape[0], 0))
            continue
        lp_small, lp_experts = chunk[1], chunk[2:]
        if alpha == DYNAMIC:
            a, _ = search_alpha(lp_large, lp_small, lp_experts, grid)
        else:
            a = lp_large.new_full((lp_large.shape[0], n_exp), float(alpha))
        out.append(fused_logprobs(lp_large, [lp_t - lp_small for lp_t in lp_experts], a))
        alphas.append(a)
    lp = torch.cat(out)
    if not torch.isfinite(lp).all():  # a part's logits held inf or NaN: never sample from that
        raise ValueError("fusion: the fused log-probabilities are not finite (a part's logits hold inf or NaN)")
    return lp.reshape(*lead, vocab), torch.cat(alphas).reshape(*lead, n_exp)


def check_alpha(alpha, where: str = "alpha"):
    if alpha == DYNAMIC:
        return alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"{where}: {alpha!r}; expected {DYNAMIC!r} or a number >= 0")
    return float(alpha)


# ---------------------------------------------------------------------------------------------------
# The fused model: what rpo.sampling.sample calls
# ---------------------------------------------------------------------------------------------------

@dataclass
class FusedOutput:
    logits: torch.Tensor  # log P̃, [B, L, V]
    past_key_values: "FusedCache | None"
    alpha: torch.Tensor  # the α each position was decoded with, [B, L, T]


class FusedCache:
    """One KV cache per distinct part, moved together (rpo.sampling repeats a prompt's cache per sample)."""

    def __init__(self, caches: list):
        self.caches = caches

    def batch_repeat_interleave(self, n: int) -> None:
        for c in self.caches:
            c.batch_repeat_interleave(n)


class FusedLM(torch.nn.Module):
    """A causal LM whose next-token log-probabilities are log P̃ (module docstring). `small` and `experts` may
    be the same module objects as each other or as `large` (then run once). `width`: the logits kept of every
    part (a vocabulary padded beyond the tokenizer differs between sizes of one family). `record_alpha`: keep
    every call's α in `alpha_trace` (tests, benchmarks)."""

    def __init__(self, large, small=None, experts=(), *, alpha=DYNAMIC, grid=None, names: dict | None = None,
                 width: int | None = None, record_alpha: bool = False):
        super().__init__()
        experts = list(experts)
        if experts and small is None:
            raise ValueError("fusion: experts need the small model they were tuned from")
        self.large, self.small, self.experts = large, small, torch.nn.ModuleList(experts)
        self.alpha = check_alpha(alpha)
        self.grid = list(grid) if grid is not None else grid_values()
        self.width = width
        self.config = large.config
        self.record_alpha = record_alpha
        self.alpha_trace: list[torch.Tensor] = []
        roles = [large, *([small] if experts else []), *experts]
        self._distinct = []  # each module once, in first-use order
        self._role_index = []
        for m in roles:
            i = next((j for j, d in enumerate(self._distinct) if d is m), None)
            if i is None:
                self._distinct.append(m)
                i = len(self._distinct) - 1
            self._role_index.append(i)
        settings = {"format": FORMAT, "alpha": self.alpha, "grid": self.grid, "width": width, "names": names or {},
                    "parts": self._role_index}
        blob = json.dumps(settings, sort_keys=True).encode()
        # In the state dict, so that rpo.sampling.model_fingerprint binds α and the roles with the weights.
        self.register_buffer("fusion_settings", torch.tensor(list(blob), dtype=torch.uint8))

    @property
    def device(self):
        return next(self.large.parameters()).device

    def tie_weights(self):
        """Each part ties its own weights when it loads (called by lm-eval's HFLM)."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0, **_):
        caches = past_key_values.caches if past_key_values is not None else [None] * len(self._distinct)
        outs = [m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  past_key_values=c, use_cache=use_cache, logits_to_keep=logits_to_keep)
                for m, c in zip(self._distinct, caches)]
        logits = [outs[i].logits[..., :self.width] if self.width else outs[i].logits for i in self._role_index]
        n_exp = len(self.experts)
        lp, alpha = fuse(logits[0], logits[1] if n_exp else None, logits[2:] if n_exp else [], self.alpha, self.grid)
        if self.record_alpha:
            self.alpha_trace.append(alpha[:, -1].detach().cpu())
        cache = FusedCache([o.past_key_values for o in outs]) if use_cache else None
        return FusedOutput(logits=lp, past_key_values=cache, alpha=alpha)


# ---------------------------------------------------------------------------------------------------
# Fused model directories
# ---------------------------------------------------------------------------------------------------

def is_fused_dir(path) -> bool:
    return (Path(path) / SPEC).is_file()


def _check_part(part, where: str) -> dict:
    if not isinstance(part, dict) or not isinstance(part.get("ref_dir"), str):
        raise ValueError(f"{where}: expected {{'name', 'ref_dir', 'policy_dir'}}, got {part!r}")
    return part


def read_spec(model_dir) -> dict:
    """The fused model's fusion.json, checked (errors name the file and the field)."""
    path = Path(model_dir) / SPEC
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a fused model directory (no {SPEC}; rule make_fused_model "
                                "writes one)")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if spec.get("format") != FORMAT:
        raise ValueError(f"{path}: format {spec.get('format')!r}; expected {FORMAT!r}")
    _check_part(spec.get("large"), f"{path}: large")
    experts = spec.get("experts")
    if not isinstance(experts, list):
        raise ValueError(f"{path}: experts must be a list")
    for i, e in enumerate(experts):
        _check_part(e, f"{path}: experts[{i}]")
    if experts:
        _check_part(spec.get("small"), f"{path}: small")
    check_alpha(spec.get("alpha"), f"{path}: alpha")
    if spec.get("vocab_check") not in VOCAB_CHECKS:
        raise ValueError(f"{path}: vocab_check {spec.get('vocab_check')!r}; expected one of {list(VOCAB_CHECKS)}")
    grid = spec.get("alpha_grid") or {}
    grid_values(grid.get("max", -1), grid.get("step", 0))  # raises on a bad grid
    return spec


def _tokenizer(ref_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(ref_dir))


def check_vocabularies(tok, others: dict, mode: str = "exact", where: str = "fusion") -> None:
    """Every part must map token ids to the same tokens as the large model's tokenizer `tok` (logit arithmetic
    adds the parts' logits id by id). `others`: name -> tokenizer. mode "size": only the vocabulary sizes must
    agree, the differing ids are logged (e.g. special tokens renamed at the same ids across a model family)."""
    mine = {i: t for t, i in tok.get_vocab().items()}
    for name, other in others.items():
        theirs = {i: t for t, i in other.get_vocab().items()}
        if len(theirs) != len(mine):
            raise ValueError(f"{where}: {name}'s tokenizer has {len(theirs)} tokens, the large model's {len(mine)}; "
                             "the parts of a fused model must share one vocabulary")
        diff = sorted(i for i in mine if mine[i] != theirs.get(i))
        if not diff:
            continue
        shown = ", ".join(f"{i}: {mine[i]!r} vs {theirs.get(i)!r}" for i in diff[:5])
        if mode == "exact":
            raise ValueError(f"{where}: {name}'s tokenizer maps {len(diff)} ids to other tokens than the large "
                             f"model's ({shown}); the parts must share one vocabulary (vocab_check: size accepts "
                             "tokens renamed at the same ids)")
        log.warning("%s: %s's tokenizer names %d ids differently (%s); vocab_check is 'size', so they are taken as "
                    "the same tokens", where, name, len(diff), shown)


def _parts(spec: dict) -> dict[str, dict]:
    experts = spec["experts"]
    return {"large": spec["large"], **({"small": spec["small"]} if experts else {}),
            **{f"experts[{i}] ({e['name']})": e for i, e in enumerate(experts)}}


def check_spec_parts(spec: dict, where: str) -> None:
    """What a fused model can be checked for without loading weights: every part's directory is a model (or a
    LoRA adapter on one) and every part shares the large model's vocabulary."""
    for role, p in _parts(spec).items():
        resolve_model_dir(p["ref_dir"])  # raises naming the directory
        if p.get("policy_dir") and not Path(p["policy_dir"]).is_dir():
            raise FileNotFoundError(f"{where}: {role}: no policy directory {p['policy_dir']}")
    tok = _tokenizer(spec["large"]["ref_dir"])
    others = {role: _tokenizer(p["ref_dir"]) for role, p in _parts(spec).items() if role != "large"}
    check_vocabularies(tok, others, spec["vocab_check"], where)


def logits_width(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def load_fused(model_dir, dtype: str | None = None, device: str | None = None, record_alpha: bool = False):
    """(tokenizer, FusedLM) of a fused model directory: the large model's tokenizer (the prompts' token ids and
    the answers' text, as the HF backend); every part in `dtype` (None: float32), on `device` (None: CUDA when
    there is one)."""
    spec = read_spec(model_dir)
    where = str(Path(model_dir) / SPEC)
    check_spec_parts(spec, where)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded: dict[tuple, torch.nn.Module] = {}

    def load(p):
        key = (p["ref_dir"], p.get("policy_dir"))
        if key not in loaded:
            loaded[key] = load_policy(p["ref_dir"], p.get("policy_dir") or p["ref_dir"], device=device,
                                      dtype=dtype or "float32").eval()
        return loaded[key]

    large = load(spec["large"])
    small = load(spec["small"]) if spec["experts"] else None
    experts = [load(e) for e in spec["experts"]]
    tok = load_tokenizer(spec["large"]["ref_dir"])
    widths = {m: logits_width(m) for m in loaded.values()}
    width = min(widths.values())
    if width < len(tok):
        raise ValueError(f"{where}: a part has {width} logits, fewer than the {len(tok)} tokens of the large model's "
                         "tokenizer")
    if len(set(widths.values())) > 1:
        log.info("%s: the parts' logits widths differ (%s); each is cut to %d, the ids past the tokenizer's %d tokens "
                 "being padding", where, sorted(set(widths.values())), width, len(tok))
    names = {"large": spec["large"]["name"], "small": (spec.get("small") or {}).get("name"),
             "experts": [e["name"] for e in spec["experts"]]}
    grid = grid_values(spec["alpha_grid"]["max"], spec["alpha_grid"]["step"])
    model = FusedLM(large, small, experts, alpha=spec["alpha"], grid=grid, names=names,
                    width=width if len(set(widths.values())) > 1 else None, record_alpha=record_alpha)
    log.info("%s: fused model %s = %s + α·(%s − %s), alpha %s, %d distinct model(s) in memory", where, spec["name"],
             names["large"], " + ".join(names["experts"]) or "nothing", names["small"], spec["alpha"], len(loaded))
    return tok, model.eval()


def make_fused_model(*, name: str, parts: dict, alpha, alpha_grid: dict, vocab_check: str, dirs: dict,
                     out: str) -> Path:
    """Write the fused model directory `out` (rule make_fused_model): its fusion.json. `parts`: {"large",
    "small", "experts"} as configured (names of the DAG's models or model sources, recorded as the parts'
    names); `dirs`: the same shape, each part's {"ref_dir", "policy_dir"} (the rule's inputs; a model source is
    materialised by rule materialise_fusion_source). The parts are checked (model directories, one vocabulary)
    before anything is written, so a fused model that cannot load fails here, not in every answer job."""
    experts = parts["experts"]
    if len(dirs["experts"]) != len(experts):
        raise ValueError(f"{out}: {len(experts)} experts configured, {len(dirs['experts'])} directories given")

    def part(configured: str, given: dict) -> dict:
        return {"name": configured, "ref_dir": given["ref_dir"], "policy_dir": given.get("policy_dir")}

    spec = {"format": FORMAT, "name": name, "alpha": check_alpha(alpha, f"fusion.models.{name}.alpha"),
            "alpha_grid": {"max": float(alpha_grid["max"]), "step": float(alpha_grid["step"])},
            "vocab_check": vocab_check, "large": part(parts["large"], dirs["large"]),
            "small": part(parts["small"], dirs["small"]) if experts else None,
            "experts": [part(e, d) for e, d in zip(experts, dirs["experts"])]}
    grid_values(spec["alpha_grid"]["max"], spec["alpha_grid"]["step"])  # raises on a bad grid
    if vocab_check not in VOCAB_CHECKS:
        raise ValueError(f"fusion.models.{name}.vocab_check {vocab_check!r}; expected one of {list(VOCAB_CHECKS)}")
    check_spec_parts(spec, f"fusion.models.{name}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / SPEC, spec, sort_keys=True)
    log.info("%s: %s", out / SPEC, json.dumps(spec))
    return out
