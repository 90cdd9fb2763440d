"""Train a GPT from YAML configs, on one CPU or GPU or many through torchrun.

    python train.py configs/tiny.yaml [more.yaml ...] [section.key=value ...]
    torchrun --standalone --nproc_per_node=8 train.py configs/500m.yaml

Setup (`main`): config -> process group -> the model's shape (data prepared on first use) -> device, precision and
compile (hardware.py) -> the Run, every `auto` decided once (memory.resolve) -> the run's lock and the checkpoint to
resume from -> the model built and sharded (build.py, parallel.py) -> optimizer -> resume. The loop (`train`): step
(step.py), log, eval, save, stop. SIGTERM/SIGUSR1 (SLURM's notice) and SIGINT finish the step on every rank, write a
checkpoint and exit. RELIABILITY.md lists what a run survives.
"""
import json
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist

import checkpoint
import config
import hardware
import kernel
import memory
import optim
import parallel
from build import build_model, data_identity, find_resume
from loader import DataError, Prefetcher, TrainLoader, copy_tokenizer, read_meta
from model import GPTConfig
from parallel import any_rank, print0
from step import BUDGET_PROBE, Log, budget_probe, first_step, fit_budget, run_eval, train_step


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    rank, lock, lease, run = 0, None, None, None
    try:
        cfg = config.load(argv)
        t = cfg.train
        rank, local_rank, world = parallel.init_distributed(t.device, t.dist_timeout_s)
        # rank 0 prepares missing data, then takes the run's lock and finds the checkpoint to resume from; the others
        # wait and then see the same outcome
        model_cfg = on_rank0(lambda: model_shape(cfg, world), rank, world)
        device, precision, compiled = hardware.resolve(t, local_rank, model_cfg)
        if precision.warning and rank == 0:
            print(f"warning: {precision.warning}", file=sys.stderr, flush=True)
        latest = t.resume and checkpoint.find_latest(t.ckpt_dir or t.out_dir)
        if latest and t.precision == "auto" and device.type == "cpu":  # a timed decision: a resume keeps it
            try:
                started = checkpoint.read_state(latest)["config"]["train"]["precision"]
            except checkpoint.CheckpointError:  # damaged: find_resume sets it aside below
                started = precision.name
            if started != precision.name:
                precision = hardware.Precision(started, f"as when the run started (here now: {precision.reason})",
                                               compile_reason=precision.compile_reason)
        run = memory.resolve(cfg, model_cfg, device, precision, compiled, rank, world)

        def take_run():
            nonlocal lock, lease
            lock, lease, made = checkpoint.lock_run(t)
            try:
                for name in checkpoint.clean(t.ckpt_dir or t.out_dir):
                    print(f"removed {name}, an unfinished save or deletion of a killed run")
                return find_resume(replace(cfg, model=model_cfg))
            except (config.ConfigError, checkpoint.CheckpointError):  # refused: the attempt leaves nothing behind
                checkpoint.abandon_run(lock, made)
                lock = None
                raise
        # the shards checked before the run's folder is touched; the ranks of one tensor-parallel group read alike
        loader = TrainLoader(cfg.data.datasets, cfg.data.weights, model_cfg.block_size, run.cfg.train.micro_batch_size,
                             run.grad_accum, t.seed, run.dp_rank, run.dp, model_cfg.vocab_size)
        resume_from = on_rank0(take_run, rank, world)
        return train(run, loader, resume_from)
    except (config.ConfigError, hardware.HardwareError, DataError, kernel.KernelError,
            checkpoint.CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:  # setting up (the loop's own are reported in train())
        if run is None:
            raise
        import diagnose
        return diagnose.out_of_memory(e, run, None, hardware.peak_memory_gb(run.device))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lease is not None:
            lease.release()
        if lock is not None:
            lock.close()


def on_rank0(fn, rank: int, world: int):
    """fn() on rank 0, its result (or its error: ConfigError, DataError, CheckpointError) shared with every rank."""
    shared = [None, None]
    if rank == 0:
        try:
            shared[0] = fn()
        except (config.ConfigError, DataError, checkpoint.CheckpointError) as e:
            shared[1] = str(e)
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        raise config.ConfigError(shared[1])
    return shared[0]


def model_shape(cfg: config.Config, world: int) -> GPTConfig:
    """The model section as it trains, checked with the rest of the config (config.check_model): train.init_from's
    shape (block_size stays ours), and the vocab from the data, whose missing named corpora are prepared here."""
    model = cfg.model
    if cfg.train.init_from:
        import hf  # Hugging Face formats: safetensors
        model = hf.config_from_init(cfg.train.init_from, model)
    for path in cfg.data.datasets:
        if not os.path.exists(os.path.join(path, "meta.json")):
            from data.prepare import ensure_prepared  # a named corpus is prepared on first use
            ensure_prepared(path)
    vocab = max(read_meta(path)["vocab_size"] for path in cfg.data.datasets)
    if cfg.train.init_from:
        for warning in hf.check_init_tokenizer(cfg):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    model = replace(model, vocab_size=model.vocab_size or vocab)
    config.check_model(replace(cfg, model=model), world, data_vocab=vocab)
    return model


def train(run: config.Run, loader: TrainLoader, resume_from: str | None) -> int:
    cfg, t, device = run.cfg, run.cfg.train, run.device
    t_start = time.perf_counter()
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals make the FP32 backward many times slower on CPU
    torch.backends.cuda.matmul.allow_tf32 = True  # (cuDNN's is on by default)
    if run.rank == 0:
        write_run_files(run)
    print0(config.dump(cfg), end="")
    print0(run.batch.banner(cfg))

    # built on the meta device, sharded there when distributed, then allocated and initialised; `model` stays the
    # unwrapped module (for eval and checkpoints), `train_model` is what the step calls (DDP, compiled)
    model = build_model(cfg, device, run.ops, parallelize=lambda m: parallel.parallelize(m, run))
    train_model = parallel.wrap(model, run)
    optimizer = optim.build(model, t, device)
    scaler = torch.amp.GradScaler(device.type) if run.precision.scaled else None
    counted = memory.meta_model(cfg) if run.pp > 1 else model  # a pipeline rank holds some blocks: count them all
    print0(banner(run, counted, optimizer, scaler))
    # Stop requests go over a CPU group, so they never wait on the GPU's stream; async checkpoints get a group
    # of their own, since their collectives run in a background thread (two threads must not share one group).
    cpu_group = dist.new_group(backend="gloo") if run.world_size > 1 else None
    ckpt_group = dist.new_group(backend="gloo") if run.world_size > 1 and t.async_checkpoint else None

    step, tokens, skipped, budget_steps = resume(run, resume_from, model, optimizer, scaler, cpu_group)
    data = data_identity(cfg.data.datasets)  # into each checkpoint: a resume on other data stops (build.find_resume)
    max_steps = t.max_steps if budget_steps is None else min(t.max_steps, budget_steps)
    if budget_steps is not None:
        print0(f"train.max_minutes: max_steps {max_steps}, as decided when the run started")
    budget, probe_from = t.max_minutes and budget_steps is None, budget_probe(t, step)  # train.max_minutes
    if step >= max_steps:
        print0(f"nothing to do: the checkpoint is at step {step} and train.max_steps is {max_steps}")
    batches = Prefetcher(loader, step, run.grad_accum, device)
    log = Log(run, counted, batches, step, skipped)
    live_eval = None
    if cfg.eval.interval:  # lm-eval tasks, a sample
        from harness import LiveEval
        live_eval = LiveEval(run, model)
    profiler = None
    if t.profile or device.type == "cuda":  # train.profile; on CUDA the allocator's history
        import diagnose
        profiler = diagnose.StepProfiler(t, device, run.rank, step)
    pending, owed, diverged, start = None, False, False, step
    if t.compile and step < max_steps:
        print0("compiling the model during the first step (about a minute on a fresh machine, seconds with a warm "
               "cache) ...", flush=True)

    def save(step: int) -> float:
        """Write step's checkpoint (after publishing the one still being written); returns the seconds taken."""
        nonlocal pending
        t0 = time.perf_counter()
        finish_save()
        state = train_state(run, tokens, max_steps, log.skipped, scaler, budget_steps, data)
        pending = checkpoint.save(t.ckpt_dir or t.out_dir, step, model, optimizer, state, t.keep_last,
                                  async_group=ckpt_group if t.async_checkpoint else False)
        if not t.async_checkpoint:
            finish_save()
        return time.perf_counter() - t0

    def finish_save() -> None:
        nonlocal pending
        if pending is not None:
            done, pending = pending, None
            print0(f"saved {done.wait()}")

    with stop_requests() as stop, closing(batches), closing(log), profiler or nullcontext():
        model.train()
        try:
            while step < max_steps:
                if profiler:  # train.profile: trace a few steps (the time writing it is not counted)
                    log.pause(profiler.step())
                lr = optim.set_lr(optimizer, step, t, max_steps)
                torch.manual_seed(t.seed * 1_000_003 + step * 1009 + run.rank)  # dropout: a resume repeats it exactly
                micro = (batches.get() for _ in range(run.grad_accum))  # each fetched as the step takes it
                if step > start:
                    loss, grad_norm, bad = train_step(model, train_model, optimizer, micro, run, scaler)
                else:  # the compile watch; a kernel that fails falls back to torch's and the step runs again (step.py)
                    micro = list(micro)  # kept for a second try
                    (loss, grad_norm, bad), _ = first_step(
                        lambda: train_step(model, train_model, optimizer, micro, run, scaler), model, optimizer, run,
                        cpu_group)
                step += 1
                tokens += run.batch.batch_tokens
                log.add(step, loss, grad_norm, bad)
                if pending is not None and pending.done():
                    finish_save()
                if budget and step == probe_from:
                    t_probe = time.perf_counter()
                if budget and step == probe_from + BUDGET_PROBE:  # train.max_minutes fixes max_steps
                    max_steps = budget_steps = fit_budget(run, step, max_steps, t_probe, t_start, log.row, cpu_group)
                last = step == max_steps
                log_now = step % cfg.log.interval == 0 or last
                if diverged := log.skips(now=log_now):  # skip flags are read late; all of them before a log line
                    break

                if log_now:  # log
                    log.line(step, lr, grad_norm, tokens, max_steps, time.perf_counter() - t_start)
                if t.eval_interval and (step % t.eval_interval == 0 or last):  # eval
                    log.pause(run_eval(train_model if run.pp > 1 else model, run, step, tokens, log.row))
                if live_eval and (step % cfg.eval.interval == 0 or last):  # lm-eval tasks, a sample
                    log.pause(live_eval.run(step, tokens, log.row))
                stopping = any_rank(stop["signal"] is not None, cpu_group)  # all ranks stop at one step
                owed = owed or step % t.ckpt_interval == 0 or last
                if owed or stopping:  # save
                    if diverged := log.skips(now=True):
                        break
                    # a periodic save waits for a step that was not skipped (a stop or the last step saves at once)
                    if log.streak and not (stopping or last):
                        if step % t.ckpt_interval == 0:
                            print0(f"step {step:>6} | checkpoint postponed: the last {log.streak} step(s) were skipped")
                    else:
                        log.pause(save(step))
                        owed = False
                if stopping:  # stop
                    break
            finish_save()
            if diverged:
                if run.rank == 0:
                    print(f"error: {log.streak} steps in a row had a non-finite loss or gradient norm "
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
            finish_save()  # an asynchronous save begun before it holds good state
            import diagnose
            return diagnose.out_of_memory(e, run, step, hardware.peak_memory_gb(device), model.ops)
    return 130 if stop["signal"] == signal.SIGINT else 0


def resume(run: config.Run, path: str | None, model, optimizer, scaler, group) -> tuple[int, int, int, int | None]:
    """Load checkpoint `path` (verified by find_resume) into model, optimizer and scaler: (step, tokens, skipped
    steps, the time budget's max_steps or None: it applies again, so the LR schedule is the same), or zeros. One that
    fails to load on some rank (DCP gathers every rank's error) is set aside by rank 0 and the newest older one that
    verifies is tried (it overwrites whatever the failed one half wrote); none left: CheckpointError."""
    while path:
        try:
            state = checkpoint.load(path, model, optimizer, verified=True)
            if scaler is not None and "grad_scaler" in state:
                scaler.load_state_dict(state["grad_scaler"])
            print0(f"resumed from {path} at step {state['step']} (saved by {state.get('world_size', 1)} process(es))")
            return state["step"], state["tokens"], state.get("skipped_steps", 0), state.get("budget_max_steps")
        except checkpoint.CorruptCheckpoint as e:
            shared = [None]
            if run.rank == 0:
                print(f"warning: {e}. Moved it aside to {checkpoint.set_aside(path)}; trying the checkpoint before it.",
                      file=sys.stderr, flush=True)
                shared = [find_resume(run.cfg) or ""]
            if group is not None:
                dist.broadcast_object_list(shared, src=0, group=group)
            if not shared[0]:
                raise checkpoint.CheckpointError(f"{e}, and no older checkpoint verifies; start over with "
                                                 f"train.resume=false or another train.out_dir") from None
            path = shared[0]
    return 0, 0, 0, None


def train_state(run: config.Run, tokens: int, max_steps: int, skipped: int, scaler, budget_steps, data) -> dict:
    """What a checkpoint keeps beside the tensors (train_state.json): the config as it runs (max_steps as the time
    budget decided it), tokens seen, skipped steps, the data's identity, the loss scaler, the LoRA base's
    fingerprint."""
    t = run.cfg.train
    state = {"tokens": tokens, "config": config.to_dict(replace(run.cfg, train=replace(t, max_steps=max_steps))),
             "world_size": run.world_size, "tp": run.tp, "pp": run.pp, "skipped_steps": skipped, "data": data}
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    if budget_steps is not None:
        state["budget_max_steps"] = budget_steps
    if t.lora:  # the adapters are only good on the base they were trained on
        import lora
        state["lora_base"] = lora.fingerprint(t.init_from, t.seed)
    return state


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


def write_run_files(run: config.Run) -> None:
    """config.yaml (resolved), run_info.json (what produced the run: git revision, package versions, hardware,
    command line, what was resolved) and the tokenizer, into out_dir."""
    t, device, here = run.cfg.train, run.device, os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    import numpy
    info = {"git": rev or None, "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "device": str(device), "cpus": os.cpu_count(), "host": platform.node(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,  # then what was resolved
            "world_size": run.world_size, "tp": run.tp, "pp": run.pp, "precision": t.precision,
            "precision_reason": run.precision.reason, "matmul_speedup": run.precision.speedup, "compile": t.compile,
            "compile_reason": run.precision.compile_reason, "parallel": run.mode,
            "micro_batch_size": t.micro_batch_size, "grad_accum": run.grad_accum,
            "vocab_size": run.cfg.model.vocab_size, "kernels": dict(run.ops.names)}
    with open(os.path.join(t.out_dir, "config.yaml"), "w") as f:
        f.write(config.dump(run.cfg))
    with open(os.path.join(t.out_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    copy_tokenizer(run.cfg.data.datasets[0], os.path.join(t.out_dir, "tokenizer"))


def banner(run: config.Run, model, optimizer, scaler) -> str:
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
            + (f" (pipeline {run.pp} x data parallel {run.dp} x tensor parallel {run.tp}, "
               f"{t.pp_schedule} over {run.pp * config.virtual_stages(t)} stages)" if run.tp * run.pp > 1 else "")
            + (", activation checkpointing" if t.activation_checkpointing else "") + f", compile {t.compile}\n"
            + hardware.describe(run.precision) + (" (loss scaling: torch.amp.GradScaler)" if scaler else "") + "\n"
            + "kernels: " + ", ".join(f"{op} {name}" for op, name in run.ops.names.items()) + "\n" + opt)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
