"""Processes and model wrapping, in the manner of torchtitan's parallelize.py: the model stays single-device code;
`parallelize` shards it on the meta device (tensor parallel, FP8, activation checkpointing, compile per block,
FSDP2, expert parallel) while build.py builds it, and `wrap` puts DDP or torch.compile around it once allocated.

    one process: nothing to wrap        DDP: replicas, gradients all-reduced once per step
    FSDP2: `fully_shard` per block and at the root, BF16 compute, FP32 (or BF16) gradient reduce-scatter
    FSDP2 + TP (train.tp): a (pp, dp, tp) mesh; `tensor_parallel` splits within tp, FSDP2 shards across dp
    expert parallel (train.ep, with FSDP2): each rank keeps its whole experts; tokens travel by all-to-all
    pipeline parallel (train.pp): pipeline.py cuts the model into a rank's stages first and runs torch's schedule
"""
import functools
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd as all_to_all
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

import config
import kernel
from model import GPT, MoE, swiglu_experts


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


def tensor_parallel(model: GPT, mesh: DeviceMesh) -> None:
    """Split `model` (on the meta device) over the 1-D tensor-parallel `mesh`, Megatron-style with sequence parallel
    (Korthikanti et al. 2022), through torch's parallel styles. Between blocks the residual stream is split by
    sequence (B, T / tp, d); each norm works on its part (SequenceParallel, weights replicated); before attention
    and the MLP it is gathered (PrepareModuleInput); q/k/v and gate/up are split by output columns (whole heads:
    n_head / tp query and n_kv_head / tp key/value heads per rank), o_proj and down_proj by input rows, and their
    partial sums are reduce-scattered back to sequence parts. The token (and GPT-2 position) embedding is split by
    rows, the head by vocab: the final norm's output is gathered whole, and the loss (kernel.vocab_parallel_loss)
    or the logits (gathered) come from the vocab shards. A tied head and embedding share one Shard(0) weight."""
    top = {"embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
           "norm": SequenceParallel(),
           "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    if model.cfg.arch == "gpt2":  # positions (T,) -> (T / tp, d): the same sequence part as the tokens'
        top["embed_positions"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))
    # a pipeline stage splits the ends it holds; the residual stream it sends on is the sequence part of each rank
    parallelize_module(model, mesh, {k: v for k, v in top.items() if getattr(model, k) is not None})
    # the loss reads lm_head's weight, not the module: it gets the final norm's output whole, as a DTensor
    whole = PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False)
    if model.norm is not None:
        parallelize_module(model.norm, mesh, whole)
    if model.cfg.tie_embeddings:  # parallelize_module gave each its own DTensor; both are Shard(0) of (V, d)
        model.lm_head.weight = model.embed_tokens.weight
    gathered = dict(input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None))
    for block in model.layers:
        plan = {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                "self_attn": PrepareModuleInput(**gathered),  # (x, rope, cache): only x is split
                "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))}
        if hasattr(block.mlp, "gate_proj"):
            plan["mlp.gate_proj"] = ColwiseParallel()
        if hasattr(block.self_attn, "q_norm"):  # per head over (B, T, H / tp, D): heads are the split dim
            plan["self_attn.q_norm"] = plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2,
                                                                                   use_local_output=True)
        parallelize_module(block, mesh, plan)


def device_mesh(run: config.Run) -> DeviceMesh | None:
    """The (pp, dp, tp) mesh of a tensor- or pipeline-parallel run: a tp group is consecutive ranks (one node's GPUs
    over NVLink), a pipeline's stages are dp x tp ranks apart (across nodes), as config.Run's dp_rank and pp_rank
    read it; None without either (FSDP2 and DDP take the whole world)."""
    if run.tp == run.pp == 1:
        return None
    return init_device_mesh(run.device.type, (run.pp, run.dp, run.tp), mesh_dim_names=("pp", "dp", "tp"))


