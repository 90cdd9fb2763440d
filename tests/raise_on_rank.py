"""`train.py` whose rank 1 fails while loading the batch of step 2 (used by test_distributed.py).

The other rank is then inside a collective; the launch must end with an error, not hang."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import loader  # noqa: E402
import train  # noqa: E402

real_batch = loader.TrainLoader.batch


def failing_batch(self, step, micro_step):
    if self.rank == 1 and step == 2:
        raise RuntimeError("injected failure on rank 1")
    return real_batch(self, step, micro_step)


loader.TrainLoader.batch = failing_batch
sys.exit(train.main(sys.argv[1:]))
