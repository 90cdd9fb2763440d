"""Shared fixtures: a small prepared dataset made from real Python sources, and a tiny training run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model small enough that a training step takes milliseconds on 2 CPU cores.
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64", "train.batch_size=8",
        "train.micro_batch_size=4", "train.compile=false", "train.warmup_steps=5", "train.lr=3e-3",
        "train.eval_batches=4", "log.interval=1", "train.max_minutes=0"]


def run(script: str, *args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts as a user would, from the repo root."""
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def children(pid: int) -> list[int]:
    """Child processes of `pid`, from /proc (torchrun starts each worker in a session of its own, so killing
    torchrun's process group does not reach them)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants at once, as a node failure or SLURM's final kill would."""
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def make_run(cfg, world: int = 1, rank: int = 0, model=None):
    """`cfg` resolved for this CPU as train.py resolves it (hardware.resolve, then memory.resolve), as rank `rank` of
    `world`; `model`: the model config with its vocab (default cfg.model)."""
    import hardware
    import memory
    device, precision, compiled = hardware.resolve(cfg.train, 0, cfg.model)
    return memory.resolve(cfg, model or cfg.model, device, precision, compiled, rank, world)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """~300 KB of standard-library Python prepared with a 512-token BPE; returns the dataset folder."""
    src = tmp_path_factory.mktemp("src")
    stdlib = sysconfig.get_paths()["stdlib"]
    picked = 0
    for name in sorted(os.listdir(stdlib)):
        path = os.path.join(stdlib, name)
        if name.endswith(".py") and 2_000 < os.path.getsize(path) < 40_000 and picked < 40:
            shutil.copy(path, src / name)
            picked += 1
    out = str(tmp_path_factory.mktemp("data") / "stdlib_bpe512")
    run("data/prepare.py", "--input", str(src), "--out", out, "--tokenizer", "bpe", "--vocab_size", "512",
        "--val_frac", "0.1", "--workers", "1")
    return out


@pytest.fixture(scope="session")
def trained(corpus, tmp_path_factory) -> str:
    """A run folder trained for 30 steps through the command line, as a user would."""
    out = str(tmp_path_factory.mktemp("runs") / "trained")
    run("train.py", "configs/tiny.yaml", *TINY, f"data.datasets=[{corpus}]", f"train.out_dir={out}",
        "train.max_steps=30", "train.eval_interval=15", "train.ckpt_interval=15")
    return out


def local_task(tmp_path) -> str:
    """A folder with lm-eval task `pyqa`: three two-way multiple-choice questions in a local JSONL file."""
    data = tmp_path / "qa.jsonl"
    with open(data, "w") as f:
        for q, a, b in [("x = 1 +", " 1", " def"), ("import", " os", " )"), ("def f(", "x):", "]:")]:
            f.write(json.dumps({"q": q, "choices": [a, b], "label": 0}) + "\n")
    task = tmp_path / "tasks" / "pyqa.yaml"
    os.makedirs(task.parent)
    task.write_text(f"task: pyqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
                    "doc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
                    "    aggregation: mean\n    higher_is_better: true\n")
    return str(task.parent)
