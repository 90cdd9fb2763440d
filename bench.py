"""Training throughput on synthetic data: tokens/s, step time, MFU, peak memory, as one JSON line.

    python bench.py configs/tiny.yaml [section.key=value ...] [--warmup 3] [--steps 10] [--peak-tflops 989]
    python bench.py configs/tiny.yaml --baseline     # + the same shape with nanoGPT-style attention and loss
    python bench.py configs/tiny.yaml --bare         # + nanoGPT's bare loop: what train_step's checks cost
    python bench.py configs/tiny.yaml --lora         # + the same model with LoRA adapters, alternating with it
    torchrun --standalone --nproc_per_node=8 bench.py configs/500m.yaml
    python bench.py configs/125m.yaml --checkpoint DIR   # checkpoint save/load time, checksums on and off

The step and the model are train.py's (memory.resolve, build.build_model, parallel, optim.build, step.train_step; the
vocab the data's where it is prepared: `bench_vocab`); the data is synthetic (random ids made once on the device), so
the numbers measure the model, not the disk. Timing starts after the warm-up steps and ends with a device sync. MFU:
PaLM's FLOPs per token over the GPU's dense peak at the run's matmul precision (hardware.GPUS, or `--peak-tflops`;
FP8 against the BF16 peak). The JSON line is the last line of stdout.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

import checkpoint
import config
import hardware
import kernel
import memory
import optim
import parallel
from build import build_model
from loader import DataError, read_meta
from step import first_step, sync_grads, train_step


def naive_attention(q, k, v):
    """nanoGPT's attention without flash: the full (T, T) score matrix, masked, softmaxed, in the model dtype."""
    B, T, H, D = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if k.size(1) != H:  # GQA: repeat K/V heads, as a plain implementation would
        k, v = (t.repeat_interleave(H // k.size(1), dim=1) for t in (k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return (att.softmax(dim=-1) @ v).transpose(1, 2)


def naive_rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


BASELINE = kernel.Ops(naive_attention, naive_rms_norm, kernel.torch_rope_qk, kernel.plain_loss,
                       names={"attention": "naive (full scores)", "rms_norm": "naive", "rope": "torch",
                              "loss": "plain (full FP32 logits)", "grouped_mm": "loop"})


def bench_vocab(cfg: config.Config) -> tuple[int, str]:
    """(the vocab train.py would train, where it came from): model.vocab_size, else the data's as train.model_shape
    takes it; a missing corpus is not prepared here (GPT-2's 50,257 then, and the reason says so)."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size, "model.vocab_size"
    try:
        vocab = max(read_meta(d)["vocab_size"] for d in cfg.data.datasets)
    except DataError as e:
        return 50257, (f"GPT-2's, not the data's as train.py would take it: {e}. Prepare the data first (train.py "
                       f"prepares a named corpus on first use) or set model.vocab_size")
    return vocab, f"the data's, from {cfg.data.datasets[0]}/meta.json, as train.py takes it"


def bench(cfg: config.Config, warmup: int, steps: int, peak_tflops: float | None, baseline: bool,
          bare: bool = False, lora: bool = False) -> dict:
    t = cfg.train
    rank, local_rank, world = parallel.init_distributed(t.device, t.dist_timeout_s)
    device, precision, compiled = hardware.resolve(t, local_rank, cfg.model)  # train.py's rules
    if precision.warning:
        print(f"warning: {precision.warning}", file=sys.stderr)
    if rank == 0:  # compile auto as train.py decides it, for the run the config describes (its max_steps, max_minutes)
        print(hardware.describe(precision), file=sys.stderr)
    run = memory.resolve(cfg, cfg.model, device, precision, compiled, rank, world)
    t = run.cfg.train
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_model(run.cfg, device, run.ops, parallelize=lambda m: parallel.parallelize(m, run))
    train_model = parallel.wrap(model, run)
    optimizer = optim.build(model, t, device)
    scaler = torch.amp.GradScaler(device.type) if precision.scaled else None
    gen = torch.Generator(device).manual_seed(t.seed + run.dp_rank)  # a tensor-parallel group shares its batches
    shape = (t.micro_batch_size, cfg.model.block_size + 1)
    data = [torch.randint(0, cfg.model.vocab_size, shape, device=device, generator=gen) for _ in range(run.grad_accum)]
    batches = [(d[:, :-1], d[:, 1:]) for d in data]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    # the first step as train.py takes it: a backend that fails there is replaced by torch's (step.first_step)
    cpu_group = torch.distributed.new_group(backend="gloo") if world > 1 else None
    _, chosen = first_step(lambda: train_step(model, train_model, optimizer, batches, run, scaler), model,
                           optimizer, run, cpu_group)
    names = dict(chosen.names) if chosen is run.ops else {
        op: name + (f" (fell back from {run.ops.names[op]})" if op in run.ops.replaced() else "")
        for op, name in chosen.names.items()}

    def our_step():
        return train_step(model, train_model, optimizer, batches, run, scaler)[0]

    def bare_step():
        """nanoGPT's loop around the same model, kernels and optimizer: no non-finite check or skip, no device-side
        skip flag (found_inf), no loss sum; gradient sync as train_step does it."""
        optimizer.found_inf = None
        for micro, (x, y) in enumerate(batches):
            with sync_grads(train_model, run.mode, micro == run.grad_accum - 1, t.fsdp_defer_sync), \
                    precision.autocast(device):
                loss = train_model(x, y)
            (loss / run.grad_accum).backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss * run.grad_accum

    def timed(n: int, step) -> tuple[float, float, float]:
        """Seconds for n steps (after a device sync), the last step's mean loss, and the CPU seconds this process
        spent meanwhile (all its threads)."""
        sync()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            loss = step()
        loss = loss.item() / run.grad_accum  # a device sync
        return time.perf_counter() - t0, loss, time.process_time() - cpu0

    def lora_step():
        return train_step(adapted, adapted_train, adapted_optimizer, batches, adapted_run, scaler)[0]
    if lora:  # the same model with LoRA adapters on (train.lora_* keys), built and initialised as train.py does
        adapted_run = replace(run, cfg=replace(run.cfg, train=replace(t, lora=True)))
        adapted = build_model(adapted_run.cfg, device, chosen,
                              parallelize=lambda m: parallel.parallelize(m, adapted_run))
        adapted_train = parallel.wrap(adapted, adapted_run)
        adapted_optimizer = optim.build(adapted, adapted_run.cfg.train, device)
        adapted.train()

    # The baseline runs in this process, alternating with the chosen kernels (best of 2 rounds each), so a
    # change in machine load between the two does not become a speed-up.
    variants = {"chosen": (chosen, our_step)} | ({"baseline": (BASELINE, our_step)} if baseline else {}) | (
        {"bare": (chosen, bare_step)} if bare else {}) | ({"lora": (chosen, lora_step)} if lora else {})
    best = {}
    for round_ in range(2 if len(variants) > 1 else 1):
        for name, (ops, step) in variants.items():
            model.set_ops(ops)
            if round_ == 0 and warmup:  # (--warmup 0: the first step was first_step's)
                timed(warmup, step)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
            elapsed, final_loss, cpu = timed(steps, step)
            # memory from the first round only: later rounds would also see the other variant's peak
            mem = hardware.peak_memory_gb(device) if round_ == 0 else best[name][2]
            best[name] = min(best.get(name, (float("inf"),)), (elapsed, final_loss, mem, cpu))
    model.set_ops(chosen)
    elapsed, final_loss, mem, cpu = best["chosen"]
    tok_s = steps * run.batch.batch_tokens / elapsed
    peak = peak_tflops * 1e12 if peak_tflops else hardware.peak_flops(device, precision.dtype)
    counted = memory.meta_model(run.cfg) if run.pp > 1 else model  # a pipeline rank holds some blocks: count them all
    flops = counted.flops_per_token()
    result = {
        "config": cfg.model.arch, "params": counted.num_params(), "n_layer": cfg.model.n_layer,
        "n_embd": cfg.model.n_embd, "block_size": cfg.model.block_size, "vocab_size": cfg.model.vocab_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x {torch.get_num_threads()}",
        "world_size": world, "tp": run.tp, "pp": run.pp, "parallel": run.mode, "precision": t.precision,
        "precision_reason": precision.reason, "compile": t.compile, "compile_reason": precision.compile_reason,
        "activation_checkpointing": t.activation_checkpointing, "kernels": names,
        "micro_batch_size": t.micro_batch_size, "grad_accum": run.grad_accum, "batch_tokens": run.batch.batch_tokens,
        "warmup_steps": warmup, "steps": steps, "step_time_s": elapsed / steps,
        # on a shared CPU a one-thread run's (OMP_NUM_THREADS=1) CPU time is what a step costs, where wall time
        # also counts the waits for the cores (and, with several threads, for the slowest of them)
        "cpu_s_per_step": cpu / steps,
        "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / world, "flops_per_token": flops,
        "peak_tflops": peak / 1e12 if peak else None, "mfu": tok_s / world * flops / peak if peak else None,
        "peak_mem_gb": mem,  # CUDA: allocated; CPU: peak RSS of the process (run without --baseline to compare)
        "final_loss": final_loss}
    if baseline:
        base_tok_s = steps * run.batch.batch_tokens / best["baseline"][0]
        result.update(baseline_kernels=BASELINE.names,
                      baseline_tokens_per_s=base_tok_s, speedup_vs_baseline=tok_s / base_tok_s)
    if bare:
        result.update(bare_step_time_s=best["bare"][0] / steps, train_step_overhead=elapsed / best["bare"][0] - 1)
    if lora:
        result.update(lora_trainable_params=sum(p.numel() for p in adapted.parameters() if p.requires_grad),
                      lora_step_time_s=best["lora"][0] / steps, lora_speedup=elapsed / best["lora"][0])
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result


def bench_checkpoint(cfg: config.Config, folder: str, rounds: int = 2) -> dict:
    """Seconds to save and to load the model and its AdamW state (one process, CPU) with the checkpoint checksums
    (hash before publishing, read-back verify, hash check on load) and without (DCP's plain writer, no checks);
    best of `rounds`, alternating. The folder is emptied before and after."""
    import shutil
    model = build_model(cfg, torch.device("cpu"))
    optimizer = optim.build(model, cfg.train, torch.device("cpu"))
    for p in model.parameters():  # one step, so that the AdamW moments exist
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    best = {}
    try:
        for _ in range(rounds):
            for mode in ("checksums", "plain"):
                out, sums = os.path.join(folder, mode), mode == "checksums"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                path = checkpoint.save(out, 1, model, optimizer, {"tokens": 0}, keep_last=1, checksums=sums).wait()
                t1 = time.perf_counter()
                checkpoint.load(path, model, optimizer, verified=not sums)
                t2 = time.perf_counter()
                size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
                s, l = best.get(mode, (float("inf"), float("inf")))
                best[mode] = (min(s, t1 - t0), min(l, t2 - t1))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    (cs, cl), (ps, pl) = best["checksums"], best["plain"]
    return {"params": model.num_params(), "checkpoint_gib": size / 2**30, "save_s": cs, "save_plain_s": ps,
            "load_s": cl, "load_plain_s": pl, "save_ratio": cs / ps, "load_ratio": cl / pl}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="+", help="YAML configs and section.key=value overrides, as for train.py")
    p.add_argument("--warmup", type=config.at_least(0), default=3)
    p.add_argument("--steps", type=config.at_least(1), default=10)
    p.add_argument("--peak-tflops", type=config.at_least(1e-9, float), default=None,
                   help="dense BF16 peak of one device, for MFU")
    p.add_argument("--baseline", action="store_true", help="also time the same model with nanoGPT-style "
                   "attention (full score matrix) and an unfused loss, in this process, for a ratio")
    p.add_argument("--lora", action="store_true", help="also time the same model with LoRA adapters (train.lora_* "
                   "keys), alternating in this process; peak memory: run once with train.lora=true instead")
    p.add_argument("--bare", action="store_true", help="also time nanoGPT's bare loop (forward, backward, clip, "
                   "step) around the same model and kernels, for what train_step's checks cost")
    p.add_argument("--checkpoint", metavar="DIR", help="instead: time checkpoint save and load with and without "
                   "checksums, writing into DIR (emptied after)")
    a = p.parse_intermixed_args(argv)
    try:
        cfg = config.load(a.args)
        vocab, source = bench_vocab(cfg)  # train.py's model: the data's vocab unless the config sets one
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
        cfg.model.validate()
        if os.environ.get("RANK", "0") == "0":
            print(f"vocab {vocab:,} ({source})", file=sys.stderr)
        if a.checkpoint:
            result = bench_checkpoint(cfg, a.checkpoint)
            print(f"save {result['save_s']:.2f} s vs {result['save_plain_s']:.2f} s without checksums "
                  f"({result['save_ratio']:.2f}x), load {result['load_s']:.2f} s vs {result['load_plain_s']:.2f} s "
                  f"({result['load_ratio']:.2f}x), {result['checkpoint_gib']:.2f} GiB", file=sys.stderr)
            print(json.dumps(result))
            return 0
        if cfg.train.pp > 1 and (a.bare or a.lora):
            raise ValueError("--bare and --lora time one model's loop; under train.pp the step is the pipeline's")
        result = bench(cfg, a.warmup, a.steps, a.peak_tflops, a.baseline, a.bare, a.lora)
    except (config.ConfigError, kernel.KernelError, ValueError) as e:  # HardwareError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["world_size"] == 1 or os.environ.get("RANK", "0") == "0":
        mfu = f", MFU {result['mfu']:.1%}" if result["mfu"] else ""
        if a.baseline:
            mfu += f", {result['speedup_vs_baseline']:.2f}x the nanoGPT-style baseline"
        if a.bare:
            mfu += f", {result['train_step_overhead']:+.1%} over nanoGPT's bare loop"
        print(f"vocab {result['vocab_size']:,}, {result['params'] / 1e6:.2f}M parameters, {result['precision']}, "
              f"compile {result['compile']}: {result['tokens_per_s']:,.0f} tokens/s "
              f"({result['tokens_per_s_per_device']:,.0f} per device), "
              f"{result['step_time_s'] * 1000:.0f} ms/step{mfu}, peak memory {result['peak_mem_gb']:.2f} GB",
              file=sys.stderr)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
