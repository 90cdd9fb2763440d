"""Pipeline parallel (train.pp) on CPU over gloo: every schedule and layout trains as one process, checkpoints move
between layouts, one-process tools read a pipeline run, and what the pipeline does not carry is refused by name.

Tolerance: in FP32 a pipeline computes what one process computes, block by block; the stages only change where the
micro-batches' gradients are summed and, with FSDP2 or tensor parallel inside a stage, the order of partial sums. Over
10 steps the global mean loss and the gradient norm stay within 1e-5 of one process and every weight within 1e-4
(tests/pp_worker.py, AdamW and Muon, Llama and GPT-2); a run of train.py resumed across layouts within 1e-4 (Muon,
as tests/test_tp.py).
"""
import json
import os

import pytest

import checkpoint
import config
import train

from test_distributed import Launch, ok, torchrun
from test_tp import close, four_ranks_stopped_by_one, one_process_reads
from test_train import losses, rows, train_args

# Llama (configs/tiny.yaml's, untied, four layers: two per stage at pp 2), Muon, checkpoints every 3 steps
PP = ["model.n_layer=4", "model.n_head=4", "model.tie_embeddings=false", "eval.interval=0", "train.micro_batch_size=2",
      "train.precision=fp32", "train.max_steps=10", "train.eval_interval=5", "train.ckpt_interval=3",
      "train.keep_last=10"]


SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "dualpipev"]


def test_every_schedule_and_layout_trains_as_one_process_as_planned(corpus, tmp_path):
    """tests/pp_worker.py: pp 2 with each schedule (GPipe, 1F1B, interleaved 1F1B and the two V schedules, two stages
    per rank), dp 2 x pp 2 and pp 2 x tp 2 (4 ranks), with AdamW and Muon, Llama and GPT-2: 10 steps against one
    process; then a NaN weight on the first stage alone makes every rank skip the step and keep its weights. And per
    schedule at pp 2, the activations each rank keeps in flight and the bytes the stages send each other in a step
    are plan.py's figures exactly."""
    measured = [f"measure:{s}" for s in SCHEDULES]
    two = ["pp2:1f1b:llama:muon", "pp2:gpipe:gpt2:adamw", "pp2:interleaved_1f1b:llama:adamw",
           "pp2:zero_bubble:gpt2:muon", "pp2:dualpipev:llama:muon", "pp2:1f1b:gpt2:adamw", *measured]
    four = ["dp2pp2:1f1b:llama:muon", "dp2pp2:1f1b:gpt2:adamw", "pp2tp2:1f1b:llama:adamw", "pp2tp2:gpipe:gpt2:muon"]
    res = {}
    for nproc, cases in ((2, two), (4, four)):
        out = str(tmp_path / f"worker{nproc}.json")
        ok(torchrun(corpus, out, *cases, script="tests/pp_worker.py", nproc=nproc, timeout=300))
        with open(out) as f:
            res.update(json.load(f))
    assert sorted(res) == sorted(two + four)
    for name in measured:
        d = res.pop(name)
        assert d["inflight"] == d["planned_inflight"] and d["sent"] == d["planned_sent"] > 0, (name, d)
    for name, d in res.items():
        # AdamW's first updates are ~lr x sign(g) (lr 3e-3): a gradient of rounding size may round either way, so
        # weights far below lr apart are what equal training looks like
        assert d["loss"] < 1e-5 and d["norm"] < 1e-5 and d["param"] < 1e-4 and d["skipped_by_all"], (name, d)


