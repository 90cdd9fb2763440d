"""Token shards on disk -> training and evaluation batches.

Training batches are a pure function of (seed, step, micro_step, rank, world_size): a resumed run, or a run
on another number of ranks with the same global batch, sees exactly the same token stream, and nothing about
the loader needs saving. Each dataset is cut into non-overlapping windows of block_size + 1 tokens (stride
block_size, never across a shard boundary); global sample s of epoch s // n_windows reads the window that a
keyed pseudo-random permutation puts at position s % n_windows, so an epoch visits every window once and
never repeats one. The permutation is evaluated per index (a Feistel network with cycle-walking), so a
dataset of any size costs memory in proportion to the batch, not the corpus.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: data/prepare.py's tokenizer workers import this
    import torch   # module for DataError and the shard checks, and need no torch (BENCHMARKS.md: its memory)

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")  # a tokenizer's files


class DataError(ValueError):
    """Missing, mismatched or corrupt data, with a message meant for the user."""


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixing hash of uint64 values."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _key(*parts: int) -> int:
    h = np.array([0], dtype=np.uint64)
    for p in parts:
        h = _mix64(h ^ np.uint64(int(p) % 2**64))
    return int(h[0])


def permute(idx: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed permutation of range(n) evaluated at `idx` (uint64 array of values < n)."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = [np.uint64(_key(key, r)) for r in range(4)]

    def feistel(x):
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    out = feistel(idx.astype(np.uint64))
    while (bad := out >= n).any():  # cycle-walk back into range; the domain is < 4n, so this ends fast
        out[bad] = feistel(out[bad])
    return out


def copy_tokenizer(data_dir: str, dst: str, names=("meta.json", "token_bytes.npy", *HF_TOKENIZER_FILES)) -> None:
    """Copy those of `names` that exist in `data_dir` into `dst`: by default what load_tokenizer needs from a dataset
    (a run folder keeps its tokenizer)."""
    os.makedirs(dst, exist_ok=True)
    for name in names:
        if os.path.exists(os.path.join(data_dir, name)):
            shutil.copy(os.path.join(data_dir, name), os.path.join(dst, name))


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path} is not a prepared dataset (no meta.json); "
                        f"run: python data/prepare.py --input ... --out {path}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}/meta.json is not valid JSON ({e})") from None


def _open_shard(file: str, tokens: int, dtype: str, digest: str | None, vocab: int) -> np.ndarray:
    """Memory-map a .npy shard after checking its header and size against meta.json, its content hash (where
    meta.json has one) and its token ids against meta.json's vocab: a changed byte stops here, before training, not
    in a silently different run. Each check reads the shard once (from the page cache after the first)."""
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, found = read(f)
            offset = f.tell()
    except FileNotFoundError:
        raise DataError(f"shard {file} is missing") from None
    except ValueError as e:
        raise DataError(f"shard {file} is not a valid .npy file ({e})") from None
    if found != np.dtype(dtype):
        raise DataError(f"shard {file} holds {found} but meta.json says {dtype}")
    if shape != (tokens,):
        raise DataError(f"shard {file} has shape {shape} but meta.json says {tokens} tokens")
    size, want = os.path.getsize(file), offset + tokens * found.itemsize
    if size != want:
        raise DataError(f"shard {file} is truncated or padded: {size} bytes, expected {want} "
                        f"({tokens} tokens of {dtype})")
    from checkpoint import file_digest  # here: it brings torch, which data/prepare.py's workers need not hold
    if digest is not None and file_digest(file) != digest:
        raise DataError(f"shard {file} does not match the checksum in meta.json: its bytes changed after it was "
                        f"prepared; prepare the dataset again (python data/prepare.py --verify "
                        f"{os.path.dirname(file)} checks every shard)")
    ids = np.load(file, mmap_mode="r")
    if tokens and (top := int(ids.max())) >= vocab:
        raise DataError(f"shard {file} holds token id {top} (first at position {int(np.argmax(ids >= vocab))}), "
                        f"outside the vocab of {vocab} in meta.json: the shard does not match its tokenizer")
    return ids


def open_split(path: str, split: str, vocab_size: int | None = None) -> list[np.ndarray]:
    """The shards of one split ('train', 'val') of one prepared dataset, memory-mapped and validated."""
    meta = read_meta(path)
    if split not in meta.get("splits", {}):
        raise DataError(f"{path} has no '{split}' split (has: {', '.join(meta.get('splits', {}))})")
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise DataError(f"{path}: data vocab {meta['vocab_size']} exceeds the model's vocab {vocab_size}")
    return [_open_shard(os.path.join(path, s["file"]), s["tokens"], meta["dtype"], s.get("xxh3"), meta["vocab_size"])
            for s in meta["splits"][split]["shards"]]


def verify_dataset(path: str) -> list[str]:
    """Check every shard of a prepared dataset as training does (header, dtype, size, hash, token ids within the
    vocab); returns what it checked, or raises DataError naming the first shard that fails."""
    meta, checked = read_meta(path), []
    for split, info in meta.get("splits", {}).items():
        open_split(path, split)
        checked += [f"{split}/{s['file']}: {s['tokens']:,} tokens, ids below {meta['vocab_size']}"
                    + (", hash ok" if "xxh3" in s else ", no hash in meta.json") for s in info["shards"]]
    return checked


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two prepared datasets (or run tokenizer folders) were tokenized alike."""
    ma, mb = read_meta(a), read_meta(b)
    spec = [{k: v for k, v in m["tokenizer"].items() if k != "name"} for m in (ma, mb)]  # hf: where it came from
    if spec[0] != spec[1] or any(ma.get(k) != mb.get(k) for k in ("vocab_size", "eot_id", "bos_id")):
        return False
    if (file := ma["tokenizer"].get("file")) is None:
        return True
    with open(os.path.join(a, file), "rb") as fa, open(os.path.join(b, file), "rb") as fb:
        return fa.read() == fb.read()


