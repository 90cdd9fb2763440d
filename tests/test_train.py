"""Training: the loss falls, resume is bit-exact, a killed save loses nothing, signals save and exit."""
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import numpy
import pytest
import torch

from build import load_model
import checkpoint
import config
import step
import train
from conftest import ROOT, TINY, make_run, run


def rows(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(out_dir) if "loss" in r}


def train_args(corpus, out_dir, *extra):
    return ["configs/tiny.yaml", *TINY, f"data.datasets=[{corpus}]", f"train.out_dir={out_dir}", *extra]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_training_lowers_the_loss(trained):
    ls = losses(trained)
    assert sorted(ls) == list(range(1, 31))
    assert ls[30] < ls[1] - 0.6, ls
    r = rows(trained)
    val = [x for x in r if "val_loss" in x]
    assert [x["step"] for x in val] == [15, 30] and val[1]["val_loss"] < val[0]["val_loss"]
    first = r[0]
    for key in ("lr", "grad_norm", "tokens_per_s", "mem_gb", "tokens", "data_wait_s", "data_wait_frac"):
        assert key in first
    assert os.path.isfile(os.path.join(trained, "config.yaml"))
    assert json.load(open(os.path.join(trained, "run_info.json")))["torch"] == torch.__version__


def test_resume_is_bit_exact(corpus, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = ["train.max_steps=12", "train.ckpt_interval=6", "train.keep_last=5", "train.eval_interval=0",
              "model.dropout=0.1"]  # dropout: its randomness must resume too
    assert train.main(train_args(corpus, full, *common)) == 0
    # a run that died after its step-6 checkpoint: only that checkpoint is left
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "step_000006"), os.path.join(resumed, "step_000006"))
    assert train.main(train_args(corpus, resumed, *common)) == 0
    a, b = losses(full), losses(resumed)
    assert sorted(b) == list(range(7, 13))
    assert all(a[s] == b[s] for s in b), (a, b)  # bitwise, not approximately
    ma, _, _ = load_model(full, "cpu")
    mb, _, _ = load_model(resumed, "cpu")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_killed_save_leaves_previous_checkpoint(corpus, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    assert train.main(train_args(corpus, out, "train.max_steps=4", "train.ckpt_interval=2",
                                 "train.eval_interval=0")) == 0
    real_save = checkpoint.dcp.save

    def dies_mid_save(state, checkpoint_id, **kw):
        real_save(state, checkpoint_id=checkpoint_id, **kw)
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "r+b") as f:
            f.truncate(100)  # half-written shard
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(checkpoint.dcp, "save", dies_mid_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(corpus, out, "train.max_steps=8", "train.ckpt_interval=2", "train.eval_interval=0"))
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    assert os.path.isdir(os.path.join(out, ".tmp_step_000006"))
    latest = checkpoint.find_latest(out)
    assert latest.endswith("step_000004")
    model, cfg, _ = load_model(out, "cpu")  # still loads
    # the next start resumes from step 4 and cleans the partial folder up
    assert train.main(train_args(corpus, out, "train.max_steps=8", "train.ckpt_interval=2",
                                 "train.eval_interval=0")) == 0
    assert checkpoint.find_latest(out).endswith("step_000008")
    assert not any(n.startswith(".tmp") for n in os.listdir(out))
    assert [s for s in losses(out)] == list(range(1, 9))


