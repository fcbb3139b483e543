"""The processes of a training job and how the model is spread over them.

    one process         the model as it is (CPU or one GPU)
    sharding: none      W > 1 ranks, each with the whole model; gradients all-reduced (DDP)
    sharding: full      PyTorch FSDP2 (`fully_shard` on every decoder layer, then on the root): each rank
                        holds 1/W of every parameter, gradient and optimizer state (ZeRO-3's equivalent),
                        also at W = 1 (a one-process group), so the sharded path can be run anywhere

The ranks are started by `accelerate launch` / torchrun (rpo.launch), which sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous; the process group is created here, gloo on CPU and NCCL on GPU, so the
same code shards on a laptop and on a cluster: nothing falls back to another engine silently.

Rule for every function below that communicates: EVERY rank calls it, in the same order. The
trainer never calls a collective from rank 0 alone (the final save gathers on all ranks, then rank 0
writes while the others wait at a barrier).
"""
from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SHARDING = ("none", "full")
# Long enough for rank 0 to write a 7B model while the other ranks wait at the barrier after it.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device
    sharding: str  # "none" or "full"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(sharding: str = "none") -> World:
    """This process's place in the job; creates the process group when there is more than one rank, or
    when the model is to be sharded (FSDP2 needs a group, a one-process one at W = 1)."""
    if sharding not in SHARDING:
        raise ValueError(f"training.sharding: expected one of {SHARDING}, got {sharding!r}")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (size > 1 or sharding == "full") and not dist.is_initialized():
        if size == 1:  # a one-process group on loopback, for FSDP2 at W = 1
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT,
                                rank=int(os.environ.get("RANK", "0")), world_size=size)
        # The group this process created is destroyed before the interpreter finalises, however the
        # process ends: left to finalisation, gloo's worker threads can abort the rank (SIGABRT,
        # "terminate called without an active exception") after its work is done and saved.
        atexit.register(teardown)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return World(rank=rank, size=size, device=device, sharding=sharding)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks, named by the model's own `_no_split_modules` (transformers)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layer found to shard (the model names none "
                         "in _no_split_modules); use training.sharding: none")
    return layers


def wrap(model, world: World, *, precision: str):
    """Shard or replicate `model` over the world (see the module docstring). Call before creating the
    optimizer: FSDP2 replaces every parameter by its DTensor shard."""
    if world.sharding == "full":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 parameters in forward and backward, fp32 master weights (the shards the optimizer steps)
        # and fp32 gradient reduction: the authors' bf16 recipe under ZeRO-3.
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if precision == "bfloat16" else MixedPrecisionPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    return model


def unwrap(model):
    """The module whose parameter names are the model's own (DDP adds `module.`; FSDP2 adds nothing)."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def no_sync(model, enabled: bool):
    """Accumulate this micro-batch's gradient locally (no all-reduce / reduce-scatter) when `enabled`."""
    if not enabled:
        yield
        return
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global gradient norm; with DTensor shards the norm is reduced over the ranks."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed or world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank (every rank calls it)."""
    if not world.distributed or world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed and world.size > 1:
        dist.barrier()


def trainable_state(model, world: World) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) trainable parameters on rank 0's CPU, None on the other ranks.

    Every rank must call it: under FSDP2 each parameter is all-gathered from its shards.
    """
    inner = unwrap(model)
    if is_sharded(inner):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(inner, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        return sd if world.main else None
    if not world.main:
        return None
    return {k: v.detach().cpu().clone() for k, v in inner.named_parameters() if v.requires_grad}
