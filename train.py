"""Train a GPT from YAML configs.

    python train.py configs/tiny.yaml [more.yaml ...] [section.key=value ...]

config -> device and precision -> data (the offline default corpus is prepared on first use) -> model built
on the meta device and initialised -> AdamW + LR schedule -> resume from out_dir/latest -> optional
torch.compile -> loop: micro-batches with gradient accumulation, clip, step, log, eval, checkpoint.
SIGINT/SIGTERM finish the current step, write a checkpoint and exit.
"""
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

import checkpoint
import config
from data.prepare import copy_tokenizer, ensure_prepared
from eval import evaluate
from loader import DataError, TrainLoader
from model import build

# Dense BF16 peak TFLOP/s by device name, for MFU (FP32 runs use the same peak: TF32 tensor cores).
PEAK_TFLOPS = {"H100 PCIe": 756, "H800 PCIe": 756, "H100": 989, "H800": 989, "H200": 989, "A100": 312}


def dist_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; the seam where the distributed wrap plugs in."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise SystemExit("error: multi-process training (torchrun) is not supported yet; run one process")
    return 0, 1


def pick_device(name: str, precision: str = "fp32") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise config.ConfigError("train.device is cuda but no CUDA device is available")
    if name == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise config.ConfigError("this GPU has no BF16 support: set train.precision=fp32")
    if name == "mps" and not torch.backends.mps.is_available():
        raise config.ConfigError("train.device is mps but MPS is not available")
    return torch.device(name)


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


@contextmanager
def stop_requests():
    """Turn SIGINT/SIGTERM into a request to stop after the current step; the old handlers come back after."""
    stop = {"signal": None}

    def request(signum, frame):
        stop["signal"] = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint", flush=True)
    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
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


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        cfg = config.load(argv)
        rank, world = dist_env()
        device = pick_device(cfg.train.device, cfg.train.precision)
        prepare_data(cfg)
        plan = config.derive(cfg, world)
        t = cfg.train
        loader = TrainLoader(cfg.data.datasets, cfg.data.weights, cfg.model.block_size, t.micro_batch_size,
                             plan.grad_accum, t.seed, rank, world, cfg.model.vocab_size)
        resume_from = checkpoint.find_latest(t.out_dir) if t.resume else None
        if resume_from:
            check_same_model(checkpoint.read_state(resume_from)["config"], cfg, resume_from)
    except (config.ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals make the FP32 backward ~10x slower on CPU
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if rank == 0:
        os.makedirs(t.out_dir, exist_ok=True)
        with open(os.path.join(t.out_dir, "config.yaml"), "w") as f:
            f.write(config.dump(cfg))
        with open(os.path.join(t.out_dir, "run_info.json"), "w") as f:
            json.dump(run_info(device), f, indent=1)
        copy_tokenizer(cfg.data.datasets[0], os.path.join(t.out_dir, "tokenizer"))
        print(config.dump(cfg), end="")
        print(plan.banner(cfg))

    torch.manual_seed(t.seed)
    model = build(cfg.model, device)
    optimizer = make_optimizer(model, t, device)
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device)
    print(f"model: {cfg.model.arch}, {model.num_params() / 1e6:.2f}M parameters "
          f"({model.num_params(embeddings=False) / 1e6:.2f}M without embeddings), "
          f"{flops_per_token / 1e6:.1f} MFLOPs/token; device {device}, precision {t.precision}")

    step, tokens = 0, 0
    if resume_from:
        state = checkpoint.load(resume_from, model, optimizer)
        step, tokens = state["step"], state["tokens"]
        print(f"resumed from {resume_from} at step {step}")
    metrics_path = os.path.join(t.out_dir, "metrics.jsonl")
    if rank == 0 and os.path.exists(metrics_path):  # drop rows a killed run logged after its last checkpoint
        with open(metrics_path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(metrics_path, "w") as f:
            f.writelines(rows)
    fwd = torch.compile(model) if t.compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if t.precision == "bf16" else nullcontext())

    def log(row: dict) -> None:
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save() -> None:
        state = {"tokens": tokens, "config": config.to_dict(cfg), "world_size": world}
        path = checkpoint.save(t.out_dir, step, model, optimizer, state, t.keep_last)
        print(f"saved {path}")

    if step >= t.max_steps:
        print(f"nothing to do: the checkpoint is at step {step} and train.max_steps is {t.max_steps}")
    with stop_requests() as stop:
        loss_sum = torch.zeros((), device=device)
        steps_since_log, t_log, t_start = 0, time.perf_counter(), time.perf_counter()
        model.train()
        while step < t.max_steps and stop["signal"] is None:
            # Dropout randomness is a function of (seed, step, rank), so a resumed run repeats it exactly.
            torch.manual_seed(t.seed * 1_000_003 + step * 1009 + rank)
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(plan.grad_accum):
                x, y = loader.batch(step, micro)
                if device.type == "cuda":
                    x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
                else:
                    x, y = x.to(device), y.to(device)
                with autocast:
                    loss = fwd(x, y)
                (loss / plan.grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += plan.batch_tokens
            steps_since_log += 1

            if step % cfg.log.interval == 0 or step == t.max_steps:
                loss_val = loss_sum.item() / (steps_since_log * plan.grad_accum)  # the one host sync per log step
                now = time.perf_counter()
                tok_s = steps_since_log * plan.batch_tokens / (now - t_log)
                row = {"step": step, "loss": loss_val, "lr": lr, "grad_norm": grad_norm.item(), "tokens": tokens,
                       "tokens_per_s": tok_s, "mfu": tok_s * flops_per_token / peak if peak else None,
                       "mem_gb": memory_gb(device), "elapsed_s": now - t_start}
                log(row)
                if rank == 0:
                    eta = (t.max_steps - step) * (now - t_log) / steps_since_log
                    mfu = f" | mfu {row['mfu']:.1%}" if peak else ""
                    print(f"step {step:>6} | loss {loss_val:.4f} | lr {lr:.2e} | grad {row['grad_norm']:.3f} | "
                          f"{tok_s:,.0f} tok/s{mfu} | mem {row['mem_gb']:.2f} GB | eta {eta / 60:.1f} min", flush=True)
                if not math.isfinite(loss_val):
                    print("error: loss is not finite; stopping without saving", file=sys.stderr)
                    return 1
                loss_sum.zero_()
                steps_since_log, t_log = 0, time.perf_counter()

            if t.eval_interval and (step % t.eval_interval == 0 or step == t.max_steps):
                t0 = time.perf_counter()
                # the uncompiled model: eval mode and a logits-only graph would each cost a recompile
                res = evaluate(model, cfg.data.datasets, cfg.model.block_size, cfg.model.vocab_size, t.micro_batch_size,
                               device, max_tokens=t.eval_batches * t.micro_batch_size * cfg.model.block_size,
                               autocast=autocast, rank=rank, world=world)
                model.train()
                log({"step": step, "tokens": tokens, "val_loss": res["loss"], "val_bpb": res["bpb"]})
                if rank == 0:
                    print(f"step {step:>6} | val loss {res['loss']:.4f} | val bpb {res['bpb']:.4f} "
                          f"({res['tokens']:,} tokens, {time.perf_counter() - t0:.1f} s)", flush=True)
                t_log += time.perf_counter() - t0  # eval time does not count against training throughput

            if step % t.ckpt_interval == 0 or step == t.max_steps or stop["signal"] is not None:
                t0 = time.perf_counter()
                save()
                t_log += time.perf_counter() - t0
    return 130 if stop["signal"] == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
