"""Train a GPT from YAML configs, on one CPU or GPU or many through torchrun.

    python train.py configs/tiny.yaml [more.yaml ...] [section.key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py configs/500m.yaml

config -> process group (from torchrun's environment) and device -> data (the offline default corpus is
prepared on first use, by rank 0) -> model built on the meta device -> activation checkpointing, compile,
FSDP2 or DDP -> materialised and initialised -> AdamW + LR schedule -> resume from out_dir/latest -> loop:
micro-batches with gradient accumulation (gradients synchronised once per step), clip, step, log, eval,
checkpoint. SIGTERM/SIGUSR1 (what SLURM sends before a preemption or the time limit) and SIGINT finish the
current step on every rank, write a checkpoint and exit. A step whose loss or gradient norm is not finite is
skipped; train.max_consecutive_skips of them in a row stop the run. RELIABILITY.md lists what a run survives.
"""
import collections
import fcntl
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from contextlib import closing, contextmanager, nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

import checkpoint
import config
import export
import kernels
import tracking
from data.prepare import copy_tokenizer, ensure_prepared
from eval import evaluate
from loader import DataError, Prefetcher, TrainLoader
from model import GPT

# Dense BF16 peak TFLOP/s by device name, for MFU (FP32 runs use the same peak: TF32 tensor cores).
PEAK_TFLOPS = {"H100 PCIe": 756, "H800 PCIe": 756, "H100": 989, "H800": 989, "H200": 989, "A100": 312}


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


