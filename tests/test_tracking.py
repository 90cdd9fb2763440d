"""Tracking: wandb (offline) and TensorBoard receive the scalars of metrics.jsonl; a missing package is an early
error only when its option is on."""
import glob
import json
import os
import sys

import pytest
import yaml

import config
import tracking
import train
from conftest import ROOT, TINY


def args(corpus, out, *extra):
    return ["configs/tiny.yaml", *TINY, f"data.datasets=[{corpus}]", f"train.out_dir={out}", "train.max_steps=4",
            "train.eval_interval=2", "train.ckpt_interval=4", *extra]


def test_wandb_and_tensorboard_get_the_metrics(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb
    runs, real_init = [], wandb.init

    def init(**kw):  # the real wandb run, with a record of what it was given
        run = real_init(**kw)
        seen = {"init": kw, "logged": []}
        runs.append(seen)
        real_log = run.log
        run.log = lambda data, step=None: (seen["logged"].append((step, dict(data))), real_log(data, step=step))
        return run
    monkeypatch.setattr(wandb, "init", init)
    out = str(tmp_path / "run")
    assert train.main(args(corpus, out, "log.wandb=true", "log.tensorboard=true", "log.wandb_project=test",
                           "log.wandb_tags=[a,b]")) == 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]

    events = EventAccumulator(os.path.join(out, "tensorboard")).Reload()
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
    assert run["logged"] == expected
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
