"""`train.py` with faults injected, for the fault tests: `python tests/faulty.py ARGS...` with FAULT set to a
comma-separated list of

    kill:POINT:N       SIGKILL this process the N-th time it reaches POINT (counted from this start):
                       step       after an optimizer step (the weights changed, nothing saved)
                       save       a save has begun: its temporary folder holds only train_state.json
                       data       DCP has written the data files but not `.metadata`
                       publish    the save is written but not yet renamed to its final name
                       latest     renamed, but `latest` still names the previous checkpoint
                       cleanup    half-way through deleting a checkpoint older than keep_last
    raise:RANK:STEP    rank RANK raises while loading the batch of step STEP (0-based)
    nan:RANK:A-B       the loss of rank RANK is NaN at 0-based steps A..B
    infgrad:A-B        the loss stays finite but its gradient is infinite at steps A..B
    skew:RANK:N        rank RANK makes N forwards more than the others in each eval.* sample (eval.LiveEval)
    oom:RANK:STEP      rank RANK's forward raises torch.OutOfMemoryError (as CUDA's allocator does) at step STEP
    kernel:RANK        rank RANK's (or every rank's, RANK *) chosen RMSNorm kernel raises at its first call, as
                       a fused kernel that does not compile on the installed torch would (step.first_step)
"""
import dataclasses
import os
import shutil
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import harness  # noqa: E402
import loader  # noqa: E402
import memory  # noqa: E402
import model  # noqa: E402
import optim  # noqa: E402
import train  # noqa: E402
from torch.distributed.checkpoint.filesystem import _FileSystemWriter  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
hits: dict[str, int] = {}
kills: dict[str, int] = {}
now = {"step": -1}  # the 0-based step being trained


def reach(point: str) -> None:
    hits[point] = hits.get(point, 0) + 1
    if kills.get(point) == hits[point]:
        print(f"faulty: SIGKILL at {point} #{hits[point]}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name: str, before=None, after=None) -> None:
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        out = real(*args, **kwargs)
        if after:
            after(*args, **kwargs)
        return out
    setattr(owner, name, wrapped)


def steps(spec: str) -> range:
    a, _, b = spec.partition("-")
    return range(int(a), int(b or a) + 1)


class InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def main() -> int:
    for fault in filter(None, os.environ.get("FAULT", "").split(",")):
        kind, *args = fault.split(":")
        if kind == "kill":
            kills[args[0]] = int(args[1])
        elif kind == "raise":
            rank, step = int(args[0]), int(args[1])
            real_batch = loader.TrainLoader.batch

            def failing_batch(self, s, micro, rank=rank, step=step, real_batch=real_batch):
                if self.rank == rank and s == step:
                    raise RuntimeError(f"injected failure on rank {rank}")
                return real_batch(self, s, micro)
            loader.TrainLoader.batch = failing_batch
        elif kind in ("nan", "infgrad"):
            rank, bad = (int(args[0]), steps(args[1])) if kind == "nan" else (RANK, steps(args[0]))
            real_forward = model.GPT.forward

            def forward(self, *a, rank=rank, bad=bad, kind=kind, real_forward=real_forward, **k):
                loss = real_forward(self, *a, **k)
                if self.training and RANK == rank and now["step"] in bad:
                    return loss * float("nan") if kind == "nan" else InfGrad.apply(loss)
                return loss
            model.GPT.forward = forward
        elif kind == "oom":
            rank, step = int(args[0]), int(args[1])
            real_forward = model.GPT.forward

            def forward(self, *a, rank=rank, step=step, real_forward=real_forward, **k):
                if self.training and RANK == rank and now["step"] == step:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                                                 "tests/faulty.py)")
                return real_forward(self, *a, **k)
            model.GPT.forward = forward
        elif kind == "kernel":
            real_resolve = memory.resolve

            def resolve(*a, rank=args[0], real_resolve=real_resolve, **k):
                run = real_resolve(*a, **k)
                if rank not in ("*", str(RANK)):
                    return run
                calls = {"n": 0}

                def broken(x, weight, eps, calls=calls):
                    calls["n"] += 1
                    raise RuntimeError(f"injected: this RMSNorm kernel does not compile (call {calls['n']})")
                ops = dataclasses.replace(run.ops, rms_norm=broken, fallback=run.ops.fallback or run.ops,
                                          names={**run.ops.names, "rms_norm": "broken (tests/faulty.py)"})
                return dataclasses.replace(run, ops=ops)
            memory.resolve = resolve
        elif kind == "skew":
            rank, extra = int(args[0]), int(args[1])
            real_sample = harness.LiveEval.sample

            def sample(self, prompt, rank=rank, extra=extra, real_sample=real_sample):
                if RANK == rank:
                    with self.autocast:
                        self.model.generate(torch.tensor([[0]], device=self.device), extra, temperature=0)
                return real_sample(self, prompt)
            harness.LiveEval.sample = sample
        else:
            raise SystemExit(f"faulty.py: unknown fault {fault!r}")

    real_set_lr = optim.set_lr

    def set_lr(optimizer, step, *a):  # called once per step, just before it runs
        now["step"] = step
        return real_set_lr(optimizer, step, *a)
    optim.set_lr = set_lr
    wrap(train, "train_step", after=lambda *a, **k: reach("step"))
    wrap(checkpoint.dcp, "save", before=lambda *a, **k: reach("save"))
    wrap(_FileSystemWriter, "finish", before=lambda *a, **k: reach("data"))
    wrap(checkpoint.Pending, "_publish", before=lambda *a, **k: reach("publish"))
    wrap(checkpoint, "write_atomic", before=lambda path, text: path.endswith("latest") and reach("latest"))

    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        if ".trash_step" in str(path) and os.path.isdir(path):
            files = sorted(os.listdir(path))
            if files:  # delete one file, then (maybe) die
                os.remove(os.path.join(path, files[0]))
            reach("cleanup")
        return real_rmtree(path, *a, **k)
    checkpoint.shutil.rmtree = rmtree
    return train.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
