"""Train a GPT from YAML configs, on one CPU or GPU or many through torchrun.

    python train.py configs/tiny.yaml [more.yaml ...] [section.key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py configs/500m.yaml

config -> process group (from torchrun's environment), device and precision (hardware.py: `auto` picks BF16
where it is native, FP16 with loss scaling on GPUs without BF16, else FP32) -> data (the offline default corpus
is prepared on first use, by rank 0) -> model built on the meta device -> activation checkpointing, compile,
FSDP2 or DDP -> materialised and initialised -> AdamW + LR schedule -> resume from out_dir/latest -> loop:
micro-batches with gradient accumulation (gradients synchronised once per step), clip, step, log, eval,
checkpoint. SIGTERM/SIGUSR1 (what SLURM sends before a preemption or the time limit) and SIGINT finish the
current step on every rank, write a checkpoint and exit. A step whose loss or gradient norm is not finite is
skipped; train.max_consecutive_skips of them in a row stop the run. train.max_minutes fixes max_steps from the
measured step time. An out-of-memory error stops the run with what to change; train.profile traces a few steps
(diagnose.py). RELIABILITY.md lists what a run survives.
"""
import collections
import dataclasses
import filecmp
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

import checkpoint
import config
import diagnose
import export
import hardware
import kernels
import optim
import plan as planner
import tracking
from data.prepare import ensure_prepared
from eval import evaluate, harness_lm, run_tasks
from loader import DataError, Prefetcher, TrainLoader, read_meta
from model import GPT
from tokenizer import copy_tokenizer, load_tokenizer

try:
    import fcntl
    import resource
except ImportError:  # Windows: no POSIX record locks (see lock_run), no getrusage (see memory_gb)
    fcntl = resource = None


def init_distributed(device_name: str, timeout_s: int) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; joins the process group when world > 1.

    NCCL on CUDA, gloo on CPU. The timeout turns a dead or stuck peer into an error instead of a hang.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", local_rank) if cuda else None)
    return rank, local_rank, world


def resolve_hardware(t: config.TrainConfig, local_rank: int, width: int) -> tuple[torch.device, hardware.Precision]:
    """Device, precision (for a model of hidden size `width`) and compile for this machine; writes the resolved
    precision and compile back into `t` (so config.yaml and the checkpoints say what ran) and returns the device
    and the Precision (its reason is for the banner). On CPUs rank 0's timed probe decides for every rank.
    Raises HardwareError or ConfigError."""
    device = hardware.pick_device(t.device, local_rank)
    precision = hardware.resolve_precision(t.precision, device, width)
    if device.type == "cpu" and dist.is_initialized():  # gloo: ranks sharing the cores would time differently
        shared = [precision]
        dist.broadcast_object_list(shared, src=0)
        precision = shared[0]
    if precision.name == "fp8" and (why := kernels.float8_supported(device)):
        raise config.ConfigError(f"train.precision=fp8: {why}")
    t.precision = precision.name
    t.compile = hardware.resolve_compile(t.compile, device)
    return device, precision


def configure_kernels(cfg: config.Config, world: int, device: torch.device, precision: hardware.Precision
                      ) -> dict[str, str]:
    """kernels.configure for this run, once model.vocab_size is known: under train.loss auto a compiled step takes
    the plain loss compiled when plan.py, planning the full logits of a micro-batch, fits the device's memory
    (a CPU's: the machine's RAM), else the chunked loss."""
    t = cfg.train
    fit = t.loss == "auto" and t.compile and planner.full_logits(cfg, world, hardware.memory_gib(device))
    return kernels.configure(t.kernels, t.loss, device, precision.dtype, compiled=t.compile, logits_fit=fit)


def first_step(run, optimizer, t: config.TrainConfig, rank: int, world: int, group):
    """This process's first training step, `run()`. When it raises (out of memory aside) while a backend other
    than torch's is chosen (a fused kernel, the compiled loss), the step runs again on kernels.FALLBACK (torch's
    kernels, the chunked loss) after one warning naming the cause; then every rank takes the fallback if any
    rank did. A compiled step is watched (`compiling`). Returns run()'s result."""
    try:
        with compiling(t, rank):
            out, fell = run(), False
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        replaced = kernels.fall_back()
        if not replaced:
            raise
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"warning{f' (rank {rank})' if world > 1 else ''}: the first step failed with {type(e).__name__}: "
              f"{cause}; running it again with {', '.join(f'{op}: {name}' for op, name in replaced.items())}",
              file=sys.stderr, flush=True)
        optimizer.zero_grad(set_to_none=True)
        torch._dynamo.reset()  # recompile with the fallback
        with compiling(t, rank):
            out, fell = run(), True
    if world > 1 and any_rank(fell, group) and not fell:
        kernels.fall_back()  # the same kernels on every rank, so every rank computes the same way
        torch._dynamo.reset()
    return out


@contextmanager
def compiling(t: config.TrainConfig, rank: int):
    """Around a compiled run's first step: a line on rank 0 after 1, 2, 4, ... minutes saying it is still
    compiling, and past train.compile_timeout_s an error on every rank and exit status 3 (a compile that hangs
    cannot be interrupted from Python, so the process ends itself)."""
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
            if rank == 0:
                print(f"still in the first step after {elapsed:.0f} s (compiling; train.compile_timeout_s="
                      f"{t.compile_timeout_s:g})", flush=True)
            say_at *= 2
    threading.Thread(target=watch, daemon=True, name="compile-watch").start()
    try:
        yield
    finally:
        done.set()


