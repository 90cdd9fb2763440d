"""`train.py` several times in one process: `python tests/train_each.py ARGS... -- ARGS... [-- ...]` runs
train.main on each group of arguments in turn and exits with the first non-zero status. Under torchrun one launch
then covers several runs (each joins and leaves the process group), which saves a launch's start-up per run.

A group `--copy SRC DST` copies the folder SRC to DST (rank 0, before the next run joins its group): a run that
resumes a checkpoint an earlier run of the same launch wrote.

Rank 0 prints `train_each: run I` once every rank has joined run I's group (so every line of the runs before it,
from any rank, is above it: torchrun's workers write unbuffered) and `train_each: run I exited RC` after it;
`sections()` splits a launch's stdout into its runs' parts by those lines."""
import os
import re
import shutil
import sys
from datetime import timedelta

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import train  # noqa: E402

HEADER = re.compile(r"^train_each: run (\d+)$", re.M)


def sections(stdout: str) -> dict[int, str]:
    """Run index -> the part of a launch's stdout that run printed (its `exited` line included)."""
    marks = list(HEADER.finditer(stdout))
    return {int(m[1]): stdout[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(stdout)]
            for i, m in enumerate(marks)}


def main(argv: list[str]) -> int:
    groups, current = [], []
    for a in argv + ["--"]:
        if a == "--":
            groups.append(current)
            current = []
        else:
            current.append(a)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    runs = 0
    for i, args in enumerate(groups):
        if args[:1] == ["--copy"]:
            if rank == 0:
                shutil.copytree(args[1], args[2])
            continue
        if world > 1:  # each run's group on keys of its own in torchrun's store (train.main leaves the group)
            store, rank, _ = next(dist.rendezvous("env://"))
            timeout = timedelta(seconds=config.load(args).train.dist_timeout_s)  # as train.main's own join
            dist.init_process_group("gloo", store=dist.PrefixStore(f"run{i}/", store), rank=rank, world_size=world,
                                    timeout=timeout)
            dist.barrier()  # every rank is done with the run before
        if rank == 0:
            print(f"train_each: run {runs}", flush=True)
        rc = train.main(args)
        if rank == 0:
            print(f"train_each: run {runs} exited {rc}", flush=True)
        if rc:
            return rc
        runs += 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
