"""The training loop's services, kept out of its way: checkpoints (when to save, resume, fall back past a damaged
one), metrics (metrics.jsonl, the trackers, the log line), skipped-step accounting, the time budget, the run's lock,
stop signals and the files that describe a run. train.py calls them; each says what it promises.
"""
import collections
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoint
import config
import diagnose
import hardware
import lora
import tracking
from model import GPT, MoE
from parallel import print0
from tokenizer import copy_tokenizer

try:
    import fcntl
    import resource
except ImportError:  # Windows: no POSIX record locks (see lock_run), no getrusage (see memory_gb)
    fcntl = resource = None


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
        """Read all but the newest `lag` steps; returns those skipped as (step, loss, grad norm, in a row, in total)."""
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

    def report(self, lag: int, limit: int, log) -> bool:
        """Print and log the skipped steps seen so far (all but the newest `lag`); True at `limit` in a row: stop."""
        for s, loss, norm, streak, total in self.poll(lag):
            what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
            print0(f"step {s:>6} | {what} is not finite: update skipped ({streak} in a row, {total} in total; the "
                f"run stops at {limit} in a row)", flush=True)
            log({"step": s, "skipped": True, "skipped_steps": total})
        return self.streak >= limit


class Metrics:
    """Rows of metrics.jsonl, mirrored to wandb/TensorBoard; written by rank 0 only. On resume the rows a killed
    run logged after its last checkpoint, and a line cut short by the kill, are dropped first (tracking.py follows)."""

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

    def __init__(self, device: torch.device, plan: config.Derived, flops_per_token: float, peak: float | None, data,
                 model: nn.Module | None = None):
        self.device, self.plan, self.flops_per_token, self.peak = device, plan, flops_per_token, peak
        self.experts = [m for m in model.modules() if isinstance(m, MoE)] if model is not None else []
        self.loss_sum, self.good = torch.zeros((), device=device), torch.zeros((), device=device)
        self.steps, self.t0, self.data, self.waited = 0, time.perf_counter(), data, data.waited

    def add(self, step_loss: torch.Tensor, bad: torch.Tensor) -> None:
        self.loss_sum += torch.where(bad > 0, 0.0, step_loss)
        self.good += 1 - bad  # skipped steps do not count towards the mean loss
        self.steps += 1

    def pause(self, seconds: float) -> None:
        self.t0 += seconds

    def close(self, step: int, lr: float, grad_norm: torch.Tensor, tokens: int, max_steps: int, elapsed: float,
              skipped: int) -> dict:
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
        moe = self.expert_balance() if self.experts else {}
        row.update(moe)
        print0(f"step {step:>6} | loss {loss:.4f} | lr {lr:.2e} | grad {norm:.3f} | {tok_s:,.0f} tok/s"
            + (f" | mfu {mfu:.1%}" if mfu else "")
            + (f" | experts max/mean {moe['moe_load_max']:.2f}, bias spread {moe['moe_bias_spread_max']:.4f}"
               + (f", aux {moe['moe_aux_loss']:.4f}" if moe["moe_aux_loss"] is not None else "") if moe else "")
            + f" | data wait {wait_s / step_s:.1%} | mem {row['mem_gb']:.2f} GB | "
            f"eta {(max_steps - step) * step_s / 60:.1f} min", flush=True)
        return row

    def expert_balance(self) -> dict:
        """The MoE layers at the last step: tokens of the busiest expert over the mean (1.0 is perfect balance) and
        the spread (max - min) of the routing biases, per layer and the worst, and the balance loss (model.moe.
        aux_loss_coef: rank 0's last micro-batch, summed over layers; None when off)."""
        if self.experts[0].last_load is None:
            return {}
        load = torch.stack([m.last_load for m in self.experts])
        bias = torch.stack([m.gate.e_score_correction_bias.float() for m in self.experts])
        ratio = (load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)).tolist()
        spread = (bias.max(dim=1).values - bias.min(dim=1).values).tolist()
        aux = [m.aux_loss for m in self.experts if m.aux_loss is not None]
        return {"moe_load": ratio, "moe_load_max": max(ratio), "moe_bias_spread": spread,
                "moe_bias_spread_max": max(spread), "moe_aux_loss": float(sum(aux).detach()) if aux else None}


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
        # an eval scores eval_batches micro-batches over the data-parallel ranks; a step trains grad_accum on each
        eval_steps = t.eval_batches / plan.dp / (3 * plan.grad_accum)
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


