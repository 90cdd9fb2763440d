"""When a run is slow or runs out of memory: a profiler trace of a few steps, the CUDA allocator's history, and
an out-of-memory report that says what to change.

    python train.py configs/125m.yaml train.profile=3

writes, for each rank R, into out_dir/profile/:
    rankR.trace.json.gz    torch.profiler trace (CPU ops, CUDA kernels, memory events): https://ui.perfetto.dev
                           or chrome://tracing, or TensorBoard's profiler plugin
    rankR.ops.txt          the ops that took the most time (self time), as a table
    rankR.memory.pickle    CUDA only: the allocations and frees from the start through the profiled steps, each
                           with its Python stack; drag it onto https://pytorch.org/memory_viz
A CUDA out-of-memory error writes out_dir/oom_rankR.pickle (the same format) and prints the advice.
"""
import os
import shlex
import sys
import time
import traceback

import torch
from torch.profiler import ProfilerActivity

import checkpoint
import config
import hardware
import kernel
from parallel import print0

MEMORY_VIZ = "https://pytorch.org/memory_viz"
HISTORY_STEPS = 3  # CUDA: allocation history is recorded over the first steps of each start (see StepProfiler)
HISTORY_ENTRIES = 100_000  # the allocator keeps the last this many alloc/free events


class StepProfiler:
    """train.profile=N: a torch.profiler trace of N training steps on each rank, written when they are done;
    training then goes on as without it (only those steps run slower). The first SKIP steps of each start are not
    traced: the first compiles and allocates everything, in the next the profiler warms up. On CUDA the allocator
    also records its history (each alloc/free with its Python stack, no C++ frames: cheap) for the first
    HISTORY_STEPS steps of the loop, where most out-of-memory errors happen (optimizer state, the largest
    activations and the logits are first allocated there), so that `out_of_memory`'s snapshot shows which line
    allocated what. `step()` goes at the top of each iteration; with train.profile=0 off CUDA it returns at once."""
    SKIP = 2

    def __init__(self, t: config.TrainConfig, device: torch.device, rank: int, start_step: int):
        self.steps, self.rank, self.folder = t.profile, rank, os.path.join(t.out_dir, "profile")
        self.on_cuda = self.recording = device.type == "cuda"  # recording: the allocator's history
        self.at = start_step  # the (1-based) step the current iteration trains, as the log numbers them
        self.first = start_step + self.SKIP + 1  # the first traced step
        self.traced, self.export_s = 0, 0.0  # steps in the exported trace, seconds spent writing it
        self.history_until = start_step + max(HISTORY_STEPS, self.SKIP + t.profile)
        self.prof = None
        if t.profile:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
            # nothing before the step ahead of the first traced one, which warms the profiler up
            schedule = torch.profiler.schedule(wait=self.first - 1, warmup=1, active=t.profile, repeat=1)
            self.prof = torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=True,
                                               profile_memory=True, on_trace_ready=self._export)
            self.prof.step_num = start_step  # ProfilerStep#k in the trace is the log's step k
        self.idle = self.prof is None and not self.recording

    def __enter__(self) -> "StepProfiler":
        if self.recording:
            torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES, stacks="python")
        if self.prof is not None:
            self.prof.start()
        return self

    def step(self) -> float:
        """At the top of each iteration: start, record or export the trace; stop the allocator's history. Returns
        the seconds spent writing files (for the log line's throughput)."""
        if self.idle:
            return 0.0
        self.at += 1
        if self.prof is not None:
            self.prof.step()  # exports through _export after the last traced step
            if self.at >= self.first + self.steps:
                self._close()
        if self.recording and self.at > self.history_until:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False
        self.idle = self.prof is None and not self.recording
        spent, self.export_s = self.export_s, 0.0
        return spent

    def __exit__(self, *exc) -> None:
        if self.prof is not None:  # the run ended inside the traced steps (or before them)
            self._close()
            if not self.traced:
                print0(f"train.profile: the run ended before step {self.first}, the first one traced (the first "
                         f"{self.SKIP} steps of each start are skipped); nothing was profiled")
        if self.recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    def _close(self) -> None:
        self.prof.__exit__(None, None, None)  # stop(), exporting what was recorded, and the context's clean-up
        self.prof = None

    def _export(self, prof) -> None:
        t0 = time.perf_counter()
        self.traced = self.at - self.first + (1 if self.at < self.first + self.steps else 0)
        name = os.path.join(self.folder, f"rank{self.rank}")
        try:
            os.makedirs(self.folder, exist_ok=True)
            prof.export_chrome_trace(name + ".trace.json.gz")
            sort = "self_device_time_total" if self.on_cuda else "self_cpu_time_total"
            with open(name + ".ops.txt", "w") as f:
                f.write(prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
            if self.on_cuda:
                torch.cuda.memory._dump_snapshot(name + ".memory.pickle")
        except OSError as e:  # a diagnostic: training goes on without it
            print(f"warning: train.profile: writing {name}.* failed ({e})", file=sys.stderr, flush=True)
            return
        last, self.export_s = self.first + self.traced - 1, time.perf_counter() - t0
        steps = f"step{'s' if self.traced > 1 else ''} {self.first}" + (f"-{last}" if last > self.first else "")
        print0(f"profile: {steps} traced, written in {self.export_s:.1f} s to {self.folder}/, one set per rank: "
                 f"rank{self.rank}.trace.json.gz (open it in https://ui.perfetto.dev or chrome://tracing; memory "
                 f"events included), rank{self.rank}.ops.txt (the ops by time)"
                 + (f", rank{self.rank}.memory.pickle (every allocation, with its stack: drag it onto {MEMORY_VIZ})"
                    if self.on_cuda else ""), flush=True)


SETUP = {"parallelize": "the model", "build": "the optimizer", "restore": "the resume"}  # where setup ran out


def out_of_memory(error: torch.OutOfMemoryError, run: config.Run, step: int | None, peak_gb: float,
                  ops: kernel.Ops | None = None) -> int:
    """After `error` on this rank in step `step` + 1, in the eval or save after step `step`, or (`step` None) while
    building the model, its optimizer or resuming: on CUDA write the allocator's snapshot to
    out_dir/oom_rankR.pickle, then print on stderr, without a traceback, the memory in use, what to lower and the
    plan.py command that checks it (`peak_gb`: train.py's memory figure, the peak RSS on a CPU; `ops`: the model's,
    run.ops unless it fell back). Nothing is saved (the step's state is half done); returns the exit code, 1. Every
    rank that runs out prints."""
    cfg, device, rank, world, mode = run.cfg, run.device, run.rank, run.world_size, run.mode
    t, ops, micro = cfg.train, ops or run.ops, cfg.train.micro_batch_size
    who = f"rank {rank} " if world > 1 else ""
    calls = {frame.f_code.co_name for frame, _ in traceback.walk_tb(error.__traceback__)}
    setup = [what for fn, what in SETUP.items() if fn in calls]
    where = (f"setting up the run ({', '.join(setup) or 'the model'})" if step is None else
             f"in the eval after step {step}" if "run_eval" in calls else
             f"saving the checkpoint of step {step}" if "save" in calls else f"in step {step + 1}")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]  # CUDA's: what it tried to allocate
    lines = [f"error: {who}ran out of memory on {device} {where}: {first}"]
    if device.type == "cuda":
        snapshot = os.path.join(t.out_dir, f"oom_rank{rank}.pickle")
        try:
            torch.cuda.memory._dump_snapshot(snapshot)
            saved = (f"snapshot {snapshot}: drag it onto {MEMORY_VIZ} (it has the allocation history, with stacks, "
                     f"of the first {HISTORY_STEPS} steps of each start and of train.profile's steps; after them, what "
                     f"is allocated in which segment)")
        except (OSError, RuntimeError) as e:
            saved = f"no snapshot ({e})"
        gib = 2**30
        lines.append(f"memory: peak {torch.cuda.max_memory_allocated(device) / gib:.2f} GiB allocated, "
                     f"{torch.cuda.memory_allocated(device) / gib:.2f} GiB now, "
                     f"{torch.cuda.memory_reserved(device) / gib:.2f} GiB reserved by PyTorch, of "
                     f"{torch.cuda.get_device_properties(device).total_memory / gib:.2f} GiB")
        lines.append(saved)
    else:
        lines.append(f"memory: peak {peak_gb:.2f} GB")
    fixes = []
    if ops.loss in (kernel.compiled_loss, kernel.plain_loss):  # train.loss auto chose it, or asked
        tokens = micro * cfg.model.block_size
        fixes.append(("train.loss=chunked", f"the loss now holds a micro-batch's full logits ({tokens:,} x "
                      f"{cfg.model.padded_vocab_size:,}); chunked holds one chunk of them at a time"))
    dp = run.dp  # the ranks that read different batches (world size / train.tp)
    accum = t.batch_size // (micro * dp)
    # the largest micro batch of at most half of this one that divides the batch per rank
    if smaller := next((m for m in range(micro // 2, 0, -1) if t.batch_size // dp % m == 0), None):
        fixes.append((f"train.micro_batch_size={smaller}", f"now {micro}; gradient accumulation goes "
                      f"from {accum} to {t.batch_size // (smaller * dp)}: the same steps in smaller pieces"))
    if not t.activation_checkpointing:
        fixes.append(("train.activation_checkpointing=true", "keep only each block's input and recompute the rest "
                      "in backward: much less activation memory, ~25 % more compute"))
    wider = 2 * run.tp
    if world % wider == 0 and wider <= 8 and t.batch_size % (world // wider) == 0:
        try:
            config.check_tp(cfg, wider)
            fixes.append((f"train.tp={wider}", f"now {run.tp}: split each block's matrices and activations over "
                          f"groups of {wider} ranks (keep a group inside a node)"))
        except config.ConfigError:
            pass
    if mode == "ddp":
        fixes.append(("train.parallel=fsdp", f"shard weights, gradients and optimizer state over the {world} ranks "
                      f"(now DDP keeps a full copy on each)"))
    if mode == "fsdp" and not t.reshard_after_forward:
        fixes.append(("train.reshard_after_forward=true", "free each block's gathered weights after its forward"))
    if mode == "fsdp" and t.fsdp_defer_sync:
        fixes.append(("train.fsdp_defer_sync=false", "reduce-scatter gradients every micro-step (they stay sharded)"))
    fixes.append((f"model.block_size={cfg.model.block_size // 2}", f"now {cfg.model.block_size}: shorter sequences; "
                  f"this changes the model, so it starts a new run (another train.out_dir)"))
    lines.append(f"To fit, lower what one device holds; the global batch (train.batch_size={t.batch_size}) stays, "
                 f"and each of these but the last resumes this run on the same data:")
    lines += [f"  {key:<38} {why}" for key, why in fixes]
    # plan.py on the run's resolved config (out_dir/config.yaml: its YAML files and overrides, the precision it
    # resolved, the data's vocab), the first fix, this world size and GPU
    spec, fix = hardware.gpu_spec(device), [fixes[0][0]] if len(fixes) > 1 else []
    gpu = next((["--gpu", k] for k, g in hardware.GPUS.items() if g is spec), [])
    command = shlex.join(["plan.py", os.path.join(t.out_dir, "config.yaml"), *fix, "--gpus", str(world), *gpu])
    lines += ["Check a change before relaunching (plan.py shows DDP, FSDP2, FSDP2 with activation checkpointing and "
              "tensor parallel side by side; add more overrides after the config):", "  python " + command]
    latest = checkpoint.find_latest(t.ckpt_dir or t.out_dir)
    lines.append(f"Nothing was saved from this step. The last checkpoint, {latest}, is intact: run the same command "
                 f"with the change to resume from it." if latest else
                 "Nothing was saved: there is no checkpoint yet, so the change starts the run anew.")
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 1
