"""Data: tokenizers, prepare.py on every input format, and the loader's determinism, coverage and errors."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from data.prepare import ensure_prepared, is_val, prepare
from loader import DataError, TrainLoader, eval_batches, open_split, permute, token_bytes, verify_dataset
from tokenizer import EOT, Tokenizer, load_tokenizer, tiktoken_encoding


def documents(n: int) -> list[str]:
    """Varied documents: code, prose, unicode, whitespace runs."""
    docs = []
    for i in range(n):
        docs.append(f"def f{i}(x):\n    return x * {i} + {i % 7}  # π ≈ 3.14, 中文 {i}\n\n\n"
                    + "    " * (i % 4) + f"print('héllo wörld {i}')\n" + "word " * (i % 13))
    return docs


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same 120 documents as .txt files, one .jsonl and one .parquet, plus one file that is not UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("sources")
    docs = documents(120)
    (root / "txt").mkdir()
    for i, d in enumerate(docs[:40]):
        (root / "txt" / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
    (root / "txt" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in docs[40:80]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"text": docs[80:]}), root / "docs.parquet")
    return root, docs


@pytest.fixture(scope="module")
def dataset(sources, tmp_path_factory):
    root, _ = sources
    out = str(tmp_path_factory.mktemp("prepared") / "mixed")
    prepare([str(root / "txt"), str(root / "docs.jsonl"), str(root / "docs.parquet")], out, "bpe", vocab_size=300,
            val_frac=0.2, workers=2, shard_tokens=2000)
    return out


def read_split(path: str, split: str) -> np.ndarray:
    meta = json.load(open(os.path.join(path, "meta.json")))
    return np.concatenate([np.load(os.path.join(path, s["file"])) for s in meta["splits"][split]["shards"]])


def test_bpe_round_trip(dataset):
    tok = load_tokenizer(dataset)
    assert tok.vocab_size == 300 and tok.eot_id == 0
    for text in ["def f(x):\n        return  x\n\n", "héllo wörld π ≈ 中文 😀", "  \t\n  ", "a" * 1000, EOT]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids  # special-token text inside a document is ordinary text


def test_gpt2_tiktoken_offline():
    enc = tiktoken_encoding("gpt2")
    assert enc.encode_ordinary("hello world") == [31373, 995]
    tok = Tokenizer({"type": "tiktoken", "name": "gpt2"}, ".")
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    text = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # π\n"
    assert tok.decode(tok.encode(text)) == text
    tb = tok.token_bytes()
    assert tb[50256] == 0 and tb[31373] == len(b"hello") and tb[995] == len(b" world")


def test_missing_tiktoken_encoding_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache; no network here either
    with pytest.raises(DataError, match="not cached|unknown tiktoken"):
        tiktoken_encoding("o200k_base")


def test_prepare_meta_and_splits(dataset, sources):
    _, docs = sources
    meta = json.load(open(os.path.join(dataset, "meta.json")))
    assert meta["tokenizer"] == {"type": "bpe", "file": "tokenizer.json"} and meta["dtype"] == "uint16"
    assert meta["skipped_files"] == 1  # latin1.txt
    want_val = [d for d in docs if is_val(d, 0.2)]
    assert meta["splits"]["val"]["docs"] == len(want_val) > 0
    assert meta["splits"]["train"]["docs"] == len(docs) - len(want_val)
    tb = token_bytes(dataset)
    for split in ("train", "val"):
        info, toks = meta["splits"][split], read_split(dataset, split)
        assert len(toks) == info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert (toks == meta["eot_id"]).sum() == info["docs"]  # one EOT per document
        assert int(tb[toks].sum()) == info["bytes"]  # token bytes add up to the source bytes exactly
    assert len(meta["splits"]["train"]["shards"]) > 1 and meta["splits"]["train"]["shards"][0]["tokens"] == 2000
    # the val documents, decoded back, are exactly the hashed-out ones in order
    tok = load_tokenizer(dataset)
    val_text = tok.decode(read_split(dataset, "val").tolist())
    assert val_text == "".join(d + EOT for d in want_val)


def test_prepare_is_deterministic(dataset, sources, tmp_path):
    root, _ = sources
    again = str(tmp_path / "again")
    prepare([str(root / "txt"), str(root / "docs.jsonl"), str(root / "docs.parquet")], again, "bpe", vocab_size=300,
            val_frac=0.2, workers=1, shard_tokens=2000)
    meta = json.load(open(os.path.join(dataset, "meta.json")))
    for split in ("train", "val"):
        for s in meta["splits"][split]["shards"]:
            assert np.array_equal(np.load(os.path.join(dataset, s["file"])), np.load(os.path.join(again, s["file"])))


def test_prepare_gpt2_and_bad_inputs(sources, tmp_path):
    root, _ = sources
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.npy").write_bytes(b"the user's own file")
    meta = prepare([str(root / "docs.jsonl")], str(tmp_path / "g"), "gpt2", val_frac=0.0, workers=1)
    assert meta["vocab_size"] == 50257 and meta["eot_id"] == 50256 and meta["dtype"] == "uint16"
    with pytest.raises(DataError, match="already holds a prepared dataset"):  # never replaced silently
        prepare([str(root / "docs.jsonl")], str(tmp_path / "g"), "gpt2", val_frac=0.0, workers=1)
    meta = prepare([str(root / "docs.jsonl")], str(tmp_path / "g"), "gpt2", val_frac=0.0, workers=1, fresh=True)
    assert (tmp_path / "g" / "notes.npy").read_bytes() == b"the user's own file"  # only its own files replaced
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text'"):
        prepare([str(bad)], str(tmp_path / "b"), "gpt2", workers=1)
    with pytest.raises(DataError, match="no such file"):
        prepare([str(tmp_path / "nothing*.txt")], str(tmp_path / "c"), "gpt2", workers=1)
    with pytest.raises(DataError, match="data/prepare.py"):
        ensure_prepared(str(tmp_path / "not_a_corpus"))


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        p = permute(np.arange(n, dtype=np.uint64), n, key=12345)
        assert sorted(p.tolist()) == list(range(n))
    a = permute(np.arange(100, dtype=np.uint64), 100, key=1)
    assert not np.array_equal(a, permute(np.arange(100, dtype=np.uint64), 100, key=2))


def rows_of(loaders, step, accum):
    return sorted(tuple(r) for m in range(accum) for L in loaders for r in L.batch(step, m)[0].tolist())


def test_loader_deterministic_and_in_range(dataset):
    L = TrainLoader([dataset], None, 32, 4, 2, seed=7, vocab_size=300)
    x, y = L.batch(5, 1)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 0 <= x.min() and x.max() < 300
    again = TrainLoader([dataset], None, 32, 4, 2, seed=7, vocab_size=300)
    assert torch.equal(again.batch(5, 1)[0], x) and torch.equal(again.batch(5, 1)[1], y)
    assert not torch.equal(TrainLoader([dataset], None, 32, 4, 2, seed=8).batch(5, 1)[0], x)


def test_loader_same_stream_for_any_world_size(dataset):
    one = [TrainLoader([dataset], None, 32, 2, 4, seed=1)]
    two = [TrainLoader([dataset], None, 32, 2, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    four = [TrainLoader([dataset], None, 32, 2, 1, seed=1, rank=r, world_size=4) for r in range(4)]
    for step in (0, 3, 11):
        assert rows_of(one, step, 4) == rows_of(two, step, 2) == rows_of(four, step, 1)
    a, b = (set(map(tuple, L.batch(0, 0)[0].tolist())) for L in two)
    assert not a & b  # ranks read different windows


def test_loader_epoch_visits_each_window_once(dataset):
    L = TrainLoader([dataset], None, 16, 1, 1, seed=3)
    n = int(L.starts[0][-1])  # windows in the train split
    epoch = [tuple(L.batch(s, 0)[0][0].tolist()) for s in range(n)]
    assert len(set(epoch)) == n  # a permutation: no window twice, none left out
    following = [tuple(L.batch(s, 0)[0][0].tolist()) for s in range(n, n + 5)]
    assert set(following) <= set(epoch) and following != epoch[:5]  # the next epoch reshuffles


def test_mixture_follows_weights(dataset, tmp_path):
    other = str(tmp_path / "other")
    shutil.copytree(dataset, other)
    for f in os.listdir(other):  # same tokenizer; fill its shards with one id so its rows can be told apart
        if f.startswith("train_"):
            arr = np.load(os.path.join(other, f))
            np.save(os.path.join(other, f), np.full_like(arr, 299))
    rehash(other)
    L = TrainLoader([dataset, other], [3, 1], 16, 64, 1, seed=0)
    frac = np.mean([(L.batch(s, 0)[0] == 299).all(dim=1).float().mean().item() for s in range(20)])
    assert 0.18 < frac < 0.32, frac
    with pytest.raises(DataError, match="different tokenizers"):
        meta = json.load(open(os.path.join(other, "meta.json")))
        meta["eot_id"] = 5
        json.dump(meta, open(os.path.join(other, "meta.json"), "w"))
        TrainLoader([dataset, other], None, 16, 4, 1, seed=0)


def test_eval_batches_cover_every_target_once(dataset):
    toks = read_split(dataset, "val")
    meta = json.load(open(os.path.join(dataset, "meta.json")))
    n_shards = len(meta["splits"]["val"]["shards"])
    got = [(x, y) for x, y in eval_batches(dataset, "val", 32, 3)]
    assert all(x.shape == (3, 32) for x, _ in got)
    targets = torch.cat([y[y >= 0] for _, y in got])
    assert len(targets) == len(toks) - n_shards
    assert sorted(targets.tolist()) == sorted(np.concatenate(
        [np.load(os.path.join(dataset, s["file"]))[1:] for s in meta["splits"]["val"]["shards"]]).tolist())
    split = [list(eval_batches(dataset, "val", 32, 3, rank=r, world_size=2)) for r in range(2)]
    assert len(split[0]) + len(split[1]) == len(got)
    capped = list(eval_batches(dataset, "val", 32, 3, max_tokens=100))
    assert 100 <= sum((y >= 0).sum().item() for _, y in capped) < 100 + 32


def rehash(path: str) -> None:
    """Record the shards' current hashes in meta.json: a dataset that was prepared this way, not one damaged later."""
    from checkpoint import file_digest
    meta = json.load(open(os.path.join(path, "meta.json")))
    for info in meta["splits"].values():
        for s in info["shards"]:
            s["xxh3"] = file_digest(os.path.join(path, s["file"]))
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))


