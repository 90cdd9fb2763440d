"""Tracking: wandb (offline) and TensorBoard receive the scalars of metrics.jsonl, and the text of a sample drawn
while training (eval.*, with lm-eval tasks beside it); a resumed run continues its wandb run with each step sent
once; a missing package is an early error only when its option is on."""
import glob
import json
import os
import sys

import pytest
import torch
import yaml

from build import load_model
import checkpoint
import config
import tracking
import train
from conftest import ROOT, TINY, local_task
from test_train import losses
from tokenizer import load_tokenizer


def args(corpus, out, *extra):
    return ["configs/tiny.yaml", *TINY, f"data.datasets=[{corpus}]", f"train.out_dir={out}", "train.max_steps=4",
            "train.eval_interval=2", "train.ckpt_interval=4", *extra]


@pytest.fixture
def wandb_runs(tmp_path, monkeypatch):
    """wandb offline in tmp_path/wandb, each run recorded: {"init": kwargs, "id", "logged": [(step, data)]}."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    runs, real_init = [], wandb.init

    def init(**kw):  # the real wandb run, with a record of what it was given
        run = real_init(**kw)
        seen = {"init": kw, "id": run.id, "logged": []}
        runs.append(seen)
        real_log = run.log
        run.log = lambda data, step=None: (seen["logged"].append((step, dict(data))), real_log(data, step=step))
        return run
    monkeypatch.setattr(wandb, "init", init)
    wandb.teardown()  # wandb reads WANDB_DIR once per process, at its first init: begin afresh
    yield runs
    wandb.teardown()


def tensorboard(out: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(os.path.join(out, "tensorboard")).Reload()


def test_wandb_and_tensorboard_get_the_metrics(corpus, tmp_path, wandb_runs):
    runs = wandb_runs
    out = str(tmp_path / "run")
    assert train.main(args(corpus, out, "log.wandb=true", "log.tensorboard=true", "log.wandb_project=test",
                           "log.wandb_tags=[a,b]", "eval.interval=2", "eval.prompt=def add(a, b):")) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    samples = [(r["step"], r["sample"]) for r in rows if "sample" in r]
    assert [s for s, _ in samples] == [2, 4]

    events = tensorboard(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_bpb"):
        expected = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key
    assert "mfu" not in events.Tags()["scalars"]  # None on CPU: not a scalar
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(text.strip("`\n")) == yaml.safe_load(open(os.path.join(out, "config.yaml")))

    (run,) = runs
    assert run["init"]["project"] == "test" and run["init"]["tags"] == ["a", "b"] and run["init"]["name"] == "run"
    assert run["init"]["config"]["train"]["max_steps"] == 4
    expected = [(r["step"], {k: v for k, v in r.items() if k != "step" and v is not None}) for r in rows]
    assert [(s, {k: v for k, v in d.items() if k != "sample"}) for s, d in run["logged"]] == \
        [(s, {k: v for k, v in d.items() if k != "sample"}) for s, d in expected]
    import wandb  # the sample as text: an HTML panel in wandb, the Text tab in TensorBoard
    pages = [(s, d["sample"]) for s, d in run["logged"] if "sample" in d]
    assert [s for s, _ in pages] == [2, 4] and all(isinstance(p, wandb.Html) for _, p in pages)
    texts = events.Tensors("sample/text_summary")
    assert [(e.step, e.tensor_proto.string_val[0].decode()) for e in texts] == \
        [(s, "    " + text.replace("\n", "\n    ")) for s, text in samples]
    (record,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))  # written offline
    assert b"val_bpb" in open(record, "rb").read()


def test_missing_package_is_an_error_only_when_switched_on(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    cfg = config.load(args(corpus, str(tmp_path / "x")))
    tracker = tracking.Tracker(cfg)  # both options off: nothing to import
    tracker.log({"step": 1, "loss": 1.0})
    tracker.close()
    assert train.main(args(corpus, str(tmp_path / "y"), "log.wandb=true")) == 2
    assert "log.wandb is on but the wandb package is not installed" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "y")  # stopped before anything was written
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    tasks = ("eval.interval=2", "eval.tasks=[hellaswag]")
    assert train.main(args(corpus, str(tmp_path / "y"), *tasks)) == 2
    assert "eval.tasks needs EleutherAI's lm-evaluation-harness: pip install" in capsys.readouterr().err
    assert train.main(args(corpus, str(tmp_path / "y"), *tasks, f"eval.include_path={tmp_path / 'none'}")) == 2
    assert "eval.include_path" in capsys.readouterr().err and not os.path.exists(tmp_path / "y")


def sample_rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "sample" in r]


def test_a_sample_while_training_is_greedy_and_leaves_the_training_alone(corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, plain = str(tmp_path / "run"), str(tmp_path / "plain")
    assert train.main(args(corpus, out, "eval.interval=2", "eval.prompt=def add(a, b):",
                           "eval.max_new_tokens=12")) == 0
    rows = sample_rows(out)
    assert [r["step"] for r in rows] == [2, 4] and all(r["sample"].startswith("def add(a, b):") for r in rows)

    # the greedy continuation of the tokenizer's document start + the prompt, by the weights of that step
    model, _, _ = load_model(out, "cpu")  # the step-4 checkpoint
    tok = load_tokenizer(os.path.join(out, "tokenizer"))
    ids = tok.start_ids + tok.encode("def add(a, b):")
    new = model.generate(torch.tensor([ids]), 12, temperature=0, stop_token=tok.eot_id)[0, len(ids):].tolist()
    new = new[:new.index(tok.eot_id)] if tok.eot_id in new else new
    assert rows[-1]["sample"] == "def add(a, b):" + tok.decode(new)

    assert train.main(args(corpus, plain)) == 0  # the same run without the samples trains bit for bit alike
    assert losses(plain) == losses(out)


def test_lm_eval_tasks_while_training(corpus, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(ROOT)
    tasks = local_task(tmp_path)
    out = str(tmp_path / "run")
    assert train.main(args(corpus, out, "eval.interval=4", "eval.tasks=[pyqa]", f"eval.include_path={tasks}",
                           "eval.limit=2", "eval.prompt=")) == 0  # "": a sample from the document start alone
    (row,) = sample_rows(out)
    assert row["step"] == 4 and row["pyqa/acc"] in (0.0, 0.5, 1.0) and "pyqa/acc_stderr" in row
    assert train.main(args(corpus, str(tmp_path / "typo"), "eval.interval=4", "eval.tasks=[pyqaa]",
                           f"eval.include_path={tasks}")) == 2  # before the first step


def test_a_resumed_run_continues_its_wandb_run_and_logs_each_step_once(corpus, tmp_path, monkeypatch, wandb_runs):
    out = str(tmp_path / "run")
    run_args = args(corpus, out, "train.max_steps=8", "train.eval_interval=4", "log.wandb=true", "log.tensorboard=true")
    import step
    real_evaluate, calls = step.evaluate, []

    def killed_in_the_second_eval(*a, **kw):  # at step 8: its train row is sent, its val row not, no step-8 save
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **kw)
    monkeypatch.setattr(step, "evaluate", killed_in_the_second_eval)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args)
    assert checkpoint.find_latest(out).endswith("step_000004")
    monkeypatch.setattr(step, "evaluate", real_evaluate)
    assert train.main(run_args) == 0  # resumes at step 4: rows 5-8 come again

    first, second = wandb_runs
    assert second["init"]["id"] == second["id"] == first["id"] and second["init"]["resume"] == "allow"
    assert len(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))) == 2  # both offline parts: the same id
    # named offline-run-TIME-ID, with "-1" added when both started in the same second
    assert all(f"-{first['id']}" in os.path.basename(d) for d in glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    assert [s for s, _ in second["logged"]] == [8]  # only the val row the first process did not send
    sent = first["logged"] + second["logged"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(s, set(d)) for s, d in sent] == [(r["step"], {k for k, v in r.items() if k != "step" and v is not None})
                                              for r in rows]
    same = ("loss", "lr", "grad_norm", "tokens", "val_loss", "val_bpb")  # not timings: those are the first attempt's
    assert [{k: d[k] for k in same if k in d} for _, d in sent] == [{k: r[k] for k in same if k in r} for r in rows]

    events = tensorboard(out)  # the events after step 4 of the first attempt are purged
    for key in ("loss", "tokens_per_s", "val_loss"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == \
            [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows if key in r], key
