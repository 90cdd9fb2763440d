"""Runs where Python runs: the entry points import on a Python without the POSIX-only modules (Windows)."""
import subprocess
import sys

from conftest import ROOT

# None in sys.modules makes `import fcntl` raise ImportError, as on Windows.
WITHOUT_POSIX = """
import sys
sys.modules["fcntl"] = sys.modules["resource"] = None
import sample, eval
import checkpoint, hardware, kernel, tokenizer  # what their main() imports
assert "train" not in sys.modules, "sample.py or eval.py imports train.py"
import train
print("imported")
"""


def test_train_sample_eval_import_without_fcntl_and_resource():
    r = subprocess.run([sys.executable, "-c", WITHOUT_POSIX], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["imported"], r.stderr[-3000:]