class TrainLoader:
    """Training micro-batches from one dataset or a weighted mixture; see the module docstring."""

    def __init__(self, paths: list[str], weights: list[float] | None, block_size: int, micro_batch_size: int,
                 grad_accum: int, seed: int, rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        self.shards = [open_split(p, "train", vocab_size) for p in paths]  # per dataset: its shards
        for p in paths[1:]:
            if not same_tokenizer(paths[0], p):
                raise DataError(f"{p} and {paths[0]} use different tokenizers; a mixture needs one")
        self.T, self.mb, self.accum = block_size, micro_batch_size, grad_accum
        self.seed, self.rank, self.world = seed, rank, world_size
        self.starts = []  # per dataset: cumulative window counts per shard
        for path, shards in zip(paths, self.shards):
            counts = [max(0, (len(a) - 1) // block_size) for a in shards]
            if sum(counts) == 0:
                raise DataError(f"{path}: the train split ({sum(map(len, shards))} tokens) is shorter than one "
                                f"window of block_size + 1 = {block_size + 1} tokens")
            self.starts.append(np.cumsum([0] + counts))
        w = np.ones(len(paths)) if weights is None else np.asarray(weights, dtype=np.float64)
        self.cum_weights = np.cumsum(w / w.sum())

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 CPU tensors of shape (micro_batch_size, block_size); y is x shifted by one."""
        import torch
        # this rank's global sample ids: a global batch holds the same ids whatever the world size
        first = (step * self.accum * self.world + micro_step * self.world + self.rank) * self.mb
        ids = np.arange(first, first + self.mb, dtype=np.uint64)
        # each sample's dataset by the weights (one dataset: always 0; the minimum: a u that rounded up to 1.0)
        u = _mix64(ids ^ np.uint64(_key(self.seed, 0x6D6978))).astype(np.float64) / 2.0**64
        which = np.minimum(np.searchsorted(self.cum_weights, u, side="right"), len(self.shards) - 1)
        rows = np.empty((len(ids), self.T + 1), dtype=np.int64)
        for d in np.unique(which):
            shards, starts = self.shards[d], self.starts[d]
            n = int(starts[-1])
            sel = np.flatnonzero(which == d)
            epoch, pos = ids[sel] // np.uint64(n), ids[sel] % np.uint64(n)
            for e in np.unique(epoch):
                here = epoch == e
                windows = permute(pos[here], n, _key(self.seed, d, int(e)))
                shard = np.searchsorted(starts, windows, side="right") - 1
                for j, w, sh in zip(sel[here], windows, shard):
                    begin = (int(w) - int(starts[sh])) * self.T
                    rows[j] = shards[sh][begin:begin + self.T + 1]
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


def eval_batches(path: str, split: str, block_size: int, batch_size: int, max_tokens: int | None = None,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
    """Yield (x, y) int64 CPU tensors (batch_size, block_size) covering `split` in order: windows start at 0, T,
    2T, ... within each shard, so every token but a shard's first is a target exactly once; short windows and the
    last batch are padded with x=0, y=-1 (ignored). Stops once max_tokens targets are covered (whole windows).
    Batch i goes to rank i % world_size; a rank left short gets an all-padding batch (FSDP needs equal forwards)."""
    import torch
    shards, T = open_split(path, split, vocab_size), block_size

    def windows():
        covered = 0
        for arr in shards:
            for start in range(0, len(arr) - 1, T):
                if max_tokens is not None and covered >= max_tokens:
                    return
                chunk = np.asarray(arr[start:start + T + 1], dtype=np.int64)
                covered += len(chunk) - 1
                yield chunk

    def padded(chunks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = np.zeros((batch_size, T), dtype=np.int64), np.full((batch_size, T), -1, dtype=np.int64)
        for n, chunk in enumerate(chunks):
            x[n, :len(chunk) - 1], y[n, :len(chunk) - 1] = chunk[:-1], chunk[1:]
        return torch.from_numpy(x), torch.from_numpy(y)

    chunks, i = windows(), 0
    while batch := list(itertools.islice(chunks, batch_size)):
        if i % world_size == rank:
            yield padded(batch)
        i += 1
    if rank >= i % world_size > 0:  # ranks i % world .. world-1 got one batch fewer than the others
        yield padded([])


def token_bytes(path: str) -> np.ndarray:
    """UTF-8 bytes each token id decodes to (0 for special tokens), from a prepared dataset."""
    try:
        return np.load(os.path.join(path, "token_bytes.npy"))
    except FileNotFoundError:
        raise DataError(f"{path}/token_bytes.npy is missing; prepare the dataset again") from None


class Prefetcher:
    """Training micro-batches in order from `start_step`, read `depth` ahead by a background thread (pinned, and
    copied non-blocking, on CUDA). A loader error surfaces from the `get()` that would have returned it. `waited`
    adds up the seconds `get()` spent blocked on the loader thread."""

    def __init__(self, loader: TrainLoader, start_step: int, grad_accum: int, device: torch.device, depth: int = 4):
        self.device, self.pin, self.waited = device, device.type == "cuda", 0.0
        self.queue, self.stop = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(loader, start_step, grad_accum), daemon=True)
        self.thread.start()

    def _fill(self, loader: TrainLoader, step: int, grad_accum: int) -> None:
        try:
            while not self.stop.is_set():
                for micro in range(grad_accum):
                    x, y = loader.batch(step, micro)
                    self._put((x.pin_memory(), y.pin_memory()) if self.pin else (x, y))
                step += 1
        except Exception as e:  # handed to the training loop, which raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                return self.queue.put(item, timeout=0.1)
            except queue.Full:
                pass

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        item = self.queue.get()
        self.waited += time.perf_counter() - t0
        if isinstance(item, Exception):
            raise item
        x, y = item
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