class Saver:
    """When checkpoints are written: every ckpt_interval steps, at the last step and on a stop request. A
    periodic save waits for a step that was not skipped, so that checkpoints sit at good steps (the weights are the
    same either way, so a stop or the last step saves at once). An asynchronous save is published when done and
    always before the next one starts."""

    def __init__(self, t: config.TrainConfig, model: nn.Module, optimizer, group):
        self.t, self.model, self.optimizer, self.group = t, model, optimizer, group
        self.owed, self.pending = False, None

    def due(self, step: int, stopping: bool, last: bool) -> bool:
        self.owed = self.owed or step % self.t.ckpt_interval == 0 or last
        return self.owed or stopping

    def save(self, step: int, state: dict, streak: int, now: bool) -> float:
        """Write step's checkpoint unless the last `streak` steps were skipped (`now` overrides); returns seconds."""
        if streak and not now:
            if step % self.t.ckpt_interval == 0:
                print0(f"step {step:>6} | checkpoint postponed: the last {streak} step(s) were skipped")
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
            print0(f"saved {pending.wait()}")


def lock_run(t: config.TrainConfig) -> tuple:
    """Take the run's folders (rank 0, before anything is written): the lock of out_dir, a check that a local
    ckpt_dir is writable and not another run's out_dir, and the lease of a remote one. Returns (the lock file,
    the lease or None) for the caller to release at the end."""
    lock, lease = _lock(t.out_dir), None
    try:
        if t.ckpt_dir and not checkpoint.is_remote(t.ckpt_dir) and \
                os.path.realpath(t.ckpt_dir) != os.path.realpath(t.out_dir):
            _lock(t.ckpt_dir).close()  # closing drops the lock
        if t.ckpt_dir and checkpoint.is_remote(t.ckpt_dir):  # an object store has no locks: a lease
            lease = checkpoint.Lease(t.ckpt_dir, t.lease_minutes)
            lease.acquire()
    except BaseException:
        lock.close()
        raise
    return lock, lease


def _lock(out_dir: str):
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


def run_info(run: config.Run) -> dict:
    """What produced this run: git revision, package versions, hardware, command line, and what was resolved."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    import numpy
    device = run.device
    return {"git": rev or None, "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "device": str(device), "cpus": os.cpu_count(), "host": platform.node(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, **run.info()}

def write_run_files(run: config.Run) -> None:
    """config.yaml (resolved), run_info.json (what produced the run) and the tokenizer, into out_dir."""
    t = run.cfg.train
    os.makedirs(t.out_dir, exist_ok=True)
    with open(os.path.join(t.out_dir, "config.yaml"), "w") as f:
        f.write(config.dump(run.cfg))
    with open(os.path.join(t.out_dir, "run_info.json"), "w") as f:
        json.dump(run_info(run), f, indent=1)
    copy_tokenizer(run.cfg.data.datasets[0], os.path.join(t.out_dir, "tokenizer"))

def memory_gb(device: torch.device) -> float:
    """Peak memory in GB: allocated on CUDA, the process's peak RSS on a CPU (NaN on Windows: no getrusage)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if resource is None:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def finite(x: float) -> float | None:
    """metrics.jsonl stays strict JSON: a non-finite value is written as null."""
    return x if math.isfinite(x) else None


def restore(path: str, model: nn.Module, optimizer, scaler) -> tuple[int, int, int, int | None]:
    """Load checkpoint `path` into model, optimizer and scaler. Returns (step, tokens, skipped steps, the max_steps
    the run's time budget decided, or None): that decision applies again, so the LR schedule is the same."""
    state = checkpoint.load(path, model, optimizer, verified=True)  # find_resume verified it
    if scaler is not None and "grad_scaler" in state:
        scaler.load_state_dict(state["grad_scaler"])
    print0(f"resumed from {path} at step {state['step']} (saved by {state.get('world_size', 1)} process(es))")
    return state["step"], state["tokens"], state.get("skipped_steps", 0), state.get("budget_max_steps")

