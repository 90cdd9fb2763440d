"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, atomically published.

Layout: `out_dir/step_000500/` holds the DCP files of {"model", "optim"} (the sharded state dicts of
`torch.distributed.checkpoint.state_dict`, so N ranks save and M ranks load, DDP or FSDP2) plus
`train_state.json` (step, tokens seen, world size, resolved config). It is written as `out_dir/.tmp_step_000500/`
and renamed when complete; `out_dir/latest` (one line, the folder name) is replaced after that. A run killed at
any moment therefore leaves the previous checkpoint whole, and `latest` never names a partial one. An
asynchronous save copies the state to host memory and writes it from a background thread; it is published
the same way once written.
"""
import json
import os
import re
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "train_state.json"

# Without a process group DCP warns that it runs single-process; that is the intended use on one device.
warnings.filterwarnings("ignore", message=".*torch.distributed is (disabled|not initialized).*")
warnings.filterwarnings("ignore", message=".*process group.*not initialized.*")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, STATE_FILE))


def list_checkpoints(out_dir: str) -> list[str]:
    """Complete checkpoint folders in out_dir, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(out_dir) if (m := STEP_DIR.match(name))]
    return [os.path.join(out_dir, name) for _, name in sorted(found) if is_complete(os.path.join(out_dir, name))]


def find_latest(out_dir: str) -> str | None:
    """The checkpoint `out_dir/latest` names, else the newest complete one, else None."""
    try:
        with open(os.path.join(out_dir, "latest")) as f:
            path = os.path.join(out_dir, f.read().strip())
        if is_complete(path):
            return path
    except OSError:
        pass
    done = list_checkpoints(out_dir)
    return done[-1] if done else None


def resolve(path: str) -> str:
    """A run folder (-> its latest checkpoint) or a checkpoint folder -> the checkpoint folder."""
    if is_complete(path):
        return path
    found = find_latest(path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    return found


class Pending:
    """A checkpoint being written. `wait()` blocks until this rank's part is on disk, then (rank 0) publishes
    it: rename to its final name, point `latest` at it, drop old ones. Returns the final folder."""

    def __init__(self, out_dir: str, name: str, keep_last: int, future=None):
        self.out_dir, self.name, self.keep_last, self.future = out_dir, name, keep_last, future

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> str:
        if self.future is not None:
            self.future.result()  # re-raises a failed write
            self.future = None
            self._publish()
        return os.path.join(self.out_dir, self.name)

    def _publish(self) -> None:
        if _rank() != 0:
            return
        final, tmp = os.path.join(self.out_dir, self.name), os.path.join(self.out_dir, f".tmp_{self.name}")
        if os.path.exists(final):  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(os.path.join(self.out_dir, "latest"), self.name + "\n")
        _fsync_dir(self.out_dir)
        for old in list_checkpoints(self.out_dir)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def save(out_dir: str, step: int, model: torch.nn.Module, optimizer, train_state: dict, keep_last: int,
         async_group=False) -> Pending:
    """Write the checkpoint of `step` (every rank calls this). Synchronous by default: it is published when
    this returns. With `async_group` (a gloo process group, or None on one process) the state is copied to
    host memory and written by a background thread; `Pending.wait()` publishes it."""
    name = f"step_{step:06d}"
    tmp = os.path.join(out_dir, f".tmp_{name}")
    if _rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # left by a run killed mid-save
        os.makedirs(tmp)
        _write_atomic(os.path.join(tmp, STATE_FILE), json.dumps({**train_state, "step": step}, indent=1))
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if async_group is not False:
        return Pending(out_dir, name, keep_last, dcp.async_save(state, checkpoint_id=tmp, process_group=async_group))
    dcp.save(state, checkpoint_id=tmp)
    pending = Pending(out_dir, name, keep_last)
    pending._publish()
    _barrier()  # no rank starts the next save before this one is published
    return pending


def read_state(path: str) -> dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def load(path: str, model: torch.nn.Module, optimizer=None) -> dict:
    """Load model (and optimizer) state from a checkpoint folder in place; returns its train_state."""
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=path)
        set_model_state_dict(model, model_sd)
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return read_state(path)


def load_model(path: str, device) -> tuple:
    """A run folder or checkpoint folder -> (model in eval mode, its Config, the checkpoint folder)."""
    import config
    from model import build
    path = resolve(path)
    tree = read_state(path)["config"]
    cfg = config.build(tree, {k: f"{path}/{STATE_FILE}" for k in config._all_keys()})
    model = build(cfg.model, device)
    load(path, model)
    return model.eval(), cfg, path
