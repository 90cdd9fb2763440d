"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, atomically published.

Layout: `out_dir/step_000500/` holds the DCP files of {"model", "optim"} (the sharded state dicts of
`torch.distributed.checkpoint.state_dict`, so N ranks save and M ranks load, DDP or FSDP2) plus `train_state.json`
(step, tokens seen, world size, resolved config). It is written as `out_dir/.tmp_step_000500/` and renamed when
complete; `out_dir/latest` (one line, the folder name) is replaced after that. A run killed at any moment therefore
leaves the previous checkpoint whole, and `latest` never names a partial one, an asynchronous save's (`save`) too.

The folder may also be an fsspec URL (`s3://bucket/run`, with s3fs; credentials and endpoint from the usual
AWS_* environment). Object stores cannot rename a folder, so there a checkpoint is written under its final
name: `train_state.json` first, DCP's data files, DCP's `.metadata` last; a folder counts as complete only with
both files, and `latest` (one PUT, atomic) is replaced after that, so it still never names a partial one.

Every file of a checkpoint is hashed (xxh3-128) before `.metadata` is written, into `checksums.json`; loading
checks the hashes first (`verify`) and names a file that does not match. A run resumes from the newest checkpoint
that verifies: one that does not is moved aside to `corrupt_step_N/` (kept for a look, never counted again) and
the run says so. A new checkpoint is read back and verified before older ones are dropped by `keep_last`.

Loading never runs code from the checkpoint: DCP's pickled index (`.metadata`) goes through an unpickler that
admits only DCP's own metadata classes, the non-tensor values (the optimizer's hyperparameters) through
`torch.load(weights_only=True)`. Anything else is refused with a CheckpointError before it is constructed.
"""
import io
import json
import os
import pickle
import platform
import re
import shutil
import threading
import time
import warnings
from contextlib import suppress

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
import xxhash

from config import ConfigError

STEP_DIR = re.compile(r"^step_(\d{6,})$")
# Frozen parameters (a LoRA run's base) are rebuilt, not saved: a checkpoint holds what trains and its optimizer state
TRAINED = StateDictOptions(ignore_frozen_params=True)
TRAINED_LOAD = StateDictOptions(ignore_frozen_params=True, strict=False)  # the keys are checked first (`_fits`)
STATE_FILE = "train_state.json"
SUMS_FILE = "checksums.json"

# Without a process group DCP warns that it runs single-process; that is the intended use on one device.
warnings.filterwarnings("ignore", message=".*torch.distributed is (disabled|not initialized).*")
warnings.filterwarnings("ignore", message=".*process group.*not initialized.*")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unsafe, unreadable, or of another model), with a message for the user."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files do not match their checksums or cannot be parsed: an older one can stand in."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (full disk, lost storage); the previous one is intact."""


