"""Train a GPT from YAML configs, on one CPU or GPU or many through torchrun.

    python train.py configs/tiny.yaml [more.yaml ...] [section.key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py configs/500m.yaml

Setup: config (frozen once loaded) -> process group -> device, precision and compile by what this machine does
(hardware.py) -> the run's lock, data prepared on first use, the checkpoint to resume from (rank 0) -> the Run:
every `auto` decided once (plan.resolve) -> model built on the meta device with its kernels, then FP8,
activation checkpointing, compile and FSDP2 or DDP (parallel.py) -> optimizer -> resume.
The loop: step (step.py), log, eval, save, stop. SIGTERM/SIGUSR1 (what SLURM sends before a preemption or the
time limit) and SIGINT finish the current step on every rank, write a checkpoint and exit. services.py holds what
the loop leans on; RELIABILITY.md lists what a run survives.
"""
import filecmp
import os
import signal
import sys
import time
from contextlib import closing
from dataclasses import replace

import torch
import torch.distributed as dist

import checkpoint
import config
import diagnose
import export
import hardware
import kernel
import optim
import parallel
import plan
import services
import tracking
from data.prepare import ensure_prepared
from eval import LiveEval, run_eval
from loader import DataError, Prefetcher, TrainLoader, read_meta
from model import GPT, GPTConfig
from parallel import print0
from services import LogWindow, Metrics, Saver, SkipCounter, TimeBudget
from step import first_step, train_step


def data_vocab(cfg: config.Config, model: GPTConfig) -> GPTConfig:
    """Prepare missing named corpora; `model` with its vocab_size from the data (or checked to be big enough)."""
    vocab = max(ensure_prepared(p)["vocab_size"] for p in cfg.data.datasets)
    if model.vocab_size is not None and model.vocab_size < vocab:
        raise config.ConfigError(f"model.vocab_size ({model.vocab_size}) is smaller than the data's vocab "
                                 f"({vocab}, {cfg.data.datasets[0]}/meta.json)")
    model = replace(model, vocab_size=model.vocab_size or vocab)
    try:
        model.validate()
    except ValueError as e:
        raise config.ConfigError(str(e)) from None
    return model