def pick_device(name: str, precision: str = "fp32", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise config.ConfigError("train.device is cuda but no CUDA device is available")
    if name == "cuda" and precision in ("bf16", "fp8") and not torch.cuda.is_bf16_supported():
        raise config.ConfigError("this GPU has no BF16 support: set train.precision=fp32")
    if name == "mps" and not torch.backends.mps.is_available():
        raise config.ConfigError("train.device is mps but MPS is not available")
    return torch.device(name, local_rank) if name == "cuda" else torch.device(name)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops * 1e12
    return None


def make_optimizer(model: nn.Module, t: config.TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or embedding tables); fused where possible."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused)


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
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


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
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
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
        bf16 = t.precision != "fp32"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
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
               t: config.TrainConfig, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over `grad_accum` micro-batches (x, y) already on the device; returns the summed
    micro-batch losses, the gradient norm before clipping and a flag (1.0) for a skipped step, all left on the
    device (no host sync).

    A step whose loss (on any rank) or gradient norm is not finite is skipped: fused AdamW's `found_inf` input
    (the mechanism GradScaler uses) makes it leave weights, moments and step count exactly as they were,
    decided on the device. The data moves on, so a bad batch is not retried."""
    loss_sum = 0.0
    for micro, (x, y) in enumerate(batches):
        with sync_grads(train_model, mode, micro == grad_accum - 1, t.fsdp_defer_sync):
            with autocast:
                loss = train_model(x, y)
            (loss / grad_accum).backward()
        loss_sum = loss_sum + loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
    if mode != "none":  # a loss is per rank; every rank must skip alike (no host sync on NCCL)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    optimizer.found_inf = bad
    optimizer.step()
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


def any_rank(flag: bool, group) -> bool:
    """Whether `flag` is set on any rank (a CPU all-reduce: no device sync), so all ranks stop together."""
    if group is None:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    rank, lock = 0, None
    try:
        cfg = config.load(argv)
        tracking.check(cfg)
        t = cfg.train
        if t.init_from:  # the model's shape comes from the Hugging Face checkpoint
            cfg.model = export.config_from_hf(t.init_from, cfg.model)
        rank, local_rank, world = init_distributed(t.device, t.dist_timeout_s)
        device = pick_device(t.device, t.precision, local_rank)
        if t.precision == "fp8" and (why := kernels.float8_supported(device)):
            raise config.ConfigError(f"train.precision=fp8: {why}")
        ops = kernels.configure(t.kernels, t.loss, device, torch.float32 if t.precision == "fp32" else torch.bfloat16)
        # rank 0 takes the run's lock and prepares missing data; the others wait and then see the same outcome
        error = None
        if rank == 0:
            try:
                lock = lock_run(t.out_dir)
                if t.ckpt_dir and not checkpoint.is_remote(t.ckpt_dir) and \
                        os.path.realpath(t.ckpt_dir) != os.path.realpath(t.out_dir):
                    lock_run(t.ckpt_dir).close()  # writable and not another run's out_dir (closing drops the lock)
                for name in checkpoint.clean(t.ckpt_dir or t.out_dir):
                    print(f"removed {name}, an unfinished save or deletion of a killed run")
                prepare_data(cfg)
            except (config.ConfigError, DataError) as e:
                error = str(e)
        if world > 1:
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
            if error is None and rank != 0:
                prepare_data(cfg)
        if error is not None:
            raise config.ConfigError(error)
        plan = config.derive(cfg, world)
        loader = TrainLoader(cfg.data.datasets, cfg.data.weights, cfg.model.block_size, t.micro_batch_size,
                             plan.grad_accum, t.seed, rank, world, cfg.model.vocab_size)
        resume_from = checkpoint.find_latest(t.ckpt_dir or t.out_dir) if t.resume else None
        if resume_from:
            check_same_model(checkpoint.read_state(resume_from)["config"], cfg, resume_from)
            with torch.device("meta"):
                checkpoint.verify(resume_from, GPT(cfg.model))
        return train(cfg, plan, loader, device, rank, world, resume_from, ops)
    except (config.ConfigError, DataError, kernels.KernelError, checkpoint.CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.close()


def train(cfg: config.Config, plan: config.Derived, loader: TrainLoader, device: torch.device, rank: int,
          world: int, resume_from: str | None, ops: dict[str, str]) -> int:
    t = cfg.train
    say = print if rank == 0 else (lambda *a, **k: None)  # one voice for the whole job
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals make the FP32 backward ~10x slower on CPU
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        os.makedirs(t.out_dir, exist_ok=True)
        with open(os.path.join(t.out_dir, "config.yaml"), "w") as f:
            f.write(config.dump(cfg))
        with open(os.path.join(t.out_dir, "run_info.json"), "w") as f:
            json.dump({**run_info(device), "world_size": world}, f, indent=1)
        copy_tokenizer(cfg.data.datasets[0], os.path.join(t.out_dir, "tokenizer"))
    say(config.dump(cfg), end="")
    say(plan.banner(cfg))

    model, train_model, mode = setup_model(cfg, device, world)
    optimizer = make_optimizer(model, t, device)
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device)
    say(f"model: {cfg.model.arch}, {model.num_params() / 1e6:.2f}M parameters "
        f"({model.num_params(embeddings=False) / 1e6:.2f}M without embeddings), "
        f"{flops_per_token / 1e6:.1f} MFLOPs/token; device {device}, precision {t.precision}, "
        f"parallel {mode} x {world}" + (", activation checkpointing" if t.activation_checkpointing else ""))
    say("kernels: " + ", ".join(f"{op} {name}" for op, name in ops.items()))
    # Stop requests go over a CPU group, so they never wait on the GPU's stream; async checkpoints get a group
    # of their own, since their collectives run in a background thread (two threads must not share one group).
    cpu_group = dist.new_group(backend="gloo") if world > 1 else None
    ckpt_group = dist.new_group(backend="gloo") if world > 1 and t.async_checkpoint else None

    step, tokens, skips = 0, 0, SkipCounter()
    if resume_from:
        state = checkpoint.load(resume_from, model, optimizer)
        step, tokens, skips.total = state["step"], state["tokens"], state.get("skipped_steps", 0)
        say(f"resumed from {resume_from} at step {step} (saved by {state.get('world_size', 1)} process(es))")
    metrics_path = os.path.join(t.out_dir, "metrics.jsonl")
    if rank == 0 and os.path.exists(metrics_path):
        # drop rows a killed run logged after its last checkpoint, and a line cut short by the kill
        kept = []
        with open(metrics_path) as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except ValueError:
                    pass
        checkpoint.write_atomic(metrics_path, "".join(kept))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if t.precision != "fp32" else nullcontext()

    tracker = tracking.Tracker(cfg, active=rank == 0)

    def log(row: dict) -> None:
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            tracker.log(row)

    pending = None  # an async checkpoint still being written

    def save() -> None:
        nonlocal pending
        if pending is not None:
            say(f"saved {pending.wait()}")
        state = {"tokens": tokens, "config": config.to_dict(cfg), "world_size": world, "skipped_steps": skips.total}
        pending = checkpoint.save(t.ckpt_dir or t.out_dir, step, model, optimizer, state, t.keep_last,
                                  async_group=ckpt_group if t.async_checkpoint else False)
        if not t.async_checkpoint:
            say(f"saved {pending.wait()}")
            pending = None

    if step >= t.max_steps:
        say(f"nothing to do: the checkpoint is at step {step} and train.max_steps is {t.max_steps}")
    batches_ahead = Prefetcher(loader, step, plan.grad_accum, device)
    lag = 1 if device.type == "cuda" else 0  # how many steps late skip flags are read (see SkipCounter)

    def check_skips(lag: int) -> bool:
        """Report newly seen skipped steps; True when the run has to stop (too many in a row)."""
        for s, loss, norm, streak, total in skips.poll(lag):
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
            say(f"step {s:>6} | {what} is not finite: update skipped ({streak} in a row, {total} in total; the "
                f"run stops at {t.max_consecutive_skips} in a row)", flush=True)
            log({"step": s, "skipped": True, "skipped_steps": total})
        return skips.streak >= t.max_consecutive_skips

    def finite(x: float) -> float | None:  # metrics.jsonl stays strict JSON
        return x if math.isfinite(x) else None

    with stop_requests() as stop, closing(batches_ahead), closing(tracker):
        loss_sum = torch.zeros((), device=device)
        good_steps = torch.zeros((), device=device)  # steps since the last log line that were not skipped
        steps_since_log, t_log, t_start = 0, time.perf_counter(), time.perf_counter()
        save_due, diverged = False, False
        model.train()
        try:
            while step < t.max_steps:
                # Dropout randomness is a function of (seed, step, rank), so a resumed run repeats it exactly.
                torch.manual_seed(t.seed * 1_000_003 + step * 1009 + rank)
                lr = lr_at(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batches = (batches_ahead.get() for _ in range(plan.grad_accum))
                step_loss, grad_norm, bad = train_step(model, train_model, optimizer, batches, plan.grad_accum,
                                                       mode, t, autocast)
                loss_sum += torch.where(bad > 0, 0.0, step_loss)
                good_steps += 1 - bad
                skips.push(step + 1, torch.stack([bad, step_loss.float() / plan.grad_accum, grad_norm.float()]))
                step += 1
                tokens += plan.batch_tokens
                steps_since_log += 1
                if pending is not None and pending.done():
                    say(f"saved {pending.wait()}")
                    pending = None
                if diverged := check_skips(lag):
                    break

                if step % cfg.log.interval == 0 or step == t.max_steps:
                    if diverged := check_skips(0):
                        break
                    if world > 1:
                        dist.all_reduce(loss_sum)
                    sums = torch.stack([loss_sum, good_steps]).tolist()  # the one host sync per log step
                    loss_val = sums[0] / (sums[1] * plan.grad_accum * world) if sums[1] else float("nan")
                    now = time.perf_counter()
                    tok_s = steps_since_log * plan.batch_tokens / (now - t_log)
                    norm = grad_norm.item()
                    row = {"step": step, "loss": finite(loss_val), "lr": lr, "grad_norm": finite(norm),
                           "tokens": tokens, "tokens_per_s": tok_s,
                           "mfu": tok_s / world * flops_per_token / peak if peak else None,
                           "mem_gb": memory_gb(device), "elapsed_s": now - t_start, "skipped_steps": skips.total}
                    log(row)
                    eta = (t.max_steps - step) * (now - t_log) / steps_since_log
                    mfu = f" | mfu {row['mfu']:.1%}" if peak else ""
                    say(f"step {step:>6} | loss {loss_val:.4f} | lr {lr:.2e} | grad {norm:.3f} | "
                        f"{tok_s:,.0f} tok/s{mfu} | mem {row['mem_gb']:.2f} GB | eta {eta / 60:.1f} min", flush=True)
                    loss_sum.zero_()
                    good_steps.zero_()
                    steps_since_log, t_log = 0, time.perf_counter()

                if t.eval_interval and (step % t.eval_interval == 0 or step == t.max_steps):
                    t0 = time.perf_counter()
                    # the uncompiled model: eval mode and a logits-only graph would each cost a recompile
                    res = evaluate(model, cfg.data.datasets, cfg.model.block_size, cfg.model.vocab_size,
                                   t.micro_batch_size, device,
                                   max_tokens=t.eval_batches * t.micro_batch_size * cfg.model.block_size,
                                   autocast=autocast, rank=rank, world=world)
                    model.train()
                    log({"step": step, "tokens": tokens, "val_loss": finite(res["loss"]), "val_bpb": finite(res["bpb"])})
                    say(f"step {step:>6} | val loss {res['loss']:.4f} | val bpb {res['bpb']:.4f} "
                        f"({res['tokens']:,} tokens, {time.perf_counter() - t0:.1f} s)", flush=True)
                    t_log += time.perf_counter() - t0  # eval time does not count against training throughput

                stopping = any_rank(stop["signal"] is not None, cpu_group)  # every rank stops at the same step
                save_due = save_due or step % t.ckpt_interval == 0 or step == t.max_steps
                if save_due or stopping:
                    if diverged := check_skips(0):
                        break
                    # A periodic save waits for a step that was not skipped, so that checkpoints sit at good
                    # steps; the weights are the same either way, so a stop request or the last step saves now.
                    if skips.streak == 0 or stopping or step == t.max_steps:
                        t0 = time.perf_counter()
                        save()
                        t_log += time.perf_counter() - t0
                        save_due = False
                    elif step % t.ckpt_interval == 0:
                        say(f"step {step:>6} | checkpoint postponed: the last {skips.streak} step(s) were skipped")
                if stopping:
                    break
            if pending is not None:
                say(f"saved {pending.wait()}")
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
    return 130 if stop["signal"] == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
