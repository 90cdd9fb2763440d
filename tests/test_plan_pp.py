"""plan.py under pipeline parallel: a stage's memory, the schedules' bubbles and activations in flight against the
published figures, the point-to-point bytes, --fit choosing pipeline stages for 34B on 256 A100s, and
scripts/slurm.sh refusing a train.tp x train.pp that does not divide the GPUs."""
import subprocess
from dataclasses import replace

import pytest

import config
import memory
import plan
from conftest import ROOT
from test_tp import fake_slurm


def rows(cfg, gpus, gpu):
    return {r["mode"]: r for r in plan.plan(cfg, gpus, gpu)}


def test_more_stages_less_memory_per_gpu_and_p2p_bytes():
    """With the GPUs of one pipeline only (dp 1), pp 2 holds half the model per GPU of pp 1; the rank's point-to-point
    bytes are its boundaries' activations forward and gradients backward, micro x block_size x n_embd x 2 bytes each
    per micro-batch."""
    cfg = config.load(["configs/34b.yaml", "train.tp=8", "train.pp=1", "train.activation_checkpointing=true"])
    one = rows(cfg, 8, "h200")["fsdp x tp 8 + AC"]
    two = rows(replace(cfg, train=replace(cfg.train, pp=2)), 16, "h200")["fsdp x tp 8 x pp 2 + AC"]
    assert two["params"] < 0.55 * one["params"] and two["total"] < one["total"], (one, two)
    c = config.load(["configs/34b.yaml", "train.tp=8", "train.pp=4"])
    m = config.derive(c, 256).grad_accum  # 128 micro-batches of 1 x 4096 per data-parallel rank
    comm = plan.comm_bytes(c, memory.meta_model(c), 8, 8, "fsdp", False)
    # of the rank that sends the most: a middle stage sends forward and backward, the first and last stages one way
    # (the last, with the loss's tensor-parallel traffic, sends the most here); each tp rank its 1/8 slice
    one_way = m * 4096 * 8192 * 2 / 8
    assert comm["p2p"] in (one_way, 2 * one_way) and comm["total"] > comm["p2p"] > 0
    assert plan.comm_bytes(replace(c, train=replace(c.train, pp=1)), memory.meta_model(c), 32, 8, "fsdp",
                           False)["p2p"] == 0


@pytest.mark.parametrize("schedule,v,peak0", [("gpipe", 1, 8), ("1f1b", 1, 4), ("interleaved_1f1b", 2, 4 + 3 / 2),
                                              ("zero_bubble", 2, 4), ("dualpipev", 2, None)])
def test_bubble_and_activations_in_flight(schedule, v, peak0):
    """GPipe and 1F1B: (p - 1) / (m + p - 1) (GPipe keeps all m micro-batches, 1F1B pp - r on rank r); interleaved 1F1B
    from torch's order: (p - 1) / (v m + p - 1) and pp + (pp - 1) / v on rank 0 (Narayanan et al. 2021); ZB-V: 1F1B's
    peak (pp) and a smaller bubble than interleaved's; DualPipeV: a bubble below 1F1B's."""
    pp, m = 4, 8
    t = replace(config.TrainConfig(), pp=pp, pp_schedule=schedule)
    weights = [1 / v] * (pp * v)  # a rank's layers for one micro-batch weigh 1
    peaks, bubble = memory.pipeline_schedule(t, m, weights)
    formula = (pp - 1) / (v * m + pp - 1)
    if schedule in ("gpipe", "1f1b", "interleaved_1f1b"):
        assert bubble == pytest.approx(formula)
    else:
        assert bubble < (pp - 1) / (2 * m + pp - 1)
    if peak0 is not None:
        assert peaks[0] == pytest.approx(peak0)
    if schedule == "1f1b":
        assert peaks == [4, 3, 2, 1]


def test_fit_picks_pipeline_stages_for_34b_on_256_a100s():
    """FSDP2 over 256 GPUs all-gathers the model every micro-batch: more than the network carries in a step's compute,
    so --fit takes pipeline stages (each gathered once per step) with the smallest tp that fits efficiently."""
    cfg = config.load(["configs/34b.yaml"])
    r = rows(cfg, 256, "a100")
    assert not r["fsdp + AC"]["hides"] and r["fsdp x tp 8 x pp 4"]["hides"]
    best = plan.fit(list(r.values()))
    assert best["pp"] > 1 and best["fits"] and best["bubble"] <= 0.1, best
    assert (best["tp"], best["pp"]) == (cfg.train.tp, cfg.train.pp)  # configs/34b.yaml holds the plan's choice


def test_slurm_refuses_a_tp_x_pp_that_does_not_divide(tmp_path):
    env = fake_slurm(tmp_path, nodes=3, gpus=8)

    def slurm(*args):
        return subprocess.run(["bash", "scripts/slurm.sh", "configs/34b.yaml", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    refused = slurm("train.tp=8", "train.pp=2")  # 16 does not divide 3 x 8 = 24
    assert refused.returncode == 2 and "srun" not in refused.stdout
    assert "train.tp x train.pp = 8 x 2 = 16 must divide the 24 GPUs (3 nodes x 8 GPUs per node)" in refused.stderr
    ran = slurm("train.tp=8", "train.pp=3")
    assert ran.returncode == 0 and "train.py configs/34b.yaml train.tp=8 train.pp=3" in ran.stdout, ran.stderr
    assert "pipeline parallel: 3 stages' ranks, each stage over 1 data-parallel ranks" in ran.stdout
