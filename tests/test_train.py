"""Training: the loss falls, resume is bit-exact, a killed save loses nothing, signals save and exit."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy
import pytest
import torch

import checkpoint
import train
from conftest import ROOT, TINY, run


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
    for key in ("lr", "grad_norm", "tokens_per_s", "mem_gb", "tokens"):
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
    ma, _, _ = checkpoint.load_model(full, "cpu")
    mb, _, _ = checkpoint.load_model(resumed, "cpu")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_killed_save_leaves_previous_checkpoint(corpus, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    assert train.main(train_args(corpus, out, "train.max_steps=4", "train.ckpt_interval=2",
                                 "train.eval_interval=0")) == 0
    real_save = checkpoint.dcp.save

    def dies_mid_save(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
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
    model, cfg, _ = checkpoint.load_model(out, "cpu")  # still loads
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


def test_sample_and_eval_cli(trained, corpus):
    r = run("sample.py", trained, "--prompt", "def ", "--max_new_tokens", "20", "--seed", "1")
    assert r.stdout.startswith("def ") and len(r.stdout) > 10
    again = run("sample.py", trained, "--prompt", "def ", "--max_new_tokens", "20", "--seed", "1")
    assert again.stdout == r.stdout  # seeded
    r = run("sample.py", trained, "--prompt", "x", "--max_new_tokens", "5", "--num_samples", "2",
            "--temperature", "0")
    assert r.stdout.count("--- sample") == 2
    r = run("eval.py", trained, "--max_tokens", "20000")
    assert "bits/byte" in r.stdout
    r = run("eval.py", trained, "--json")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    meta = json.load(open(os.path.join(corpus, "meta.json")))
    # the whole split, every token once, except each shard's first, which has no context to predict it from
    tb = numpy.load(os.path.join(corpus, "token_bytes.npy"))
    firsts = [numpy.load(os.path.join(corpus, s["file"]))[0] for s in meta["splits"]["val"]["shards"]]
    assert res["bytes"] == meta["splits"]["val"]["bytes"] - sum(int(tb[t]) for t in firsts)
    assert res["tokens"] == meta["splits"]["val"]["tokens"] - len(firsts)
    assert 0 < res["bpb"] < 8 and abs(res["ppl"] - 2.718281828 ** res["loss"]) < 1e-6 * res["ppl"]
    bad = run("eval.py", str(os.path.join(trained, "nope")), check=False)
    assert bad.returncode == 2 and "no complete checkpoint" in bad.stderr


def test_eval_refuses_data_of_another_tokenizer(trained, tmp_path):
    from data.prepare import prepare
    doc = tmp_path / "doc.txt"
    doc.write_text("def main():\n    pass\n" * 50)
    other = str(tmp_path / "gpt2data")
    prepare([str(doc)], other, "gpt2", val_frac=1.0, workers=1)
    r = run("eval.py", trained, "--data", other, check=False)
    assert r.returncode == 2 and "tokenized differently" in r.stderr


def test_shipped_tiny_config_end_to_end(tmp_path):
    """The README's main job, cut to 40 steps: prepares the offline pycode corpus, compiles, trains; then the
    sample and eval command lines. The slowest test (~1 min on 2 cores) and the one a new user runs."""
    data, out = str(tmp_path / "pycode"), str(tmp_path / "run")
    run("train.py", "configs/tiny.yaml", "train.max_steps=40", f"train.out_dir={out}", f"data.datasets=[{data}]",
        timeout=900)
    meta = json.load(open(os.path.join(data, "meta.json")))
    assert meta["vocab_size"] == 8192 and meta["splits"]["val"]["docs"] > 10
    ls = losses(out)
    assert sorted(ls) == [10, 20, 30, 40] and ls[40] < ls[10] - 1.0, ls
    assert run("sample.py", out, "--prompt", "def ", "--max_new_tokens", "20").stdout.startswith("def ")
    assert "bits/byte" in run("eval.py", out, "--max_tokens", "20000").stdout


def test_gpt2_arch_trains(corpus, tmp_path):
    out = str(tmp_path / "gpt2")
    assert train.main(train_args(corpus, out, "model.arch=gpt2", "train.max_steps=10", "train.eval_interval=5",
                                 "train.precision=fp32")) == 0
    ls = losses(out)
    assert ls[10] < ls[1]
    model, cfg, _ = checkpoint.load_model(out, "cpu")
    assert cfg.model.arch == "gpt2" and hasattr(model, "embed_positions")
