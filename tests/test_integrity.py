"""Silent corruption: every checkpoint file and token shard is hashed when written and checked when read; a damaged
latest checkpoint is set aside and the run resumes from the newest one that verifies, bit-exactly."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import train
from conftest import run
from model import GPT
from test_train import losses, train_args

COMMON = ["train.ckpt_interval=2", "train.keep_last=5", "train.eval_interval=0"]


def flip(path: str) -> None:
    """Invert one byte in the middle of a file, as a bad disk or a stray write would."""
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(data)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A 6-step run with checkpoints at 2, 4, 6, and the same run continued to 8 without interruption."""
    root = tmp_path_factory.mktemp("integrity")
    six, eight = str(root / "six"), str(root / "eight")
    assert train.main(train_args(corpus, six, *COMMON, "train.max_steps=6")) == 0
    assert train.main(train_args(corpus, eight, *COMMON, "train.max_steps=8")) == 0
    return six, eight


def meta_model(run_dir: str) -> GPT:
    cfg = checkpoint.read_state(checkpoint.find_latest(run_dir))["config"]
    import config
    with torch.device("meta"):
        return GPT(config.build(cfg).model)


def test_every_file_of_a_checkpoint_has_a_checksum_and_a_flipped_byte_is_named(runs, tmp_path):
    six, _ = runs
    step6 = os.path.join(six, "step_000006")
    sums = json.load(open(os.path.join(step6, checkpoint.SUMS_FILE)))
    data_files = [n for n in os.listdir(step6) if n.endswith(".distcp")]
    assert sorted(sums) == sorted([*data_files, checkpoint.STATE_FILE, ".metadata"])
    checkpoint.verify(step6, meta_model(six))  # intact: passes
    for name in [*data_files, checkpoint.STATE_FILE, ".metadata", checkpoint.SUMS_FILE]:
        copy = str(tmp_path / name.strip("._"))
        shutil.copytree(step6, copy)
        flip(os.path.join(copy, name))
        with pytest.raises(checkpoint.CorruptCheckpoint) as e:
            checkpoint.verify(copy, meta_model(six))
        want = f"{name} does not match its checksum" if name != checkpoint.SUMS_FILE else f"{name} is unreadable"
        assert want in str(e.value), str(e.value)
        with pytest.raises(checkpoint.CorruptCheckpoint):  # sample.py, eval.py and export.py load through this
            checkpoint.load(copy, meta_model(six).to_empty(device="cpu"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "state_json", "unreadable_without_checksums"])