def test_keep_last_and_changed_shape_refused(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(train_args(corpus, out, "train.max_steps=6", "train.ckpt_interval=1", "train.keep_last=2",
                                 "train.eval_interval=0")) == 0
    assert sorted(n for n in os.listdir(out) if n.startswith("step_")) == ["step_000005", "step_000006"]
    assert open(os.path.join(out, "latest")).read().strip() == "step_000006"
    assert train.main(train_args(corpus, out, "train.max_steps=8", "model.n_layer=3")) == 2
    assert "model.n_layer: checkpoint 2 vs config 3" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_signal_saves_and_exits_0(sig, corpus, tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "train.py", *train_args(corpus, out, "train.max_steps=100000",
                          "train.ckpt_interval=100000", "train.eval_interval=0")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:  # wait until training is under way
        if line.startswith("step"):
            break
    p.send_signal(sig)
    out_text = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out_text
    latest = checkpoint.find_latest(out)
    assert latest is not None and checkpoint.read_state(latest)["step"] < 100000
    assert f"{sig.name}: stopping after this step and saving a checkpoint" in out_text


def test_profile_traces_steps_and_training_goes_on(corpus, tmp_path, capsys):
    """train.profile=2: steps 3 and 4 (the first two of a start are skipped) are traced into a Chrome/Perfetto
    trace with memory events and an ops table; the run goes on to its last step and checkpoint. The log line and
    metrics.jsonl carry the time spent waiting for batches."""
    out = str(tmp_path / "run")
    assert train.main(train_args(corpus, out, "train.max_steps=6", "train.eval_interval=0", "train.profile=2")) == 0
    text = capsys.readouterr().out
    assert "profile: steps 3-4 traced, written in " in text and f"to {out}/profile/" in text, text[-2000:]
    with gzip.open(os.path.join(out, "profile", "rank0.trace.json.gz")) as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"ProfilerStep#3", "ProfilerStep#4"} <= names and "ProfilerStep#5" not in names
    assert "[memory]" in names and "aten::mm" in names
    assert "aten::" in open(os.path.join(out, "profile", "rank0.ops.txt")).read()
    assert checkpoint.find_latest(out).endswith("step_000006") and sorted(losses(out)) == list(range(1, 7))
    assert "| data wait " in text
    waits = [r["data_wait_frac"] for r in rows(out) if "loss" in r]
    assert len(waits) == 6 and all(0 <= w < 1 for w in waits)
    cfg = config.load(train_args(corpus, out, "train.max_minutes=5"))
    for profile, first_timed in [(0, 10 + 2), (2, 10 + 2 + 3)]:  # a time budget times the steps after the trace
        assert step.budget_probe(replace(cfg.train, profile=profile), 10) == first_timed


def test_sample_and_eval_cli(trained, corpus, capsys):
    """sample.py's and eval.py's command lines, through their main() in this process (a second interpreter and its
    torch import cost seconds a call; tests/test_readme.py runs both as programs); the refusal as a program, by its
    exit status."""
    import eval as eval_
    import sample

    def cli(main, *args: str) -> str:
        assert main(list(args)) == 0, capsys.readouterr().err[-3000:]
        return capsys.readouterr().out
    capsys.readouterr()
    text = cli(sample.main, trained, "--prompt", "def ", "--max_new_tokens", "20", "--seed", "1")
    assert text.startswith("def ") and len(text) > 10
    again = cli(sample.main, trained, "--prompt", "def ", "--max_new_tokens", "20", "--seed", "1")
    assert again == text  # seeded
    text = cli(sample.main, trained, "--prompt", "x", "--max_new_tokens", "5", "--num_samples", "2", "--temperature",
               "0")
    assert text.count("--- sample") == 2
    assert "bits/byte" in cli(eval_.main, trained, "--max_tokens", "2000")  # the text report: a few batches
    res = json.loads(cli(eval_.main, trained, "--json").strip().splitlines()[-1])
    meta = json.load(open(os.path.join(corpus, "meta.json")))
    # the whole split, every token once, except each shard's first, which has no context to predict it from
    tb = numpy.load(os.path.join(corpus, "token_bytes.npy"))
    firsts = [numpy.load(os.path.join(corpus, s["file"]))[0] for s in meta["splits"]["val"]["shards"]]
    assert res["bytes"] == meta["splits"]["val"]["bytes"] - sum(int(tb[t]) for t in firsts)
    assert res["tokens"] == meta["splits"]["val"]["tokens"] - len(firsts)
    assert 0 < res["bpb"] < 8 and abs(res["ppl"] - 2.718281828 ** res["loss"]) < 1e-6 * res["ppl"]
    bad = run("eval.py", str(os.path.join(trained, "nope")), check=False)
    assert bad.returncode == 2 and f"{os.path.join(trained, 'nope')} does not exist" in bad.stderr


def test_eval_refuses_data_of_another_tokenizer(trained, tmp_path):
    from data.prepare import prepare
    doc = tmp_path / "doc.txt"
    doc.write_text("def main():\n    pass\n" * 50)
    other = str(tmp_path / "gpt2data")
    prepare([str(doc)], other, "gpt2", val_frac=1.0, workers=1)
    r = run("eval.py", trained, "--data", other, check=False)
    assert r.returncode == 2 and "tokenized differently" in r.stderr


def test_shipped_tiny_config_end_to_end(tmp_path, capsys):
    """The README's main job with its shipped precision (auto) and compile (auto), its time budget cut to 1 minute:
    prepares the offline pycode corpus, decides max_steps from the measured step time, trains, evaluates; then the
    sample and eval command lines (their main(), in this process: tests/test_readme.py runs them as programs). The
    slowest test, and the one a new user runs: the same budget on a CPU with native BF16 (more steps) and on one
    without (FP32, fewer steps)."""
    import eval as eval_
    import sample
    data, out = str(tmp_path / "pycode"), str(tmp_path / "run")
    r = run("train.py", "configs/tiny.yaml", "train.max_minutes=1", "log.interval=5", f"train.out_dir={out}",
            f"data.datasets=[{data}]", timeout=600)
    assert re.search(r"precision (bf16|fp32): BF16 matmul \d+\.\d\dx FP32 here \(", r.stdout), r.stdout[:3000]
    meta = json.load(open(os.path.join(data, "meta.json")))
    assert meta["vocab_size"] == 8192 and meta["splits"]["val"]["docs"] > 10
    (decided,) = [x["max_steps"] for x in rows(out) if "max_steps" in x]
    ls = losses(out)
    assert max(ls) == decided and decided >= 10 and ls[decided] < ls[5] - 0.5, ls
    assert [x["step"] for x in rows(out) if "val_bpb" in x][-1] == decided
    capsys.readouterr()
    assert sample.main([out, "--prompt", "def ", "--max_new_tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert eval_.main([out, "--max_tokens", "4000"]) == 0  # the text report: two batches of the shipped model
    assert "bits/byte" in capsys.readouterr().out


def test_gpt2_arch_trains(corpus, tmp_path):
    out = str(tmp_path / "gpt2")
    assert train.main(train_args(corpus, out, "model.arch=gpt2", "train.max_steps=10", "train.eval_interval=5",
                                 "train.precision=fp32")) == 0
    ls = losses(out)
    assert ls[10] < ls[1]
    model, cfg, _ = load_model(out, "cpu")
    assert cfg.model.arch == "gpt2" and hasattr(model, "embed_positions")


def test_fp16_loss_scaling_trains_and_resumes_bit_exact(corpus, tmp_path):
    """FP16 autocast with GradScaler (what a GPU without BF16 gets): trains, keeps the scaler in the checkpoint,
    and a resumed run repeats the uninterrupted one bit for bit."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = ["train.max_steps=8", "train.ckpt_interval=4", "train.keep_last=5", "train.eval_interval=8",
              "train.precision=fp16"]
    assert train.main(train_args(corpus, full, *common)) == 0
    state = checkpoint.read_state(os.path.join(full, "step_000004"))
    assert state["config"]["train"]["precision"] == "fp16"
    assert state["grad_scaler"]["scale"] == 2.0**16 and state["grad_scaler"]["_growth_tracker"] == 4
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "step_000004"), os.path.join(resumed, "step_000004"))
    assert train.main(train_args(corpus, resumed, *common)) == 0
    a, b = losses(full), losses(resumed)
    assert a[8] < a[1] and all(a[s] == b[s] for s in range(5, 9)), (a, b)
    assert checkpoint.read_state(os.path.join(resumed, "step_000008"))["grad_scaler"] == \
        checkpoint.read_state(os.path.join(full, "step_000008"))["grad_scaler"]


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_overflow_is_one_skip_and_one_backoff(fused):
    """The scaler's found-inf and the non-finite-step skip are one decision: an overflowing step leaves weights
    and AdamW state untouched and halves the scale; a good step updates and keeps the scale."""
    import config
    import kernel
    import optim
    from model import GPT, GPTConfig
    from step import train_step
    cfg = config.Config(model=GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16),
                        train=config.TrainConfig(fused_optimizer=fused, precision="fp16", batch_size=2))
    run = make_run(cfg)
    m = GPT(cfg.model, kernel.configure("torch", "plain"))
    opt = optim.build(m, run.cfg.train, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randint(0, 64, (2, 16))

    def step(factor: float):  # factor 1e30: the scaled loss overflows FP16 in backward
        return train_step(m, lambda a, b: m(a, b) * factor, opt, [(x, x)], run, scaler)
    _, _, bad = step(1.0)
    assert bad.item() == 0.0 and scaler.get_scale() == 2.0**10
    before = {k: v.clone() for k, v in m.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    _, norm, bad = step(1e30)
    assert bad.item() == 1.0 and not torch.isfinite(norm) and scaler.get_scale() == 2.0**9
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(torch.equal(v, moments[id(p)][k]) for p, s in opt.state.items() for k, v in s.items())
    _, _, bad = step(1.0)
    assert bad.item() == 0.0 and scaler.get_scale() == 2.0**9
    assert not torch.equal(m.lm_head.weight, before["lm_head.weight"])


def test_time_budget_fixes_max_steps_and_a_resume_keeps_it(corpus, tmp_path):
    """train.max_minutes: after the warm-up and probe steps, max_steps becomes what fits in the budget (bounded by
    the configured one), the LR decays to its floor on the last step, and the decision travels in the checkpoint,
    so that a resumed run ends at the same step with bit-identical losses."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = ["train.max_steps=100000", "train.max_minutes=0.1", "train.ckpt_interval=10", "train.keep_last=1000",
              "train.eval_interval=0"]
    assert train.main(train_args(corpus, full, *common)) == 0
    decided = [r for r in rows(full) if "max_steps" in r]
    probe_end = step.BUDGET_WARMUP + step.BUDGET_PROBE
    assert len(decided) == 1 and decided[0]["step"] == probe_end and decided[0]["budget_step_s"] > 0
    n = decided[0]["max_steps"]
    assert 10 < n < 100000, n
    ls = losses(full)
    assert max(ls) == n
    last = [r for r in rows(full) if r.get("step") == n and "lr" in r][0]
    assert last["lr"] == pytest.approx(3e-3 * 0.1, rel=0.05)  # TINY's lr x min_lr_ratio: the schedule ended
    state = checkpoint.read_state(checkpoint.find_latest(full))
    assert state["step"] == n and state["budget_max_steps"] == n and state["config"]["train"]["max_steps"] == n
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "step_000010"), os.path.join(resumed, "step_000010"))
    assert train.main(train_args(corpus, resumed, *common)) == 0
    assert not [r for r in rows(resumed) if "max_steps" in r]  # no second decision
    again = losses(resumed)
    assert sorted(again) == list(range(11, n + 1)) and all(again[s] == ls[s] for s in again)
    # an explicit max_steps below the budget still bounds the run
    bounded = str(tmp_path / "bounded")
    assert train.main(train_args(corpus, bounded, *common[1:], "train.max_steps=9")) == 0
    assert max(losses(bounded)) == 9 and [r["max_steps"] for r in rows(bounded) if "max_steps" in r] == [9]
