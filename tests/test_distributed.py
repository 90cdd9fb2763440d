"""torchrun on CPU over gloo, two processes: DDP and FSDP2 match one process, checkpoints reshard between
world sizes, BF16 FSDP trains, and a failing rank ends the launch instead of hanging it.

The 2-rank runs without an injected fault share one launch (`launch` below, through tests/train_each.py): a launch
costs seconds of start-up on 2 CPU cores, a tiny run less than that. Each test checks that its own runs exited 0.

Tolerance: in FP32 the 2-process runs differ from one process only in the order gradients are summed
(all-reduce / reduce-scatter of two per-rank sums against one accumulated sum), a rounding of ~1e-7 relative
per step; losses over a few steps agree to 1e-5 (absolute, on losses of ~9 nats).
"""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
from build import build_model
import config
import train
import parallel
from conftest import ROOT, TINY, kill_tree, make_run
from model import GPT
from test_train import losses, rows, train_args
from train_each import sections

# 2 ranks x micro batch 2 x accumulation 2 = the 1-process global batch of 8 with accumulation 4
DIST = [*TINY, "train.micro_batch_size=2", "train.precision=fp32", "train.eval_interval=3", "train.ckpt_interval=3",
        "train.keep_last=5"]


def torchrun(*args, script="train.py", timeout=180, fault="", nproc=2) -> subprocess.CompletedProcess:
    """Launch `nproc` ranks (of tests/faulty.py with `fault`); on a hang, kill torchrun and its workers together and
    fail."""
    if fault:
        script = "tests/faulty.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env={**os.environ, "FAULT": fault})
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        out, err = p.communicate()
        pytest.fail(f"torchrun hung for {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def close(a: dict, b: dict, steps) -> None:
    assert all(abs(a[s] - b[s]) < 1e-5 for s in steps), (a, b)


class Launch:
    """One torchrun launch of tests/train_each.py over `runs` (name -> (out_dir, train.py arguments), or name ->
    (None, ["--copy", SRC, DST]) for a checkpoint an earlier run of the launch wrote). A test asks for its runs by
    name, and each is checked to have exited 0 then: a failed run fails the tests that use it, with the launch's
    output."""

    def __init__(self, runs: dict[str, tuple[str | None, list[str]]], nproc: int = 2, timeout: int = 600):
        argv, names = [], [name for name, (out, _) in runs.items() if out is not None]
        for _, args in runs.values():
            argv += [*args, "--"]
        self.result = torchrun(*argv[:-1], script="tests/train_each.py", nproc=nproc, timeout=timeout)
        parts = sections(self.result.stdout)
        self.dirs = {name: runs[name][0] for name in names}
        self.parts = {name: (i, parts.get(i, "")) for i, name in enumerate(names)}

    def stdout(self, name: str) -> str:
        """What run `name` printed (rank 0's lines, and any other rank's), once it is known to have exited 0."""
        (i, text), r = self.parts[name], self.result
        assert f"train_each: run {i} exited 0" in text, \
            f"run {name}: launch exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return text

    def finished(self, name: str) -> str:
        """The out_dir of run `name`, once it is known to have exited 0."""
        self.stdout(name)
        return self.dirs[name]


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The 1-process reference: 6 steps, checkpoints at 3 and 6."""
    out = str(tmp_path_factory.mktemp("dist") / "single")
    assert train.main(train_args(corpus, out, *DIST, "train.max_steps=6")) == 0
    return out


FP16 = [*DIST, "train.precision=fp16", "train.max_steps=6", "train.eval_interval=0"]
MUON = [*DIST, "train.optimizer=muon", "train.max_steps=6", "train.eval_interval=0"]
EVAL = [*DIST, "train.max_steps=4", "train.parallel=fsdp", "train.dist_timeout_s=30"]


@pytest.fixture(scope="module")
def launch(corpus, single, tmp_path_factory) -> Launch:
    """Every 2-rank run of this file without an injected fault, in one torchrun launch: the resumed ones after the
    runs whose checkpoints they resume, the compiled one last."""
    root = tmp_path_factory.mktemp("two")
    d = {n: str(root / n) for n in ("fsdp", "ddp", "plain", "fp16_ddp", "fp16_resumed", "muon_ddp", "muon_fsdp",
                                    "muon_again", "bf16")}
    os.makedirs(d["ddp"])  # the DDP run resumes the 1-process run's step-3 checkpoint
    shutil.copytree(os.path.join(single, "step_000003"), os.path.join(d["ddp"], "step_000003"))

    def run(name, *args):
        return d[name], train_args(corpus, d[name], *args)

    def copy_step3(src, dst):
        return None, ["--copy", os.path.join(d[src], "step_000003"), os.path.join(d[dst], "step_000003")]
    return Launch({
        # the chunked loss (the GPU default) reads lm_head's weight inside the FSDP2 root's forward
        "fsdp": run("fsdp", *DIST, "train.max_steps=6", "train.parallel=fsdp", "train.loss=chunked"),
        "ddp": run("ddp", *DIST, "train.max_steps=6", "train.parallel=ddp"),
        "plain": run("plain", *EVAL),
        "fp16_ddp": run("fp16_ddp", *FP16, "train.parallel=ddp"),
        "muon_ddp": run("muon_ddp", *MUON, "train.parallel=ddp"),
        "muon_fsdp": run("muon_fsdp", *MUON, "train.parallel=fsdp"),
        "copy_fp16": copy_step3("fp16_ddp", "fp16_resumed"),
        "fp16_resumed": run("fp16_resumed", *FP16, "train.parallel=ddp"),
        "copy_muon": copy_step3("muon_ddp", "muon_again"),
        "muon_again": run("muon_again", *MUON, "train.parallel=ddp"),
        "bf16": run("bf16", *TINY, "train.max_steps=20", "train.eval_interval=0", "train.precision=bf16",
                    "train.parallel=fsdp", "train.activation_checkpointing=true", "train.compile=true",
                    "train.async_checkpoint=true", "train.ckpt_interval=10"),
    })


def test_fsdp_matches_one_process_and_resumes_on_one(corpus, single, launch, tmp_path):
    fsdp = launch.finished("fsdp")
    ref = losses(single)
    close(losses(fsdp), ref, range(1, 7))
    # the FSDP run's step-3 checkpoint (sharded by 2 ranks) resumes in one process
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(fsdp, "step_000003"), os.path.join(resumed, "step_000003"))
    assert train.main(train_args(corpus, resumed, *DIST, "train.max_steps=6")) == 0
    assert sorted(losses(resumed)) == [4, 5, 6]
    close(losses(resumed), ref, range(4, 7))


def test_ddp_resumes_a_one_process_checkpoint(single, launch):
    out = launch.stdout("ddp")  # what this run printed
    assert "resumed from" in out and "parallel ddp x 2" in out
    assert out.count("step      4 |") == 1  # only rank 0 prints
    close(losses(launch.finished("ddp")), losses(single), range(4, 7))


def test_fsdp_bf16_compiled_with_activation_checkpointing_trains(launch):
    out = launch.finished("bf16")
    ls = losses(out)
    assert ls[20] < ls[1] - 0.3, ls
    assert sorted(n for n in os.listdir(out) if n.startswith("step_")) == ["step_000010", "step_000020"]


def test_eval_while_training_under_fsdp_cannot_hang_and_changes_no_loss(corpus, launch, tmp_path):
    """eval.* with FSDP2 on 2 ranks, rank 1 making 20 forwards more than rank 0 inside it (as generations that stop
    at different tokens would): the model is gathered first, so no forward waits on the other rank."""
    plain, live = launch.finished("plain"), str(tmp_path / "live")
    ok(torchrun(*train_args(corpus, live, *EVAL, "eval.interval=2", "eval.prompt=def f(x):"), fault="skew:1:20"))
    assert [r["step"] for r in rows(live) if r.get("sample", "").startswith("def f(x):")] == [2, 4]
    assert losses(live) == losses(plain)  # bit for bit: the evaluation leaves the training alone


def test_fp16_under_ddp_and_fsdp(corpus, launch, tmp_path):
    """FP16 with loss scaling on 2 ranks: DDP follows one process and resumes its own checkpoint bit for bit; under
    FSDP2 a NaN on one rank is one skipped step and one scale back-off on both ranks (the scaler's found-inf is
    the all-reduced skip flag, not each rank's look at its own gradient shard)."""
    single, ddp, resumed = str(tmp_path / "single"), launch.finished("fp16_ddp"), launch.finished("fp16_resumed")
    assert train.main(train_args(corpus, single, *FP16)) == 0
    assert all(abs(losses(ddp)[s] - losses(single)[s]) < 1e-3 for s in range(1, 7)), (losses(ddp), losses(single))
    assert sorted(losses(resumed)) == [4, 5, 6]
    assert all(losses(resumed)[s] == losses(ddp)[s] for s in range(4, 7))
    fsdp = str(tmp_path / "fsdp")
    r = torchrun(*train_args(corpus, fsdp, *FP16, "train.parallel=fsdp"), fault="nan:1:2")  # 0-based: logged as step 3
    ok(r)
    assert "step      3 | gradient norm nan is not finite: update skipped" in r.stdout  # rank 0 saw a finite loss
    state = checkpoint.read_state(os.path.join(fsdp, "step_000006"))
    assert state["skipped_steps"] == 1 and state["grad_scaler"]["scale"] == 2.0**15
    assert all(math.isfinite(v) for s, v in losses(fsdp).items() if s != 3)


def test_muon_under_ddp_and_fsdp_matches_one_process_and_reshards(corpus, launch, tmp_path):
    """Muon on 2 ranks: DDP (each matrix orthogonalised by one rank and broadcast) and FSDP2 (the owner gathers
    the shards, orthogonalises, scatters them back) follow one process; DDP resumes its own checkpoint bit for
    bit; FSDP2's sharded momentum buffers resume in one process (2 -> 1). In FP32 the Newton-Schulz inputs differ
    from one process only by the order gradients were summed, so the losses agree to 1e-4."""
    single, one = str(tmp_path / "single"), str(tmp_path / "one")
    ddp, fsdp, again = (launch.finished(n) for n in ("muon_ddp", "muon_fsdp", "muon_again"))
    assert train.main(train_args(corpus, single, *MUON)) == 0
    ref = losses(single)
    for run in (ddp, fsdp):
        assert all(abs(losses(run)[s] - ref[s]) < 1e-4 for s in range(1, 7)), (losses(run), ref)
    assert losses(ddp)[6] < ref[1] - 0.1  # it trains
    assert sorted(losses(again)) == [4, 5, 6]
    assert all(losses(again)[s] == losses(ddp)[s] for s in range(4, 7))
    os.makedirs(one)
    shutil.copytree(os.path.join(fsdp, "step_000003"), os.path.join(one, "step_000003"))
    assert train.main(train_args(corpus, one, *MUON)) == 0
    assert all(abs(losses(one)[s] - ref[s]) < 1e-4 for s in range(4, 7)), (losses(one), ref)


def test_a_failing_rank_ends_the_launch(corpus, tmp_path):
    out = str(tmp_path / "fails")
    r = torchrun(*train_args(corpus, out, *TINY, "train.max_steps=50", "train.eval_interval=0",
                             "train.parallel=ddp", "train.dist_timeout_s=30"),
                 fault="raise:1:2", timeout=120)  # a hang would run into the timeout
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr


def test_fsdp_blocks_get_the_fp32_rope_table(corpus, tmp_path, monkeypatch):
    """Under FSDP2 in BF16 each block receives the RoPE table in FP32, as without FSDP (FSDP's default casts every
    floating input of a block to the parameter dtype), and the BF16 residual stream as it is."""
    import torch.distributed as dist
    monkeypatch.chdir(ROOT)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        cfg = config.load(train_args(corpus, str(tmp_path / "run"), "train.parallel=fsdp", "train.precision=bf16"))
        run = make_run(cfg, world=2, model=train.model_shape(cfg, 1))  # on a 1-rank mesh
        model = build_model(run.cfg, run.device, run.ops, parallelize=lambda m: parallel.parallelize(m, run))
        seen = []
        model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, args[1].dtype)))
        with torch.no_grad():
            model(torch.zeros((1, 8), dtype=torch.long))
        assert run.mode == "fsdp" and seen == [(torch.bfloat16, torch.float32)]
    finally:
        dist.destroy_process_group()


def test_plan_activation_estimate_matches_saved_tensors():
    import kernel
    import memory
    import plan
    from model import GPTConfig
    cfg = GPTConfig(vocab_size=1000, n_layer=2, n_embd=128, n_head=4, n_kv_head=2, block_size=64)
    model = GPT(cfg, kernel.configure("torch", "plain"))
    x = torch.randint(0, 1000, (2, 64))
    got = plan.measure_saved(model, x, "fp32")
    assert abs(memory.activation_bytes(cfg, x.numel(), "fp32") / got - 1) < 0.01
    # 8 GPUs: FSDP shards the 16 bytes/parameter of weights, gradients and AdamW moments 8 ways
    rows = {r["mode"]: r for r in plan.plan(config.load(["configs/1b.yaml"]), 8, "h100")}
    assert rows["ddp"]["optim"] == pytest.approx(8 * rows["fsdp"]["optim"])
    assert rows["fsdp + AC"]["activations"] < rows["fsdp"]["activations"] / 4
