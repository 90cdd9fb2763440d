"""One optimizer step as train.py and bench.py take it (`train_step`, `first_step`), the books of the steps (`Log`),
the validation loss (`evaluate` for eval.py; `run_eval` while training) and the time budget (`fit_budget`)."""
import collections
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
import config
import hardware
import kernel
from loader import eval_batches, token_bytes
from model import GPT, MoE
from parallel import any_rank, print0


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
    """One optimizer step over run.grad_accum micro-batches (x, y) on the device; returns the summed losses, the
    gradient norm before clipping and a skip flag (1.0), left on the device.

    A step whose loss (on any rank) or gradient norm is not finite is skipped, its data not retried (RELIABILITY.md):
    fused AdamW takes the flag as `found_inf` and leaves weights, moments and step count as they were without a host
    sync; other optimizers are not stepped (one host read). With FP16's `scaler` the same flag is its found-inf.
    MoE routing biases then take their balancing step (`balance_experts`)."""
    t, accum, mode = run.cfg.train, run.grad_accum, run.mode
    loss_sum, experts = 0.0, [m for m in model.modules() if isinstance(m, MoE)]
    for m in experts:  # counts of a step that raised (a first step run again) do not carry over
        m.load = None
    if run.pp > 1:  # the pipeline's schedule runs the micro-batches (train_model: parallel.Pipeline)
        loss_sum = train_model.step(list(batches))
    else:
        for micro, (x, y) in enumerate(batches):
            with sync_grads(train_model, mode, micro == accum - 1, t.fsdp_defer_sync):
                with run.precision.autocast(run.device):
                    loss = train_model(x, y)
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            loss_sum = loss_sum + loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = train_model.clip(t.grad_clip) if run.pp > 1 else clip_grads(model, t.grad_clip)
    bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
    if run.world_size > 1:  # a loss is per rank; every rank must skip alike (no host sync on NCCL)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if skips_on_device(optimizer):
        optimizer.found_inf = bad
        optimizer.step()
    elif not bad.item():
        optimizer.step()
    if scaler is not None:
        # The scaler's own check looks at this rank's gradients only (a shard of them under FSDP2), so ranks
        # could disagree; its update reads the found-inf recorded by unscale_(), which becomes the global flag.
        scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = {bad.device: bad}
        scaler.update()
    if experts:
        balance_experts(experts, bad, mode)
    optimizer.zero_grad(set_to_none=True)
    if t.precision == "fp8" and mode == "fsdp":
        kernel.precompute_float8_scales(model)
    return loss_sum, grad_norm, bad