def make_optimizer(model: nn.Module, t: config.TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer (optim.py); Muon's Newton-Schulz runs in BF16 where the run's matmuls do, else FP32."""
    return optim.build(model, t, device, ns_dtype="bfloat16" if t.precision in ("bf16", "fp8") else "float32")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can take the skip flag as `found_inf` and decide on the device (no host sync):
    fused AdamW on CUDA and CPU. The MPS fused kernels, the non-fused paths and Muon refuse it."""
    fused = all(g.get("fused") for g in optimizer.param_groups)
    device = optimizer.param_groups[0]["params"][0].device
    return type(optimizer) is torch.optim.AdamW and fused and device.type in ("cuda", "cpu")


def lr_at(step: int, t: config.TrainConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup, then cosine / linear / warmup-stable-decay / constant."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    min_lr = t.lr * t.min_lr_ratio
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "wsd":  # constant, then a linear decay over the last decay_frac of the run
        start = max(t.warmup_steps, int(t.max_steps * (1 - t.decay_frac)))
        if step < start:
            return t.lr
        return t.lr + (min_lr - t.lr) * min(1.0, (step - start) / max(1, t.max_steps - start))
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    if t.schedule == "linear":
        return t.lr + (min_lr - t.lr) * progress
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (t.lr - min_lr)


def run_info(device: torch.device) -> dict:
    """What produced this run: git revision, package versions, hardware, command line."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    import numpy
    return {"git": rev or None, "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "device": str(device), "cpus": os.cpu_count(), "host": platform.node(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def memory_gb(device: torch.device) -> float:
    """Peak memory in GB: allocated on CUDA, the process's peak RSS on a CPU (NaN on Windows: no getrusage)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if resource is None:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def prepare_data(cfg: config.Config) -> None:
    """Prepare missing named corpora and fill in model.vocab_size from the data (or check it is big enough)."""
    metas = [ensure_prepared(p) for p in cfg.data.datasets]
    vocab = max(m["vocab_size"] for m in metas)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise config.ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocab "
                                 f"({vocab}, {cfg.data.datasets[0]}/meta.json)")
    try:
        cfg.model.validate()
    except ValueError as e:
        raise config.ConfigError(str(e)) from None


def check_init_tokenizer(cfg: config.Config) -> list[str]:
    """Warnings for datasets not tokenized with the tokenizer that train.init_from's folder brings (a model
    continues pretraining well only on the ids it was trained with: prepare with --tokenizer hf:FOLDER)."""
    theirs = cfg.train.init_from and os.path.join(cfg.train.init_from, "tokenizer.json")
    if not theirs or not os.path.exists(theirs):
        return []
    warnings = []
    for d in cfg.data.datasets:
        spec = read_meta(d)["tokenizer"]
        if spec["type"] != "hf" or not filecmp.cmp(theirs, os.path.join(d, spec["file"]), shallow=False):
            warnings.append(f"{d} was not tokenized with the tokenizer of {cfg.train.init_from}; prepare it with "
                            f"python data/prepare.py ... --tokenizer hf:{cfg.train.init_from}")
    return warnings


def lock_run(out_dir: str):
    """Create out_dir, check that it is writable and take its lock, so that a second run on the same folder stops
    before it writes anything. The lock is a POSIX record lock on `out_dir/.lock` (honoured over NFS); the kernel
    drops it when the process ends, kill -9 included, so it never goes stale. Returns the open lock file."""
    path = os.path.join(out_dir, ".lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise config.ConfigError(f"train.out_dir {out_dir} is not writable ({e.strerror or e})") from None
    try:
        if fcntl is not None:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # Windows: a byte-range lock, also dropped by the OS when the process ends
            import msvcrt
            f.seek(2**30)  # far past the text: such locks are mandatory, and the holder line must stay readable
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise config.ConfigError(f"train.out_dir {out_dir} is in use by another run ({holder}); wait for it to "
                                 f"end or choose another train.out_dir") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
    except OSError as e:
        f.close()
        raise config.ConfigError(f"train.out_dir {out_dir} is not writable ({e.strerror or e})") from None
    return f


@contextmanager
def stop_requests():
    """Turn SIGINT/SIGTERM/SIGUSR1 into a request to stop after the current step; the old handlers come back
    after. Repeated signals (torchrun forwards the one SLURM also sends each worker) change nothing."""
    stop = {"signal": None}

    def request(signum, frame):
        if stop["signal"] is None:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint", flush=True)
        stop["signal"] = signum
    sigs = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])  # not on Windows
    previous = {sig: signal.signal(sig, request) for sig in sigs}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_same_model(saved: dict, cfg: config.Config, path: str) -> None:
    diff = {k: (v, getattr(cfg.model, k)) for k, v in saved["model"].items() if getattr(cfg.model, k) != v}
    if diff:
        lines = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise config.ConfigError(f"checkpoint {path} was trained with a different model ({lines}); "
                                 f"use another train.out_dir or train.resume=false")


def find_resume(cfg: config.Config) -> str | None:
    """The checkpoint to resume from (rank 0): the newest one in the run that verifies (train_state.json, the
    tensor index against this model, every file's checksum); damaged newer ones are set aside, loudly."""
    t = cfg.train
    if not t.resume:
        return None
    with torch.device("meta"):
        model = GPT(cfg.model)
    return checkpoint.find_resumable(t.ckpt_dir or t.out_dir, model, lambda msg: print(msg, file=sys.stderr, flush=True),
                                     check=lambda state, path: check_same_model(state["config"], cfg, path))


