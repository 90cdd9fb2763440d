"""One optimizer step, as train.py and bench.py both take it: micro-batches with gradient accumulation (gradients
synchronised once per step), clip, the non-finite skip decided on the device, the optimizer step. `first_step`
wraps a run's first step: the compile watch, and the fall-back to torch's kernels when a faster one fails there.
"""
import math
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

import config
import kernel
from model import GPT, MoE
from parallel import any_rank


def sync_grads(train_model: nn.Module, mode: str, last_micro: bool, defer_fsdp: bool):
    """Context for one micro-step's backward: DDP reduces gradients on the last micro-step only; FSDP2
    reduce-scatters every micro-step (gradients stay sharded) unless told to defer."""
    if mode == "ddp" and not last_micro:
        return train_model.no_sync()
    if mode == "fsdp" and defer_fsdp:
        train_model.set_requires_gradient_sync(last_micro)
    return nullcontext()


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can take the skip flag as `found_inf` and decide on the device (no host sync):
    fused AdamW on CUDA and CPU. The MPS fused kernels, the non-fused paths and Muon refuse it."""
    fused = all(g.get("fused") for g in optimizer.param_groups)
    device = optimizer.param_groups[0]["params"][0].device
    return type(optimizer) is torch.optim.AdamW and fused and device.type in ("cuda", "cpu")


def train_step(model: GPT, train_model: nn.Module, optimizer, batches, run: config.Run,
               scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over run.grad_accum micro-batches (x, y) already on the device; returns the summed
    micro-batch losses, the gradient norm before clipping and a flag (1.0) for a skipped step, all left on the
    device (no host sync where the optimizer can skip on the device).

    A step whose loss (on any rank) or gradient norm is not finite is skipped: fused AdamW's `found_inf` input
    (the mechanism GradScaler uses) makes it leave weights, moments and step count exactly as they were,
    decided on the device; other optimizers are not stepped, which costs one host read of the flag. The data
    moves on, so a bad batch is not retried. With FP16's `scaler` the loss is scaled, the gradients unscaled
    before clipping, and the same flag is the scaler's found-inf: it backs off on exactly the skipped steps. An
    MoE model's routing biases then take their balancing step (`balance_experts`), not on a skipped step."""
    t, accum, mode = run.cfg.train, run.grad_accum, run.mode
    loss_sum, experts = 0.0, [m for m in model.modules() if isinstance(m, MoE)]
    for m in experts:  # counts of a step that raised (a first step run again) do not carry over
        m.load = None
    for micro, (x, y) in enumerate(batches):
        with sync_grads(train_model, mode, micro == accum - 1, t.fsdp_defer_sync):
            with run.precision.autocast(run.device):
                loss = train_model(x, y)
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        loss_sum = loss_sum + loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = clip_grads(model, t.grad_clip)
    bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
    if mode != "none":  # a loss is per rank; every rank must skip alike (no host sync on NCCL)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if scaler is not None:
        # The scaler's own check looks at this rank's gradients only (a shard of them under FSDP2), so ranks
        # could disagree; its update reads the found-inf recorded by unscale_(), which becomes the global flag.
        scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = {bad.device: bad}
    if skips_on_device(optimizer):
        optimizer.found_inf = bad
        optimizer.step()
    elif not bad.item():
        optimizer.step()
    if scaler is not None:
        scaler.update()
    if experts:
        balance_experts(experts, bad, mode)
    optimizer.zero_grad(set_to_none=True)
    if t.precision == "fp8" and mode == "fsdp":
        kernel.precompute_float8_scales(model)
    return loss_sum, grad_norm, bad


def clip_grads(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a global norm of at most `max_norm` (0: no clipping); returns the norm before, a plain
    tensor. Under FSDP2 (and tensor parallel) the gradients are DTensors and torch's norm is one over the whole mesh:
    a sharded gradient counts each element once, a replicated one (a norm weight under tensor parallel) once."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def balance_experts(experts: list[MoE], bad: torch.Tensor, mode: str) -> None:
    """After the optimizer step, not part of it: each MoE layer's tokens per expert over this step's micro-batches,
    summed over the data-parallel ranks (one all-reduce for all layers), move its routing bias (MoE.update_bias),
    the same on every rank; a skipped step (`bad`) leaves the biases as they were. The summed counts stay on each
    layer as `last_load` for the log line."""
    load = torch.stack([m.load for m in experts]).float()  # (layers, E)
    if mode != "none":
        dist.all_reduce(load)
    for m, layer_load in zip(experts, load):
        m.update_bias(layer_load, 1.0 - bad)
        m.load, m.last_load = None, layer_load


def first_step(step, model: GPT, optimizer, run: config.Run, group) -> tuple[object, kernel.Ops]:
    """This process's first training step, `step()`, under the compile watch (`compiling`). When it raises (out
    of memory aside) while the run's ops have a fallback (a fused kernel, the compiled loss), the model gets the
    fallback's ops and the step runs again, after one warning naming the cause; then every rank takes the
    fallback if any rank did. Returns step()'s result and the ops the model now runs on."""
    ops, rank, world = run.ops, run.rank, run.world_size
    try:
        with compiling(run):
            out, fell = step(), False
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        if ops.fallback is None:
            raise
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"warning{f' (rank {rank})' if world > 1 else ''}: the first step failed with {type(e).__name__}: "
              f"{cause}; running it again with {', '.join(f'{op}: {n}' for op, n in ops.replaced().items())}",
              file=sys.stderr, flush=True)
        optimizer.zero_grad(set_to_none=True)
        model.set_ops(ops.fallback)
        torch._dynamo.reset()  # recompile with the fallback
        with compiling(run):
            out, fell = step(), True
    if world > 1 and any_rank(fell, group) and not fell:
        model.set_ops(ops.fallback)  # the same kernels on every rank, so every rank computes the same way
        torch._dynamo.reset()
        fell = True
    return out, ops.fallback if fell else ops


@contextmanager
def compiling(run: config.Run):
    """Around a compiled run's first step: a line on rank 0 after 1, 2, 4, ... minutes saying it is still
    compiling, and past train.compile_timeout_s an error on every rank and exit status 3 (a compile that hangs
    cannot be interrupted from Python, so the process ends itself)."""
    t = run.cfg.train
    if not t.compile:
        yield
        return
    done, t0, limit = threading.Event(), time.perf_counter(), t.compile_timeout_s or math.inf

    def watch():
        say_at = 60.0
        while not done.wait(min(say_at, limit) - (time.perf_counter() - t0)):
            elapsed = time.perf_counter() - t0
            if elapsed >= limit:
                print(f"error: the first step (torch.compile included) has run for {elapsed:.0f} s, past "
                      f"train.compile_timeout_s={t.compile_timeout_s:g}; stopping. torch {torch.__version__}, "
                      f"precision {t.precision}, kernels {t.kernels}, loss {t.loss}: try train.compile=false, another "
                      f"train.precision or train.kernels=torch, or a larger train.compile_timeout_s (0: no limit)",
                      file=sys.stderr, flush=True)
                os._exit(3)
            if run.rank == 0:
                print(f"still in the first step after {elapsed:.0f} s (compiling; train.compile_timeout_s="
                      f"{t.compile_timeout_s:g})", flush=True)
            say_at *= 2
    threading.Thread(target=watch, daemon=True, name="compile-watch").start()
    try:
        yield
    finally:
        done.set()