def test_a_damaged_latest_is_set_aside_and_the_run_continues_bit_exactly(runs, tmp_path, damage, capsys):
    six, eight = runs
    out = str(tmp_path / "run")
    shutil.copytree(six, out)
    step6 = os.path.join(out, "step_000006")
    data = os.path.join(step6, [n for n in os.listdir(step6) if n.endswith(".distcp")][0])
    if damage == "flip":
        flip(data)
    elif damage == "truncate":
        os.truncate(data, os.path.getsize(data) // 2)
    elif damage == "state_json":  # a broken train_state.json, in a checkpoint without checksums (an old one)
        os.remove(os.path.join(step6, checkpoint.SUMS_FILE))
        open(os.path.join(step6, checkpoint.STATE_FILE), "w").write('{"step": 6,\n"tokens": }')
    else:  # no checksums to catch it first: the load itself fails, and the run falls back from there
        os.remove(os.path.join(step6, checkpoint.SUMS_FILE))
        os.truncate(data, os.path.getsize(data) // 2)
    assert train.main(train_args(corpus_of(six), out, *COMMON, "train.max_steps=8")) == 0
    err = capsys.readouterr().err
    assert "step_000006" in err and "Moved it aside to" in err and "corrupt_step_000006" in err, err
    if damage == "state_json":
        assert f"{checkpoint.STATE_FILE} is not valid JSON" in err
    elif damage == "unreadable_without_checksums":
        assert "step_000006 is unreadable" in err
    else:
        assert os.path.basename(data) in err
    assert os.path.isdir(os.path.join(out, "corrupt_step_000006"))  # kept for a look, not deleted
    a, b = losses(eight), losses(out)
    assert all(a[s] == b[s] for s in (5, 6, 7, 8)), (a, b)  # resumed at 4: the same steps, bit for bit
    assert checkpoint.find_latest(out).endswith("step_000008")


def corpus_of(run_dir: str) -> str:
    import yaml
    return yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["data"]["datasets"][0]


def test_keep_last_keeps_the_good_checkpoint_when_a_new_one_fails_to_verify(corpus, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    assert train.main(train_args(corpus, out, "train.max_steps=2", "train.ckpt_interval=2", "train.keep_last=1",
                                 "train.eval_interval=0")) == 0
    real = checkpoint.verify_files

    def damaged_on_write(path):  # what a disk that corrupts writes looks like: the read-back differs
        if "step_000004" in path:
            raise checkpoint.CorruptCheckpoint(f"checkpoint {path}: __0_0.distcp does not match its checksum")
        return real(path)
    monkeypatch.setattr(checkpoint, "verify_files", damaged_on_write)
    assert train.main(train_args(corpus, out, "train.max_steps=4", "train.ckpt_interval=2", "train.keep_last=1",
                                 "train.eval_interval=0")) == 1
    assert "does not match its checksum" in capsys.readouterr().err
    assert sorted(n for n in os.listdir(out) if "step_" in n) == ["step_000002"]  # the good one stays
    assert checkpoint.find_latest(out).endswith("step_000002")


def test_a_changed_token_shard_stops_the_run_and_prepare_verify_names_it(corpus, tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(corpus, data)
    meta = json.load(open(os.path.join(data, "meta.json")))
    shard = meta["splits"]["train"]["shards"][0]
    assert len(shard["xxh3"]) == 32
    import data.prepare as prep  # its command line, in this process; the failing one below as a program
    assert prep.main(["--verify", data]) == 0
    assert "every shard matches meta.json" in capsys.readouterr().out
    flip(os.path.join(data, shard["file"]))
    assert train.main(train_args(data, str(tmp_path / "run"), "train.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert f"shard {os.path.join(data, shard['file'])} does not match the checksum in meta.json" in err
    r = run("data/prepare.py", "--verify", data, check=False)
    assert r.returncode == 2 and shard["file"] in r.stderr
    assert not os.path.exists(tmp_path / "run" / "step_000002")


def test_bench_times_checkpoints_with_and_without_checksums(tmp_path, monkeypatch, capsys):
    """bench.py --checkpoint through its main(), in this process (a second interpreter costs seconds)."""
    import json as js
    import bench
    from conftest import ROOT
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert bench.main(["configs/tiny.yaml", "model.n_layer=1", "model.vocab_size=256", "--checkpoint",
                       str(tmp_path / "ck")]) == 0
    res = js.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["save_s"] > 0 and res["load_plain_s"] > 0 and res["save_ratio"] > 0
    assert not os.path.exists(tmp_path / "ck")  # emptied after


def shrink_train_split(data: str) -> None:
    """Replace a dataset's first train shard by its first half, meta.json updated to match: a valid dataset, but
    not the one a run trained on."""
    meta = json.load(open(os.path.join(data, "meta.json")))
    shard = meta["splits"]["train"]["shards"][0]
    path = os.path.join(data, shard["file"])
    np.save(path, np.load(path)[:shard["tokens"] // 2])
    shard["tokens"], shard["xxh3"] = shard["tokens"] // 2, checkpoint.file_digest(path)
    meta["splits"]["train"]["tokens"] = sum(s["tokens"] for s in meta["splits"]["train"]["shards"])
    open(os.path.join(data, "meta.json"), "w").write(json.dumps(meta, indent=1))


def test_a_resume_on_changed_data_stops_and_names_the_change(corpus, tmp_path, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    shutil.copytree(corpus, data)
    assert train.main(train_args(data, out, "train.max_steps=2", "train.ckpt_interval=2")) == 0
    state = checkpoint.read_state(checkpoint.find_latest(out))
    assert state["data"][data]["meta.json_xxh3"] == checkpoint.file_digest(os.path.join(data, "meta.json"))
    tokens = state["data"][data]["train_tokens"]
    shrink_train_split(data)
    capsys.readouterr()
    assert train.main(train_args(data, out, "train.max_steps=4", "train.ckpt_interval=2")) == 2
    err = capsys.readouterr().err
    assert f"{data}: train_tokens {tokens} -> {tokens - tokens // 2}" in err and "data.allow_change=true" in err, err
    assert f"{data}: meta.json changed" in err
    assert checkpoint.find_latest(out).endswith("step_000002")  # nothing trained, nothing written
    assert train.main(train_args(data, out, "train.max_steps=4", "train.ckpt_interval=2",
                                 "data.allow_change=true")) == 0  # on purpose: it goes on with the new data
    assert "resumed from" in capsys.readouterr().out and checkpoint.find_latest(out).endswith("step_000004")


def test_when_no_checkpoint_verifies_the_run_says_it_starts_over_and_keeps_the_old_rows(runs, tmp_path, capsys):
    six, _ = runs
    out = str(tmp_path / "run")
    shutil.copytree(six, out)
    old_rows = open(os.path.join(out, "metrics.jsonl")).read()
    for step in (2, 4, 6):
        folder = os.path.join(out, f"step_{step:06d}")
        flip(os.path.join(folder, [n for n in os.listdir(folder) if n.endswith(".distcp")][0]))
    assert train.main(train_args(corpus_of(six), out, *COMMON, "train.max_steps=2")) == 0
    err = capsys.readouterr().err
    assert "no checkpoint left that verifies, so training starts again from step 0" in err, err
    assert open(os.path.join(out, "metrics.jsonl.before_restart")).read() == old_rows
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))
            if "loss" in json.loads(line)] == [1, 2]