def run_state(run: config.Run, tokens: int, max_steps: int, skips: SkipCounter, scaler, budget_steps) -> dict:
    """What a checkpoint keeps beside the tensors (train_state.json): the config as it runs (max_steps as the time
    budget decided it), tokens seen, skipped steps, the loss scaler."""
    cfg = replace(run.cfg, train=replace(run.cfg.train, max_steps=max_steps))
    state = {"tokens": tokens, "config": config.to_dict(cfg), "world_size": run.world_size, "tp": run.tp,
             "skipped_steps": skips.total}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    if budget_steps is not None:
        state["budget_max_steps"] = budget_steps
    if cfg.train.lora:  # the adapters are only good on the base they were trained on
        state["lora_base"] = lora.fingerprint(cfg.train.init_from, cfg.train.seed)
    return state

def fall_back(run: config.Run, bad: str, error: Exception, group) -> str:
    """After checkpoint `bad` failed to load on some rank (DCP gathers every rank's error, so all ranks are
    here): rank 0 sets it aside and picks the newest checkpoint that verifies; every rank gets its name. The next
    load overwrites every tensor the failed one may have half written. Raises CheckpointError when none is left
    (a fresh start would need a fresh model)."""
    shared = [None]
    if run.rank == 0:
        print(f"warning: {error}. Moved it aside to {checkpoint.set_aside(bad)}; trying the checkpoint before it.",
              file=sys.stderr, flush=True)
        shared = [find_resume(run.cfg) or ""]
    if group is not None:
        dist.broadcast_object_list(shared, src=0, group=group)
    if not shared[0]:
        raise checkpoint.CheckpointError(f"{error}, and no older checkpoint verifies; start over with "
                                         f"train.resume=false or another train.out_dir")
    return shared[0]

def find_resume(cfg: config.Config) -> str | None:
    """The checkpoint to resume from (rank 0): the newest one in the run that verifies (train_state.json, the
    tensor index against this model, every file's checksum); damaged newer ones are set aside, loudly."""
    t = cfg.train
    if not t.resume:
        return None
    with torch.device("meta"):
        model = GPT(cfg.model)
    if t.lora:
        lora.apply(model, t)

    def check(state, path):
        check_same_model(state["config"], cfg, path)
        if t.lora:
            lora.check_base(state, t, path)
    return checkpoint.find_resumable(t.ckpt_dir or t.out_dir, model,
                                     lambda msg: print(msg, file=sys.stderr, flush=True), check=check)


def check_same_model(saved: dict, cfg: config.Config, path: str) -> None:
    ours = config.to_dict(cfg)["model"]  # nested sections (model.moe) as dicts, as the checkpoint keeps them
    if diff := {k: (v, ours.get(k)) for k, v in saved["model"].items() if ours.get(k) != v}:
        lines = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise config.ConfigError(f"checkpoint {path} was trained with a different model ({lines}); "
                                 f"use another train.out_dir or train.resume=false")


def banner(run: config.Run, model: GPT, optimizer, scaler) -> str:
    """The start-up lines after the config: model size, layout, precision and why, kernels, optimizer."""
    t, world = run.cfg.train, run.world_size
    muon = sum(p.numel() for g in optimizer.param_groups if g.get("muon") for p in g["params"])
    if muon:  # under FSDP2 the counts are global: the parameters are DTensors of the full shape
        opt = (f"optimizer: Muon for {muon / 1e6:.2f}M parameters of the blocks' matrices (lr {t.muon_lr or t.lr:g}, "
               f"Newton-Schulz in {next(g for g in optimizer.param_groups if g.get('muon'))['ns_dtype']}), AdamW for "
               f"the rest (lr {t.lr:g})")
    else:
        opt = f"optimizer: AdamW (lr {t.lr:g}{', fused' if optimizer.param_groups[0].get('fused') else ''})"
    if t.lora:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt += (f"\nLoRA: rank {t.lora_rank}, alpha {t.lora_alpha:g} on {', '.join(t.lora_targets)}: "
                f"{trained / 1e6:.3f}M trainable parameters, the rest frozen")
    return (f"model: {run.cfg.model.arch}, {model.num_params() / 1e6:.2f}M parameters "
            f"({model.num_params(embeddings=False) / 1e6:.2f}M without embeddings), "
            f"{model.flops_per_token() / 1e6:.1f} MFLOPs/token; device {run.device}, parallel {run.mode} x {world}"
            + (f" (data parallel {run.dp} x tensor parallel {run.tp})" if run.tp > 1 else "")
            + (", activation checkpointing" if t.activation_checkpointing else "") + f", compile {t.compile}\n"
            + hardware.describe(run.precision) + (" (loss scaling: torch.amp.GradScaler)" if scaler else "") + "\n"
            + "kernels: " + run.ops.describe() + "\n" + opt)