def parallel_mode(cfg: config.Config, device: torch.device, world: int, n_params: int) -> str:
    """'none' on one process; else train.parallel, where auto picks DDP while the FP32 model, its gradients
    and AdamW's two moments (16 bytes a parameter) take under 40 % of one device's memory, else FSDP."""
    if world == 1:
        return "none"
    if cfg.train.parallel != "auto":
        return cfg.train.parallel
    if device.type != "cuda":
        return "ddp"
    return "ddp" if 16 * n_params < 0.4 * torch.cuda.get_device_properties(device).total_memory else "fsdp"


def setup_model(cfg: config.Config, device: torch.device, world: int) -> tuple[GPT, nn.Module, str]:
    """Build the model on the meta device, apply activation checkpointing, compile and the FSDP2/DDP wrap, then
    materialise and initialise it; returns (model, the module the training step calls, the parallel mode).

    Under FSDP2 each rank allocates only its shards; the initial values do not depend on the sharding, so
    1 process, DDP and FSDP start from the same weights. `torch.compile` applies per block under FSDP2 (in place,
    so the state-dict names stay; the gathers stay outside the graphs), else to the whole model, head and loss
    included (~10 % faster on the CPU tiny config); the returned model itself stays uncompiled for evaluation.
    """
    t = cfg.train
    with torch.device("meta"):
        model = GPT(cfg.model)
    mode = parallel_mode(cfg, device, world, model.num_params())
    if t.precision == "fp8":
        kernels.convert_to_float8(model, fsdp=mode == "fsdp")
    for block in model.layers:
        if t.activation_checkpointing:  # keep only each block's input; recompute the rest in backward
            block.forward = (lambda fwd: lambda *a, **k: recompute(fwd, *a, use_reentrant=False, **k))(block.forward)
        if t.compile and mode == "fsdp":
            block.compile()
    if mode == "fsdp":
        half = {"fp32": None, "fp16": torch.float16}.get(t.precision, torch.bfloat16)  # fp8 gathers BF16 too
        # cast_forward_inputs off: a block's inputs are the BF16 residual stream, which needs no cast, and the FP32
        # RoPE table, which must stay FP32 (cast per block it lost precision and cost a copy each time)
        mp = MixedPrecisionPolicy(param_dtype=half, cast_forward_inputs=False,
                                  reduce_dtype=torch.bfloat16 if t.reduce_dtype == "bf16" else torch.float32)
        for block in model.layers:
            fully_shard(block, mp_policy=mp, reshard_after_forward=t.reshard_after_forward)
        fully_shard(model, mp_policy=mp, reshard_after_forward=t.reshard_after_forward)
        model.to_empty(device=device)
        # every rank draws the same full tensor (one parameter at a time) and keeps its own shard
        def assign(p, full):
            p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
        model.init_weights(t.seed, assign=assign)
        if t.init_from:
            export.load_weights(model, t.init_from, assign)
        return model, model, mode
    model.to_empty(device=device)
    model.init_weights(t.seed)
    if t.init_from:
        export.load_weights(model, t.init_from)
    wrapped = model
    if mode == "ddp":
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      gradient_as_bucket_view=True)  # gradients live in the buckets: no second copy
    return model, torch.compile(wrapped) if t.compile else wrapped, mode


def sync_grads(train_model: nn.Module, mode: str, last_micro: bool, defer_fsdp: bool):
    """Context for one micro-step's backward: DDP reduces gradients on the last micro-step only; FSDP2
    reduce-scatters every micro-step (gradients stay sharded) unless told to defer."""
    if mode == "ddp" and not last_micro:
        return train_model.no_sync()
    if mode == "fsdp" and defer_fsdp:
        train_model.set_requires_gradient_sync(last_micro)
    return nullcontext()