def _first_failure(e: BaseException) -> BaseException:
    """The error behind DCP's CheckpointException (which gathers every rank's), else `e` itself."""
    if isinstance(e, dcp.CheckpointException) and e.failures:
        first = next(iter(e.failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return e


# Every global a DCP `.metadata` pickle names (torch 2.13; checked by tests/test_faults.py on real checkpoints).
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dtype and (module, name) not in _METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a DCP checkpoint index never holds")
        return super().find_class(module, name)


class _SafeIndex:
    """Mixed into DCP's readers: the `.metadata` index through the allow-listing unpickler."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise CheckpointError(f"refusing to load {path}: {e}") from None
        if not isinstance(metadata, dcp.Metadata):
            raise CheckpointError(f"refusing to load {path}: it holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(dcp.DefaultLoadPlanner):
    """DCP's default planner (it flattens), but non-tensor values are read with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refusing to load the value of {read_item.dest_index.fqn}: "
                                  f"{str(e).splitlines()[0]}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:  # a flat state dict of the checkpoint's own keys (`load`'s check of the parameter groups)
            self.state_dict[read_item.dest_index.fqn] = obj


def file_digest(path: str) -> str:
    """xxh3-128 of a local file or an fsspec URL, read in 8 MB pieces: the checksum of token shards and checkpoints."""
    h = xxhash.xxh3_128()
    with _fs(path).open(path, "rb") if is_remote(path) else open(path, "rb") as f:
        while piece := f.read(8 << 20):
            h.update(piece)
    return h.hexdigest()


class _Checksummed:
    """Mixed into DCP's writers: `finish()` runs on the coordinator after every rank has written its files and
    before `.metadata` (the file that makes the folder count as complete); it hashes the files first."""

    def finish(self, metadata, results) -> None:
        names = sorted({r.storage_data.relative_path for rank in results for r in rank} | {STATE_FILE})
        sums = {name: self._hash(name) for name in names}
        self._write_sums(sums)
        super().finish(metadata, results)
        # the index too (written just now); a kill before this line leaves a list without it, still consistent
        self._write_sums({**sums, ".metadata": self._hash(".metadata")})

    def _hash(self, name: str) -> str:
        return file_digest(_join(str(self.path), name))

    def _write_sums(self, sums: dict) -> None:
        with self.fs.create_stream(self.fs.concat_path(self.path, SUMS_FILE), "wb") as f:
            f.write(json.dumps(sums, indent=1).encode())


def _writer(path: str, checksums: bool = True):
    """DCP's writer for a folder or an fsspec URL, hashing the files into checksums.json unless told not to."""
    base = dcp.FileSystemWriter
    if is_remote(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter as base
    return type("_ChecksummedWriter", (_Checksummed, base), {})(path) if checksums else base(path)


def verify_files(path: str) -> None:
    """Hash every file `checksums.json` lists and compare; raises CorruptCheckpoint naming the first file that is
    missing or differs. A checkpoint written before checksums existed has no list and passes."""
    try:
        sums = json.loads(_read_text(_join(path, SUMS_FILE)))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{_join(path, SUMS_FILE)} is unreadable ({e})") from None
    for name, want in sums.items():
        file = _join(path, name)
        try:
            got = file_digest(file)
        except FileNotFoundError:
            raise CorruptCheckpoint(f"checkpoint {path} is missing {name}") from None
        if got != want:
            raise CorruptCheckpoint(f"checkpoint {path}: {name} does not match its checksum (the file changed or "
                                  f"is damaged since it was written)")


def _reader(path: str):
    """DCP's reader for a folder or an fsspec URL, reading the index through the allow-listing unpickler."""
    base = dcp.FileSystemReader
    if is_remote(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader as base
    return type("_SafeReader", (_SafeIndex, base), {})(path)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def is_remote(path: str) -> bool:
    """Whether `path` is an fsspec URL (s3://, gs://, ...) rather than a local folder."""
    return "://" in path and not path.startswith("file://")


def _fs(path: str):
    import fsspec
    try:
        fs = fsspec.core.url_to_fs(path)[0]
    except ImportError as e:  # fsspec names the package, e.g. "Install s3fs to access S3"
        raise CheckpointError(f'{path}: {e} (for s3://: pip install ".[s3]")') from None
    fs.invalidate_cache()  # listings cached by s3fs would miss what DCP's writer (or another run) just wrote
    return fs


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if is_remote(folder) else os.path.join(folder, name)


def _rmtree(path: str) -> None:
    """Delete a checkpoint folder. Locally it is first renamed to `.trash_*` (atomic), so a run killed while
    deleting never leaves a half-deleted folder under a name that looks complete."""
    if is_remote(path):
        fs = _fs(path)
        if fs.exists(_join(path, ".metadata")):
            fs.rm(_join(path, ".metadata"))  # first: the folder stops counting as complete at once
        if fs.exists(path):
            fs.rm(path, recursive=True)
    elif os.path.exists(path):
        head, name = os.path.split(path.rstrip("/"))
        trash = os.path.join(head, f".trash_{name.removeprefix('.tmp_')}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clean(out_dir: str) -> list[str]:
    """Remove what a killed run left behind in a local out_dir (partial `.tmp_*` saves, `.trash_*` deletions);
    returns their names. Call only while holding the run's lock."""
    left = [n for n in _listdir(out_dir) if n.startswith((".tmp_step_", ".trash_"))] if not is_remote(out_dir) else []
    for name in left:
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return left


def discard(tmp: str) -> None:
    """Remove the folder of a save whose write failed (rank 0); a complete one in an object store stays."""
    if _rank() == 0 and not (is_remote(tmp) and is_complete(tmp)):
        _rmtree(tmp)


def _read_text(path: str) -> str:
    if is_remote(path):
        return _fs(path).cat_file(path).decode()
    with open(path) as f:
        return f.read()


def write_atomic(path: str, text: str) -> None:
    """Replace the file `path` with `text` durably: a reader (or a run killed meanwhile) sees the old or the new one."""
    if is_remote(path):
        _fs(path).pipe_file(path, text.encode())  # one PUT: readers see the old object or the new one
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name != "nt":  # the rename reaches the disk with its folder (Windows opens no folder; NTFS journals it)
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_complete(path: str) -> bool:
    isfile = _fs(path).isfile if is_remote(path) else os.path.isfile
    return isfile(_join(path, ".metadata")) and isfile(_join(path, STATE_FILE))


def _listdir(path: str) -> list[str]:
    if is_remote(path):
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in _fs(path).ls(path, detail=False)]
        except FileNotFoundError:
            return []
    return os.listdir(path) if os.path.isdir(path) else []


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoint folders in out_dir, oldest first."""
    found = [(int(m.group(1)), name) for name in _listdir(out_dir) if (m := STEP_DIR.match(name))]
    return [_join(out_dir, name) for _, name in sorted(found) if is_complete(_join(out_dir, name))]


def find_latest(out_dir: str) -> str | None:
    """The checkpoint `out_dir/latest` names, else the newest complete one, else None."""
    with suppress(OSError):  # no readable `latest` (yet): the newest complete one stands in
        path = _join(out_dir, _read_text(_join(out_dir, "latest")).strip())
        if is_complete(path):
            return path
    done = list_checkpoints(out_dir)
    return done[-1] if done else None


def resolve(path: str) -> str:
    """A run folder (-> its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    if is_complete(path):
        return path
    if (found := find_latest(path)) is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return found


class Pending:
    """A checkpoint being written to `tmp` (`.tmp_step_N` locally; its final name in an object store). `wait()`
    blocks until this rank's part is written, then (rank 0) publishes it and returns the final folder."""

    def __init__(self, out_dir: str, name: str, keep_last: int, checksums: bool):
        self.out_dir, self.name, self.keep_last, self.checksums = out_dir, name, keep_last, checksums
        self.tmp = _join(out_dir, name if is_remote(out_dir) else f".tmp_{name}")
        self.future = None  # an asynchronous save's write

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> str:
        """Raises SaveError (after removing the partial folder) when the write failed."""
        if self.future is not None:
            future, self.future = self.future, None
            try:
                future.result()  # re-raises a failed write
                self._publish()
            except (OSError, dcp.CheckpointException, CheckpointError) as e:
                raise self._failed(e) from None
        return _join(self.out_dir, self.name)

    def _publish(self) -> None:
        if _rank() != 0:
            return
        # read back before anything older can be dropped: keep_last never trades a good checkpoint for a bad one
        if self.checksums:
            verify_files(self.tmp)
        if not is_remote(self.out_dir):  # remote checkpoints were written under their final name
            final = os.path.join(self.out_dir, self.name)
            _rmtree(final)  # the same step saved again (e.g. after a resume): replace it
            os.rename(self.tmp, final)
        write_atomic(_join(self.out_dir, "latest"), self.name + "\n")  # makes the rename durable too
        for old in list_checkpoints(self.out_dir)[:-self.keep_last]:
            _rmtree(old)

    def _failed(self, e: BaseException) -> SaveError:
        """Drop the unfinished save and describe the failure (DCP wraps each rank's error)."""
        e = _first_failure(e)
        with suppress(OSError):
            discard(self.tmp)
        return SaveError(f"writing checkpoint {self.name} failed ({type(e).__name__}: {e}); the previous "
                         f"checkpoint ({find_latest(self.out_dir) or 'none yet'}) is intact")


def save(out_dir: str, step: int, model: torch.nn.Module, optimizer, train_state: dict, keep_last: int,
         async_group=False, checksums: bool = True) -> Pending:
    """Write the checkpoint of `step` (every rank calls this). Synchronous by default: it is published when
    this returns. With `async_group` (a gloo process group, or None on one process) the state is copied to
    host memory and written by a background thread; `Pending.wait()` publishes it. A failed write (a full
    disk) raises SaveError from here or from `wait()`, with the partial folder removed. `checksums=False`
    (bench.py's comparison only) writes no checksums.json and skips the read-back."""
    pending = Pending(out_dir, f"step_{step:06d}", keep_last, checksums)
    tmp = pending.tmp
    try:
        if _rank() == 0:
            _rmtree(tmp)  # an older save of this step (a run killed mid-save), if any
            if not is_remote(tmp):
                os.makedirs(tmp)
            write_atomic(_join(tmp, STATE_FILE), json.dumps({**train_state, "step": step}, indent=1))
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINED)
        state = {"model": model_sd, "optim": optim_sd}
        if async_group is not False:
            pending.future = dcp.async_save(state, checkpoint_id=tmp, process_group=async_group,
                                            storage_writer=_writer(tmp, checksums))
            return pending
        dcp.save(state, checkpoint_id=tmp, storage_writer=_writer(tmp, checksums))
        pending._publish()
    except (OSError, dcp.CheckpointException, CheckpointError) as e:
        raise pending._failed(e) from None
    _barrier()  # no rank starts the next save before this one is published
    return pending


def read_state(path: str) -> dict:
    """A checkpoint's train_state.json; raises CorruptCheckpoint naming the file when it is not valid JSON."""
    file = _join(path, STATE_FILE)
    try:
        state = json.loads(_read_text(file))
    except ValueError as e:
        raise CorruptCheckpoint(f"{file} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptCheckpoint(f"{file} does not hold a training state (no 'step')")
    return state


def set_aside(path: str) -> str:
    """Move a corrupt checkpoint aside as `corrupt_step_N`, kept but never loaded or counted again; returns its name."""
    head, name = path.rstrip("/").rsplit("/", 1) if is_remote(path) else os.path.split(path.rstrip("/"))
    exists = _fs(path).exists if is_remote(path) else os.path.exists
    n, dest = 0, _join(head, f"corrupt_{name}")
    while exists(dest):
        n += 1
        dest = _join(head, f"corrupt_{name}.{n}")
    if is_remote(path):
        _fs(path).mv(path, dest, recursive=True)
    else:
        os.rename(path, dest)
    return dest


class Lease:
    """The lock of a remote checkpoint folder: `.lease.json` names its holder and when it was last renewed.
    `acquire()` refuses while another holder renewed it within `minutes`, else takes it over; a daemon thread renews
    it every minutes/4; `release()` deletes it. Two runs starting in the same instant both write it; each reads it
    back after a moment and only the one whose write stayed goes on."""

    def __init__(self, folder: str, minutes: float):
        self.folder, self.path, self.minutes = folder, _join(folder, ".lease.json"), minutes
        self.holder = f"pid {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
        self.stop, self.thread = threading.Event(), threading.Thread(target=self._renew, daemon=True)

    def _read(self) -> dict | None:
        try:
            return json.loads(_read_text(self.path))
        except (FileNotFoundError, ValueError):  # none, or one cut short by a crash: it holds nobody
            return None

    def _write(self) -> None:
        with _fs(self.path).open(self.path, "wb") as f:
            f.write(json.dumps({"holder": self.holder, "renewed": time.time()}).encode())

    def acquire(self, settle_s: float = 1.0) -> None:
        """Take the lease or raise CheckpointError naming its holder."""
        held = self._read()
        if held and held.get("holder") != self.holder:
            age = time.time() - held.get("renewed", 0)
            if age < 60 * self.minutes:
                raise CheckpointError(f"{self.folder} is in use by another run ({held['holder']}; its "
                                      f"lease was renewed {age:.0f} s ago); wait for it to end, use another "
                                      f"train.ckpt_dir, or wait {self.minutes:g} minutes after it died "
                                      f"(train.lease_minutes) and its lease can be taken over")
        self._write()
        time.sleep(settle_s)
        held = self._read()
        if not held or held.get("holder") != self.holder:
            raise CheckpointError(f"{self.path} was taken by another run starting at the same time "
                                  f"({held['holder'] if held else 'unknown'})")
        self.thread.start()

    def _renew(self) -> None:
        while not self.stop.wait(15 * self.minutes):  # every minutes/4
            try:
                held = self._read()
                if held and held.get("holder") != self.holder:
                    print(f"warning: another run took over {self.path} ({held['holder']}); this run no longer "
                          f"renews it", flush=True)
                    return
                self._write()
            except OSError as e:  # storage briefly unreachable: try again at the next turn
                print(f"warning: renewing {self.path} failed ({e})", flush=True)

    def release(self) -> None:
        self.stop.set()
        with suppress(OSError):
            held = self._read()
            if held and held.get("holder") == self.holder:
                _fs(self.path).rm(self.path)


def find_resumable(out_dir: str, model: torch.nn.Module, warn, check=lambda state, path: None) -> str | None:
    """The newest checkpoint in `out_dir` whose state and `verify` pass, `latest` pointed at it; each newer damaged
    one is set aside with a warning through `warn`. `check(state, path)` may refuse one by raising. An unsafe or foreign
    checkpoint raises CheckpointError: that is not damage, and an older checkpoint would hide it. Rank 0 only."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            check(read_state(path), path)
            verify(path, model)
        except CorruptCheckpoint as e:
            warn(f"warning: {e}. Moved it aside to {set_aside(path)}; trying the checkpoint before it.")
            continue
        if find_latest(out_dir) != path:
            write_atomic(_join(out_dir, "latest"), path.rstrip("/").rsplit("/", 1)[-1] + "\n")
        return path
    return None


def _fits(path: str, metadata, model_sd: dict, part: bool = False) -> None:
    """Raise a CheckpointError naming the keys and shapes where checkpoint and model differ."""
    saved = {k[len("model."):]: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(v, dcp.TensorStorageMetadata)}
    want = {k: tuple(v.shape) for k, v in model_sd.items()}

    def some(keys):
        return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    problems = []
    if missing := sorted(set(want) - set(saved)):
        problems.append(f"missing from the checkpoint: {some(missing)}")
    if (extra := sorted(set(saved) - set(want))) and not part:
        problems.append(f"not in the model: {some(extra)}")
    if shapes := [f"{k} {saved[k]} vs {want[k]}" for k in want if k in saved and saved[k] != want[k]]:
        problems.append(f"shapes differ (checkpoint vs model): {some(shapes)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this model; " + "; ".join(problems))


def verify(path: str, model: torch.nn.Module) -> None:
    """Check that checkpoint `path` is safe to open, fits `model` (a model on the meta device will do) and that
    every file matches its checksum; raises CheckpointError (CorruptCheckpoint for damage) naming what differs."""
    verify_files(path)  # first: damage is told apart from a foreign or unsafe checkpoint
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    _fits(path, _reader(path).read_metadata(), {k: v for k, v in model.state_dict().items() if k not in frozen})


def load(path: str, model: torch.nn.Module, optimizer=None, verified: bool = False) -> dict:
    """Load model (and optimizer) state from a checkpoint folder in place; returns its train_state.
    Raises CheckpointError for an unsafe, damaged (checksums; skipped when `verified` says that was just done),
    unreadable or mismatched checkpoint, before the model is touched."""
    if not verified:
        verify_files(path)
    if optimizer is None:
        model_sd = get_model_state_dict(model, options=TRAINED)
        _load(path, {"model": model_sd}, part=hasattr(model, "stages"))
        set_model_state_dict(model, model_sd, options=TRAINED_LOAD)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=TRAINED)
        # the optimizer's state only: its hyperparameters come from the config, and under pipeline parallel each rank
        # saved its own parameter groups, of which the checkpoint kept one rank's (`_load` reads them, unapplied)
        _load(path, {"model": model_sd, "optim": {"state": optim_sd["state"]}}, part=hasattr(model, "stages"))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=TRAINED_LOAD)
    return read_state(path)


def load_base(path: str, model: torch.nn.Module, skip=lambda name: False) -> None:
    """The weights of checkpoint `path` (a run of ours, verified here) into `model`'s parameters of the same names,
    in place and resharded as `model` is; parameters named by `skip` (LoRA adapters) are left alone."""
    verify_files(path)
    model_sd = {k: v for k, v in get_model_state_dict(model).items() if not skip(k)}
    _load(path, {"model": model_sd})
    set_model_state_dict(model, model_sd, options=StateDictOptions(strict=False))


def _load(path: str, state: dict, part: bool = False) -> None:
    """DCP-load `state` in place after checking that the checkpoint's model tensors are the ones it asks for (all of
    them, unless the model is `part` of one: a pipeline stage's)."""
    reader = _reader(path)
    metadata = reader.read_metadata()
    _fits(path, metadata, state["model"], part)
    # with the optimizer: its saved parameter groups are read too, unapplied, so that a checkpoint holding anything
    # but plain values there is refused (RELIABILITY.md, promise 10)
    groups = dict.fromkeys(k for k, v in metadata.state_dict_metadata.items() if "optim" in state and
                           k.startswith("optim.param_groups.") and isinstance(v, dcp.metadata.BytesStorageMetadata))
    try:
        dcp.load(state, checkpoint_id=path, storage_reader=reader, planner=_SafePlanner())
        if groups:
            dcp.load(groups, checkpoint_id=path, storage_reader=reader, planner=_SafePlanner(flatten_state_dict=False))
    except dcp.CheckpointException as e:
        first = _first_failure(e)
        if isinstance(first, CheckpointError):
            raise first from None
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable ({type(first).__name__}: {first})") from None


def tokenizer_dir(path: str, cfg) -> str:
    """The run's tokenizer copy for checkpoint `path`: beside it, or in the local out_dir when it is remote."""
    return os.path.join(cfg.train.out_dir if is_remote(path) else os.path.dirname(path), "tokenizer")


def lock_run(t) -> tuple:
    """Take the run's folders (rank 0): out_dir's lock, a local ckpt_dir checked writable and not another run's
    out_dir, a remote one's lease. Returns (the lock file, the lease or None, the paths taking them created), for the
    caller to release, or to `abandon_run` when the run is refused before it starts."""
    made = [path for folder in dict.fromkeys([t.out_dir, t.ckpt_dir or t.out_dir]) if not is_remote(folder)
            for path in (folder, os.path.join(folder, ".lock")) if not os.path.exists(path)]
    lock = _lock(t.out_dir)
    if not t.ckpt_dir:
        return lock, None, made
    try:
        if is_remote(t.ckpt_dir):  # an object store has no locks: a lease
            lease = Lease(t.ckpt_dir, t.lease_minutes)
            lease.acquire()
            return lock, lease, made
        if os.path.realpath(t.ckpt_dir) != os.path.realpath(t.out_dir):
            _lock(t.ckpt_dir).close()  # closing drops the lock
    except BaseException:
        lock.close()
        raise
    return lock, None, made


def abandon_run(lock, made: list[str]) -> None:
    """Release the lock of a run refused before it started and remove what taking it created: the lock files, then
    their folders while still empty. A refused run leaves nothing behind."""
    lock.close()
    for path in reversed(made):
        with suppress(OSError):
            if os.path.isdir(path):
                os.rmdir(path)
            else:
                os.remove(path)


def _lock(out_dir: str):
    """Create out_dir, check that it is writable and take its lock, so that a second run on the same folder stops
    before it writes anything. The lock is a POSIX record lock on `out_dir/.lock` (honoured over NFS); the kernel
    drops it when the process ends, kill -9 included, so it never goes stale. Returns the open lock file."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise ConfigError(f"train.out_dir {out_dir} is not writable ({e.strerror or e})") from None
    try:
        if os.name == "nt":  # no POSIX record locks: a byte-range lock, also dropped by the OS when the process ends
            import msvcrt
            f.seek(2**30)  # far past the text: such locks are mandatory, and the holder line must stay readable
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise ConfigError(f"train.out_dir {out_dir} is in use by another run ({holder}); wait for it to "
                                 f"end or choose another train.out_dir") from None
    try:
        f.truncate(0)  # "a+": the write below lands at the (new) end
        f.write(f"pid {os.getpid()} on {platform.node()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
    except OSError as e:
        f.close()
        raise ConfigError(f"train.out_dir {out_dir} is not writable ({e.strerror or e})") from None
    return f
