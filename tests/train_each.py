"""`train.py` several times in one process: `python tests/train_each.py ARGS... -- ARGS... [-- ...]` runs
train.main on each group of arguments in turn and exits with the first non-zero status. Under torchrun one launch
then covers several runs (each joins and leaves the process group), which saves a launch's start-up per run."""
import os
import sys
from datetime import timedelta

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


def main(argv: list[str]) -> int:
    groups, current = [], []
    for a in argv + ["--"]:
        if a == "--":
            groups.append(current)
            current = []
        else:
            current.append(a)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for i, args in enumerate(groups):
        if world > 1:  # each run's group on keys of its own in torchrun's store (train.main leaves the group)
            store, rank, _ = next(dist.rendezvous("env://"))
            dist.init_process_group("gloo", store=dist.PrefixStore(f"run{i}/", store), rank=rank, world_size=world,
                                    timeout=timedelta(seconds=120))
        if rc := train.main(args):
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