def train_step(model: GPT, train_model: nn.Module, optimizer, batches, grad_accum: int, mode: str,
               t: config.TrainConfig, autocast, scaler: torch.amp.GradScaler | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches (x, y) already on the device; returns the summed
    micro-batch losses, the gradient norm before clipping and a flag (1.0) for a skipped step, all left on the
    device (no host sync where the optimizer can skip on the device).

    A step whose loss (on any rank) or gradient norm is not finite is skipped: fused AdamW's `found_inf` input
    (the mechanism GradScaler uses) makes it leave weights, moments and step count exactly as they were,
    decided on the device; other optimizers are not stepped, which costs one host read of the flag. The data
    moves on, so a bad batch is not retried. With FP16's `scaler` the loss is scaled, the gradients unscaled
    before clipping, and the same flag is the scaler's found-inf: it backs off on exactly the skipped steps."""
    loss_sum = 0.0
    for micro, (x, y) in enumerate(batches):
        with sync_grads(train_model, mode, micro == grad_accum - 1, t.fsdp_defer_sync):
            with autocast:
                loss = train_model(x, y)
            (scaler.scale(loss / grad_accum) if scaler else loss / grad_accum).backward()
        loss_sum = loss_sum + loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
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
    optimizer.zero_grad(set_to_none=True)
    if t.precision == "fp8" and mode == "fsdp":
        kernels.precompute_float8_scales(model)
    return loss_sum, grad_norm, bad


class SkipCounter:
    """Counts skipped steps and the current run of them. Each step's (flag, loss, grad norm) is read on the host
    `lag` steps late: on CUDA through a pinned copy and an event one step behind, so that checking never waits
    for the step just queued; elsewhere at once."""

    def __init__(self, total: int = 0):
        self.total, self.streak, self.queue = total, 0, collections.deque()

    def push(self, step: int, values: torch.Tensor) -> None:
        event = None
        if values.device.type == "cuda":
            values, event = values.to("cpu", non_blocking=True), torch.cuda.Event()
            event.record()
        self.queue.append((step, values, event))

    def poll(self, lag: int = 0) -> list[tuple[int, float, float, int, int]]:
        """Read all but the newest `lag` steps; returns the skipped ones among them as (step, loss, grad norm,
        skips in a row, skips in total)."""
        skipped = []
        while len(self.queue) > lag:
            step, values, event = self.queue.popleft()
            if event is not None:
                event.synchronize()
            flag, loss, norm = values.tolist()
            self.streak = self.streak + 1 if flag else 0
            if flag:
                self.total += 1
                skipped.append((step, loss, norm, self.streak, self.total))
        return skipped

    def report(self, lag: int, limit: int, say, log) -> bool:
        """Print and log the skipped steps seen so far (all but the newest `lag`); True when `limit` in a row
        were reached and the run has to stop."""
        for s, loss, norm, streak, total in self.poll(lag):
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
            say(f"step {s:>6} | {what} is not finite: update skipped ({streak} in a row, {total} in total; the "
                f"run stops at {limit} in a row)", flush=True)
            log({"step": s, "skipped": True, "skipped_steps": total})
        return self.streak >= limit


def any_rank(flag: bool, group) -> bool:
    """Whether `flag` is set on any rank (a CPU all-reduce: no device sync), so all ranks stop together."""
    if group is None:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def finite(x: float) -> float | None:
    """metrics.jsonl stays strict JSON: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


class Metrics:
    """Rows of metrics.jsonl, mirrored to wandb/TensorBoard; written by rank 0 only. On resume the rows a killed
    run logged after its last checkpoint, and a line cut short by the kill, are dropped first (the trackers
    follow: see tracking.py)."""

    def __init__(self, cfg: config.Config, rank: int, resumed_step: int):
        self.path, self.active = os.path.join(cfg.train.out_dir, "metrics.jsonl"), rank == 0
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
        self.tracker = tracking.Tracker(cfg, active=self.active, resumed_step=resumed_step)

    def log(self, row: dict) -> None:
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.tracker.log(row)

    def close(self) -> None:
        self.tracker.close()


class LogWindow:
    """Loss and throughput since the last log line. Losses add up on the device, so a log line costs one host
    sync; time spent in evals and saves is taken out of the throughput. The time the loop waited for batches
    (`data`'s `waited`, host time) is logged per step and as a fraction of the step time (data_wait_s,
    data_wait_frac): much above a few percent, the loader is what limits the run."""

    def __init__(self, device: torch.device, plan: config.Derived, flops_per_token: float, peak: float | None,
                 data: Prefetcher):
        self.device, self.plan, self.flops_per_token, self.peak = device, plan, flops_per_token, peak
        self.loss_sum, self.good = torch.zeros((), device=device), torch.zeros((), device=device)
        self.steps, self.t0, self.data, self.waited = 0, time.perf_counter(), data, data.waited

    def add(self, step_loss: torch.Tensor, bad: torch.Tensor) -> None:
        self.loss_sum += torch.where(bad > 0, 0.0, step_loss)
        self.good += 1 - bad  # skipped steps do not count towards the mean loss
        self.steps += 1

    def pause(self, seconds: float) -> None:
        self.t0 += seconds

    def close(self, step: int, lr: float, grad_norm: torch.Tensor, tokens: int, max_steps: int, elapsed: float,
              skipped: int, say) -> dict:
        """Print the log line and return the metrics row; starts a new window."""
        plan, world = self.plan, self.plan.world_size
        if world > 1:
            dist.all_reduce(self.loss_sum)
        loss_sum, good = torch.stack([self.loss_sum, self.good]).tolist()  # the one host sync per log line
        loss = loss_sum / (good * plan.grad_accum * world) if good else float("nan")
        now = time.perf_counter()
        step_s, wait_s = (now - self.t0) / self.steps, (self.data.waited - self.waited) / self.steps
        self.loss_sum.zero_()
        self.good.zero_()
        self.steps, self.t0, self.waited = 0, now, self.data.waited
        tok_s, norm = plan.batch_tokens / step_s, grad_norm.item()
        mfu = tok_s / world * self.flops_per_token / self.peak if self.peak else None
        row = {"step": step, "loss": finite(loss), "lr": lr, "grad_norm": finite(norm), "tokens": tokens,
               "tokens_per_s": tok_s, "mfu": mfu, "mem_gb": memory_gb(self.device), "elapsed_s": elapsed,
               "skipped_steps": skipped, "data_wait_s": wait_s, "data_wait_frac": wait_s / step_s}
        say(f"step {step:>6} | loss {loss:.4f} | lr {lr:.2e} | grad {norm:.3f} | {tok_s:,.0f} tok/s"
            + (f" | mfu {mfu:.1%}" if mfu else "")
            + f" | data wait {wait_s / step_s:.1%} | mem {row['mem_gb']:.2f} GB | "
            f"eta {(max_steps - step) * step_s / 60:.1f} min", flush=True)
        return row


class TimeBudget:
    """train.max_minutes -> max_steps. The first WARMUP steps are not timed (compilation, allocator growth); the
    next PROBE steps are, and then max_steps becomes the step count that fits in what is left of the budget,
    counting the periodic and the final eval (a forward is about a third of a training step), never more than
    the configured max_steps. The slowest rank decides, so that every rank stops at the same step."""
    WARMUP, PROBE = 2, 5

    def __init__(self, minutes: float, t_start: float, start_step: int, eval_interval: int, eval_steps: float):
        self.deadline, self.eval_interval, self.eval_steps = t_start + 60 * minutes, eval_interval, eval_steps
        self.probe_from, self.t_probe = start_step + self.WARMUP, None

    @classmethod
    def for_run(cls, t: config.TrainConfig, plan: config.Derived, t_start: float, step: int) -> "TimeBudget":
        # an eval scores eval_batches micro-batches over all ranks; a step trains grad_accum on each
        eval_steps = t.eval_batches / plan.world_size / (3 * plan.grad_accum)
        # train.profile's traced steps run slower, and the step after them writes the trace: time the ones after
        traced = t.profile + diagnose.StepProfiler.SKIP - cls.WARMUP + 1 if t.profile else 0
        return cls(t.max_minutes, t_start, step + traced, t.eval_interval, eval_steps)

    def decide(self, step: int, max_steps: int, group) -> tuple[int, float] | None:
        """After each step: None, or once (max_steps, measured seconds per step)."""
        now = time.perf_counter()
        if step == self.probe_from:
            self.t_probe = now
        if step != self.probe_from + self.PROBE:
            return None
        timing = torch.tensor([(now - self.t_probe) / self.PROBE, now - self.deadline])
        if group is not None:
            dist.all_reduce(timing, op=dist.ReduceOp.MAX, group=group)
        step_s, late = timing.tolist()
        evals = self.eval_steps * step_s if self.eval_interval else 0.0  # seconds per eval
        per_step = step_s + (evals / self.eval_interval if self.eval_interval else 0.0)
        fit = int((-late - evals) / per_step)
        return max(step, min(max_steps, step + fit)), step_s


def fall_back(cfg: config.Config, bad: str, error: Exception, rank: int, group) -> str:
    """After checkpoint `bad` failed to load on some rank (DCP gathers every rank's error, so all ranks are
    here): rank 0 sets it aside and picks the newest checkpoint that verifies; every rank gets its name. The next
    load overwrites every tensor the failed one may have half written. Raises CheckpointError when none is
    left (a fresh start would need a fresh model)."""
    shared = [None]
    if rank == 0:
        print(f"warning: {error}. Moved it aside to {checkpoint.set_aside(bad)}; trying the checkpoint before it.",
              file=sys.stderr, flush=True)
        shared = [find_resume(cfg) or ""]
    if group is not None:
        dist.broadcast_object_list(shared, src=0, group=group)
    if not shared[0]:
        raise checkpoint.CheckpointError(f"{error}, and no older checkpoint verifies; start over with "
                                         f"train.resume=false or another train.out_dir")
    return shared[0]


def describe_run(cfg: config.Config, model: GPT, device: torch.device, mode: str, world: int,
                 precision: hardware.Precision, scaler, ops: dict[str, str], optimizer) -> str:
    """The start-up lines after the config: model size, layout, precision and why, kernels, optimizer."""
    t = cfg.train
    muon = sum(p.numel() for g in optimizer.param_groups if g.get("muon") for p in g["params"])
    if muon:  # under FSDP2 the counts are global: the parameters are DTensors of the full shape
        opt = (f"optimizer: Muon for {muon / 1e6:.2f}M parameters of the blocks' matrices (lr {t.muon_lr or t.lr:g}, "
               f"Newton-Schulz in {next(g for g in optimizer.param_groups if g.get('muon'))['ns_dtype']}), AdamW for "
               f"the rest (lr {t.lr:g})")
    else:
        opt = f"optimizer: AdamW (lr {t.lr:g}{', fused' if optimizer.param_groups[0].get('fused') else ''})"
    return (f"model: {cfg.model.arch}, {model.num_params() / 1e6:.2f}M parameters "
            f"({model.num_params(embeddings=False) / 1e6:.2f}M without embeddings), "
            f"{model.flops_per_token() / 1e6:.1f} MFLOPs/token; device {device}, parallel {mode} x {world}"
            + (", activation checkpointing" if t.activation_checkpointing else "") + f", compile {t.compile}\n"
            + hardware.describe(precision) + (" (loss scaling: torch.amp.GradScaler)" if scaler else "") + "\n"
            + "kernels: " + ", ".join(f"{op} {name}" for op, name in ops.items()) + "\n" + opt)


def restore(path: str, model: nn.Module, optimizer, scaler, t: config.TrainConfig, say
            ) -> tuple[int, int, int, int | None]:
    """Load checkpoint `path` into model, optimizer and scaler; a max_steps decided by the run's time budget
    applies again (the same LR schedule). Returns (step, tokens, skipped steps, decided max_steps or None)."""
    state = checkpoint.load(path, model, optimizer, verified=True)  # find_resume verified it
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    say(f"resumed from {path} at step {state['step']} (saved by {state.get('world_size', 1)} process(es))")
    budget_steps = state.get("budget_max_steps")
    if budget_steps is not None:
        t.max_steps = min(t.max_steps, budget_steps)
        say(f"train.max_minutes: max_steps {t.max_steps}, as decided when the run started")
    return state["step"], state["tokens"], state.get("skipped_steps", 0), budget_steps


def run_state(cfg: config.Config, tokens: int, world: int, skips: SkipCounter, scaler, budget_steps) -> dict:
    """What a checkpoint keeps beside the tensors (train_state.json)."""
    state = {"tokens": tokens, "config": config.to_dict(cfg), "world_size": world, "skipped_steps": skips.total}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    if budget_steps is not None:
        state["budget_max_steps"] = budget_steps
    return state


class Saver:
    """When checkpoints are written: every ckpt_interval steps, at the last step and on a stop request. A
    periodic save waits for a step that was not skipped, so that checkpoints sit at good steps (the weights are
    the same either way, so a stop or the last step saves at once). An asynchronous save is published when done
    and always before the next one starts."""

    def __init__(self, t: config.TrainConfig, model: nn.Module, optimizer, group, say):
        self.t, self.model, self.optimizer, self.group, self.say = t, model, optimizer, group, say
        self.owed, self.pending = False, None

    def due(self, step: int, stopping: bool, last: bool) -> bool:
        self.owed = self.owed or step % self.t.ckpt_interval == 0 or last
        return self.owed or stopping

    def save(self, step: int, state: dict, streak: int, now: bool) -> float:
        """Write step's checkpoint unless the last `streak` steps were skipped (`now` overrides); returns the
        seconds it took."""
        if streak and not now:
            if step % self.t.ckpt_interval == 0:
                self.say(f"step {step:>6} | checkpoint postponed: the last {streak} step(s) were skipped")
            return 0.0
        t0 = time.perf_counter()
        self.finish()
        t = self.t
        self.pending = checkpoint.save(t.ckpt_dir or t.out_dir, step, self.model, self.optimizer, state, t.keep_last,
                                       async_group=self.group if t.async_checkpoint else False)
        if not t.async_checkpoint:
            self.finish()
        self.owed = False
        return time.perf_counter() - t0

    def poll(self) -> None:
        if self.pending is not None and self.pending.done():
            self.finish()

    def finish(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.say(f"saved {pending.wait()}")


def write_run_files(cfg: config.Config, device: torch.device, world: int, precision: hardware.Precision) -> None:
    """config.yaml (resolved), run_info.json (what produced the run) and the tokenizer, into out_dir."""
    t = cfg.train
    os.makedirs(t.out_dir, exist_ok=True)
    with open(os.path.join(t.out_dir, "config.yaml"), "w") as f:
        f.write(config.dump(cfg))
    with open(os.path.join(t.out_dir, "run_info.json"), "w") as f:
        json.dump({**run_info(device), "world_size": world, "precision": precision.name,
                   "precision_reason": precision.reason, "matmul_speedup": precision.speedup}, f, indent=1)
    copy_tokenizer(cfg.data.datasets[0], os.path.join(t.out_dir, "tokenizer"))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    rank, lock, lease = 0, None, None
    try:
        cfg = config.load(argv)
        tracking.check(cfg)
        t = cfg.train
        if t.init_from:  # the model's shape comes from the Hugging Face checkpoint
            cfg.model = export.config_from_hf(t.init_from, cfg.model)
        rank, local_rank, world = init_distributed(t.device, t.dist_timeout_s)
        device, precision = resolve_hardware(t, local_rank, cfg.model.n_embd)
        if precision.warning and rank == 0:
            print(f"warning: {precision.warning}", file=sys.stderr, flush=True)
        kernels.configure(t.kernels, t.loss, device, precision.dtype)  # a missing or unfit kernel stops here
        # rank 0 takes the run's lock and prepares missing data; the others wait and then see the same outcome
        error, resume_from = None, None
        if rank == 0:
            try:
                lock = lock_run(t.out_dir)
                if t.ckpt_dir and not checkpoint.is_remote(t.ckpt_dir) and \
                        os.path.realpath(t.ckpt_dir) != os.path.realpath(t.out_dir):
                    lock_run(t.ckpt_dir).close()  # writable and not another run's out_dir (closing drops the lock)
                if t.ckpt_dir and checkpoint.is_remote(t.ckpt_dir):  # an object store has no locks: a lease
                    lease = checkpoint.Lease(t.ckpt_dir, t.lease_minutes)
                    lease.acquire()
                for name in checkpoint.clean(t.ckpt_dir or t.out_dir):
                    print(f"removed {name}, an unfinished save or deletion of a killed run")
                prepare_data(cfg)
                for warning in check_init_tokenizer(cfg):
                    print(f"warning: {warning}", file=sys.stderr, flush=True)
                resume_from = find_resume(cfg)
            except (config.ConfigError, DataError, checkpoint.CheckpointError) as e:
                error = str(e)
        if world > 1:
            shared = [error, resume_from]
            dist.broadcast_object_list(shared, src=0)
            error, resume_from = shared
            if error is None and rank != 0:
                prepare_data(cfg)
        if error is not None:
            raise config.ConfigError(error)
        # written back, like precision, so that config.yaml and plan.py commands name the micro batch that ran
        t.micro_batch_size = planner.micro_batch(cfg, world, hardware.memory_gib(device))
        plan = config.derive(cfg, world)
        loader = TrainLoader(cfg.data.datasets, cfg.data.weights, cfg.model.block_size, t.micro_batch_size,
                             plan.grad_accum, t.seed, rank, world, cfg.model.vocab_size)
        ops = configure_kernels(cfg, world, device, precision)  # the loss's choice needs the data's vocab
        return train(cfg, plan, loader, device, precision, rank, world, resume_from, ops)
    except (config.ConfigError, hardware.HardwareError, DataError, kernels.KernelError,
            checkpoint.CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # before the loop (the loop's own are reported in train())
        return diagnose.out_of_memory(e, cfg, device, rank, world, 0, cfg.train.parallel, memory_gb(device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lease is not None:
            lease.release()
        if lock is not None:
            lock.close()


def train(cfg: config.Config, plan: config.Derived, loader: TrainLoader, device: torch.device,
          precision: hardware.Precision, rank: int, world: int, resume_from: str | None, ops: dict[str, str]) -> int:
    t = cfg.train
    t_start = time.perf_counter()
    say = print if rank == 0 else (lambda *a, **k: None)  # one voice for the whole job
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals make the FP32 backward ~10x slower on CPU
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        write_run_files(cfg, device, world, precision)
    say(config.dump(cfg), end="")
    say(plan.banner(cfg))

    model, train_model, mode = setup_model(cfg, device, world)
    optimizer = make_optimizer(model, t, device)
    scaler = torch.amp.GradScaler(device.type) if precision.scaled else None
    flops_per_token, peak = model.flops_per_token(), hardware.peak_flops(device, precision.dtype)
    say(describe_run(cfg, model, device, mode, world, precision, scaler, ops, optimizer))
    # Stop requests go over a CPU group, so they never wait on the GPU's stream; async checkpoints get a group
    # of their own, since their collectives run in a background thread (two threads must not share one group).
    cpu_group = dist.new_group(backend="gloo") if world > 1 else None
    ckpt_group = dist.new_group(backend="gloo") if world > 1 and t.async_checkpoint else None

    step, tokens, skips, budget_steps = 0, 0, SkipCounter(), None
    while resume_from:
        try:
            step, tokens, skips.total, budget_steps = restore(resume_from, model, optimizer, scaler, t, say)
            break
        except checkpoint.CorruptCheckpoint as e:  # verified (or too old to have checksums), yet unreadable
            resume_from = fall_back(cfg, resume_from, e, rank, cpu_group)
    budget = TimeBudget.for_run(t, plan, t_start, step) if t.max_minutes and budget_steps is None else None
    live_eval = LiveEval(cfg, model, device, precision.autocast(device), mode)  # eval.*: lm-eval tasks, a sample
    metrics = Metrics(cfg, rank, step)
    saver = Saver(t, model, optimizer, ckpt_group, say)
    if step >= t.max_steps:
        say(f"nothing to do: the checkpoint is at step {step} and train.max_steps is {t.max_steps}")
    batches_ahead = Prefetcher(loader, step, plan.grad_accum, device)
    lag = 1 if device.type == "cuda" else 0  # how many steps late skip flags are read (see SkipCounter)
    window = LogWindow(device, plan, flops_per_token, peak, batches_ahead)
    profiler = diagnose.StepProfiler(t, device, rank, step, say)  # train.profile; on CUDA, allocation history
    autocast, diverged, first = precision.autocast(device), False, True
    if t.compile and step < t.max_steps:
        say("compiling the model during the first step (about a minute on a fresh machine, seconds with a warm "
            "cache) ...", flush=True)

    with stop_requests() as stop, closing(batches_ahead), closing(metrics), profiler:
        model.train()
        try:
            while step < t.max_steps:
                window.pause(profiler.step())  # train.profile: trace a few steps (the time writing it is not counted)
                lr = lr_at(step, t)  # Muon's: the same schedule with its own peak
                optim.set_lr(optimizer, lr, lr_at(step, dataclasses.replace(t, lr=t.muon_lr)) if t.muon_lr else lr)
                batches = (batches_ahead.get() for _ in range(plan.grad_accum))
                if first:  # kept, in case the step runs twice (first_step)
                    batches = list(batches)

                def run(batches=batches, seed=t.seed * 1_000_003 + step * 1009 + rank):
                    # Dropout randomness is a function of (seed, step, rank): a resumed run repeats it exactly
                    torch.manual_seed(seed)
                    return train_step(model, train_model, optimizer, batches, plan.grad_accum, mode, t, autocast,
                                      scaler)
                loss, grad_norm, bad = first_step(run, optimizer, t, rank, world, cpu_group) if first else run()
                first = False
                step += 1
                tokens += plan.batch_tokens
                window.add(loss, bad)
                skips.push(step, torch.stack([bad, loss.float() / plan.grad_accum, grad_norm.float()]))
                saver.poll()
                if diverged := skips.report(lag, t.max_consecutive_skips, say, metrics.log):
                    break
                if budget and (decided := budget.decide(step, t.max_steps, cpu_group)):
                    t.max_steps, budget_steps = decided[0], decided[0]
                    metrics.log({"step": step, "max_steps": t.max_steps, "budget_step_s": decided[1]})
                    say(f"train.max_minutes={t.max_minutes:g}: {decided[1]:.2f} s/step measured over steps "
                        f"{step - TimeBudget.PROBE + 1}-{step}, so max_steps = {t.max_steps}", flush=True)
                last = step == t.max_steps

                if step % cfg.log.interval == 0 or last:  # log
                    if diverged := skips.report(0, t.max_consecutive_skips, say, metrics.log):
                        break
                    metrics.log(window.close(step, lr, grad_norm, tokens, t.max_steps, time.perf_counter() - t_start,
                                             skips.total, say))

                if t.eval_interval and (step % t.eval_interval == 0 or last):  # eval
                    window.pause(run_eval(model, cfg, device, autocast, rank, world, step, tokens, metrics, say))
                if cfg.eval.interval and (step % cfg.eval.interval == 0 or last):  # lm-eval tasks, a sample
                    window.pause(live_eval.run(step, tokens, metrics, say))

                stopping = any_rank(stop["signal"] is not None, cpu_group)  # every rank stops at the same step
                if saver.due(step, stopping, last):  # save
                    if diverged := skips.report(0, t.max_consecutive_skips, say, metrics.log):
                        break
                    state = run_state(cfg, tokens, world, skips, scaler, budget_steps)
                    window.pause(saver.save(step, state, skips.streak, now=stopping or last))
                if stopping:  # stop
                    break
            saver.finish()
            if diverged:
                if rank == 0:
                    print(f"error: {skips.streak} steps in a row had a non-finite loss or gradient norm "
                          f"(train.max_consecutive_skips={t.max_consecutive_skips}); stopping without saving. The "
                          f"last checkpoint, {checkpoint.find_latest(t.ckpt_dir or t.out_dir) or 'none'}, is from "
                          f"before them: resume from it with a lower train.lr or other data.", file=sys.stderr)
                return 1
        except checkpoint.SaveError as e:
            if rank == 0:
                print(f"error: {e}; stopping. Free space (or fix the storage) and run the same command to resume "
                      f"from it.", file=sys.stderr)
            return 1
        except torch.OutOfMemoryError as e:  # this step's state is half done: nothing of it is saved
            saver.finish()  # an asynchronous save begun before it holds good state
            return diagnose.out_of_memory(e, cfg, device, rank, world, step, mode, memory_gb(device))
    return 130 if stop["signal"] == signal.SIGINT else 0


def run_eval(model: GPT, cfg: config.Config, device: torch.device, autocast, rank: int, world: int, step: int,
             tokens: int, metrics: Metrics, say) -> float:
    """Validation loss and bits per byte on the first eval_batches micro-batches of each val split, with the
    uncompiled model (eval mode and a logits-only graph would each cost a recompile); returns the seconds taken."""
    t, t0 = cfg.train, time.perf_counter()
    res = evaluate(model, cfg.data.datasets, cfg.model.block_size, cfg.model.vocab_size, t.micro_batch_size, device,
                   max_tokens=t.eval_batches * t.micro_batch_size * cfg.model.block_size, autocast=autocast,
                   rank=rank, world=world)
    model.train()
    metrics.log({"step": step, "tokens": tokens, "val_loss": finite(res["loss"]), "val_bpb": finite(res["bpb"])})
    say(f"step {step:>6} | val loss {res['loss']:.4f} | val bpb {res['bpb']:.4f} "
        f"({res['tokens']:,} tokens, {time.perf_counter() - t0:.1f} s)", flush=True)
    return time.perf_counter() - t0


class LiveEval:
    """eval.*: lm-eval tasks (eval.py's adapter) and a greedy sample from eval.prompt, logged as one row: numbers
    as `task/metric`, the text as `sample`. Every rank does the same work and rank 0 logs it, so the ranks come
    back together (none waits in a collective for a rank-0-only eval, which could pass train.dist_timeout_s);
    under FSDP2 the model is first gathered whole on each rank (`whole_model`), so the forwards inside make no
    collective calls and ranks that generate different numbers of tokens cannot hang each other."""

    def __init__(self, cfg: config.Config, model: GPT, device: torch.device, autocast, mode: str):
        """Load the tokenizer and, for eval.tasks, lm-eval's task index (seconds); raises ConfigError for a task
        name it does not know, before the first step."""
        self.cfg, self.model, self.device, self.autocast, self.mode = cfg, model, device, autocast, mode
        self.tok = self.lm = self.tasks = None
        e = cfg.eval
        if not e.interval or not (e.tasks or e.prompt is not None):
            return
        # out_dir/tokenizer is a copy of this one, written by rank 0 alone (maybe on another node)
        self.tok = load_tokenizer(cfg.data.datasets[0])
        if e.tasks:
            from lm_eval.tasks import TaskManager
            self.tasks = TaskManager(include_path=e.include_path)
            unknown = [name for name in e.tasks if not self.tasks.match_tasks([name])]
            if unknown:
                raise config.ConfigError(f"eval.tasks: lm-eval knows no task {', '.join(unknown)}"
                                         + (f" (nor {e.include_path})" if e.include_path else ""))
            self.lm = harness_lm(model, self.tok, device, cfg.train.micro_batch_size, autocast)

    def run(self, step: int, tokens: int, metrics: Metrics, say) -> float:
        """Evaluate and log at `step`; returns the seconds taken (kept out of the throughput)."""
        if self.tok is None:
            return 0.0
        e, t0, row = self.cfg.eval, time.perf_counter(), {"step": step, "tokens": tokens}
        # eager: the compiled blocks (FSDP) would recompile for every new shape
        with whole_model(self.model, self.mode, self.cfg.train.reshard_after_forward), \
                torch.compiler.set_stance("force_eager"):
            self.model.eval()
            if self.lm is not None:
                try:
                    res = run_tasks(self.lm, e.tasks, e.num_fewshot, e.limit, task_manager=self.tasks)
                    row.update({f"{task}/{name.removesuffix(',none')}": finite(float(v))
                                for task, scores in res.items() for name, v in scores.items()})
                except Exception as err:  # a benchmark's hiccup (a download, a task's bug) must not end the run
                    say(f"step {step:>6} | warning: eval.tasks failed: {type(err).__name__}: {err}", flush=True)
            if e.prompt is not None:
                row["sample"] = self.sample(e.prompt)
            self.model.train()
        metrics.log(row)
        scores = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if "/" in k and v is not None)
        say(f"step {step:>6} | {scores + ' | ' if scores else ''}{time.perf_counter() - t0:.1f} s"
            + (f" | sample {row['sample']!r}" if "sample" in row else ""), flush=True)
        return time.perf_counter() - t0

    def sample(self, prompt: str) -> str:
        """The prompt and its greedy continuation (eval.max_new_tokens at most), cut where a document ends."""
        tok = self.tok
        idx = torch.tensor([tok.start_ids + tok.encode(prompt)], device=self.device)
        with self.autocast:
            new = self.model.generate(idx, self.cfg.eval.max_new_tokens, temperature=0, stop_token=tok.eot_id)
        new = new[0, idx.size(1):].tolist()
        ends = [i for i, t in enumerate(new) if t in tok.end_ids]
        return prompt + tok.decode(new[:ends[0]] if ends else new)


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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