def parallelize(model: GPT, run: config.Run) -> None:
    """Shard `model` (on the meta device) for the run, in place, as the module docstring lists. Under FSDP2
    `torch.compile` applies per block (in place, so the state-dict names stay; the gathers stay outside the graphs)."""
    t, device, fsdp = run.cfg.train, run.device, run.mode == "fsdp"
    mesh = device_mesh(run)
    if mesh is not None and run.pp > 1:  # first: the rank's stages, which pipeline.Pipeline runs (wrap)
        import pipeline  # torch.distributed.pipelining takes half a second to import: only pipeline runs pay it
        pipeline.split(model, run, mesh)
    if mesh is not None and run.tp > 1:  # as torchtitan: checkpointing, compile and FSDP2 then see the split modules
        tensor_parallel(model, mesh["tp"])
        if t.compile and model.embed_tokens is not None:
            # The embedding's output is a view of its DTensor's local part; a compiled block given that view as its
            # input returned a zero gradient for it (torch 2.13, CPU), so the embedding never learned. A copy.
            model.embed_tokens.register_forward_hook(lambda module, args, out: out.clone())
    if t.precision == "fp8":
        kernel.convert_to_float8(model, fsdp=fsdp)
    # Under tensor parallel a checkpointed block is compiled inside the checkpoint: torch 2.13's compiled checkpoint
    # of a block with DTensors failed in AOTAutograd (it saved the DeviceMesh as if it were a tensor)
    inner = t.compile and t.activation_checkpointing and mesh is not None
    for block in model.layers:
        if inner:
            block.forward = torch.compile(block.forward)
        if t.activation_checkpointing:  # keep only each block's input; recompute the rest in backward
            block.forward = (lambda fwd: lambda *a, **k: recompute(fwd, *a, use_reentrant=False, **k))(block.forward)
        if t.compile and fsdp and not inner:
            block.compile()
    if fsdp:
        half = {"fp32": None, "fp16": torch.float16}.get(t.precision, torch.bfloat16)  # fp8 gathers BF16 too
        # cast_forward_inputs off: a block's inputs are the BF16 residual stream, which needs no cast, and the FP32
        # RoPE table, which must stay FP32 (cast per block it lost precision and cost a copy each time)
        mp = MixedPrecisionPolicy(param_dtype=half, cast_forward_inputs=False,
                                  reduce_dtype=torch.bfloat16 if t.reduce_dtype == "bf16" else torch.float32)
        # FSDP2 over the data-parallel ranks (the dp side of a TP mesh, else all of them); expert parallel's experts,
        # sharded over the same ranks, are left to it
        dp_mesh = mesh["dp"] if mesh is not None else init_device_mesh(device.type, (dist.get_world_size(),))
        experts = expert_parallel(model, dp_mesh) if t.ep > 1 else set()
        # a pipeline stage's blocks stay gathered from the first micro-batch's forward to the last one's backward
        shard = dict(mesh=dp_mesh, mp_policy=mp, reshard_after_forward=t.reshard_after_forward and run.pp == 1,
                     ignored_params=experts)
        for block in model.layers:
            fully_shard(block, **shard)
        for root in [part for _, part in model.stages] if run.pp > 1 else [model]:  # each stage is a root
            fully_shard(root, **shard)


def wrap(model: GPT, run: config.Run) -> nn.Module:
    """The module the training step calls, once `model` holds its weights: DDP for a DDP run, torch.compile of the
    whole model (head and loss included) unless FSDP2 compiled it per block. `model` itself stays the uncompiled
    module, not wrapped by DDP, for evaluation and checkpoints (under FSDP2 it is the sharded root)."""
    if run.mode == "fsdp" and run.pp > 1:  # (a pipeline-parallel run is an FSDP2 one)
        import pipeline
        return pipeline.Pipeline(model, run)
    if run.mode == "fsdp":
        return model
    wrapped = model
    if run.mode == "ddp":
        wrapped = DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                      gradient_as_bucket_view=True,  # gradients live in the buckets: no second copy
                      broadcast_buffers=False)  # the RoPE table and routing biases agree on every rank already
    return torch.compile(wrapped) if run.cfg.train.compile else wrapped


def expert_parallel(model: GPT, mesh) -> set[nn.Parameter]:
    """Shard every MoE layer's experts over `mesh` (on the meta device) as DTensors of whole experts (Shard(0)), so
    init and checkpoints see the global tensor; `run_experts` becomes `_dispatch`. Returns them for FSDP2 to skip."""
    params = set()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        for name, p in list(moe.experts.named_parameters(recurse=False)):
            local = torch.empty((p.size(0) // mesh.size(), *p.shape[1:]), device="meta", dtype=p.dtype)
            sharded = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
            setattr(moe.experts, name, sharded)
            params.add(sharded)
        moe.run_experts = functools.partial(_dispatch, moe, mesh.get_group())
    return params


class _ScaleGrad(torch.autograd.Function):
    """The identity, whose backward scales the gradient."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _dispatch(moe: MoE, group, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """MoE.run_experts under expert parallel: the rows of xs (grouped by expert, counts (E,) per expert) go to the
    ranks that hold their experts (all-to-all), run there and come back in order. An expert's gradient sums every
    rank's tokens while each loss is a mean of its own batch, so it is divided by the world size, as FSDP2 does."""
    world = dist.get_world_size(group)
    mine = counts.numel() // world  # experts per rank
    with torch.no_grad():
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=group)  # got[r * mine + e]: rows rank r sends to my expert e
        got = got.view(world, mine)
        send, recv = torch.stack([counts.view(world, mine).sum(dim=1), got.sum(dim=1)]).tolist()  # one host read
    xr = all_to_all(xs.contiguous(), recv, send, group)
    # arrived by (source rank, my expert): group the rows by my expert for the grouped GEMMs, then put them back
    expert = torch.arange(mine, device=xs.device).repeat(world).repeat_interleave(got.flatten(), output_size=sum(recv))
    order = expert.argsort(stable=True)
    w = [_ScaleGrad.apply(p.to_local(), 1.0 / world) for p in (moe.experts.gate_proj, moe.experts.up_proj,
                                                                moe.experts.down_proj)]
    ys = swiglu_experts(moe.ops.grouped_mm, xr[order], *w, got.sum(dim=0))
    yr = torch.empty_like(ys).index_copy(0, order, ys)
    return all_to_all(yr, send, recv, group)


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
