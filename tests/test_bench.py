"""bench.py measures the model train.py trains: the data's vocab where the data is prepared, GPT-2's (said so)
where it is not, model.vocab_size where the config sets one."""
import json

import bench
import config
from conftest import TINY, run
from loader import read_meta


def test_the_vocab_is_the_datas_as_in_training(corpus, tmp_path):
    vocab = read_meta(corpus)["vocab_size"]
    assert bench.bench_vocab(config.load(["configs/tiny.yaml", f"data.datasets=[{corpus}]"])) == (
        vocab, f"the data's, from {corpus}/meta.json, as train.py takes it")
    size, why = bench.bench_vocab(config.load(["configs/tiny.yaml", f"data.datasets=[{tmp_path / 'none'}]"]))
    assert size == 50257 and why.startswith("GPT-2's, not the data's") and "is not a prepared dataset" in why
    assert not (tmp_path / "none").exists()  # a benchmark prepares no data
    assert bench.bench_vocab(config.load(["configs/tiny.yaml", "model.vocab_size=300"])) == (300, "model.vocab_size")


def test_bench_prints_the_vocab_and_the_parameters_it_measured(corpus):
    r = run("bench.py", "configs/tiny.yaml", *TINY, f"data.datasets=[{corpus}]", "--warmup", "0", "--steps", "1")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    vocab = read_meta(corpus)["vocab_size"]
    assert result["vocab_size"] == vocab and result["compile_reason"] == "off: as configured"
    assert r.stderr.startswith(f"vocab {vocab:,} (the data's, from {corpus}/meta.json")
    assert f"vocab {vocab:,}, {result['params'] / 1e6:.2f}M parameters, " in r.stderr