def corrupt_copy(dataset, tmp_path, name):
    path = str(tmp_path / name)
    shutil.copytree(dataset, path)
    return path, os.path.join(path, "train_00000.npy")


def test_corrupt_or_mismatched_data_is_rejected(dataset, tmp_path):
    path, shard = corrupt_copy(dataset, tmp_path, "truncated")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(DataError, match="truncated"):
        open_split(path, "train")

    path, shard = corrupt_copy(dataset, tmp_path, "dtype")
    np.save(shard, np.load(shard).astype(np.uint32))
    with pytest.raises(DataError, match="holds uint32 but meta.json says uint16"):
        open_split(path, "train")

    with pytest.raises(DataError, match="data vocab 300 exceeds the model's vocab 256"):
        TrainLoader([dataset], None, 16, 4, 1, seed=0, vocab_size=256)

    path, shard = corrupt_copy(dataset, tmp_path, "range")
    arr = np.load(shard)
    arr[:] = 400  # ids past the vocab meta.json declares, in a dataset whose hashes match (made this way)
    np.save(shard, arr)
    rehash(path)
    with pytest.raises(DataError, match="holds token id 400 .first at position 0., outside the vocab of 300"):
        TrainLoader([path], None, 16, 64, 1, seed=0, vocab_size=300)  # at once, before any batch
    with pytest.raises(DataError, match="token id 400"):
        verify_dataset(path)  # --verify checks what training checks

    path, _ = corrupt_copy(dataset, tmp_path, "nometa")
    os.remove(os.path.join(path, "meta.json"))
    with pytest.raises(DataError, match="not a prepared dataset"):
        open_split(path, "train")
    with pytest.raises(DataError, match="shorter than one window"):
        TrainLoader([dataset], None, 10**7, 1, 1, seed=0)