def test_checkpoints_move_between_layouts_and_one_process_reads_a_pipeline_run(corpus, tmp_path, capsys):
    """pp 2 (1F1B) from the start; its step-3 checkpoint resumed at dp 2 (FSDP2, no pipeline); pp 2's step-6 one
    resumed in one process; dp 2's step-6 one at dp 2 x pp 2 (4 ranks, stopped by a signal to one of them): every loss,
    gradient norm and validation loss within 1e-4 of one process (the data order is kept across layouts). A pp 2 run under train.max_minutes stops
    both stages at the step the time budget fixed, and saves it. The pp 2 checkpoint verifies its checksums and
    reads in one process: eval.py gives one process's validation loss, sample.py generates, export.py writes one
    process's weights (to 1e-4)."""
    single, pp2, dp2, back, four = (str(tmp_path / n) for n in ("single", "pp2", "dp2", "back", "four"))
    assert train.main(train_args(corpus, single, *PP)) == 0
    ref = losses(single)
    budget = str(tmp_path / "budget")
    run = Launch({"pp2": (pp2, train_args(corpus, pp2, *PP, "train.pp=2")),
                  "copy": (None, ["--copy", os.path.join(pp2, "step_000003"), os.path.join(dp2, "step_000003")]),
                  "dp2": (dp2, train_args(corpus, dp2, *PP, "train.parallel=fsdp")),
                  "budget": (budget, train_args(corpus, budget, *PP, "train.pp=2", "train.max_steps=1000",
                                                "train.max_minutes=0.05", "train.ckpt_interval=1000",
                                                "train.eval_interval=0"))})
    text = run.stdout("pp2")
    assert "pipeline 2 x data parallel 1 x tensor parallel 1, 1f1b over 2 stages" in text
    run.finished("dp2")
    # train.max_minutes under pp: the slowest rank's step time fixes max_steps for both stages, which stop and save
    # at it together
    fixed = [r["max_steps"] for r in rows(run.finished("budget")) if "max_steps" in r]
    assert len(fixed) == 1 and 7 <= fixed[0] < 1000 and max(losses(budget)) == fixed[0]
    assert checkpoint.read_state(checkpoint.find_latest(budget))["step"] == fixed[0]
    os.makedirs(back)
    os.rename(os.path.join(pp2, "step_000006"), os.path.join(back, "step_000006"))  # moved: pp2 keeps 3, 9, 10
    assert train.main(train_args(corpus, back, *PP)) == 0
    stopped = four_ranks_stopped_by_one(corpus, four, os.path.join(dp2, "step_000006"), (*PP, "train.pp=2"),
                                        "pipeline 2 x data parallel 2")
    worst = {"pp2": close(losses(pp2), ref, range(1, 11), 1e-4), "dp2": close(losses(dp2), ref, range(4, 11), 1e-4),
             "back": close(losses(back), ref, range(7, 11), 1e-4), "four": close(losses(four), ref, range(7, stopped + 1), 1e-4)}
    print(f"largest loss differences from one process: {worst}")
    norms = {r["step"]: r["grad_norm"] for r in rows(single) if "grad_norm" in r}
    for out, steps in ((pp2, range(1, 11)), (four, range(7, stopped + 1))):
        close({r["step"]: r["grad_norm"] for r in rows(out) if "grad_norm" in r}, norms, steps, 1e-4)
    val = {r["step"]: r["val_loss"] for r in rows(single) if "val_loss" in r}
    close({r["step"]: r["val_loss"] for r in rows(pp2) if "val_loss" in r}, val, [5, 10], 1e-4)

    assert checkpoint.read_state(checkpoint.find_latest(pp2))["pp"] == 2
    one_process_reads(single, pp2, tmp_path, capsys)


@pytest.mark.parametrize("args, words", [
    (["model.tie_embeddings=true"], "model.tie_embeddings=true (the embedding is on the first stage"),
    (["model.moe.num_experts=4"], "model.moe"),
    (["train.lora=true"], "train.lora"),
    (["train.precision=fp16"], "train.precision=fp16"),
    (["eval.interval=10"], "eval.interval"),
    (["train.parallel=ddp"], "train.parallel=ddp"),
    (["model.n_layer=2", "train.pp=4"], "cuts the model into 4 stages, more than its model.n_layer (2)"),
    (["train.pp_schedule=zero_bubble", "train.pp_virtual_stages=3"], "runs two stages (a V) per rank"),
    (["train.pp_schedule=gpipe", "train.pp_virtual_stages=2"], "runs one stage per rank"),
    (["train.pp_schedule=interleaved_1f1b", "train.pp_virtual_stages=1"], "per rank or more"),
])
def test_what_the_pipeline_does_not_carry_is_refused_by_name(args, words):
    base = ["configs/tiny.yaml", "model.vocab_size=512", "model.tie_embeddings=false", "eval.interval=0", "train.pp=2"]
    with pytest.raises(config.ConfigError, match="train.pp") as e:
        config.load([*base, *args])
    assert words in str(e.value)


def test_the_batch_splits_into_pipeline_micro_batches():
    """Under pp the step's micro-batches are the pipeline's: train.pp_microbatches sets their number (the micro batch
    follows), or train.micro_batch_size does; auto gives every stage a micro-batch; a schedule's minimum is named."""
    base = ["configs/tiny.yaml", "model.vocab_size=512", "model.tie_embeddings=false", "eval.interval=0",
            "train.batch_size=16", "train.pp=2"]
    d = config.derive(config.load([*base, "train.pp_microbatches=8"]), 4)  # dp 2: 8 sequences a rank
    assert (d.dp, d.micro_batch, d.grad_accum) == (2, 1, 8)
    assert "pipeline micro-batches (1f1b) 8 x data parallel 2 (world size 4 / train.tp 1 / train.pp 2)" in \
        d.banner(config.load([*base, "train.pp_microbatches=8"]))
    assert config.derive(config.load([*base, "train.pp_schedule=dualpipev"]), 2).grad_accum == 4  # 4 stages
    with pytest.raises(config.ConfigError, match="needs at least 2 pipeline micro-batches per step; this step has 1"):
        config.derive(config.load([*base, "train.micro_batch_size=16"]), 2)
    with pytest.raises(config.ConfigError, match="train.micro_batch_size \\(4\\) and train.pp_microbatches \\(2\\)"):
        config.derive(config.load([*base, "train.micro_batch_size=4", "train.pp_microbatches=2"]), 2)
    with pytest.raises(config.ConfigError, match="multiple of train.tp x train.pp \\(1 x 2\\)"):
        config.derive(config.load(base), 3)