def check_init_tokenizer(cfg: config.Config) -> list[str]:
    """Warnings for datasets not tokenized with the tokenizer that train.init_from's folder brings (a model
    continues pretraining well only on the ids it was trained with: prepare with --tokenizer hf:FOLDER)."""
    theirs = cfg.train.init_from and os.path.join(cfg.train.init_from, "tokenizer.json")
    if not theirs or not os.path.exists(theirs):
        return []
    return [f"{d} was not tokenized with the tokenizer of {cfg.train.init_from}; prepare it with python "
            f"data/prepare.py ... --tokenizer hf:{cfg.train.init_from}" for d in cfg.data.datasets
            if (spec := read_meta(d)["tokenizer"])["type"] not in ("hf", "bpe")  # bpe: ours, exported as tokenizer.json
            or not filecmp.cmp(theirs, os.path.join(d, spec["file"]), shallow=False)]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    rank, lock, lease, run = 0, None, None, None
    try:
        cfg = config.load(argv)
        tracking.check(cfg)
        t = cfg.train
        # the model's shape: train.init_from's config.json (block_size stays ours), the vocab from the data below
        model_cfg = export.config_from_init(t.init_from, cfg.model) if t.init_from else cfg.model
        rank, local_rank, world = parallel.init_distributed(t.device, t.dist_timeout_s)
        device, precision, compiled = hardware.resolve(t, local_rank, model_cfg.n_embd)
        if precision.warning and rank == 0:
            print(f"warning: {precision.warning}", file=sys.stderr, flush=True)
        kernel.configure(t.kernels, t.loss, device, precision.dtype)  # a missing or unfit kernel stops here
        # rank 0 takes the run's lock and prepares missing data; the others wait and then see the same outcome
        error, resume_from = None, None
        if rank == 0:
            try:
                lock, lease = services.lock_run(t)
                for name in checkpoint.clean(t.ckpt_dir or t.out_dir):
                    print(f"removed {name}, an unfinished save or deletion of a killed run")
                model_cfg = data_vocab(cfg, model_cfg)
                for warning in check_init_tokenizer(cfg):
                    print(f"warning: {warning}", file=sys.stderr, flush=True)
                resume_from = services.find_resume(replace(cfg, model=model_cfg))
            except (config.ConfigError, DataError, checkpoint.CheckpointError) as e:
                error = str(e)
        if world > 1:
            shared = [error, resume_from]
            dist.broadcast_object_list(shared, src=0)
            error, resume_from = shared
            if error is None and rank != 0:
                model_cfg = data_vocab(cfg, model_cfg)
        if error is not None:
            raise config.ConfigError(error)
        if resume_from and t.precision == "auto" and device.type == "cpu":  # a timed decision: a resume keeps it
            started = checkpoint.read_state(resume_from)["config"]["train"]["precision"]
            if started != precision.name:
                precision = hardware.Precision(started, f"as when the run started (here now: {precision.reason})")
        run = plan.resolve(cfg, model_cfg, device, precision, compiled, rank, world)
        # the ranks of one tensor-parallel group read the same batches
        loader = TrainLoader(cfg.data.datasets, cfg.data.weights, model_cfg.block_size, run.cfg.train.micro_batch_size,
                             run.grad_accum, t.seed, run.dp_rank, run.dp, model_cfg.vocab_size)
        return train(run, loader, resume_from)
    except (config.ConfigError, hardware.HardwareError, DataError, kernel.KernelError,
            checkpoint.CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # setting up (the loop's own are reported in train())
        if run is None:
            raise
        return diagnose.out_of_memory(e, run, None, services.memory_gb(run.device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lease is not None:
            lease.release()
        if lock is not None:
            lock.close()


def train(run: config.Run, loader: TrainLoader, resume_from: str | None) -> int:
    cfg, t, device = run.cfg, run.cfg.train, run.device
    t_start = time.perf_counter()
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals make the FP32 backward many times slower on CPU
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if run.rank == 0:
        services.write_run_files(run)
    print0(config.dump(cfg), end="")
    print0(run.batch.banner(cfg))

    with torch.device("meta"):
        model = GPT(cfg.model, run.ops)
    train_model = parallel.parallelize(model, run)  # the model itself stays unwrapped, for eval and checkpoints
    optimizer = optim.build(model, t, device)
    scaler = torch.amp.GradScaler(device.type) if run.precision.scaled else None
    print0(services.banner(run, model, optimizer, scaler))
    # Stop requests go over a CPU group, so they never wait on the GPU's stream; async checkpoints get a group
    # of their own, since their collectives run in a background thread (two threads must not share one group).
    cpu_group = dist.new_group(backend="gloo") if run.world_size > 1 else None
    ckpt_group = dist.new_group(backend="gloo") if run.world_size > 1 and t.async_checkpoint else None

    step, tokens, skips, budget_steps = 0, 0, SkipCounter(), None
    while resume_from:
        try:
            step, tokens, skips.total, budget_steps = services.restore(resume_from, model, optimizer, scaler)
            break
        except checkpoint.CorruptCheckpoint as e:  # verified (or too old to have checksums), yet unreadable
            resume_from = services.fall_back(run, resume_from, e, cpu_group)
    max_steps = t.max_steps if budget_steps is None else min(t.max_steps, budget_steps)
    if budget_steps is not None:
        print0(f"train.max_minutes: max_steps {max_steps}, as decided when the run started")
    budget = TimeBudget.for_run(t, run.batch, t_start, step) if t.max_minutes and budget_steps is None else None
    live_eval = LiveEval(run, model)  # eval.*: lm-eval tasks, a sample
    metrics = Metrics(cfg, run.rank, step)
    saver = Saver(t, model, optimizer, ckpt_group)
    if step >= max_steps:
        print0(f"nothing to do: the checkpoint is at step {step} and train.max_steps is {max_steps}")
    batches_ahead = Prefetcher(loader, step, run.grad_accum, device)
    lag = 1 if device.type == "cuda" else 0  # how many steps late skip flags are read (see SkipCounter)
    window = LogWindow(device, run.batch, model.flops_per_token(), hardware.peak_flops(device, run.precision.dtype),
                       batches_ahead, model)
    profiler = diagnose.StepProfiler(t, device, run.rank, step)  # train.profile; on CUDA, allocation history
    diverged, first = False, True
    if t.compile and step < max_steps:
        print0("compiling the model during the first step (about a minute on a fresh machine, seconds with a warm "
               "cache) ...", flush=True)

    with services.stop_requests() as stop, closing(batches_ahead), closing(metrics), profiler:
        model.train()
        try:
            while step < max_steps:
                window.pause(profiler.step())  # train.profile: trace a few steps (the time writing it is not counted)
                lr = optim.set_lr(optimizer, step, t, max_steps)
                batches = (batches_ahead.get() for _ in range(run.grad_accum))
                if first:  # kept, in case the step runs twice (first_step)
                    batches = list(batches)

                def one_step(batches=batches, seed=t.seed * 1_000_003 + step * 1009 + run.rank):
                    # Dropout randomness is a function of (seed, step, rank): a resumed run repeats it exactly
                    torch.manual_seed(seed)
                    return train_step(model, train_model, optimizer, batches, run, scaler)
                if first:  # the compile watch; a kernel that fails here falls back to torch's (step.py)
                    (loss, grad_norm, bad), _ = first_step(one_step, model, optimizer, run, cpu_group)
                    first = False
                else:
                    loss, grad_norm, bad = one_step()
                step += 1
                tokens += run.batch.batch_tokens
                window.add(loss, bad)
                skips.push(step, torch.stack([bad, loss.float() / run.grad_accum, grad_norm.float()]))
                saver.poll()
                if budget and (decided := budget.decide(step, max_steps, cpu_group)):
                    max_steps = budget_steps = decided[0]
                    metrics.log({"step": step, "max_steps": max_steps, "budget_step_s": decided[1]})
                    print0(f"train.max_minutes={t.max_minutes:g}: {decided[1]:.2f} s/step measured over steps "
                           f"{step - TimeBudget.PROBE + 1}-{step}, so max_steps = {max_steps}", flush=True)
                last = step == max_steps
                log_now = step % cfg.log.interval == 0 or last
                # skipped steps are read `lag` steps late; up to this one before a log line or a save
                if diverged := skips.report(0 if log_now else lag, t.max_consecutive_skips, metrics.log):
                    break

                if log_now:  # log
                    metrics.log(window.close(step, lr, grad_norm, tokens, max_steps, time.perf_counter() - t_start,
                                             skips.total))
                if t.eval_interval and (step % t.eval_interval == 0 or last):  # eval
                    window.pause(run_eval(model, run, step, tokens, metrics))
                if cfg.eval.interval and (step % cfg.eval.interval == 0 or last):  # lm-eval tasks, a sample
                    window.pause(live_eval.run(step, tokens, metrics))
                stopping = parallel.any_rank(stop["signal"] is not None, cpu_group)  # all ranks stop at one step
                if saver.due(step, stopping, last):  # save
                    if diverged := skips.report(0, t.max_consecutive_skips, metrics.log):
                        break
                    state = services.run_state(run, tokens, max_steps, skips, scaler, budget_steps)
                    window.pause(saver.save(step, state, skips.streak, now=stopping or last))
                if stopping:  # stop
                    break
            saver.finish()
            if diverged:
                if run.rank == 0:
                    print(f"error: {skips.streak} steps in a row had a non-finite loss or gradient norm "
                          f"(train.max_consecutive_skips={t.max_consecutive_skips}); stopping without saving. The "
                          f"last checkpoint, {checkpoint.find_latest(t.ckpt_dir or t.out_dir) or 'none'}, is from "
                          f"before them: resume from it with a lower train.lr or other data.", file=sys.stderr)
                return 1
        except checkpoint.SaveError as e:
            if run.rank == 0:
                print(f"error: {e}; stopping. Free space (or fix the storage) and run the same command to resume "
                      f"from it.", file=sys.stderr)
            return 1
        except torch.OutOfMemoryError as e:  # this step's state is half done: nothing of it is saved
            saver.finish()  # an asynchronous save begun before it holds good state
            return diagnose.out_of_memory(e, run, step, services.memory_gb(device), model.ops)
    return 130 if stop["signal"] == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