def clip_grads(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a global norm of at most `max_norm` (0: no clipping); returns the norm before, a plain
    tensor (under FSDP2 and tensor parallel torch's norm of DTensors is already over the whole mesh)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def balance_experts(experts: list[MoE], bad: torch.Tensor, mode: str) -> None:
    """After the optimizer step: each MoE layer's tokens per expert, summed over the ranks (one all-reduce), move its
    routing bias (MoE.update_bias) unless the step was skipped (`bad`); the counts stay as `last_load` for the log."""
    load = torch.stack([m.load for m in experts]).float()  # (layers, E)
    if mode != "none":
        dist.all_reduce(load)
    for m, layer_load in zip(experts, load):
        m.update_bias(layer_load, 1.0 - bad)
        m.load, m.last_load = None, layer_load


def first_step(step, model: GPT, optimizer, run: config.Run, group) -> tuple[object, kernel.Ops]:
    """The first training step, `step()`, under `compiling`. When it raises (out of memory aside) and the run's ops
    have a fallback, it warns and runs again on the fallback from the same torch seed; every rank takes the fallback
    if any did. Returns step()'s result and the ops the model now runs on."""
    try:
        with compiling(run):
            out, fell = step(), False
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        if run.ops.fallback is None:
            raise
        failed = f"the first step failed with {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
        fallback = ", ".join(f"{op}: {n}" for op, n in run.ops.replaced().items())
        if run.pp > 1:  # the other stages wait mid-schedule for this one: no second try
            raise kernel.KernelError(f"{failed}; under train.pp it cannot run again on the fallback ({fallback}): set "
                                     f"train.kernels=torch and train.loss=chunked") from e
        print(f"warning{f' (rank {run.rank})' if run.world_size > 1 else ''}: {failed}; running it again with "
              f"{fallback}", file=sys.stderr, flush=True)
        optimizer.zero_grad(set_to_none=True)
        model.set_ops(run.ops.fallback)
        torch._dynamo.reset()  # recompile with the fallback
        torch.manual_seed(torch.initial_seed())  # the failed try's dropout again
        with compiling(run):
            out, fell = step(), True
    if any_rank(fell, group) and not fell:
        model.set_ops(run.ops.fallback)  # the same kernels on every rank, so every rank computes the same way
        torch._dynamo.reset()
        fell = True
    return out, run.ops.fallback if fell else run.ops


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


class Log:
    """The books of the loop, written by rank 0: metrics.jsonl rows (also to wandb / TensorBoard; on resume the rows
    after the checkpoint dropped), the mean loss and throughput per log line (one host sync each; `pause` leaves out
    evals and saves), and the skipped steps, read `lag` steps late so that checking never waits for the step queued."""

    def __init__(self, run: config.Run, model: GPT, data, resumed_step: int, skipped: int):
        cfg = run.cfg
        self.run, self.data, self.active = run, data, run.rank == 0
        self.path, self.tracker = os.path.join(cfg.train.out_dir, "metrics.jsonl"), None
        if self.active and os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resumed_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except ValueError:
                        pass
            checkpoint.write_atomic(self.path, "".join(kept))
        if self.active and (cfg.log.wandb or cfg.log.tensorboard):
            import tracking  # wandb, TensorBoard
            self.tracker = tracking.Tracker(cfg, resumed_step=resumed_step)
        self.flops, self.peak = model.flops_per_token(), hardware.peak_flops(run.device, run.precision.dtype)
        self.experts = [m for m in model.modules() if isinstance(m, MoE)]
        self.loss_sum, self.good = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
        self.steps, self.t0, self.waited = 0, time.perf_counter(), data.waited
        self.queue, self.skipped, self.streak = collections.deque(), skipped, 0
        self.lag = 1 if run.device.type == "cuda" else 0

    def row(self, row: dict) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tracker is not None:
                self.tracker.log(row)

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, bad: torch.Tensor) -> None:
        """A step's result, still on the device; skipped steps do not count towards the mean loss."""
        self.loss_sum += torch.where(bad > 0, 0.0, loss)
        self.good += 1 - bad
        self.steps += 1
        values = torch.stack([bad, loss.float() / self.run.grad_accum, grad_norm.float()])
        event = None
        if values.device.type == "cuda":
            values, event = values.to("cpu", non_blocking=True), torch.cuda.Event()
            event.record()
        self.queue.append((step, values, event))

    def skips(self, now: bool = False) -> bool:
        """Print and log the skipped steps read so far (all but the newest `lag`, none left when `now`); True once
        train.max_consecutive_skips are in a row: the run stops."""
        limit = self.run.cfg.train.max_consecutive_skips
        while len(self.queue) > (0 if now else self.lag):
            step, values, event = self.queue.popleft()
            if event is not None:
                event.synchronize()
            flag, loss, norm = values.tolist()
            self.streak = self.streak + 1 if flag else 0
            if flag:
                self.skipped += 1
                what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
                print0(f"step {step:>6} | {what} is not finite: update skipped ({self.streak} in a row, {self.skipped} "
                       f"in total; the run stops at {limit} in a row)", flush=True)
                self.row({"step": step, "skipped": True, "skipped_steps": self.skipped})
        return self.streak >= limit

    def pause(self, seconds: float) -> None:
        self.t0 += seconds

    def line(self, step: int, lr: float, grad_norm: torch.Tensor, tokens: int, max_steps: int, elapsed: float):
        """Print the log line and write its row; starts a new window."""
        run, world = self.run, self.run.world_size
        if world > 1:
            dist.all_reduce(self.loss_sum)
        loss_sum, good = torch.stack([self.loss_sum, self.good]).tolist()  # the one host sync per log line
        loss = loss_sum / (good * run.grad_accum * world) if good else float("nan")
        now = time.perf_counter()
        step_s, wait_s = (now - self.t0) / self.steps, (self.data.waited - self.waited) / self.steps
        self.loss_sum.zero_()
        self.good.zero_()
        self.steps, self.t0, self.waited = 0, now, self.data.waited
        tok_s, norm = run.batch.batch_tokens / step_s, grad_norm.item()
        mfu = tok_s / world * self.flops / self.peak if self.peak else None
        moe = expert_balance(self.experts) if self.experts else {}
        row = {"step": step, "loss": finite(loss), "lr": lr, "grad_norm": finite(norm), "tokens": tokens,
               "tokens_per_s": tok_s, "mfu": mfu, "mem_gb": hardware.peak_memory_gb(run.device), "elapsed_s": elapsed,
               "skipped_steps": self.skipped, "data_wait_s": wait_s, "data_wait_frac": wait_s / step_s, **moe}
        self.row(row)
        print0(f"step {step:>6} | loss {loss:.4f} | lr {lr:.2e} | grad {norm:.3f} | {tok_s:,.0f} tok/s"
               + (f" | mfu {mfu:.1%}" if mfu else "")
               + (f" | experts max/mean {moe['moe_load_max']:.2f}, bias spread {moe['moe_bias_spread_max']:.4f}"
                  + (f", aux {moe['moe_aux_loss']:.4f}" if moe["moe_aux_loss"] is not None else "") if moe else "")
               + f" | data wait {wait_s / step_s:.1%} | mem {row['mem_gb']:.2f} GB | "
               f"eta {(max_steps - step) * step_s / 60:.1f} min", flush=True)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def expert_balance(experts: list[MoE]) -> dict:
    """The MoE layers at the last step: busiest expert's tokens over the mean (1.0: balanced) and the routing biases'
    spread, per layer and the worst; the balance loss (rank 0's last micro-batch, summed over layers; None: off)."""
    if experts[0].last_load is None:
        return {}
    load = torch.stack([m.last_load for m in experts])
    bias = torch.stack([m.gate.e_score_correction_bias.float() for m in experts])
    ratio = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()
    spread = (bias.max(dim=1).values - bias.min(dim=1).values).tolist()
    aux = [m.aux_loss for m in experts if m.aux_loss is not None]
    return {"moe_load": ratio, "moe_load_max": max(ratio), "moe_bias_spread": spread,
            "moe_bias_spread_max": max(spread), "moe_aux_loss": float(sum(aux).detach()) if aux else None}


def finite(x: float) -> float | None:
    """metrics.jsonl stays strict JSON: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


@torch.no_grad()
def evaluate(model, paths: list[str], block_size: int, vocab_size: int, batch_size: int, device: torch.device,
             split: str = "val", max_tokens: int | None = None, autocast=nullcontext(), rank: int = 0,
             world: int = 1) -> dict:
    """Score `split` of each dataset in `paths` sequentially (each target token once, up to max_tokens per
    dataset); returns loss (nats/token), ppl, bpb, tokens, bytes, summed over datasets and ranks. `rank` of
    `world` data-parallel ranks: with tensor parallel, the process group holds world x tp ranks."""
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens, n_bytes = 0, 0
    for path in paths:
        nbytes = token_bytes(path)
        for x, y in eval_batches(path, split, block_size, batch_size, max_tokens, rank, world, vocab_size):
            scored = y[y >= 0].numpy()
            n_tokens += scored.size
            n_bytes += int(nbytes[scored].sum())
            x, y = x.to(device), y.to(device)
            if hasattr(model, "nats"):  # a pipeline.Pipeline: its stages score together
                nats += model.nats(x, y)
                continue
            with autocast:
                logits = model(x)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
    totals = torch.tensor([nats.item(), n_tokens, n_bytes], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)
        totals /= dist.get_world_size() // world  # a tensor-parallel group or a pipeline scored alike
    total_nats, n_tokens, n_bytes = totals.tolist()
    loss = total_nats / max(n_tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700)), "bpb": total_nats / math.log(2) / max(n_bytes, 1),
            "tokens": int(n_tokens), "bytes": int(n_bytes)}


def run_eval(model, run, step: int, tokens: int, log) -> float:
    """Validation loss and bits per byte on the first eval_batches micro-batches of each val split, with the
    uncompiled model (eval mode and a logits-only graph would each cost a recompile); `log(row)` writes the
    metrics row; returns the seconds taken."""
    t, model_cfg, t0 = run.cfg.train, run.cfg.model, time.perf_counter()
    res = evaluate(model, run.cfg.data.datasets, model_cfg.block_size, model_cfg.vocab_size, t.micro_batch_size,
                   run.device, max_tokens=t.eval_batches * t.micro_batch_size * model_cfg.block_size,
                   autocast=run.precision.autocast(run.device), rank=run.dp_rank, world=run.dp)
    model.train()
    log({"step": step, "tokens": tokens, "val_loss": finite(res["loss"]), "val_bpb": finite(res["bpb"])})
    print0(f"step {step:>6} | val loss {res['loss']:.4f} | val bpb {res['bpb']:.4f} "
        f"({res['tokens']:,} tokens, {time.perf_counter() - t0:.1f} s)", flush=True)
    return time.perf_counter() - t0


# train.max_minutes times BUDGET_PROBE steps after BUDGET_WARMUP untimed ones (compilation, allocator growth) of a start
BUDGET_WARMUP, BUDGET_PROBE = 2, 5


def budget_probe(t: config.TrainConfig, start_step: int) -> int:
    """The step after which the BUDGET_PROBE timed steps begin: BUDGET_WARMUP steps into this start, after
    train.profile's traced steps (slower, and the next one writes the trace)."""
    return start_step + BUDGET_WARMUP + (t.profile + 1 if t.profile else 0)


def fit_budget(run: config.Run, step: int, max_steps: int, probe_start: float, run_start: float, log, group) -> int:
    """train.max_minutes after the BUDGET_PROBE steps timed from `probe_start` (perf_counter, as `run_start`): the
    max_steps that fit in the budget left, evals counted (a forward is about a third of a step), at most `max_steps`;
    the slowest rank decides, so all stop at one step. The decision is logged (`log(row)`) and printed."""
    t, now = run.cfg.train, time.perf_counter()
    timing = torch.tensor([(now - probe_start) / BUDGET_PROBE, now - (run_start + 60 * t.max_minutes)])
    if group is not None:
        dist.all_reduce(timing, op=dist.ReduceOp.MAX, group=group)
    step_s, late = timing.tolist()
    # an eval scores eval_batches micro-batches over the data-parallel ranks; a step trains grad_accum on each
    evals = t.eval_batches / run.dp / (3 * run.grad_accum) * step_s if t.eval_interval else 0.0  # seconds per eval
    per_step = step_s + (evals / t.eval_interval if t.eval_interval else 0.0)
    max_steps = max(step, min(max_steps, step + int((-late - evals) / per_step)))
    log({"step": step, "max_steps": max_steps, "budget_step_s": step_s})
    print0(f"train.max_minutes={t.max_minutes:g}: {step_s:.2f} s/step measured over steps "
           f"{step - BUDGET_PROBE + 1}-{step}, so max_steps = {max_steps}", flush=True)
    return max_steps
