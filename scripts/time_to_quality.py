"""Run one recipe of the time-to-quality table (BENCHMARKS.md) for a fixed number of steps and record its
held-out bits per byte; the step count stands for a wall-clock budget (see BENCHMARKS.md for how it was set).

    python scripts/time_to_quality.py NAME STEPS SEED [section.key=value ...]
    python scripts/time_to_quality.py --table      # results.jsonl as a markdown table: per name, each seed

Trains configs/tiny.yaml with the overrides (no time budget, one eval at the end over train.eval_batches
val micro-batches) into out/ttq/NAME_sSEED and appends {name, seed, steps, seconds, val_bpb, val_loss,
overrides} to out/ttq/results.jsonl. Steps are deterministic, so other load on the machine changes only the
seconds, not the result.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def table() -> None:
    rows = {}
    with open(os.path.join(ROOT, "out", "ttq", "results.jsonl")) as f:
        for row in map(json.loads, f):
            rows.setdefault(row["name"], []).append(row)
    print("| name | steps | overrides | val bpb per seed | mean |")
    print("| --- | --- | --- | --- | --- |")
    for name, rs in rows.items():
        bpb = [r["val_bpb"] for r in rs]
        print(f"| {name} | {rs[0]['steps']} | `{' '.join(rs[0]['overrides'])}` | "
              f"{' / '.join(f'{b:.4f}' for b in bpb)} | {sum(bpb) / len(bpb):.4f} |")


def main(argv: list[str]) -> int:
    if argv == ["--table"]:
        table()
        return 0
    if len(argv) < 3:
        print(__doc__)
        return 2
    name, steps, seed, overrides = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    out = os.path.join("out", "ttq", f"{name}_s{seed}")
    cmd = [sys.executable, "train.py", "configs/tiny.yaml", "train.max_minutes=0", f"train.max_steps={steps}",
           f"train.eval_interval={steps}", "train.ckpt_interval=1000000", f"train.seed={seed}",
           f"train.out_dir={out}", "train.resume=false", *overrides]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
        return r.returncode
    with open(os.path.join(ROOT, out, "metrics.jsonl")) as f:
        last = [row for row in map(json.loads, f) if "val_bpb" in row][-1]
    row = {"name": name, "seed": seed, "steps": steps, "seconds": round(seconds, 1), "val_bpb": last["val_bpb"],
           "val_loss": last["val_loss"], "overrides": overrides}
    with open(os.path.join(ROOT, "out", "ttq", "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
