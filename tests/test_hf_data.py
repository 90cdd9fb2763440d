"""Hugging Face inputs: datasets as `hf:NAME_OR_FOLDER` (a local folder in the Hub's parquet layout and a
`save_to_disk` folder, through the code path a Hub name takes), resumable and deterministic preparation, fail-fast
offline errors, tokenizers as `hf:FOLDER` with their BOS/EOS conventions, and the continued-pretraining path:
import a Hugging Face Llama, prepare data with its tokenizer, train, export, load the result in transformers."""
import json
import os

import numpy as np
import pytest
import torch

import data.prepare as prep
from hf import check_init_tokenizer
from build import load_model
from conftest import ROOT, TINY, run
from data.prepare import is_val, prepare
from loader import DataError, same_tokenizer
from test_data import documents, read_split
from tokenizer import HF_TOKENIZER_FILES, Tokenizer, load_tokenizer, tiktoken_encoding

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory):
    """300 documents as the Hub lays a dataset out: data/train-0000K-of-00003.parquet, with an extra column, a
    few rows without text, small row groups; and the same rows written by save_to_disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("hub")
    docs = documents(300)
    texts = [None if i % 50 == 7 else d for i, d in enumerate(docs)]
    os.makedirs(root / "fwe" / "data")
    for k in range(3):
        part = texts[k * 100:(k + 1) * 100]
        pq.write_table(pa.table({"id": list(range(len(part))), "text": part}),
                       root / "fwe" / "data" / f"train-{k:05d}-of-00003.parquet", row_group_size=16)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(root / "saved"))
    return root, [t for t in texts if t is not None]


def expected(docs: list[str], tok: Tokenizer, val_frac: float, split: str) -> np.ndarray:
    return np.concatenate([tok.document(tok.encode(d)) for d in docs if is_val(d, val_frac) == (split == "val")])


@pytest.mark.parametrize("folder", ["fwe", "saved"])
def test_a_dataset_by_name_gives_its_documents_in_order(hub_layout, tmp_path, folder):
    root, docs = hub_layout
    out = str(tmp_path / "out")
    meta = prepare([f"hf:{root / folder}"], out, "gpt2", val_frac=0.1, workers=1, shard_tokens=3000)
    tok = load_tokenizer(out)
    for split in ("train", "val"):
        assert np.array_equal(read_split(out, split), expected(docs, tok, 0.1, split))
    assert meta["skipped_docs"] == 6 and len(meta["splits"]["train"]["shards"]) > 3
    assert not [f for f in os.listdir(out) if "tail" in f or "progress" in f]


def test_a_subset_of_a_downloaded_dataset_is_chosen_by_name(tmp_path):
    """A Hub dataset downloaded whole (`huggingface-cli download --repo-type dataset NAME --local-dir DIR`) keeps its
    subsets in folders named by its README's `configs`: hf:DIR with --subset reads that one, as from the Hub."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path / "fineweb-edu"
    for name, texts in [("10BT", ["ten a", "ten b"]), ("100BT", ["hundred a"])]:
        os.makedirs(root / "sample" / name)
        pq.write_table(pa.table({"text": texts}), root / "sample" / name / "000_00000.parquet")
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: sample-{n}\n  data_files:\n  - split: train\n    path: sample/{n}/*\n" for n in ("10BT", "100BT"))
        + "---\n")
    meta = prepare([f"hf:{root}"], str(tmp_path / "out"), "gpt2", subset="sample-10BT", val_frac=0.0, workers=1)
    enc = tiktoken_encoding("gpt2")
    assert read_split(str(tmp_path / "out"), "train").tolist() == enc.encode_ordinary("ten a") + [50256] + \
        enc.encode_ordinary("ten b") + [50256]
    assert meta["source"] == f"hf:{root} (subset sample-10BT, split train)"
    with pytest.raises(DataError, match="sample-1BT.*sample-10BT"):  # a wrong name lists the right ones
        prepare([f"hf:{root}"], str(tmp_path / "bad"), "gpt2", subset="sample-1BT", workers=1)


def test_max_tokens_stops_after_the_document_that_reaches_it(hub_layout, tmp_path):
    root, docs = hub_layout
    meta = prepare([f"hf:{root / 'fwe'}"], str(tmp_path / "out"), "gpt2", val_frac=0.0, workers=1, max_tokens=5000)
    enc = tiktoken_encoding("gpt2")
    lengths = np.cumsum([len(enc.encode_ordinary(d)) + 1 for d in docs])
    n = int(np.searchsorted(lengths, 5000)) + 1  # documents up to and including the one that reaches 5000
    assert meta["splits"]["train"]["docs"] == n and meta["splits"]["train"]["tokens"] == lengths[n - 1]


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("kind", ["hub", "files", "bpe"])
def test_an_interrupted_preparation_continues_to_the_same_result(hub_layout, tmp_path, monkeypatch, kind):
    """Killed after its third shard, the next run continues from the last saved position (it does not tokenize
    the finished shards' documents again) and ends with exactly the shards of an uninterrupted run."""
    root, docs = hub_layout
    if kind == "files":
        os.makedirs(tmp_path / "txt")
        for i, d in enumerate(docs):
            (tmp_path / "txt" / f"{i:04d}.txt").write_text(d, encoding="utf-8")
        inputs = [str(tmp_path / "txt")]
    else:
        inputs = [f"hf:{root / 'fwe'}"]
    kw = dict(tokenizer="bpe" if kind == "bpe" else "gpt2", vocab_size=300, val_frac=0.1, workers=1,
              shard_tokens=2500 if kind == "bpe" else 1500)
    clean = prepare(inputs, str(tmp_path / "clean"), **kw)
    out = str(tmp_path / "out")
    real_write, encoded = prep.ShardWriter._write, []
    monkeypatch.setattr(prep, "CHUNK_DOCS", 4)  # progress is saved between windows of 4 chunks: keep them small

    def write(self):
        if self.split == "train" and len(self.shards) == 3:
            raise Interrupt
        real_write(self)
    monkeypatch.setattr(prep.ShardWriter, "_write", write)
    with pytest.raises(Interrupt):
        prepare(inputs, out, **kw)
    monkeypatch.setattr(prep.ShardWriter, "_write", real_write)
    assert os.path.exists(os.path.join(out, prep.PROGRESS)) and not os.path.exists(os.path.join(out, "meta.json"))
    real_encode = prep._encode_chunk
    monkeypatch.setattr(prep, "_encode_chunk", lambda args: encoded.extend(args[0]) or real_encode(args))
    resumed = prepare(inputs, out, **kw)
    assert 0 < len(encoded) < len(docs) - 20  # it went on from a saved position, not from the start
    assert resumed["splits"] == clean["splits"]  # same shards, same hashes
    if kind == "bpe":  # the interrupted run's BPE is kept, not trained again
        assert (tmp_path / "clean" / "tokenizer.json").read_text() == open(os.path.join(out, "tokenizer.json")).read()
    if kind == "files":  # a file that changed size since the interruption: the saved position means nothing
        monkeypatch.setattr(prep.ShardWriter, "_write", write)
        with pytest.raises(Interrupt):
            prepare(inputs, out, **kw, fresh=True)
        monkeypatch.setattr(prep.ShardWriter, "_write", real_write)
        (tmp_path / "txt" / "0000.txt").write_text(docs[0] + "more", encoding="utf-8")
        encoded.clear()
        prepare(inputs, out, **kw)
        assert len(encoded) == len(docs)
    with pytest.raises(DataError, match="already holds a prepared dataset"):  # never replaced without --fresh
        prepare(inputs, out, **{**kw, "val_frac": 0.2})
    monkeypatch.setattr(prep.ShardWriter, "_write", write)
    with pytest.raises(Interrupt):
        prepare(inputs, out, **kw, fresh=True)
    monkeypatch.setattr(prep.ShardWriter, "_write", real_write)
    # other settings start over instead of mixing with the interrupted run's shards
    again = prepare(inputs, out, **{**kw, "val_frac": 0.2})
    assert again["val_frac"] == 0.2 and not os.path.exists(os.path.join(out, prep.PROGRESS))


def test_offline_a_hub_name_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="switched off here.*huggingface-cli download --repo-type dataset"):
        prepare(["hf:HuggingFaceFW/fineweb-edu"], str(tmp_path / "a"), "gpt2", workers=1)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: as a machine without network

    def retrying(*a, **kw):  # datasets retries an unreachable Hub for ~25 s: it must not be reached
        raise AssertionError("load_dataset was called for an unreachable Hub")
    monkeypatch.setattr(datasets, "load_dataset", retrying)
    with pytest.raises(DataError, match="cannot be reached"):
        prepare(["hf:HuggingFaceFW/fineweb-edu"], str(tmp_path / "b"), "gpt2", workers=1)
    with pytest.raises(DataError, match="cannot be reached"):
        prepare([os.path.join(ROOT, "README.md")], str(tmp_path / "c"), "hf:meta-llama/Llama-2-7b-hf", workers=1)
    r = run("data/prepare.py", "--input", "hf:HuggingFaceFW/fineweb-edu", "--subset", "sample-10BT",
            "--out", str(tmp_path / "d"), "--tokenizer", "gpt2", "--max_tokens", "2e9", check=False)
    assert r.returncode != 0  # the CLI: a message, not a traceback
    assert "error: hf:HuggingFaceFW/fineweb-edu" in r.stderr and "Traceback" not in r.stderr


def test_a_missing_column_or_split_is_named(hub_layout, tmp_path):
    root, _ = hub_layout
    with pytest.raises(DataError, match="no column 'content' .*id, text"):
        prepare([f"hf:{root / 'fwe'}"], str(tmp_path / "a"), "gpt2", text_field="content", workers=1)
    with pytest.raises(DataError, match="validation"):
        prepare([f"hf:{root / 'fwe'}"], str(tmp_path / "b"), "gpt2", split="validation", workers=1)


# ----------------------------------------------------------------------------- tokenizers by folder

def make_tokenizer(path, llama: bool, docs: list[str]):
    """A byte-level BPE saved by transformers: Llama's convention (<s> added before a text, </s> its EOS) or
    GPT-2's (nothing added; <|endoftext|> ends a document)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    special = ["<unk>", "<s>", "</s>"] if llama else ["<|endoftext|>"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if llama:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return fast


@pytest.mark.parametrize("llama", [True, False], ids=["llama", "gpt2"])
def test_a_tokenizer_by_folder_keeps_its_document_convention(hub_layout, tmp_path, llama):
    root, docs = hub_layout
    if not os.path.exists(root / "gpt2_data"):
        prepare([f"hf:{root / 'fwe'}"], str(root / "gpt2_data"), "gpt2", val_frac=0.0, workers=1)
    fast = make_tokenizer(tmp_path / "tok", llama, docs)
    out = str(tmp_path / "out")
    meta = prepare([f"hf:{root / 'fwe'}"], out, f"hf:{tmp_path / 'tok'}", val_frac=0.0, workers=2)
    tok = load_tokenizer(out)
    assert (meta["bos_id"], meta["eot_id"]) == ((1, 2) if llama else (None, 0))
    stream = read_split(out, "train")
    want = [([1] if llama else []) + fast(d, add_special_tokens=False)["input_ids"] + [meta["eot_id"]] for d in docs]
    assert stream.tolist() == [i for w in want for i in w]  # Llama: <s> doc </s>; GPT-2: doc <|endoftext|>
    assert tok.start_ids == ([1] if llama else [0])
    assert tok.decode(tok.encode(docs[3])) == docs[3]
    nbytes = tok.token_bytes()
    assert nbytes[tok.encode(docs[3])].sum() == len(docs[3].encode("utf-8")) and nbytes[meta["eot_id"]] == 0
    # the same folder again tokenizes alike; another tokenizer does not
    again = prepare([f"hf:{root / 'fwe'}"], str(tmp_path / "again"), f"hf:{tmp_path / 'tok'}", val_frac=0.0,
                    workers=1)
    assert same_tokenizer(out, str(tmp_path / "again")) and again["splits"] == meta["splits"]
    os.rename(tmp_path / "tok", tmp_path / "moved")  # the same tokenizer from elsewhere is the same tokenizer
    prepare([f"hf:{root / 'fwe'}"], str(tmp_path / "moved_data"), f"hf:{tmp_path / 'moved'}", val_frac=0.0, workers=1)
    assert same_tokenizer(out, str(tmp_path / "moved_data")) and not same_tokenizer(out, str(root / "gpt2_data"))


def test_a_tokenizer_by_hub_id_is_fetched_with_its_config(hub_layout, tmp_path, monkeypatch):
    """hf:ORG/NAME: the Hub is asked first (here it answers), then tokenizer.json and whichever of its config files
    the repository has are downloaded (here from a folder standing in for the Hub) and kept beside the shards."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError
    root, docs = hub_layout
    make_tokenizer(tmp_path / "hub", True, docs)
    (tmp_path / "hub" / "special_tokens_map.json").unlink(missing_ok=True)  # a repository without one: skipped
    asked, fetched = [], []
    monkeypatch.setattr("tokenizer.check_hub", lambda kind, name: asked.append((kind, name)))

    def download(repo, name):
        fetched.append((repo, name))
        if not os.path.exists(tmp_path / "hub" / name):
            raise EntryNotFoundError(f"{repo} has no {name}")
        return str(tmp_path / "hub" / name)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    meta = prepare([f"hf:{root / 'fwe'}"], str(tmp_path / "out"), "hf:org/llama-tok", val_frac=0.0, workers=1)
    assert asked == [("model", "org/llama-tok")] and [n for _, n in fetched] == list(HF_TOKENIZER_FILES)
    assert meta["tokenizer"] == {"type": "hf", "file": "tokenizer.json", "name": "org/llama-tok", "bos_id": 1,
                                 "eos_id": 2}
    assert sorted(f for f in os.listdir(tmp_path / "out") if f.startswith("tokenizer")) == \
        ["tokenizer.json", "tokenizer_config.json"]


def test_a_folder_without_tokenizer_json_is_refused(tmp_path):
    os.makedirs(tmp_path / "slow")
    with pytest.raises(DataError, match="no tokenizer.json"):
        prepare([os.path.join(ROOT, "README.md")], str(tmp_path / "out"), f"hf:{tmp_path / 'slow'}", workers=1)


def test_continued_pretraining_from_a_hf_llama_with_its_tokenizer(hub_layout, tmp_path, monkeypatch, capsys):
    """The LLeMA-style path, whole: a Llama with its tokenizer -> data prepared with that tokenizer -> training
    from its weights -> export -> transformers loads model and tokenizer and gives our logits; sample.py works.
    Each command line through its main(), in this process (a second interpreter costs seconds a call)."""
    transformers = pytest.importorskip("transformers")
    import export
    import sample
    import train
    monkeypatch.chdir(ROOT)
    root, docs = hub_layout
    if not os.path.exists(root / "gpt2_data"):
        prepare([f"hf:{root / 'fwe'}"], str(root / "gpt2_data"), "gpt2", val_frac=0.0, workers=1)
    base = tmp_path / "llama"
    fast = make_tokenizer(base, True, docs)
    conf = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(conf).save_pretrained(str(base))
    data, out, dst = str(tmp_path / "data"), str(tmp_path / "run"), str(tmp_path / "export")
    assert prep.main(["--input", f"hf:{root / 'fwe'}", "--out", data, "--tokenizer", f"hf:{base}", "--val_frac", "0.1",
                      "--workers", "1"]) == 0
    assert train.main(["configs/tiny.yaml", *TINY, f"data.datasets=[{data}]", f"train.out_dir={out}",
                       f"train.init_from={base}", "train.max_steps=3", "train.eval_interval=3",
                       "train.precision=fp32"]) == 0
    assert export.main([out, "--to", "hf", dst]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(dst)
    ours = load_tokenizer(data)
    text = docs[5]
    assert theirs(text)["input_ids"] == ours.start_ids + ours.encode(text)  # Llama's BOS, both ways
    assert (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (1, 2)
    model, _, _ = load_model(out, "cpu")
    ids = torch.tensor([theirs(text)["input_ids"][:64]])
    with torch.no_grad():
        assert torch.allclose(model(ids)[..., :len(fast)], hf(ids).logits[..., :len(fast)], atol=1e-4)
    import config
    cfg = config.load(["configs/tiny.yaml", f"train.init_from={base}", f"data.datasets=[{data},{root / 'gpt2_data'}]"])
    assert check_init_tokenizer(cfg) == [  # data tokenized otherwise is named, with the fix
        f"{root / 'gpt2_data'} was not tokenized with the tokenizer of {base}; prepare it with python "
        f"data/prepare.py ... --tokenizer hf:{base}"]
    capsys.readouterr()
    assert sample.main([out, "--prompt", "def f", "--max_new_tokens", "5", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    meta = json.load(open(os.path.join(out, "tokenizer", "meta.json")))
    assert meta["tokenizer"]["type"] == "hf" and meta["bos_id"] == 1
