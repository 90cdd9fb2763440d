"""Fault injection: kill -9 at every stage of a save and at random moments, preemption signals on one rank or
through the SLURM script, non-finite losses and gradients, a full disk, bad inputs, a second run on the same
out_dir, and hostile checkpoints. Each fault must cost at most the steps since the last checkpoint, and a
resumed run must match the uninterrupted one bit for bit (RELIABILITY.md)."""
import json
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from build import load_model
import checkpoint
import train
from conftest import ROOT, TINY, children, kill_tree, make_run
from test_distributed import torchrun
from test_train import losses, rows, train_args

# 1 process: 16 steps, a checkpoint every 2, two kept; dropout so that its randomness has to resume too
ONE = ["train.max_steps=16", "train.ckpt_interval=2", "train.keep_last=2", "train.eval_interval=0",
       "model.dropout=0.1"]
# 2 ranks (DDP) x micro batch 2 x accumulation 2, asynchronous checkpoints every 5 steps (~30 steps/s here)
TWO = [*TINY, "train.micro_batch_size=2", "train.precision=fp32", "train.parallel=ddp", "train.max_steps=150",
       "train.ckpt_interval=5", "train.keep_last=2", "train.eval_interval=0", "train.async_checkpoint=true"]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def faulty(fault: str, *args, timeout=300) -> subprocess.CompletedProcess:
    """tests/faulty.py (train.py with FAULT injected) in a subprocess."""
    return subprocess.run([sys.executable, "tests/faulty.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "FAULT": fault})


def same_weights(a: str, b: str) -> None:
    ma, _, pa = load_model(a, "cpu")
    mb, _, pb = load_model(b, "cpu")
    assert os.path.basename(pa) == os.path.basename(pb)
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def same_losses(a: str, b: str, steps) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(steps), sorted(lb)
    assert all(la[s] == lb[s] for s in steps), [(s, la[s], lb[s]) for s in steps if la[s] != lb[s]]


@pytest.fixture(scope="module")
def ref1(corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("faults") / "ref1")
    assert train.main(train_args(corpus, out, *ONE)) == 0
    return out


@pytest.fixture(scope="module")
def ref2(corpus, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("faults") / "ref2")
    r = torchrun(*train_args(corpus, out, *TWO))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_kill_at_every_stage_of_a_save_resumes_bit_exact(corpus, ref1, tmp_path):
    out = str(tmp_path / "killed")
    # each start dies at the given point (counted from that start); the last one runs to the end
    points = [("step", 3), ("save", 2), ("data", 1), ("publish", 2), ("latest", 1), ("cleanup", 1), ("step", 2)]
    for i, (point, n) in enumerate(points):
        r = faulty(f"kill:{point}:{n}", *train_args(corpus, out, *ONE))
        assert r.returncode == -signal.SIGKILL, f"{point} #{n} was never reached\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
        latest = checkpoint.find_latest(out)
        if latest:  # whatever the kill hit, a complete checkpoint is what the next start sees
            load_model(out, "cpu")
        if i == 0:  # a kill while a metrics line is half written
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write('{"step": 4, "loss": 3.')
    r = faulty("", *train_args(corpus, out, *ONE))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(n.startswith((".tmp", ".trash")) for n in os.listdir(out))
    same_losses(ref1, out, range(1, 17))
    same_weights(ref1, out)


@pytest.mark.parametrize("seed", [int(s) for s in os.environ.get("GPTRAIN_KILL_SEEDS", "6").split(",")])
def test_random_kills_of_two_ranks_resume_bit_exact(seed, corpus, ref2, tmp_path):
    """kill -9 of torchrun and both workers at seeded random moments (asynchronous checkpoints in flight).
    CI stops killing after 3 kills; GPTRAIN_KILL_SEEDS=0,1,2,... GPTRAIN_KILLS=99 runs more seeds, each until the
    run completes (RELIABILITY.md has the counts)."""
    most = int(os.environ.get("GPTRAIN_KILLS", "3"))
    out, rng, kills, mid_save = str(tmp_path / "killed"), random.Random(seed), [], 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *train_args(corpus, out, *TWO)]
    for attempt in range(12):
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
        for line in p.stdout:  # training is under way
            if line.startswith("step"):
                break
        time.sleep(rng.uniform(0.1, 1.5))
        killed = p.poll() is None and len(kills) < most
        if killed:
            kill_tree(p.pid)
        p.communicate(timeout=300)
        if p.returncode == 0:
            break
        latest = checkpoint.find_latest(out)
        if killed and (latest is None or checkpoint.read_state(latest)["step"] < 150):  # killed mid-run
            kills.append(os.path.basename(latest) if latest else None)
            mid_save += any(n.startswith(".tmp_step") for n in os.listdir(out))
    print(f"seed {seed}: {len(kills)} kills mid-run, {mid_save} of them mid-save; resumed from {kills}")
    assert len(kills) >= 2, kills  # the run was really interrupted, more than once
    assert p.returncode == 0
    same_losses(ref2, out, range(1, 151))
    same_weights(ref2, out)


def test_sigusr1_on_one_rank_saves_on_both_and_exits_0(corpus, ref2, tmp_path):
    out = str(tmp_path / "usr1")
    args = train_args(corpus, out, *TWO, "train.max_steps=100000")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    for line in p.stdout:
        if line.startswith("step      5 "):
            break
    kids = children(p.pid)
    assert len(kids) == 2
    os.kill(max(kids), signal.SIGUSR1)  # one worker only, as if the other had not got it yet
    text = line + p.communicate(timeout=120)[0]
    assert p.returncode == 0, text[-3000:]  # torchrun exits 0 only when both workers did
    saved = checkpoint.read_state(checkpoint.find_latest(out))["step"]
    assert "SIGUSR1: stopping after this step" in text and 5 <= saved < 100000
    assert max(losses(out)) == saved  # both ranks stopped at the same step: the last logged one was saved


def test_slurm_script_forwards_usr1_and_requeues(corpus, ref2, tmp_path):
    """scripts/slurm.sh with stand-ins for srun, torchrun (this Python's) and scontrol: SIGUSR1 to the batch script
    (what --signal=B:USR1 sends before the time limit) reaches the workers through torchrun; they save and the job
    is requeued. The requeued job resumes and ends exactly where the uninterrupted run does."""
    bin_dir, out = tmp_path / "bin", str(tmp_path / "slurm")
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  f'exec {sys.executable} -m torch.distributed.run "${{@:2}}"\n')
    (bin_dir / "torchrun").write_text(f'#!/bin/bash\nexec {sys.executable} -m torch.distributed.run "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\ncase "$1" in show) echo localhost ;; '
                                      'requeue) echo "requeue $2" >> "$REQUEUED" ;; esac\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": "2", "SLURM_SUBMIT_DIR": ROOT,
           "MASTER_PORT": str(29500 + os.getpid() % 1000), "REQUEUED": str(tmp_path / "requeued"),
           "SHUTDOWN_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}  # the script's default of 8 would oversubscribe 2 cores
    p = subprocess.Popen(["bash", "scripts/slurm.sh", *train_args(corpus, out, *TWO)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in p.stdout:
        if line.startswith("step      4 "):
            break
    p.send_signal(signal.SIGUSR1)
    text = p.communicate(timeout=180)[0]
    assert p.returncode == 0, text[-3000:]
    assert (tmp_path / "requeued").read_text() == "requeue 42\n"
    saved = checkpoint.read_state(checkpoint.find_latest(out))["step"]
    assert 4 <= saved < 150 and max(losses(out)) == saved, text[-3000:]
    # the requeued job
    p = subprocess.run(["bash", "scripts/slurm.sh", *train_args(corpus, out, *TWO)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and f"resumed from {out}/step_{saved:06d}" in p.stdout, p.stdout[-3000:]
    same_losses(ref2, out, range(1, 151))
    same_weights(ref2, out)


# fused AdamW: decided on the device; not fused (MPS, a user's choice) and Muon: on the host
@pytest.mark.parametrize("fused,optimizer", [(True, "adamw"), (False, "adamw"), (True, "muon")])
def test_skipped_step_leaves_weights_and_optimizer_untouched(fused, optimizer):
    import config
    import kernel
    import optim
    import step as steps
    from model import GPT, GPTConfig
    cfg = config.Config(model=GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16),
                        train=config.TrainConfig(fused_optimizer=fused, optimizer=optimizer, precision="fp32",
                                                 batch_size=2))
    run = make_run(cfg)
    m = GPT(cfg.model, kernel.configure("torch", "plain"))
    opt = optim.build(m, run.cfg.train, run.device)
    assert steps.skips_on_device(opt) == (fused and optimizer == "adamw")
    x = torch.randint(0, 64, (2, 16))

    def step(poison: float):
        return steps.train_step(m, lambda a, b: m(a, b) * poison, opt, [(x, x)], run)
    step(1.0)  # AdamW state exists
    before = ({k: v.clone() for k, v in m.state_dict().items()},
              {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})
    for poison in (float("nan"), float("inf")):
        loss, norm, bad = step(poison)
        assert bad.item() == 1.0
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[0][k]), k
        for p, s in opt.state.items():
            for k, v in s.items():
                assert torch.equal(v, before[1][id(p)][k]), k
    _, _, bad = step(1.0)
    assert bad.item() == 0.0 and opt.state[next(m.parameters())]["step"].item() == 2
    if optimizer == "muon":  # the momentum buffers were among the state checked above
        assert sum("momentum_buffer" in s for s in opt.state.values()) == 7  # q, k, v, o, gate, up, down


def skipped(out: str) -> list[int]:
    return [r["step"] for r in rows(out) if r.get("skipped")]


def test_nonfinite_steps_are_skipped_counted_and_resumable(corpus, tmp_path):
    out = str(tmp_path / "nan")
    args = train_args(corpus, out, "train.max_steps=10", "train.ckpt_interval=2", "train.eval_interval=0")
    r = faulty("nan:0:3-4,infgrad:7", *args)  # 0-based steps: logged as steps 4, 5 and 8
    assert r.returncode == 0, r.stderr[-3000:]
    assert skipped(out) == [4, 5, 8]
    assert "step      4 | loss nan is not finite: update skipped (1 in a row, 1 in total" in r.stdout
    assert re.search(r"step      8 \| gradient norm (inf|nan) is not finite", r.stdout)
    assert "step      4 | checkpoint postponed" in r.stdout
    names = sorted(n for n in os.listdir(out) if n.startswith("step_"))
    assert names == ["step_000009", "step_000010"], names  # 8's save waited for a good step
    assert checkpoint.read_state(checkpoint.find_latest(out))["skipped_steps"] == 3
    ls = losses(out)
    assert [s for s, v in ls.items() if v is None] == [4, 5, 8]  # log rows of steps with nothing to average
    assert all(np.isfinite(v) for v in ls.values() if v is not None) and ls[10] < ls[1]
    assert [r["skipped_steps"] for r in rows(out) if "loss" in r][-1] == 3


def test_too_many_nonfinite_steps_stop_with_the_last_good_checkpoint(corpus, tmp_path):
    out = str(tmp_path / "diverged")
    args = train_args(corpus, out, "train.max_steps=20", "train.ckpt_interval=2", "train.eval_interval=0",
                      "train.max_consecutive_skips=3")
    r = faulty("nan:0:5-19", *args)  # from step 6 on
    assert r.returncode == 1
    assert "3 steps in a row had a non-finite loss or gradient norm" in r.stderr
    assert f"{out}/step_000004" in r.stderr
    assert checkpoint.find_latest(out).endswith("step_000004") and skipped(out) == [6, 7, 8]
    model, _, _ = load_model(out, "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_on_one_rank_is_skipped_by_both(corpus, tmp_path):
    """A loss that is NaN on rank 1 only: both ranks skip the step and stay in step with a 1-process run that
    skips it too."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = [*TINY, "train.micro_batch_size=2", "train.precision=fp32", "train.max_steps=6",
              "train.eval_interval=0", "train.ckpt_interval=6"]
    r = faulty("nan:0:2", *train_args(corpus, one, *common))
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun(*train_args(corpus, two, *common, "train.parallel=ddp"), fault="nan:1:2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert skipped(one) == skipped(two) == [3]
    a, b = losses(one), losses(two)
    assert all(abs(a[s] - b[s]) < 1e-5 for s in (1, 2, 4, 5, 6)), (a, b)


def test_a_kernel_that_fails_at_the_first_step_falls_back_to_torch(corpus, ref1, ref2, tmp_path):
    """A chosen kernel that raises at the first step (as liger's did under compile on torch 2.11) is replaced by
    torch's with one warning naming the cause, and the step runs again: the run matches one that never had it, bit
    for bit (dropout included), on 1 process and on 2 DDP ranks that both fail."""
    one = str(tmp_path / "one")
    r = faulty("kernel:0", *train_args(corpus, one, *ONE))
    assert r.returncode == 0, r.stderr[-3000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: the first step failed")]
    assert warnings == ["warning: the first step failed with RuntimeError: injected: this RMSNorm kernel does not "
                        "compile (call 1); running it again with rms_norm: torch"], r.stderr
    same_losses(ref1, one, range(1, 17))
    two = str(tmp_path / "two")
    r = torchrun(*train_args(corpus, two, *TWO), fault="kernel:*")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("the first step failed with RuntimeError") == 2, r.stderr  # "(rank 0)", "(rank 1)"
    same_losses(ref2, two, range(1, 151))


def test_a_compile_past_its_time_limit_stops_with_an_error(corpus, tmp_path):
    """train.compile_timeout_s bounds a compiled run's first step (a compile that hangs, as FP8's did on torch
    2.11): past it every rank says why and exits with status 3; nothing is saved."""
    out = str(tmp_path / "slow")
    r = subprocess.run([sys.executable, "train.py", *train_args(corpus, out, "train.compile=true",
                                                                "train.compile_timeout_s=0.5")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr[-3000:]
    assert re.search(r"error: the first step \(torch.compile included\) has run for \d+ s, past "
                     r"train.compile_timeout_s=0.5; stopping. torch 2", r.stderr), r.stderr[-3000:]
    assert checkpoint.find_latest(out) is None


def test_out_of_memory_says_what_to_lower_and_keeps_the_last_checkpoint(corpus, tmp_path, capsys):
    """torch.OutOfMemoryError in step 5 (what CUDA's allocator raises): no traceback, exit 1, the memory and what
    to lower on stderr with a plan.py command for this run that runs; nothing saved, step 4's checkpoint loads."""
    out = str(tmp_path / "oom")
    r = faulty("oom:0:4", *train_args(corpus, out, "train.max_steps=10", "train.ckpt_interval=2",
                                      "train.eval_interval=0"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith("error: ran out of memory on cpu in step 5: CUDA out of memory. Tried to allocate "
                               "2.00 GiB"), r.stderr
    for advice in ("memory: peak ", "train.micro_batch_size=2 ", "gradient accumulation goes from 2 to 4",
                   "train.activation_checkpointing=true ", "model.block_size=32 ",
                   f"The last checkpoint, {out}/step_000004, is intact"):
        assert advice in r.stderr, (advice, r.stderr)
    (command,) = [line.strip() for line in r.stderr.splitlines() if line.strip().startswith("python plan.py ")]
    assert command == f"python plan.py {out}/config.yaml train.micro_batch_size=2 --gpus 1"
    import plan  # the command as a user would run it, in this process (a second interpreter costs seconds)
    assert shlex.split(command)[:2] == ["python", "plan.py"] and plan.main(shlex.split(command)[2:]) == 0
    assert "micro batch 2 x grad accum 4" in capsys.readouterr().out
    assert checkpoint.find_latest(out).endswith("step_000004") and max(losses(out)) == 4
    assert not any(n.startswith(".tmp") for n in os.listdir(out))
    load_model(out, "cpu")


def test_out_of_memory_while_setting_up_is_reported_too(corpus, tmp_path, monkeypatch, capsys):
    """Building the model, its optimizer state or resuming can run out too: the same report, no traceback."""
    import train
    monkeypatch.chdir(ROOT)

    def build(*a):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
    monkeypatch.setattr(train.optim, "build", build)
    out = str(tmp_path / "oom")
    assert train.main(train_args(corpus, out, "train.max_steps=2")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ran out of memory on cpu setting up the run (the optimizer): CUDA out of memory"), err
    assert "train.micro_batch_size=2 " in err and f"python plan.py {out}/config.yaml" in err
    assert "no checkpoint yet" in err


def test_cuda_out_of_memory_report_and_allocation_history(tmp_path, monkeypatch, capsys):
    """The CUDA side, with the allocator's functions stood in for (no GPU here): allocation history is recorded
    over the first steps of a start only; an out-of-memory error writes the snapshot and, under DDP on 8 GPUs, adds
    FSDP to the advice and names the GPU for plan.py."""
    import config
    import diagnose
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda enabled="all", **k: calls.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: open(path, "wb").close())
    for name, value in (("max_memory_allocated", 70 * 2**30), ("memory_allocated", 60 * 2**30),
                        ("memory_reserved", 78 * 2**30), ("get_device_name", "NVIDIA H100 80GB HBM3"),
                        ("get_device_properties", type("Props", (), {"total_memory": 80 * 2**30}))):
        monkeypatch.setattr(torch.cuda, name, lambda *a, value=value: value)
    cfg = config.load(["train.batch_size=64", "train.micro_batch_size=8", f"train.out_dir={tmp_path}"])
    cuda = torch.device("cuda", 0)
    with diagnose.StepProfiler(cfg.train, cuda, 0, 100) as profiler:  # a start at step 100
        for _ in range(diagnose.HISTORY_STEPS):
            profiler.step()
        assert calls == ["all"]
        profiler.step()
        assert calls == ["all", None] and profiler.idle
    import hardware
    import kernel
    bf16 = hardware.Precision("bf16", "this GPU has BF16 tensor cores")
    run = config.Run(cfg, cuda, bf16, kernel.REFERENCE, "ddp", 3, config.derive(cfg, 8))
    assert diagnose.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB"), run,
                                  101, 70.0) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: rank 3 ran out of memory on cuda:0 in step 102: CUDA out of memory. Tried")
    assert os.path.isfile(tmp_path / "oom_rank3.pickle") and f"snapshot {tmp_path}/oom_rank3.pickle" in err
    assert "memory: peak 70.00 GiB allocated, 60.00 GiB now, 78.00 GiB reserved by PyTorch, of 80.00 GiB" in err
    for advice in ("train.micro_batch_size=4 ", "from 1 to 2", "train.activation_checkpointing=true ",
                   "train.parallel=fsdp ", f"python plan.py {tmp_path}/config.yaml train.micro_batch_size=4 --gpus 8 "
                   "--gpu h100\n", "there is no checkpoint yet"):
        assert advice in err, (advice, err)
    # the compiled loss (train.loss auto where the logits fit) holds a micro-batch's logits: the first advice
    from dataclasses import replace
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=50257))
    compiled = replace(kernel.REFERENCE, loss=kernel.compiled_loss)
    run = config.Run(cfg, cuda, bf16, compiled, "ddp", 0, config.derive(cfg, 8))
    diagnose.out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), run, 5, 70.0)
    err = capsys.readouterr().err
    assert "  train.loss=chunked                     the loss now holds a micro-batch's full logits (8,192 x 50,304)" \
        in err and "python plan.py " + f"{tmp_path}/config.yaml train.loss=chunked --gpus 8 --gpu h100\n" in err, err


def test_full_disk_during_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    """A real write failure from the kernel: files may not grow past 64 KB (RLIMIT_FSIZE, as a full disk would
    stop them), so the step-4 checkpoint cannot be written; step 2's stays and the run stops cleanly."""
    out = str(tmp_path / "full")
    args = train_args(corpus, out, "train.max_steps=6", "train.ckpt_interval=2", "train.eval_interval=0")
    assert train.main([*args, "train.max_steps=2"]) == 0
    meta_before = open(os.path.join(out, "step_000002", ".metadata"), "rb").read()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       preexec_fn=small_files)
    assert r.returncode == 1, r.stderr[-3000:]
    # torch.save's zip writer reports the failed write as "unexpected pos": the message carries what it got
    assert "error: writing checkpoint step_000004 failed (" in r.stderr, r.stderr[-3000:]
    assert f"the previous checkpoint ({out}/step_000002) is intact" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(out)) == [".lock", "config.yaml", "latest", "metrics.jsonl", "run_info.json",
                                       "step_000002", "tokenizer"]  # the partial save is gone
    assert open(os.path.join(out, "step_000002", ".metadata"), "rb").read() == meta_before
    assert train.main(args) == 0  # space again: it resumes from step 2
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def corrupt_dataset(corpus: str, tmp_path, how: str) -> str:
    path = str(tmp_path / f"data_{how}")
    shutil.copytree(corpus, path)
    meta = json.load(open(os.path.join(path, "meta.json")))
    shard = os.path.join(path, meta["splits"]["train"]["shards"][0]["file"])
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 7)
    elif how == "dtype":
        np.save(shard, np.load(shard).astype(np.int32))
    elif how == "vocab":
        meta["vocab_size"] = 100_000
        json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    elif how == "checksum":  # one token changed after preparation
        ids = np.load(shard)
        ids[len(ids) // 2] ^= 1
        np.save(shard, ids)
    elif how == "range":  # ids past meta.json's vocab, with a checksum that matches (made this way)
        ids = np.load(shard)
        ids[-3] = meta["vocab_size"] + 7
        np.save(shard, ids)
        meta["splits"]["train"]["shards"][0]["xxh3"] = checkpoint.file_digest(shard)
        json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    elif how == "nometa":
        os.remove(os.path.join(path, "meta.json"))
    elif how == "short":  # a train split shorter than one window
        for s in meta["splits"]["train"]["shards"]:
            np.save(os.path.join(path, s["file"]), np.load(os.path.join(path, s["file"]))[:10])
            s["tokens"], s["xxh3"] = 10, checkpoint.file_digest(os.path.join(path, s["file"]))
        json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    return path


@pytest.mark.parametrize("case", ["yaml", "vocab", "dtype", "truncated", "checksum", "range", "nometa", "short",
                                  "tp", "lora_moe", "shape", "not_writable"])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, corpus, trained, tmp_path, capsys):
    out, data, extra = str(tmp_path / "run"), corpus, []
    if case == "yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text("train:\n  lr: 3e-4\n  max_steps: [10\nmodel:\n  n_layer: 2\n")
        extra, want = [str(bad)], f"{bad}: line "
    elif case == "vocab":  # the data's vocab is larger than the model's
        data, extra = corrupt_dataset(corpus, tmp_path, "vocab"), ["model.vocab_size=512"]
        want = "model.vocab_size (512) is smaller than the data's vocab (100000"
    elif case == "dtype":
        data, want = corrupt_dataset(corpus, tmp_path, "dtype"), "holds int32 but meta.json says uint16"
    elif case == "truncated":
        data, want = corrupt_dataset(corpus, tmp_path, "truncated"), "is truncated or padded"
    elif case in ("checksum", "range", "nometa", "short"):
        data = corrupt_dataset(corpus, tmp_path, case)
        want = {"checksum": "does not match the checksum in meta.json", "range": "outside the vocab of 512",
                "nometa": "is not a prepared dataset (no meta.json)", "short": "shorter than one window"}[case]
    elif case == "tp":  # tensor parallel on one process
        extra, want = ["train.tp=2"], "must be a multiple of train.tp (2)"
    elif case == "lora_moe":
        extra, want = ["train.lora=true", "model.moe.num_experts=4"], "train.lora with an MoE model"
    elif case == "shape":  # a checkpoint whose config says 3 layers but which holds 2
        os.makedirs(out)
        shutil.copytree(checkpoint.find_latest(trained), os.path.join(out, "step_000030"))
        state_file = os.path.join(out, "step_000030", "train_state.json")
        state = json.load(open(state_file))
        state["config"]["model"]["n_layer"] = 3
        os.remove(os.path.join(out, "step_000030", checkpoint.SUMS_FILE))  # foreign, not damaged: no checksums
        json.dump(state, open(state_file, "w"))
        extra = ["model.n_layer=3", "train.max_steps=40"]
        want = "does not fit this model; missing from the checkpoint: layers.2.input_layernorm.weight"
    elif case == "not_writable":
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        out, want = str(blocker / "run"), "is not writable (Not a directory)"
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    assert train.main([*train_args(data, out, "train.max_steps=5"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and want in err, err
    assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before  # nothing written, not even a lock


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_dir(corpus, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    assert train.main(train_args(corpus, str(ro / "run"), "train.max_steps=2")) == 2
    assert "is not writable" in capsys.readouterr().err


def test_second_run_on_the_same_out_dir_is_refused(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", f"import checkpoint, time; f = checkpoint._lock({out!r}); "
                               "print('locked', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train.main(train_args(corpus, out, "train.max_steps=2")) == 2
        err = capsys.readouterr().err
        assert f"train.out_dir {out} is in use by another run (pid {holder.pid} on " in err, err
        assert os.listdir(out) == [".lock"]
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    assert train.main(train_args(corpus, out, "train.max_steps=2")) == 0


class Bomb:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_bombs_in_a_checkpoint_are_refused(corpus, trained, tmp_path, capsys):
    marker = str(tmp_path / "code_ran")
    # 1. DCP's index (.metadata) is a pickle: swap it for one that runs code
    index_bomb = str(tmp_path / "index_bomb")
    shutil.copytree(trained, index_bomb)
    latest = checkpoint.find_latest(index_bomb)
    with open(os.path.join(latest, ".metadata"), "wb") as f:
        pickle.dump(Bomb(marker), f)
    os.remove(os.path.join(latest, checkpoint.SUMS_FILE))  # checksums catch damage; an attacker drops them too
    # 2. non-tensor values (optimizer hyperparameters) are pickled by torch.save inside the data files
    value_bomb = str(tmp_path / "value_bomb")
    shutil.copytree(trained, value_bomb)
    path = checkpoint.find_latest(value_bomb)
    model, cfg, _ = load_model(trained, "cpu")
    model.train()
    opt = train.optim.build(model, cfg.train, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (1, 8))
    model(x, x).backward()
    opt.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    optim_sd["param_groups"][0]["lr"] = Bomb(marker)
    for name in os.listdir(path):
        if name != checkpoint.STATE_FILE:
            os.remove(os.path.join(path, name))
    checkpoint.dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    assert not os.path.exists(marker)  # saving did not run it

    # the command lines through their main(), in this process (a second interpreter costs seconds a call): a load
    # that ran the bomb would create the marker here just the same
    capsys.readouterr()
    for run_dir, what in ((index_bomb, "it names io.open"), (value_bomb, "optim.param_groups.0.lr")):
        assert train.main(train_args(corpus, run_dir, "train.max_steps=40")) == 2
        err = capsys.readouterr().err
        assert "refusing to load" in err and what in err, err[-2000:]
    import eval as eval_
    import export
    import sample
    for main, extra in ((sample.main, []), (eval_.main, []), (export.main, ["--to", "hf", str(tmp_path / "hf")])):
        assert main([index_bomb, *extra]) == 2, main.__module__  # they read weights only: the index is the way in
        err = capsys.readouterr().err
        assert "refusing to load" in err, (main.__module__, err[-2000:])
    assert not os.path.exists(marker)


def test_every_load_in_the_repo_is_safe():
    """No torch.load without weights_only=True, no pickle.load, no np.load with allow_pickle, outside tests."""
    unsafe = re.compile(r"torch\.load\((?![^)]*weights_only=True)|pickle\.loads?\(|allow_pickle=True")
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "out", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    found += [f"{name}: {m.group(0)}" for m in unsafe.finditer(f.read())]
    assert not found, found
