"""Tensor parallel (train.tp) on CPU over gloo: the same training as one process, checkpoints that move between
(dp, tp) meshes, one-process tools on a tensor-parallel checkpoint, the plan's communication against torch's
CommDebugMode, and the refusals before step 1.

Tolerance: in FP32 a split model differs from one process only in the order partial sums are added (the row-parallel
matmuls' reduce-scatter, the vocab-parallel log-sum-exp, FSDP2's gradient reduce-scatter): ~1e-7 relative per step.
Losses over 10 steps agree to 1e-5 with AdamW and 1e-4 with Muon (as tests/test_distributed.py: Newton-Schulz
amplifies the rounding of its input); single-step gradients to 1e-6, logits and the gradient norm to 1e-5.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import checkpoint
import config
import eval as eval_
import export
import plan
import sample
import train
from safetensors.torch import load_file

from conftest import ROOT, TINY, children, kill_tree
from test_distributed import Launch, ok, torchrun
from test_train import losses, rows, train_args

# The reference model: Llama with GQA and tied embeddings (configs/tiny.yaml), Muon, checkpoints every 3 steps
TP = [*TINY, "model.n_head=4", "model.n_kv_head=2", "train.micro_batch_size=2", "train.precision=fp32",
      "train.max_steps=10", "train.eval_interval=0", "train.ckpt_interval=3", "train.keep_last=10"]


def close(a: dict, b: dict, steps, tol: float) -> float:
    """The largest difference of the losses of `steps`; fails above `tol`."""
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert sorted(steps) == sorted(s for s in a if s in steps) and worst < tol, (worst, a, b)
    return worst


def grad_norms(out: str) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in rows(out) if "grad_norm" in r}


def launch(corpus, out, *args, nproc=2, resume_from=None, fault="") -> None:
    """torchrun train.py (2 or 4 ranks) into `out`, first copying the checkpoint `resume_from` there."""
    if resume_from:
        os.makedirs(out)
        shutil.copytree(resume_from, os.path.join(out, os.path.basename(resume_from)))
    r = torchrun(*train_args(corpus, out, *args), nproc=nproc, fault=fault, timeout=300)
    ok(r)
    return r


def test_tp_numerics_and_the_plans_communication(corpus, tmp_path):
    """One launch of tests/tp_worker.py (2 ranks, dp 1 x tp 2): Llama GQA, GPT-2 and Llama with qk_norm (all tied) split
    two ways give the loss, gradients, gradient norm, logits and one AdamW and one Muon step of one process; the
    bytes sent per step as CommDebugMode counts them are within 10 % of plan.comm_bytes (TP, and FSDP2 at dp 2); the
    tensors a rank keeps for backward are within 5 % of memory.activation_bytes at tp 2."""
    out = str(tmp_path / "worker.json")
    ok(torchrun(corpus, out, script="tests/tp_worker.py"))
    with open(out) as f:
        res = json.load(f)
    for name, d in res["models"].items():
        assert d["params"], name
        assert d["loss"] < 1e-5 and d["grad"] < 1e-6 and d["grad_norm"] < 1e-5 and d["logits"] < 1e-5, (name, d)
        # one step from the same gradients; AdamW's first update is ~lr x sign(g) (lr 3e-3), so a gradient of
        # rounding size may round either way: far below lr is what equal updates look like
        assert d["adamw_step"] < 5e-4 and d["muon_step"] < 5e-4, (name, d)
    for kind, c in res["comm"].items():
        assert abs(c["counted"] / c["planned"] - 1) < 0.10, (kind, c)
    # the activation estimate at tp 2 against the tensors autograd keeps on a rank (as plan.py --check in one process)
    assert abs(res["saved"]["measured"] / res["saved"]["planned"] - 1) < 0.05, res["saved"]


def test_tp_trains_as_one_process_and_checkpoints_move_between_meshes(corpus, tmp_path, capsys):
    """Muon, activation checkpointing: dp 1 x tp 2 from the start; its step-3 checkpoint resumed at dp 2 x tp 1 (FSDP2);
    that run's step-6 checkpoint resumed at dp 1 x tp 2 and at dp 2 x tp 2 (4 ranks, stopped by a signal to one of
    them): every loss and gradient norm within 1e-4 of one process (the data order is kept across meshes). The final
    TP checkpoint verifies its checksums and reads in one process: eval.py gives one process's validation loss,
    sample.py generates, export.py writes its weights (those of one process, to 1e-4)."""
    single, tp2, dp2, back, four = (str(tmp_path / n) for n in ("single", "tp2", "dp2", "back", "four"))
    ac = "train.activation_checkpointing=true"
    assert train.main(train_args(corpus, single, *TP)) == 0
    ref = losses(single)
    two = Launch({  # one launch, each resume after the run that wrote its checkpoint
        "tp2": (tp2, train_args(corpus, tp2, *TP, "train.tp=2", ac)),
        "copy": (None, ["--copy", os.path.join(tp2, "step_000003"), os.path.join(dp2, "step_000003")]),
        "dp2": (dp2, train_args(corpus, dp2, *TP, "train.parallel=fsdp")),
        "copy_back": (None, ["--copy", os.path.join(dp2, "step_000006"), os.path.join(back, "step_000006")]),
        "back": (back, train_args(corpus, back, *TP, "train.tp=2", ac))})
    for name in ("tp2", "dp2", "back"):
        two.finished(name)
    stopped = four_ranks_stopped_by_one(corpus, four, os.path.join(dp2, "step_000006"))
    worst = {"tp2": close(losses(tp2), ref, range(1, 11), 1e-4), "dp2": close(losses(dp2), ref, range(4, 11), 1e-4),
             "back": close(losses(back), ref, range(7, 11), 1e-4),
             "four": close(losses(four), ref, range(7, stopped + 1), 1e-4)}
    print(f"largest loss differences from one process: {worst}")
    # the global gradient norm over the (dp, tp) mesh, which clipping (train.grad_clip 1) uses on the steps above 1
    assert max(grad_norms(single).values()) > 1.0
    for run, steps in ((tp2, range(1, 11)), (four, range(7, stopped + 1))):
        close(grad_norms(run), grad_norms(single), steps, 1e-4)

    one_process_reads(single, tp2, tmp_path, capsys)


def one_process_reads(single: str, split: str, tmp_path, capsys) -> None:
    """The last checkpoint of run `split` (trained split over ranks) verifies its checksums and reads in one process as
    run `single`'s does: eval.py's validation loss, export.py's weights (to 1e-4); sample.py generates from it."""
    last = checkpoint.find_latest(split)
    checkpoint.verify_files(last)  # checksums.json covers the split run's files
    assert os.path.exists(os.path.join(last, checkpoint.SUMS_FILE))
    one = ["--device", "cpu", "--precision", "fp32"]
    scores = []
    for run in (single, split):
        assert eval_.main([run, "--json", "--max_tokens", "4096", *one]) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"])
    assert abs(scores[0] - scores[1]) < 1e-4, scores
    assert sample.main([split, "--prompt", "def ", "--max_new_tokens", "8", *one]) == 0
    assert capsys.readouterr().out.startswith("def ")
    weights = []
    for run in (single, split):
        assert export.main([run, "--to", "hf", str(tmp_path / f"hf_{os.path.basename(run)}")]) == 0
        weights.append(load_file(str(tmp_path / f"hf_{os.path.basename(run)}" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    worst = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    assert worst < 1e-4, worst


def four_ranks_stopped_by_one(corpus, out, resume_from, args=(*TP, "train.tp=2"),
                              layout="data parallel 2 (world size 4 / train.tp 2)") -> int:
    """4 ranks of `args` (dp 2 x tp 2) resuming `resume_from`; after its step 7, SIGUSR1 to one worker only (the last:
    another data-parallel group and tensor-parallel position, or pipeline stage, than rank 0). Every rank stops after
    the same step and saves it; torchrun exits 0; the banner names `layout`. Returns that step."""
    os.makedirs(out)
    shutil.copytree(resume_from, os.path.join(out, os.path.basename(resume_from)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "train.py",
           *train_args(corpus, out, *args)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        seen = ""
        for line in p.stdout:
            seen += line
            if line.startswith("step      7 "):
                break
        kids = children(p.pid)
        assert len(kids) == 4, seen[-3000:]
        os.kill(max(kids), signal.SIGUSR1)
        text = seen + p.communicate(timeout=300)[0]
    finally:
        if p.poll() is None:
            kill_tree(p.pid)
    assert p.returncode == 0, text[-3000:]
    assert layout in text and "SIGUSR1: stopping after this step" in text
    saved = checkpoint.read_state(checkpoint.find_latest(out))["step"]
    assert 7 <= saved <= 10 and max(losses(out)) == saved, text[-3000:]  # all stopped at the step that was saved
    return saved


def test_gpt2_adamw_tp_matches_and_a_nan_on_one_rank_is_skipped_by_all(corpus, tmp_path):
    """GPT-2 (biases, learned positions, untied head) with AdamW at dp 1 x tp 2, its loss made NaN on rank 1 alone at
    step 3: both ranks skip that step (the flag is all-reduced over the mesh) and every other step matches one
    process with the same fault to 1e-5."""
    args = [*TP, "model.arch=gpt2", "model.tie_embeddings=false", "train.optimizer=adamw", "train.ckpt_interval=100"]
    single, tp2 = str(tmp_path / "single"), str(tmp_path / "tp2")
    r = subprocess.run([sys.executable, "tests/faulty.py", *train_args(corpus, single, *args)], cwd=ROOT, text=True,
                       capture_output=True, env={**os.environ, "FAULT": "nan:0:2"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(corpus, tp2, *args, "train.tp=2", fault="nan:1:2")
    assert "step      3 | gradient norm nan is not finite: update skipped" in r.stdout
    assert rows(tp2)[-1]["skipped_steps"] == 1
    close(losses(tp2), losses(single), [s for s in range(1, 11) if s != 3], 1e-5)
    close(grad_norms(tp2), grad_norms(single), [s for s in range(1, 11) if s != 3], 1e-5)


@pytest.mark.parametrize("args, words", [
    (["train.tp=3"], ["train.tp=3", "model.n_head (4)"]),
    (["model.n_kv_head=1", "train.tp=2"], ["train.tp=2", "model.n_kv_head (1)"]),
    (["model.block_size=63", "train.tp=2"], ["model.block_size (63)"]),
    (["train.tp=2", "train.parallel=ddp"], ["train.parallel=ddp"]),
    (["train.tp=2", "eval.interval=5", "eval.prompt=x"], ["eval.interval=5"]),
    (["train.tp=2", "train.kernels=liger"], ["train.kernels=liger"]),
])
def test_what_cannot_be_split_is_refused_with_the_numbers(args, words):
    with pytest.raises(config.ConfigError) as e:
        config.load(["configs/tiny.yaml", "model.n_head=4", *args])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_world_size_must_be_a_multiple_of_tp_and_the_batch_follows_dp():
    cfg = config.load(["configs/tiny.yaml", "train.tp=2", "train.batch_size=16", "train.micro_batch_size=2"])
    with pytest.raises(config.ConfigError, match=r"world size \(3\) must be a multiple of train.tp \(2\)"):
        config.derive(cfg, 3)
    d = config.derive(cfg, 8)  # 4 data-parallel ranks of 2: 16 = 2 x 2 x 4
    assert (d.dp, d.grad_accum) == (4, 2) and "data parallel 4 (world size 8 / train.tp 2)" in d.banner(cfg)


def test_plan_shows_each_tp_and_fits_the_smallest():
    cfg = config.load(["configs/1b.yaml"])
    rows_ = {r["mode"]: r for r in plan.plan(cfg, 8, "h100")}
    assert {"fsdp x tp 2", "fsdp x tp 4", "fsdp x tp 8"} <= set(rows_)
    # tensor parallel divides the activations (all but the gathered norm outputs) and adds its collectives
    assert rows_["fsdp x tp 4"]["activations"] < rows_["fsdp x tp 2"]["activations"] < rows_["fsdp"]["activations"]
    assert rows_["fsdp"]["comm_tp"] == 0 < rows_["fsdp x tp 2"]["comm_tp"] < rows_["fsdp x tp 4"]["comm_tp"]
    assert plan.fit(plan.plan(cfg, 8, "h100"))["tp"] == 1
    long = config.load(["configs/1b.yaml", "model.block_size=16384", "train.micro_batch_size=2",
                        "train.batch_size=64"])  # 32k tokens per micro-batch
    small = plan.plan(long, 8, (10.0, 989.0))  # 10 GiB GPUs: even FSDP2 + AC and tp 2 + AC do not fit
    best = plan.fit(small)
    assert (best["tp"], best["ac"]) == (4, True) and not any(r["fits"] for r in small if r["tp"] < 4), best


def fake_slurm(tmp_path, nodes: int, gpus: int) -> dict:
    """The environment of a SLURM job of `nodes` nodes of `gpus` GPUs, with stand-ins for srun (it prints what it
    would launch) and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\necho "srun $*"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho localhost\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_GPUS_ON_NODE": str(gpus), "SLURM_SUBMIT_DIR": ROOT}


def test_slurm_passes_tp_through_and_keeps_a_group_inside_a_node(tmp_path):
    """scripts/slurm.sh with a stand-in srun that prints what it would launch: train.tp=2 on 2 GPUs per node reaches
    train.py; train.tp=3 stops the job before srun, naming the GPUs per node."""
    env = fake_slurm(tmp_path, nodes=2, gpus=2)
    ran = subprocess.run(["bash", "scripts/slurm.sh", "configs/7b.yaml", "train.tp=2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0 and "train.py configs/7b.yaml train.tp=2" in ran.stdout, ran.stdout + ran.stderr
    assert "FSDP2 over 2 groups" in ran.stdout
    refused = subprocess.run(["bash", "scripts/slurm.sh", "configs/7b.yaml", "train.tp=3"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "must divide the 2 GPUs per node" in refused.stderr
    assert "srun" not in refused.stdout
