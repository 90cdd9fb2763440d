"""Config: YAML merge order, typed overrides, and error messages that name the key and suggest a fix."""
import os
import subprocess
import sys

import pytest

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_merge_in_order_then_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", "model:\n  n_layer: 4\n  n_embd: 128\n  n_head: 4\ntrain:\n  lr: 3e-4\n  max_steps: 10\n")
    b = write(tmp_path, "b.yaml", "model:\n  n_layer: 8\n")
    cfg = config.load([a, b, "train.max_steps=20", "data.datasets=[x, y]", "data.weights=[1, 3]"])
    assert cfg.model.n_layer == 8 and cfg.model.n_embd == 128  # later file wins, earlier keys stay
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.train.max_steps == 20
    assert cfg.data.datasets == ["x", "y"] and cfg.data.weights == [1.0, 3.0]
    cfg = config.load(["model.n_kv_head=null", "train.out_dir=123", "train.compile=true", "train.max_steps=1e3"])
    assert cfg.model.n_kv_head is None and cfg.train.out_dir == "123" and cfg.train.compile is True
    assert cfg.train.max_steps == 1000
    # optional strings stay verbatim too (null: None), so a prompt of code is no YAML mapping
    cfg = config.load(["eval.prompt=def f(x): [1]", "log.wandb_run_name=123", "train.ckpt_dir=null"])
    assert cfg.eval.prompt == "def f(x): [1]" and cfg.log.wandb_run_name == "123" and cfg.train.ckpt_dir is None


def test_every_shipped_config_loads():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        cfg = config.load([os.path.join(ROOT, "configs", name)])
        assert cfg.train.max_steps > 0


@pytest.mark.parametrize("args, words", [
    (["model.n_layr=2"], ["model.n_layr", "command line", "did you mean 'model.n_layer'"]),
    (["train.n_layer=2"], ["train.n_layer", "did you mean 'model.n_layer'"]),
    (["modle.n_layer=2"], ["unknown section 'modle'", "did you mean 'model'"]),
    (["train.lr=fast"], ["train.lr", "expected float", "'fast'"]),
    (["model.n_layer=2.5"], ["model.n_layer", "expected int"]),
    (["model.arch=gpt3"], ["model.arch", "gpt3", "llama, gpt2"]),
    (["train.resume=maybe"], ["train.resume", "expected bool"]),
    (["train.compile=maybe"], ["train.compile", "'maybe' is not one of auto, true, false"]),
    (["train.precision=bf32"], ["train.precision", "auto, fp32, bf16, fp16, fp8"]),
    (["train.max_minutes=-1"], ["train.max_minutes must be >= 0"]),
    (["train.profile=-1"], ["train.profile must be >= 0"]),
    (["train.batch_size=0"], ["train.batch_size must be >= 1"]),
    (["eval.limit=0"], ["eval.limit > 0"]),
    (["model.n_embd=100", "model.n_head=3"], ["model.n_embd (100) must be divisible by model.n_head (3)"]),
    (["model.n_kv_head=5"], ["divisible by model.n_kv_head"]),
    (["data.weights=[1]", "data.datasets=[a, b]"], ["data.weights"]),
    (["n_layer=2"], ["section.key=value"]),
    (["nonsense"], ["neither a .yaml file"]),
])
def test_errors_name_the_key(args, words):
    with pytest.raises(config.ConfigError) as e:
        config.load(args)
    for w in words:
        assert w in str(e.value)


def test_errors_name_the_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "model:\n  n_layers: 4\n")
    with pytest.raises(config.ConfigError, match=r"model.n_layers.*bad.yaml.*did you mean 'model.n_layer'"):
        config.load([bad])
    broken = write(tmp_path, "broken.yaml", "model:\n  n_layer: 4\n   n_embd: [\n")
    with pytest.raises(config.ConfigError, match=r"broken.yaml: line \d+"):
        config.load([broken])
    with pytest.raises(config.ConfigError, match="not found"):
        config.load([str(tmp_path / "missing.yaml")])


def test_derived_grad_accum():
    cfg = config.load(["train.batch_size=64", "train.micro_batch_size=8"])
    assert config.derive(cfg, 1).grad_accum == 8
    assert config.derive(cfg, 4).grad_accum == 2
    assert config.derive(cfg, 4).batch_tokens == 64 * cfg.model.block_size
    assert "x grad accum 2 x world size 4" in config.derive(cfg, 4).banner(cfg)
    with pytest.raises(config.ConfigError, match="multiple"):
        config.derive(cfg, 3)


def test_misspelt_key_stops_train_before_writing(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", "configs/tiny.yaml", "model.n_layr=2", f"train.out_dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "n_layr" in r.stderr and "n_layer" in r.stderr
    assert not out.exists()
