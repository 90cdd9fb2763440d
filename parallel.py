"""Processes and model wrapping, in the manner of torchtitan's parallelize.py: the model stays single-device code,
and `parallelize` applies FP8, activation checkpointing, torch.compile and FSDP2 or DDP to it for a run.

    one process: nothing to wrap        DDP: replicas, gradients all-reduced once per step
    FSDP2: `fully_shard` per block and at the root, BF16 compute, FP32 (or BF16) gradient reduce-scatter
"""
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

import config
import export
import kernels
import lora
from model import GPT


def init_distributed(device_name: str, timeout_s: int) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; joins the process group when world > 1: NCCL
    on CUDA, gloo on CPU, with a timeout that turns a dead or stuck peer into an error instead of a hang."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", local_rank) if cuda else None)
    return rank, local_rank, world


def print0(*args, **kwargs) -> None:
    """print on rank 0 only: one voice for the whole job."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


def any_rank(flag: bool, group) -> bool:
    """Whether `flag` is set on any rank (a CPU all-reduce: no device sync), so all ranks act together."""
    if group is None:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def parallelize(model: GPT, run: config.Run) -> nn.Module:
    """Apply the run's FP8, activation checkpointing, compile and FSDP2/DDP to `model`, built on the meta device,
    then materialise and initialise it (from train.seed, then train.init_from's weights); returns the module the
    training step calls. `model` itself stays the uncompiled, unwrapped-by-DDP module for evaluation and
    checkpoints (under FSDP2 it is the sharded root).

    Under FSDP2 each rank allocates only its shards; the initial values do not depend on the sharding, so 1 process, DDP
    and FSDP start from the same weights. `torch.compile` applies per block under FSDP2 (in place, so the state-dict
    names stay; the gathers stay outside the graphs), else to the whole model, head and loss included."""
    t, device, fsdp = run.cfg.train, run.device, run.mode == "fsdp"
    if t.lora:  # before any wrapping: FSDP2 and DDP see the frozen base and the adapters as they will train
        lora.apply(model, t)
    if t.precision == "fp8":
        kernels.convert_to_float8(model, fsdp=fsdp)
    for block in model.layers:
        if t.activation_checkpointing:  # keep only each block's input; recompute the rest in backward
            block.forward = (lambda fwd: lambda *a, **k: recompute(fwd, *a, use_reentrant=False, **k))(block.forward)
        if t.compile and fsdp:
            block.compile()
    if fsdp:
        half = {"fp32": None, "fp16": torch.float16}.get(t.precision, torch.bfloat16)  # fp8 gathers BF16 too
        # cast_forward_inputs off: a block's inputs are the BF16 residual stream, which needs no cast, and the FP32
        # RoPE table, which must stay FP32 (cast per block it lost precision and cost a copy each time)
        mp = MixedPrecisionPolicy(param_dtype=half, cast_forward_inputs=False,
                                  reduce_dtype=torch.bfloat16 if t.reduce_dtype == "bf16" else torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp, reshard_after_forward=t.reshard_after_forward)
        fully_shard(model, mp_policy=mp, reshard_after_forward=t.reshard_after_forward)
        model.to_empty(device=device)

        def assign(p, full):  # every rank draws the same full tensor (one parameter at a time), keeps its shard
            p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
        initialise(model, t, assign)
        return model
    model.to_empty(device=device)
    initialise(model, t)
    wrapped = model
    if run.mode == "ddp":
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      gradient_as_bucket_view=True)  # gradients live in the buckets: no second copy
    return torch.compile(wrapped) if t.compile else wrapped


def initialise(model: GPT, t: config.TrainConfig, assign=None) -> None:
    """Give `model` (allocated, maybe sharded) its starting values: train.seed's init, then train.init_from's
    weights (a Hugging Face folder or a run of ours), then LoRA's adapters. `assign(param, full_value)` stores a
    full value into a sharded parameter."""
    model.init_weights(t.seed, assign=assign)
    if t.init_from:
        export.load_init(model, t.init_from, assign)
    if t.lora:
        lora.init_adapters(model, t.seed, assign)


@contextmanager
def whole_model(model: nn.Module, mode: str, reshard_after_forward: bool):
    """Under FSDP2: every block's and the root's parameters gathered once on entry (the same all-gathers in the
    same order on every rank) and kept until exit, so that forwards inside run without collectives; then FSDP2's
    settings come back (the root never reshards after forward). Elsewhere: nothing to do."""
    if mode != "fsdp":
        yield
        return
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_reshard_after_forward(reshard_after_forward and m is not model, recurse=False)
            m.reshard()
